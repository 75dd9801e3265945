"""nf4_dequantize and nf4_lora_linear (the QLoRA layer) against their references, every implementation."""

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_utils import (
    DEVICE,
    DTYPES,
    IMPLS,
    TRITON_RUNS,
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

from peftloop.kernels import lora_dropout_mask, nf4_dequantize, nf4_lora_linear
from peftloop.kernels import nf4 as nf4_module
from peftloop.kernels.lora_linear import dropout_mask_like
from peftloop.kernels.nf4 import NF4State, nf4_dequantize_reference, nf4_lora_linear_reference
from peftloop.nf4 import quantize_nf4

# ((out, in), blocksize): an odd element count (the last byte half used), a ragged last block,
# a whole number of blocks, and more than 256 blocks (a second, ragged nested block).
SHAPES = [((45, 7), 64), ((33, 65), 64), ((64, 96), 64), ((90, 97), 32)]


def _state(shape, blocksize=64, double_quant=True, seed=0) -> NF4State:
    return quantize_nf4(randn(*shape, seed=seed, scale=0.05), blocksize, double_quant)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_dequantize_is_bit_exact(impl, dtype, shape, blocksize, double_quant):
    """One fp32 product per element, one rounding: every implementation gives the same bits."""
    state = _state(shape, blocksize, double_quant)
    assert state.double_quant == double_quant
    got = run(impl, nf4_dequantize, state, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, nf4_dequantize_reference(state, dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("blocksize", [128, 4096])
def test_dequantize_other_block_sizes(impl, blocksize):
    state = _state((50, 90), blocksize=blocksize)
    assert torch.equal(run(impl, nf4_dequantize, state, torch.float32), nf4_dequantize_reference(state))


def _layer_inputs(dtype, shape=(2, 5, 40), out_features=50, r=6, bias=True):
    state = _state((out_features, shape[-1]), seed=3)
    x = randn(*shape, dtype=dtype, seed=1, requires_grad=True)
    b = randn(out_features, dtype=dtype, seed=2) if bias else None
    A = randn(r, shape[-1], dtype=dtype, seed=4, scale=0.2, requires_grad=True)
    B = randn(out_features, r, dtype=dtype, seed=5, scale=0.2, requires_grad=True)
    return x, state, b, A, B


def _reference_grads(x, state, b, A, B, dtype, scaling, p=0.0, mask=None):
    x32, A32, B32 = fp32_copy(x), fp32_copy(A), fp32_copy(B)
    ref = nf4_lora_linear_reference(x32, state, fp32_copy(b), A32, B32, scaling, p, mask)
    return ref, grads(ref, [x32, A32, B32], dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_qlora_linear_forward_and_gradients(impl, dtype, bias):
    x, state, b, A, B = _layer_inputs(dtype, bias=bias)
    y = run(impl, nf4_lora_linear, x, state, b, A, B, 2.0)
    assert y.dtype == dtype
    got = grads(y, [x, A, B], dtype)
    ref, expected = _reference_grads(x, state, b, A, B, dtype, 2.0)
    assert_close(y, ref, dtype, "nf4_lora_linear")
    assert_grads_close(got, expected, dtype, ["x", "lora_A", "lora_B"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlora_linear_with_dropout_mask(impl, dtype):
    x, state, b, A, B = _layer_inputs(dtype, shape=(7, 40))
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE) >= 0.3
    y = run(impl, nf4_lora_linear, x, state, b, A, B, 0.5, dropout_p=0.3, dropout_mask=mask)
    got = grads(y, [x, A, B], dtype)
    ref, expected = _reference_grads(x, state, b, A, B, dtype, 0.5, 0.3, mask)
    assert_close(y, ref, dtype, "nf4_lora_linear with dropout")
    assert_grads_close(got, expected, dtype, ["x", "lora_A", "lora_B"])


@pytest.mark.skipif(not TRITON_RUNS, reason="no Triton")
def test_qlora_linear_seeded_dropout_on_the_kernels_matches_the_rebuilt_mask():
    """The Triton path draws the mask in the LoRA kernels from a seed; lora_dropout_mask rebuilds it."""
    x, state, b, A, B = _layer_inputs(torch.float32, shape=(9, 40))
    y = run("triton", nf4_lora_linear, x, state, b, A, B, 0.5, dropout_p=0.25, seed=1234)
    got = grads(y, [x, A, B], torch.float32)
    mask = lora_dropout_mask(x.shape, 0.25, 1234, x.device)
    ref, expected = _reference_grads(x, state, b, A, B, torch.float32, 0.5, 0.25, mask)
    assert_close(y, ref, torch.float32, "seeded dropout")
    assert_grads_close(got, expected, torch.float32, ["x", "lora_A", "lora_B"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_4bit_linear(impl, dtype):
    """No LoRA: x·dequant(W)ᵀ + b, and dx."""
    x, state, b, _, _ = _layer_inputs(dtype)
    y = run(impl, nf4_lora_linear, x, state, b)
    (got,) = grads(y, [x], dtype)
    x32 = fp32_copy(x)
    ref = nf4_lora_linear_reference(x32, state, fp32_copy(b))
    assert_close(y, ref, dtype, "4-bit linear")
    assert_close(got, grads(ref, [x32], dtype)[0], dtype, "d x")


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_computes_in_the_autocast_dtype(impl):
    x, state, b, A, B = _layer_inputs(torch.float32)
    b = b.detach()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = run(impl, nf4_lora_linear, x, state, b, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    got = grads(y, [x, A, B], torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in got)  # the fp32 leaves get fp32 gradients
    xb, Ab, Bb = (t.detach().bfloat16().float().requires_grad_() for t in (x, A, B))
    ref = nf4_lora_linear_reference(xb, state, b.bfloat16().float(), Ab, Bb, 2.0)
    assert_close(y, ref, torch.bfloat16, "autocast")
    expected = grads(ref, [xb, Ab, Bb], torch.bfloat16)
    assert_grads_close(got, expected, torch.bfloat16, ["x", "lora_A", "lora_B"])


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_mixed_dtypes_are_cast_by_the_op(impl):
    """bf16 x, fp32 A, B and bias, autocast off: computed in x's dtype, as if the caller had
    cast them; the fp32 adapters get fp32 gradients."""
    x, state, b, A, B = _layer_inputs(torch.bfloat16)
    A32, B32 = fp32_copy(A), fp32_copy(B)
    y = run(impl, nf4_lora_linear, x, state, b.float(), A32, B32, 2.0)
    y_cast = run(impl, nf4_lora_linear, x, state, b, A, B, 2.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_cast)
    got, expected = grads(y, [x, A32, B32], torch.bfloat16), grads(y_cast, [x, A, B], torch.bfloat16)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, e in zip(got, expected):
        assert torch.equal(g, e.to(g.dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_the_dequantised_weight_is_never_saved_for_backward(impl):
    """What autograd keeps between forward and backward: x, u = x·Aᵀ, A, B, never a weight-sized tensor."""
    x, state, b, A, B = _layer_inputs(torch.float32, shape=(3, 40), out_features=64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run(impl, nf4_lora_linear, x, state, b, A, B, 2.0)
    assert saved and max(saved) < state.numel / 4, f"saved tensors of {saved} elements (W has {state.numel})"
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_dequantises_only_when_x_needs_a_gradient(impl, monkeypatch):
    x, state, b, A, B = _layer_inputs(torch.float32)
    calls = []
    real = nf4_module._dequantize
    monkeypatch.setattr(nf4_module, "_dequantize", lambda *a: calls.append(1) or real(*a))
    y = run(impl, nf4_lora_linear, x.detach(), state, b, A, B, 2.0)
    y.sum().backward()
    assert len(calls) == 1 and A.grad is not None and B.grad is not None  # forward only
    calls.clear()
    y = run(impl, nf4_lora_linear, x, state, b, A, B, 2.0)
    y.sum().backward()
    assert len(calls) == 2  # forward and dx


def test_input_errors_name_the_problem():
    x, state, b, A, _ = _layer_inputs(torch.float32)
    with pytest.raises(ValueError, match="takes 40"):
        nf4_lora_linear(x[..., :39], state, b)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        nf4_lora_linear(x, state, b, A, None)
    with pytest.raises(ValueError, match="frozen"):
        nf4_lora_linear(x, state, b.requires_grad_())


# ---------------------------------------------------------------------------------------
# Property tests: drawn shapes, block sizes, ranks and every combination of gradients.
# ---------------------------------------------------------------------------------------

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=12)
@given(out_f=st.integers(1, 60), in_f=st.integers(1, 90), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
@example(out_f=1, in_f=1, blocksize=64, double_quant=True, dtype=F32)  # one element, half a byte
@example(out_f=90, in_f=97, blocksize=32, double_quant=True, dtype=BF16)  # 273 blocks: a ragged nested block
@example(out_f=16, in_f=16, blocksize=32, double_quant=False, dtype=torch.float16)  # exactly 2 programs
def test_dequantize_property(impl, out_f, in_f, blocksize, double_quant, dtype):
    state = _state((out_f, in_f), blocksize, double_quant, seed=out_f * 100 + in_f)
    got = run(impl, nf4_dequantize, state, dtype)
    assert got.dtype == dtype and got.shape == (out_f, in_f)
    assert torch.equal(got, nf4_dequantize_reference(state, dtype))


class QLoRACase(NamedTuple):
    lead: tuple  # x's leading dims
    in_f: int
    out_f: int
    blocksize: int
    rank: int | None  # None: the plain 4-bit layer, no LoRA
    bias: bool
    needs: tuple  # requires_grad of (x, lora_A, lora_B); A and B ignored without LoRA
    dropout: str  # "off", "mask" or "seed"
    dtype: torch.dtype


@st.composite
def qlora_cases(draw):
    lead = draw(st.one_of(st.tuples(st.integers(1, 50)), st.tuples(st.integers(1, 3), st.integers(1, 17))))
    return QLoRACase(lead, draw(st.integers(1, 40)), draw(st.integers(1, 40)),
                     draw(st.sampled_from([32, 64])), draw(st.sampled_from([None, 1, 3, 6, 17])),
                     draw(st.booleans()), draw(st.sampled_from(grad_combinations(3))),
                     draw(st.sampled_from(["off", "mask", "seed"])), draw(st.sampled_from(DTYPES)))


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(case=qlora_cases())
# dA without dx on 3 row tiles (the last group has one): gb written for every row
@example(case=QLoRACase((41,), 37, 19, 64, 5, False, (False, True, True), "off", F32))
@example(case=QLoRACase((41,), 37, 19, 32, 3, True, (False, True, False), "seed", BF16))
@example(case=QLoRACase((1,), 33, 7, 64, 1, True, (True, True, True), "mask", F32))  # one row, rank 1
@example(case=QLoRACase((2, 3), 21, 5, 32, None, True, (True, False, False), "off", BF16))  # plain 4-bit
@example(case=QLoRACase((3,), 9, 11, 64, 2, False, (True, False, False), "seed", F32))  # only x
@example(case=QLoRACase((4,), 9, 11, 64, 2, True, (False, False, True), "off", F32))  # only B
# nothing needs grad
@example(case=QLoRACase((4,), 9, 11, 64, None, False, (False, False, False), "off", F32))
def test_qlora_linear_property(impl, case):
    dtype, rows = case.dtype, int(np.prod(case.lead))
    state = _state((case.out_f, case.in_f), case.blocksize, seed=case.out_f)
    x = randn(*case.lead, case.in_f, dtype=dtype, seed=rows, requires_grad=case.needs[0])
    b = randn(case.out_f, dtype=dtype, seed=2) if case.bias else None
    A = B = None
    if case.rank is not None:
        A = randn(case.rank, case.in_f, dtype=dtype, seed=4, scale=0.2, requires_grad=case.needs[1])
        B = randn(case.out_f, case.rank, dtype=dtype, seed=5, scale=0.2, requires_grad=case.needs[2])
    p, mask, seed, ref_mask = 0.0, None, None, None
    if case.dropout != "off" and A is not None:
        p = 0.3
        if case.dropout == "mask":
            draw = torch.rand(x.shape, generator=torch.Generator().manual_seed(rows))
            mask = ref_mask = draw.to(DEVICE) >= p
        else:
            seed = 1000 + rows
            ref_mask = (lora_dropout_mask(x.shape, p, seed, x.device) if impl == "triton"
                        else dropout_mask_like(x, p, torch.Generator(x.device).manual_seed(seed)))
    y = run(impl, nf4_lora_linear, x, state, b, A, B, 0.5, dropout_p=p, dropout_mask=mask, seed=seed)
    assert y.dtype == dtype and y.shape == (*case.lead, case.out_f)
    x32, A32, B32 = fp32_copy(x), fp32_copy(A), fp32_copy(B)
    ref = nf4_lora_linear_reference(x32, state, fp32_copy(b), A32, B32, 0.5, p, ref_mask)
    check_op(y, ref, [x, A, B], [x32, A32, B32], dtype, ["x", "lora_A", "lora_B"], "nf4_lora_linear")
