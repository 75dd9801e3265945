"""Work the job does not need is not done, and the gradients do not change for it.

- The output head and the loss run only on the positions that carry a label: the rows reaching
  ``kernels.linear_cross_entropy`` are exactly the labels != -100 (after the shift), and the LoRA
  gradients equal those of full logits through ``F.cross_entropy`` with the prompt masked.
- No input-gradient GEMM where nothing below needs it: layer 0's q/k/v read the frozen
  embedding (through a frozen RMSNorm), so their dx = g·W is wasted work. The LoRA op computes dx
  only when its input requires grad; nothing (the loop, checkpointing) makes the embedding output
  require it. Counted here: the matmuls the backward pass runs, by which base weight they read.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peftloop import kernels
from tests.helpers import lora_model

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


def prompt_and_answer_batch():
    """Two rows of 12 tokens: a 5-token prompt with no label, an answer, and in row 2 three pads."""
    tokens = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    return tokens, labels


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_the_head_sees_only_the_labelled_rows(monkeypatch):
    tokens, labels = prompt_and_answer_batch()
    rows_seen = []
    original = kernels.linear_cross_entropy

    def counting(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_cross_entropy", counting)
    model = lora_model(seed=1, lora_dropout=0.0)
    model(tokens, labels=labels).backward()
    assert rows_seen == [int((labels[:, 1:] != -100).sum())] == [7 + 4]  # tokens 5-11 of row 1, 5-8 of row 2


def test_labelled_rows_only_give_the_full_logits_gradients():
    tokens, labels = prompt_and_answer_batch()
    model = lora_model(seed=1, lora_dropout=0.0)
    loss = model(tokens, labels=labels)
    loss.backward()
    grads = lora_grads(model)
    model.zero_grad()
    logits = model(tokens)  # [B, T, vocab], every position through the head
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grads[name], grad, msg=name)


class InputGradientGEMMs(TorchDispatchMode):
    """Records the dx GEMMs g·W of the given base weights and counts every matmul.

    A dx GEMM reads W as stored ([out, in], row-major); the forward pass (and a checkpointed
    layer's recomputation inside the backward pass) reads it transposed (x·Wᵀ), so the strides
    tell them apart even for a square W."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.weights = weights
        self.read: list[str] = []
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.matmuls += 1
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    self.read += [name for name, w in self.weights.items() if self.same_layout(arg, w)]
        return func(*args, **(kwargs or {}))

    @staticmethod
    def same_layout(a: torch.Tensor, w: torch.Tensor) -> bool:
        return (a.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
                and a.shape == w.shape and a.stride() == w.stride())


def backward_reads(model, tokens, labels, embedding_requires_grad: bool):
    """The base weights the backward pass multiplies by (a dx GEMM each), and the LoRA gradients."""
    hook = None
    if embedding_requires_grad:  # what enable_input_require_grads does in transformers
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    base = {name.removesuffix(".base_layer"): module.weight
            for name, module in model.named_modules() if name.endswith(".base_layer")}
    loss = model(tokens, labels=labels)
    with InputGradientGEMMs(base) as reads:
        loss.backward()
    if hook is not None:
        hook.remove()
    return reads, lora_grads(model)


@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
def test_layer_0_qkv_compute_no_input_gradient(checkpointing):
    tokens, labels = prompt_and_answer_batch()

    def model():
        m = lora_model(seed=1, lora_dropout=0.1)
        if checkpointing != "off":
            m.gradient_checkpointing_enable(offload=checkpointing == "offload")
        return m.train()

    torch.manual_seed(0)  # the same dropout masks in both runs
    reads, grads = backward_reads(model(), tokens, labels, embedding_requires_grad=False)
    torch.manual_seed(0)
    forced, forced_grads = backward_reads(model(), tokens, labels, embedding_requires_grad=True)
    first = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    adapted = set(forced.read)
    assert first <= adapted and len(adapted) == 2 * 7  # every adapted Linear of both layers reads W
    assert set(reads.read) == adapted - first  # ... except layer 0's q/k/v: no dx GEMM there
    assert sorted(forced.read) == sorted(adapted) and sorted(reads.read) == sorted(adapted - first)
    # forced: 3 more g·W GEMMs, and 3 more dL/du·A (the LoRA branch's share of dx)
    assert forced.matmuls - reads.matmuls == 6
    assert grads.keys() == forced_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], forced_grads[name], rtol=0, atol=0, msg=name)
