"""Our model against transformers' implementation of the same checkpoint, family by family.

Each family's checkpoint is written by transformers (random weights, biases and norms; see
tests/hf_builders.py) and loaded by both libraries. Logits must agree within 1e-4 in fp32, with
and without left padding, and a checkpoint that peftloop saves must load in transformers.
"""

import json

import pytest
import torch

from peftloop.models import load_pretrained, save_pretrained
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM, rope_inverse_frequencies
from tests.hf_builders import FAMILIES, build_checkpoint, load_reference

transformers = pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")

ATOL = 1e-4  # fp32; the measured differences are ~2e-6 (docs/models.md)
SEQ = 12  # longer than the sliding windows of the mistral (5) and qwen2-sliding (4) checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_checkpoint(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


def inputs(vocab_size: int, seed: int = 0):
    """Two rows of SEQ tokens; the first is left-padded by 3 (mask 0, positions counting real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, family):
    folder = checkpoints[family]
    ours, theirs = load_pretrained(folder, dtype="fp32"), load_reference(folder)
    ids, mask, positions = inputs(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=ATOL)
        padded_ours = ours(ids, attention_mask=mask, position_ids=positions)
        padded_theirs = theirs(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(padded_ours[real], padded_theirs[real], rtol=0, atol=ATOL)


def test_the_family_switches_change_the_model(checkpoints):
    """The parity above would not notice a switch that has no effect on these inputs: check that
    turning each one off changes the logits (so the test could fail if we ignored it)."""
    ids = inputs(100)[0]
    for family, switch in [("mistral", {"sliding_window": None}), ("qwen2-sliding", {"sliding_window": None}),
                           ("llama3", {"rope_scaling": None})]:
        model = load_pretrained(checkpoints[family])
        plain = LlamaForCausalLM(LlamaConfig(**{**model.config.__dict__, **switch}))
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (model(ids) - plain(ids)).abs().max() > 1e-3, family


def test_config_flags_per_family(checkpoints):
    config = {family: load_pretrained(folder).config for family, folder in checkpoints.items()}
    qwen2 = config["qwen2"]
    assert qwen2.qkv_bias and not qwen2.attention_bias and qwen2.tie_word_embeddings
    assert config["qwen3"].qk_norm and config["qwen3"].head_dim == 24
    assert config["qwen3-bias"].attention_bias
    assert config["llama-bias"].attention_bias and config["llama-bias"].mlp_bias
    assert config["mistral"].sliding_window == 5 and config["mistral"].layer_types is None
    assert config["qwen2-sliding"].layer_types == ["full_attention", "sliding_attention"]
    assert config["qwen2"].sliding_window is None  # use_sliding_window is false
    assert config["llama3"].rope_scaling["rope_type"] == "llama3" and config["llama3"].rope_theta == 500000.0


def test_llama3_rope_frequencies_match_transformers(checkpoints):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = checkpoints["llama3"]
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inverse_frequencies(load_pretrained(folder).config)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2-sliding", "qwen3-bias", "smollm"])
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path, family):
    ours = load_pretrained(checkpoints[family])
    save_pretrained(ours, tmp_path / "saved", copy_from=checkpoints[family])
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not {"qkv_bias", "qk_norm", "extra", "layer_types" if family == "mistral" else ""} & set(written)
    assert written["model_type"] == FAMILIES[family][0]
    theirs = load_reference(tmp_path / "saved")
    ids = inputs(ours.config.vocab_size)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=ATOL)
    assert (tmp_path / "saved" / "tokenizer.json").is_file()


def test_bf16_load_matches_transformers_bf16(checkpoints):
    folder = checkpoints["qwen2"]
    ours = load_pretrained(folder, dtype="bf16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    theirs = load_reference(folder, dtype=torch.bfloat16)
    ids = inputs(ours.config.vocab_size)[0][:, :6]
    with torch.no_grad():
        diff = (ours(ids).float() - theirs(ids).logits.float()).abs().max()
    assert diff < 0.1  # bf16 keeps ~3 significant digits; logits are O(3)
