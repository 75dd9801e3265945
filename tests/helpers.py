"""What the tests share: tiny models (plain, with LoRA, saved as a Hugging Face checkpoint), toy
data, the fixed token batch the reference comparisons run on, a callback that stops the loop, and
PEFT's parameter names.

The fixtures here are imported by the modules that use them with a redundant alias, which tells
readers and ruff that the import is there for pytest::

    from tests.helpers import base_dir as base_dir  # fixture
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftloop.callbacks import Callback
from peftloop.config import LoraConfig
from peftloop.inject import inject_lora
from peftloop.models import save_pretrained
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

# Two sequences of the tiny vocabulary (61): the batch the reference comparisons run on.
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 17, 8, 60, 4], [1, 44, 3, 3, 12, 50, 21, 7, 2]])


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def lora_model(seed: int = 0, adapter_seed: int = 0, **lora) -> LlamaForCausalLM:
    """``tiny_model(seed)`` with a LoRA adapter drawn from ``adapter_seed``: r=4, alpha=8 on every
    linear layer, B random (``init_lora_weights=False``) so the adapter changes the output.
    Keyword arguments are LoraConfig fields and override these."""
    model = tiny_model(seed)
    torch.manual_seed(adapter_seed)
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                     "init_lora_weights": False, **lora}))
    return model


@pytest.fixture
def base_dir(tmp_path) -> Path:
    """``tiny_model(seed=7)`` saved as a Hugging Face checkpoint folder (config.json, safetensors),
    which transformers' LlamaForCausalLM loads: the base of the comparisons with transformers/peft."""
    save_pretrained(tiny_model(seed=7), tmp_path / "base")
    return tmp_path / "base"


def logits_of(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Logits of ours (a tensor) or of a transformers/peft model (``.logits``), without a graph."""
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def our_name(peft_name: str) -> str:
    """peftloop's name for a parameter of a live PEFT model: without PEFT's ``base_model.model.``
    prefix and its adapter name (``.default``); the DoRA magnitude, a module holding ``weight`` in
    PEFT, is the parameter ``lora_magnitude_vector`` itself here (as on disk)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


class StopAt(Callback):
    """Stops the loop at the end of optimizer step ``step``, as a crash there would (for resume tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, metrics):
        if state.global_step == self.step:
            state.should_stop = True


def toy_examples(n: int, seed: int = 0, vocab: int = 61, min_len: int = 3, max_len: int = 12,
                 mask_prompt: bool = True) -> list[dict[str, list[int]]]:
    """Copy task examples of uneven lengths: prompt x, answer x; labels -100 on the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_len, max_len)
        x = [rng.randrange(3, vocab) for _ in range(k)]
        ids = [1, *x, 2, *x]
        labels = ([-100] * (k + 2) + x) if mask_prompt else list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


# A merged model's logits against the adapter-on-base logits, fp32. Merging rounds W + s·B·A to fp32
# once per weight where the adapter computes x·Wᵀ + s·(x·Aᵀ)·Bᵀ: the two differ by a few ulps of each
# product, and the difference grows with the logits' magnitude (1.03e-4 on SmolLM2-135M-Instruct,
# whose logits reach ~40: 2.6e-6 of the scale). So the tolerance is relative to the largest logit.
MERGE_LOGITS_RTOL = 1e-5


def assert_merged_logits_close(merged: torch.Tensor, adapted: torch.Tensor) -> None:
    scale = adapted.abs().max().item()
    err = (merged - adapted).abs().max().item()
    assert err <= MERGE_LOGITS_RTOL * max(scale, 1.0), (
        f"merged logits differ by {err:.3g} from the adapter's, over {MERGE_LOGITS_RTOL:g} x the logits' "
        f"scale {scale:.3g}")


# ---------------------------------------------------------------------------------------------
# Data and chat-ready checkpoints (the CLI's inputs)

QA = [("What colour is the sky?", "Blue."), ("How many legs does a spider have?", "Eight."),
      ("Which planet is closest to the sun?", "Mercury."), ("What do bees make?", "Honey.")]


def qa_records(repeat: int = 1) -> list[dict[str, str]]:
    """QA as prompt/completion records, ``repeat`` times over."""
    return [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in QA] * repeat


def write_jsonl(path: Path, records) -> Path:
    """One record a line; a str record is written as it is (a malformed line on purpose)."""
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return Path(path)


def read_log(folder: Path) -> list[dict]:
    """The records of ``folder/log.jsonl``, the loop's JSONL log."""
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def save_chat_base(folder: Path, **config) -> Path:
    """A tiny Qwen2-shaped checkpoint (tied, q/k/v bias) with a ChatML tokenizer, written by
    peftloop. Weights N(0, 0.2): a frozen head that is not flat, so a small LoRA learns the QA task
    in a few steps. ``config``: LlamaConfig fields that override these (e.g. ``model_type="llama"``)."""
    from tests.hf_builders import save_tokenizer_files, train_tokenizer

    tokenizer = train_tokenizer("chatml")
    fields = dict(model_type="qwen2", vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, bos_token_id=None, initializer_range=0.2,
                  eos_token_id=tokenizer.token_to_id("<|im_end|>"))
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **config}))
    model.init_weights(torch.Generator().manual_seed(0))
    save_pretrained(model, folder)
    save_tokenizer_files(folder, "chatml", tokenizer)
    return Path(folder)


def save_demo_base(folder: Path, seed: int = 0) -> Path:
    """The built-in demo's base model and tokenizer, as ``peftloop train`` (the demo) writes them."""
    from peftloop.demo import base_config, build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(base_config(tokenizer.get_vocab_size()))
    model.init_weights(torch.Generator().manual_seed(seed))
    save_pretrained(model, folder)
    save_tokenizer(tokenizer, folder)
    return Path(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """peftloop's Tokenizer of a ChatML-style tokenizer.json trained on hf_builders.PARAGRAPHS."""
    from peftloop.tokenizer import Tokenizer
    from tests.hf_builders import build_tokenizer_folder

    return Tokenizer.from_pretrained(build_tokenizer_folder(tmp_path_factory.mktemp("tok"), "chatml"))
