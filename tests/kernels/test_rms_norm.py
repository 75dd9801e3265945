"""rms_norm: forward, dx and dweight against ``rms_norm_reference`` (HF LlamaRMSNorm)."""

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

from peftloop.kernels import rms_norm
from peftloop.kernels.rms_norm import rms_norm_reference


def _check(impl, x, weight, dtype, eps=1e-6):
    out = run(impl, rms_norm, x, weight, eps)
    assert out.dtype == rms_norm_reference(x.detach(), weight.detach(), eps).dtype
    got = grads(out, [x, weight], dtype)
    x32, w32 = fp32_copy(x), fp32_copy(weight)
    ref = rms_norm_reference(x32, w32, eps)
    expected = grads(ref, [x32, w32], dtype)
    assert_close(out, ref, dtype, "rms_norm")
    assert_grads_close(got, expected, dtype, ["x", "weight"])


def _weight(hidden, dtype, trainable):
    return (1.0 + randn(hidden, scale=0.3, seed=9)).to(dtype).requires_grad_(trainable)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7, 45), (19, 64), (1, 1, 3)])
@pytest.mark.parametrize("trainable", [True, False], ids=["w_trainable", "w_frozen"])
def test_rms_norm_matches_reference(impl, dtype, shape, trainable):
    x = randn(*shape, dtype=dtype, scale=3.0, seed=1, requires_grad=True)
    _check(impl, x, _weight(shape[-1], dtype, trainable), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows(impl, dtype):
    """x as the first H columns of a wider tensor: rows strided by 2H, read without a copy."""
    wide = randn(5, 3, 2 * 37, dtype=dtype, seed=2, requires_grad=True)
    x = wide[..., :37]
    w = _weight(37, dtype, True)
    out = run(impl, rms_norm, x, w)
    got = grads(out, [wide, w], dtype)
    wide32, w32 = fp32_copy(wide), fp32_copy(w)
    ref = rms_norm_reference(wide32[..., :37], w32)
    assert_close(out, ref, dtype, "rms_norm")
    assert_grads_close(got, grads(ref, [wide32, w32], dtype), dtype, ["wide x", "weight"])


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_transposed_input(impl):
    x = randn(6, 4, 21, seed=3).transpose(0, 1).requires_grad_()  # [4, 6, 21], not viewable as rows
    _check(impl, x, _weight(21, torch.float32, True), torch.float32, eps=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_bf16_input_fp32_weight(impl):
    """HF semantics with mixed dtypes: the row is rounded to bf16, the product is fp32."""
    x = randn(3, 5, 40, dtype=torch.bfloat16, seed=4, requires_grad=True)
    w = _weight(40, torch.float32, True)
    out = run(impl, rms_norm, x, w)
    assert out.dtype == torch.float32
    got = grads(out, [x, w], torch.bfloat16)
    x32, w32 = fp32_copy(x), fp32_copy(w)
    ref = rms_norm_reference(x.detach(), w.detach())  # the reference in the same mixed dtypes
    assert_close(out, ref, torch.bfloat16, "rms_norm")
    expected = grads(rms_norm_reference(x32, w32), [x32, w32], torch.bfloat16)
    assert_grads_close(got, expected, torch.bfloat16, ["x", "weight"])


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_under_autocast_is_unchanged(impl):
    """HF's RMSNorm computes in fp32 under autocast too; so does this one."""
    x = randn(4, 33, seed=5, requires_grad=True)
    w = _weight(33, torch.float32, True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = run(impl, rms_norm, x, w)
        ref = rms_norm_reference(fp32_copy(x), fp32_copy(w))
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, torch.float32, "rms_norm under autocast")


def test_rms_norm_rejects_a_wrong_weight():
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(torch.zeros(2, 8), torch.ones(7))


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(lead=st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 3), st.integers(1, 13))),
       hidden=st.integers(1, 70), needs=st.sampled_from(grad_combinations(2)), dtype=st.sampled_from(DTYPES))
@example(lead=(1,), hidden=1, needs=(True, True), dtype=torch.float32)  # one row of one element
@example(lead=(7,), hidden=33, needs=(False, True), dtype=torch.float32)  # only the weight: dx skipped
@example(lead=(2, 5), hidden=45, needs=(True, False), dtype=torch.bfloat16)  # frozen weight: no dW
@example(lead=(4,), hidden=64, needs=(False, False), dtype=torch.float32)  # nothing needs grad
def test_rms_norm_property(impl, lead, hidden, needs, dtype):
    """Drawn shapes (rows not a multiple of the 3 backward programs, odd hidden sizes) and every
    combination of which of x and the weight need a gradient."""
    x = randn(*lead, hidden, dtype=dtype, scale=3.0, seed=hidden, requires_grad=needs[0])
    w = _weight(hidden, dtype, needs[1])
    out = run(impl, rms_norm, x, w)
    x32, w32 = fp32_copy(x), fp32_copy(w)
    check_op(out, rms_norm_reference(x32, w32), [x, w], [x32, w32], dtype, ["x", "weight"], "rms_norm")
