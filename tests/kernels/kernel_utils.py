"""Shared set-up of the kernel tests: where they run, which implementations, inputs and gradients.

The kernels run on CUDA tensors when a GPU is present, and otherwise on CPU tensors in the
Triton interpreter (the root conftest sets TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import pytest
import torch
from peftloop.kernels import backend, triton_available
from peftloop.kernels._dispatch import interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
TRITON_RUNS = triton_available() and (DEVICE.type == "cuda" or interpreting())
# "torch" is what CPU users run; "triton" is the kernels (interpreted on a CPU).
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="no Triton"))]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0, requires_grad=False) -> torch.Tensor:
    """A deterministic normal tensor made on the CPU (the same values on every device), then cast."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def fp32_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same (already rounded) values in fp32, a fresh leaf with t's requires_grad."""
    if t is None:
        return None
    return t.detach().float().requires_grad_(t.requires_grad)


def run(impl: str, fn, *args, **kwargs):
    with backend(impl):
        return fn(*args, **kwargs)


def grads(outputs, inputs, dtype: torch.dtype, seed: int = 1):
    """d(Σ outputs ⊙ g)/d inputs for fixed random g (one per output), None for inputs without grad.

    g is rounded to ``dtype`` (the dtype under test) first, so a kernel run in bf16 and the
    fp32 reference receive the same cotangent values."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    cotangents = [randn(*o.shape, dtype=dtype, seed=seed + i).to(o.dtype) for i, o in enumerate(outputs)]
    outputs, cotangents = zip(*[(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad])
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(outputs, wanted, cotangents))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def assert_grads_close(got, expected, dtype, names) -> None:
    """Each gradient matches the reference's; an input without grad gets None on both sides."""
    from tolerances import assert_close

    for g, e, name in zip(got, expected, names, strict=True):
        assert (g is None) == (e is None), f"d {name}: {'None' if g is None else 'a tensor'} vs the reference's"
        if e is not None:
            assert g.dtype == e.dtype or e.dtype == torch.float32, f"d {name}: dtype {g.dtype}"
            assert_close(g, e, dtype, f"d {name}")
