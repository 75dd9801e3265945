"""Shared set-up of the kernel tests: where they run, which implementations, inputs and gradients.

The kernels run on CUDA tensors when a GPU is present, and otherwise on CPU tensors in the
Triton interpreter (the root conftest sets TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

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
        assert (g is None) == (e is None), \
            f"d {name}: {'None' if g is None else 'a tensor'} vs the reference's"
        if e is not None:
            assert g.dtype == e.dtype or e.dtype == torch.float32, f"d {name}: dtype {g.dtype}"
            assert_close(g, e, dtype, f"d {name}")


# ---------------------------------------------------------------------------------------
# Property tests: shapes drawn by hypothesis, deterministic and few.
# ---------------------------------------------------------------------------------------


def property_settings(max_examples: int) -> settings:
    """A fixed, small set of drawn examples (``derandomize``: the same draws on every run and
    machine, no example database), no per-example deadline (the interpreter is slow), and no
    shrinking: a failure reports the drawn example as it is rather than spending minutes of
    interpreter time on a smaller one."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def grad_combinations(n: int) -> list[tuple[bool, ...]]:
    """Every combination of which of n inputs need a gradient (all False included)."""
    return list(itertools.product((False, True), repeat=n))


KERNEL_MODULES = ("linear_cross_entropy", "lora_linear", "multi_lora", "nf4", "rms_norm", "rope", "swiglu")


def _kernel_functions() -> list[type]:
    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"peftloop.kernels.{name}")
        found += [obj for obj in vars(module).values() if isinstance(obj, type)
                  and issubclass(obj, torch.autograd.Function) and obj.__module__ == module.__name__]
    return found


@contextlib.contextmanager
def checked_backwards():
    """Watches the backward pass of every ``autograd.Function`` of the kernels: yields the list
    of the Functions whose backward ran, and fails when a backward returned a gradient for an
    input that needs none (autograd would drop it silently: work done for nothing)."""
    calls, wrong = [], []
    originals = {cls: cls.__dict__["backward"] for cls in _kernel_functions()}

    def spy(cls, backward):
        def checked(ctx, *grad_outputs):
            result = backward(ctx, *grad_outputs)
            results = result if isinstance(result, tuple) else (result,)
            calls.append(cls.__name__)
            for i, (need, g) in enumerate(zip(ctx.needs_input_grad, results, strict=True)):
                if not need and g is not None:
                    wrong.append(f"{cls.__name__}.backward returned a gradient for input {i}, "
                                 "which needs none")
            return result

        return staticmethod(checked)

    try:
        for cls, original in originals.items():
            cls.backward = spy(cls, original.__func__)
        yield calls
    finally:
        for cls, original in originals.items():
            cls.backward = original
    assert not wrong, "; ".join(wrong)


def check_op(outputs, expected, inputs, ref_inputs, dtype, names, what):
    """``outputs`` (an op run in ``dtype``) and every gradient against the fp32 reference
    ``expected`` computed from ``ref_inputs``. ``inputs`` may hold None and tensors without
    grad: each gets no gradient, and the op's backward returns None for it."""
    from tolerances import assert_close

    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    refs = expected if isinstance(expected, (tuple, list)) else (expected,)
    for i, (o, e) in enumerate(zip(outs, refs, strict=True)):
        assert_close(o, e, dtype, what if len(outs) == 1 else f"{what}[{i}]")
    if not any(t is not None and t.requires_grad for t in inputs):
        assert not any(o.requires_grad for o in outs), \
            f"{what}: an output requires grad with no input needing it"
        return
    with checked_backwards() as calls:
        got = grads(outputs, inputs, dtype)
    assert calls, f"{what}: no backward of the kernels ran"
    assert_grads_close(got, grads(expected, ref_inputs, dtype), dtype, names)
