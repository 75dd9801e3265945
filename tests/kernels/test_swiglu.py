"""swiglu: forward and both gradients against ``swiglu_reference``, on the torch path and the kernel."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_utils import (
    DTYPES,
    IMPLS,
    assert_grads_close,
    check_op,
    fp32_copy,
    grad_combinations,
    grads,
    property_settings,
    randn,
    run,
)
from tolerances import assert_close

from peftloop.kernels import swiglu
from peftloop.kernels.swiglu import swiglu_reference

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


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(lead=st.one_of(st.tuples(st.integers(1, 20)), st.tuples(st.integers(1, 3), st.integers(1, 7))),
       width=st.integers(1, 100), needs=st.sampled_from(grad_combinations(2)), dtype=st.sampled_from(DTYPES))
@example(lead=(1,), width=1, needs=(True, True), dtype=torch.float32)  # one element
@example(lead=(3,), width=33, needs=(True, False), dtype=torch.bfloat16)  # only gate; 32 + 1 columns
@example(lead=(2, 2), width=64, needs=(False, True), dtype=torch.float32)  # only up; whole blocks
@example(lead=(2,), width=5, needs=(False, False), dtype=torch.float32)  # nothing needs grad
def test_swiglu_property(impl, lead, width, needs, dtype):
    """Drawn shapes (widths around the interpreter's 32-column block) and every combination of
    which of gate and up need a gradient."""
    gate = randn(*lead, width, dtype=dtype, scale=2.0, seed=width, requires_grad=needs[0])
    up = randn(*lead, width, dtype=dtype, seed=width + 1, requires_grad=needs[1])
    out = run(impl, swiglu, gate, up)
    gate32, up32 = fp32_copy(gate), fp32_copy(up)
    check_op(out, swiglu_reference(gate32, up32), [gate, up], [gate32, up32], dtype, ["gate", "up"], "swiglu")
