"""What a training step keeps: the tensors autograd saves in a tiny Llama with LoRA, and glibc's heap.

- Inside ``recompute_activations()`` no norm output and no SwiGLU output is kept for the backward
  pass (they are recomputed), the gradients are those of a run that keeps them, and the saved
  bytes per layer go down by exactly those tensors; a test here fails if one comes back.
- Under bf16 autocast on a bf16 model, activations are saved in bf16: fp32 is only the per-row
  statistics (RMSNorm's rstd, attention's log-sum-exp).
- ``peftloop.allocator.limit_heap_retention`` makes freed tensors leave the resident set.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import weakref

import pytest
import torch

from peftloop import allocator
from peftloop.models.llama import MLP, RMSNorm
from tests.helpers import TOKENS, lora_model

LAYERS = 2


@contextlib.contextmanager
def saved_storages(cheap: dict):
    """Every storage autograd saves in the block: address -> (bytes, dtype), parameters included,
    and the names of the cheap outputs among them (checked when saved: addresses are reused)."""
    saved: dict[int, tuple[int, torch.dtype]] = {}
    cheap_saved: set[str] = set()

    def pack(t):
        address = t.untyped_storage().data_ptr()
        saved[address] = (t.untyped_storage().nbytes(), t.dtype)
        if address in cheap and cheap[address][1]() is not None:
            cheap_saved.add(cheap[address][0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved, cheap_saved


def cheap_outputs(model) -> dict[int, tuple[str, weakref.ref]]:
    """Hooks recording every RMSNorm output and every SwiGLU output (down_proj's input) that a
    forward makes: storage address -> (name, the tensor, weakly)."""
    outputs: dict[int, tuple[str, weakref.ref]] = {}

    def record(tensor, name):  # returns None: a hook that returns a value replaces the module's
        outputs[tensor.untyped_storage().data_ptr()] = (name, weakref.ref(tensor))

    for name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            module.register_forward_hook(lambda m, a, out, name=name: record(out, name))
        elif isinstance(module, MLP):
            module.down_proj.register_forward_pre_hook(lambda m, a, name=name: record(a[0], f"{name} swiglu"))
    return outputs


def step(model, recompute: bool, dtype: torch.dtype):
    """One forward + backward of the fixed batch: (loss, gradients by name, saved storages that are
    not parameters, names of the cheap outputs saved)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    model.model.recompute_cheap_activations = recompute  # the model's own switch (on by default)
    with saved_storages(cheap_outputs(model)) as (saved, cheap_saved), autocast:
        loss = model(TOKENS, labels=TOKENS)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    activations = {ptr: v for ptr, v in saved.items() if ptr not in parameters}
    return loss.detach(), grads, activations, cheap_saved


def bf16_model():
    model = lora_model(lora_dropout=0.1)
    for module in model.modules():  # the base in bf16, the adapters in fp32, as load_pretrained(dtype="bf16")
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                setattr(module, name, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_norms", [False, True])
def test_norm_and_swiglu_outputs_are_recomputed_not_saved(dtype, trainable_norms, cpu_low_precision):
    model = bf16_model() if dtype == torch.bfloat16 else lora_model(lora_dropout=0.1)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.requires_grad_(trainable_norms)
    model.train()
    torch.manual_seed(0)
    kept = step(model, recompute=False, dtype=dtype)
    torch.manual_seed(0)  # the same dropout masks
    loss, grads, saved, cheap_saved = step(model, recompute=True, dtype=dtype)

    kept_loss, kept_grads, kept_saved, kept_cheap = kept
    assert torch.equal(loss, kept_loss)
    assert grads.keys() == kept_grads.keys()
    assert len(grads) == 7 * 2 * LAYERS + (2 * LAYERS + 1) * trainable_norms
    for name, g in grads.items():
        assert torch.equal(g, kept_grads[name]), name
    # Without recomputation the consumers keep them (the test can fail); with it, none is kept.
    # The final norm's output is copied by the loss (only the labelled rows), so never kept.
    # Exception: with a frozen first norm, the first layer's norm output needs no grad (its input,
    # the frozen embedding's output, neither): nothing keeps that input, and a recipe would keep
    # it in the output's place, so the output is kept as it is.
    assert len(kept_cheap) == 3 * LAYERS, kept_cheap
    first_norm = set() if trainable_norms else {"model.layers.0.input_layernorm"}
    assert cheap_saved == first_norm
    # and nothing else changed: the saved bytes drop by one [tokens, hidden] tensor per norm and
    # one [tokens, intermediate] per MLP
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    cheap_bytes = TOKENS.numel() * (LAYERS * (2 * hidden + intermediate) - len(first_norm) * hidden)
    assert (sum(b for b, _ in kept_saved.values()) - sum(b for b, _ in saved.values())
            == cheap_bytes * dtype.itemsize)


def test_bf16_activations_are_saved_in_bf16(force_cpu_low_precision):
    """fp32 only in the per-row statistics: a float copy of an activation would be far more.

    On the native bf16 path, forced so that every host (AVX2 too) runs it. The fp32-multiply
    path of CPUs without bf16 hardware keeps ~4 KB of fp32 here (its compute dtype; not bounded
    by this test)."""
    force_cpu_low_precision("native")
    model = bf16_model()
    model.train()
    _, _, saved, _ = step(model, recompute=True, dtype=torch.bfloat16)
    by_dtype: dict[torch.dtype, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    rows = TOKENS.numel()
    heads = model.config.num_attention_heads
    # per layer: two RMSNorm rstd (one fp32 per row) and attention's log-sum-exp (one per head and row)
    per_row_stats = (LAYERS * (2 + heads) + 1) * rows * 4
    assert by_dtype.get(torch.float32, 0) <= per_row_stats, by_dtype
    assert by_dtype[torch.bfloat16] > 10 * per_row_stats


RETENTION = """
import json, sys, torch
from peftloop import allocator
from benchmarks.common import status_kib
if sys.argv[1] == "limit":
    assert allocator.limit_heap_retention(1 << 20)
# 4 MiB tensors between small ones that stay (as a step's activations lie between longer-lived
# tensors), allocated and freed twice: the first free raises glibc's threshold past 4 MiB
small = []
for _ in range(2):
    blocks = []
    for _ in range(64):
        blocks.append(torch.ones(1 << 20))
        small.append(torch.ones(4096))
    before_free = status_kib("VmRSS")
    del blocks
print(json.dumps({"freed_mib": (before_free - status_kib("VmRSS")) / 1024}))
"""


@pytest.mark.slow  # two fresh processes importing torch
@pytest.mark.skipif(allocator.why_unavailable() is not None, reason="glibc only")
def test_limit_heap_retention_returns_freed_tensors_to_the_system():
    freed = {}
    for mode in ("default", "limit"):
        out = subprocess.run([sys.executable, "-c", RETENTION, mode], capture_output=True, text=True,
                             check=True)
        freed[mode] = json.loads(out.stdout)["freed_mib"]
    assert freed["limit"] > 240, freed  # the 256 MiB left the resident set
    assert freed["default"] < 64, freed  # glibc kept them: what the setting is for


def test_allocator_settings_refuse_nonsense_and_say_why_when_unavailable():
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.limit_heap_retention(0)
    reason = allocator.why_unavailable()
    assert reason is None if allocator.glibc() is not None else "not glibc" in reason
    assert isinstance(allocator.release_free_memory(), bool)
