"""swiglu: forward and both gradients against ``swiglu_reference``, on the torch path and the kernel."""

import pytest
import torch
from kernel_utils import DTYPES, IMPLS, assert_grads_close, fp32_copy, grads, randn, run
from peftloop.kernels import swiglu
from peftloop.kernels.swiglu import swiglu_reference
from tolerances import assert_close

SHAPES = [(3, 5, 77), (1, 33), (2, 1, 7)]


def _check(impl, gate, up, dtype):
    out = run(impl, swiglu, gate, up)
    assert out.dtype == swiglu_reference(gate.detach(), up.detach()).dtype
    got = grads(out, [gate, up], dtype)
    gate32, up32 = fp32_copy(gate), fp32_copy(up)
    ref = swiglu_reference(gate32, up32)
    expected = grads(ref, [gate32, up32], dtype)
    assert_close(out, ref, dtype, "silu(gate)*up")
    assert_grads_close(got, expected, dtype, ["gate", "up"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(impl, dtype, shape):
    gate = randn(*shape, dtype=dtype, scale=2.0, seed=1, requires_grad=True)
    up = randn(*shape, dtype=dtype, seed=2, requires_grad=True)
    _check(impl, gate, up, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided_halves_of_a_fused_projection(impl, dtype):
    """gate and up as the two halves of one [.., 2I] projection: rows strided by 2I, no copy."""
    fused = randn(4, 3, 2 * 45, dtype=dtype, scale=2.0, seed=3, requires_grad=True)
    gate, up = fused[..., :45], fused[..., 45:]
    out = run(impl, swiglu, gate, up)
    (dfused,) = grads(out, [fused], dtype)
    fused32 = fp32_copy(fused)
    ref = swiglu_reference(fused32[..., :45], fused32[..., 45:])
    (ref_dfused,) = grads(ref, [fused32], dtype)
    assert_close(out, ref, dtype, "silu(gate)*up")
    assert_close(dfused, ref_dfused, dtype, "d fused")


@pytest.mark.parametrize("impl", IMPLS)
def test_swiglu_transposed_inputs(impl):
    dtype = torch.float32
    gate = randn(9, 6, dtype=dtype, seed=4).t().requires_grad_()  # [6, 9], column-major
    up = randn(6, 9, dtype=dtype, seed=5, requires_grad=True)
    _check(impl, gate, up, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_swiglu_only_up_trainable(impl):
    gate = randn(5, 19, seed=6)
    up = randn(5, 19, seed=7, requires_grad=True)
    _check(impl, gate, up, torch.float32)


def test_swiglu_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.zeros(2, 3), torch.zeros(2, 4))
