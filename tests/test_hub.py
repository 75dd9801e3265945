"""Loading checkpoints: hub ids through a local hub cache (offline), revisions, sharded files,
dtypes, and the errors a broken folder gives."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftloop.hub import ModelNotFoundError, resolve_model
from peftloop.models import CheckpointFormatError, load_pretrained, safetensors_io, save_pretrained
from peftloop.tokenizer import Tokenizer
from tests.helpers import tiny_model
from tests.hf_builders import install_in_hub_cache, save_tokenizer_files

COMMIT = "abcdef0123" * 4


@pytest.fixture
def folder(tmp_path):
    model = tiny_model(seed=2, vocab_size=320, tie_word_embeddings=True)
    save_pretrained(model, tmp_path / "model")
    save_tokenizer_files(tmp_path / "model", "chatml")
    return tmp_path / "model"


@pytest.fixture
def offline_cache(tmp_path, folder, monkeypatch):
    cache = tmp_path / "hub"
    install_in_hub_cache(cache, "tiny-org/tiny-model", folder, commit=COMMIT, refs=("main", "v1.0"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network
    return cache


def logits(model):
    with torch.no_grad():
        return model(torch.arange(3, 11)[None])


def test_a_hub_id_loads_from_the_cache_offline(offline_cache, folder):
    expected = logits(load_pretrained(folder))
    for revision in (None, "main", "v1.0", COMMIT):
        model = load_pretrained("tiny-org/tiny-model", revision=revision, cache_dir=offline_cache)
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    path = resolve_model("tiny-org/tiny-model", cache_dir=offline_cache)
    assert path == offline_cache / "models--tiny-org--tiny-model" / "snapshots" / COMMIT
    tokenizer = Tokenizer.from_pretrained("tiny-org/tiny-model", cache_dir=offline_cache)
    assert tokenizer.encode("Hello") == Tokenizer.from_pretrained(folder).encode("Hello")


def test_offline_misses_are_clear_errors(offline_cache):
    with pytest.raises(ModelNotFoundError,
                       match=r"tiny-org/other \(revision main\): not in .*HF_HUB_OFFLINE is set"):
        load_pretrained("tiny-org/other", cache_dir=offline_cache)
    with pytest.raises(ModelNotFoundError, match=r"revision v2.0"):
        load_pretrained("tiny-org/tiny-model", revision="v2.0", cache_dir=offline_cache)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_pretrained("./not/a/folder/nor/an/id")


def test_the_environment_selects_cache_and_offline_mode(offline_cache, folder):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, in a fresh interpreter."""
    code = ("from peftloop.models import load_pretrained; import torch;"
            "m = load_pretrained('tiny-org/tiny-model', dtype='bf16');"
            "print(m.model.embed_tokens.weight.dtype, float(m.model.norm.weight.float().sum()))")
    env = {"HF_HUB_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = float(load_pretrained(folder).model.norm.weight.detach().to(torch.bfloat16).float().sum())
    assert out.stdout.split() == ["torch.bfloat16", str(expected)]


def test_keys_a_family_does_not_read_are_kept_but_unused(folder, tmp_path):
    """As in transformers: Llama has no sliding window and Qwen2 no attention_bias key."""
    edit_config(folder, sliding_window=2)
    model = load_pretrained(folder)
    assert model.config.sliding_window is None and model.config.extra["sliding_window"] == 2
    save_pretrained(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["sliding_window"] == 2
    edit_config(folder, model_type="qwen2", architectures=["Qwen2ForCausalLM"], attention_bias=True)
    # qwen2: q/k/v bias always
    with pytest.raises(CheckpointFormatError, match="tensor\\(s\\) missing .*q_proj.bias"):
        load_pretrained(folder)


def test_a_local_folder_with_a_revision_is_refused(folder):
    with pytest.raises(ModelNotFoundError, match="revision='v1' applies to hub ids"):
        load_pretrained(folder, revision="v1")


def test_sharded_checkpoints_and_dtypes(tmp_path):
    model = tiny_model(seed=4)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for dtype, torch_dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        loaded = load_pretrained(tmp_path / "sharded", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {torch_dtype}
        assert not any(p.is_meta for p in loaded.parameters())
        assert not loaded.model.rotary_emb.inv_freq.is_meta
        assert loaded.config.torch_dtype == str(torch_dtype).removeprefix("torch.")
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "sharded")), logits(model.eval()),
                               rtol=0, atol=0)


def test_tied_checkpoints_share_the_head(folder):
    model = load_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")


# ---- errors ------------------------------------------------------------------------------


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_unknown_architecture_lists_the_supported_ones(folder):
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointFormatError,
                       match=r"config.json: architecture 'GPT2LMHeadModel' is not supported; supported: "
                             r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}},
     "pre-quantized checkpoints are not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_attention_heads": 3}, "num_attention_heads=3 is not a multiple of num_key_value_heads=2"),
])
def test_unsupported_config_values(folder, change, message):
    edit_config(folder, **change)
    with pytest.raises(CheckpointFormatError, match=message):
        load_pretrained(folder)


def test_missing_mis_shaped_and_unexpected_tensors(folder):
    edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"1 tensor\(s\) missing for LlamaForCausalLM: "
                                                    r"model.layers.1.mlp.up_proj.weight"):
        load_pretrained(folder)
    edit_weights(folder, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(72, 31)}))
    with pytest.raises(CheckpointFormatError,
                       match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                             r"has shape \(72, 31\), the config implies \(72, 32\)"):
        load_pretrained(folder)
    edit_weights(folder, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(72, 32),
                                             "model.layers.1.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointFormatError, match="unexpected tensor 'model.layers.1.mlp.extra.weight'"):
        load_pretrained(folder)


def test_missing_and_broken_files(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointFormatError, match="model.safetensors: not a valid safetensors file"):
        load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="model.safetensors: not found .*no pickle"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointFormatError, match="config.json: invalid JSON"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match="config.json: not found"):
        load_pretrained(folder)


def test_conversion_through_a_small_buffer_rounds_like_to(folder, monkeypatch):
    """An fp32 file loaded as bf16 goes through a buffer (here 1 KiB, so every matrix takes many
    chunks); the result is exactly tensor.to(bf16)."""
    monkeypatch.setattr(safetensors_io, "CONVERSION_CHUNK_BYTES", 1022)  # not a multiple of 4 either
    reference = load_file(folder / "model.safetensors")
    loaded = load_pretrained(folder, dtype="bf16").state_dict()
    for key, tensor in reference.items():
        assert torch.equal(loaded[key], tensor.to(torch.bfloat16)), key


def test_truncated_and_quantized_files(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointFormatError, match=r"data offsets .* do not fit it or the file \(truncated"):
        load_pretrained(folder)
    tensors = load_file_from_bytes(data)
    tensors["model.norm.weight"] = torch.zeros(32, dtype=torch.int8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointFormatError,
                       match="'model.norm.weight' has dtype I8; .* not quantized ones"):
        load_pretrained(folder)


def load_file_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)
