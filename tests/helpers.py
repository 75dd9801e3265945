"""Small builders shared by the tests: tiny models, toy data."""

from __future__ import annotations

import random

import torch

from peftloop.models.llama import LlamaConfig, LlamaForCausalLM


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
