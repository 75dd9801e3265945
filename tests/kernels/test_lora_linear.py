"""lora_linear: y, dx, dA and dB against ``lora_linear_reference``, dropout off, from a stored
mask, and (Triton) regenerated from a seed; never a gradient for the frozen W and b."""

import logging
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

from peftloop.kernels import backend, lora_dropout_mask, lora_linear
from peftloop.kernels.lora_linear import MAX_RANK, dropout_mask_like, log_fallback, lora_linear_reference

BATCH, SEQ, IN, OUT, RANK = 3, 7, 35, 19, 5  # 21 rows: 2 row tiles, 3 steps over K, 2 column tiles
SCALING = 2.0
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="no Triton")


def _layer(dtype, rank=RANK, bias=True, seed=0, x_grad=True):
    x = randn(BATCH, SEQ, IN, dtype=dtype, seed=seed, requires_grad=x_grad)
    weight = randn(OUT, IN, dtype=dtype, scale=IN**-0.5, seed=seed + 1)
    b = randn(OUT, dtype=dtype, seed=seed + 2) if bias else None
    lora_A = randn(rank, IN, dtype=dtype, scale=IN**-0.5, seed=seed + 3, requires_grad=True)
    lora_B = randn(OUT, rank, dtype=dtype, scale=0.5, seed=seed + 4, requires_grad=True)
    return x, weight, b, lora_A, lora_B


def _check(impl, x, weight, b, lora_A, lora_B, dtype, p=0.0, mask=None, seed=None, ref_mask=None):
    kw = dict(dropout_p=p, dropout_mask=mask)
    if seed is not None:
        kw["seed"] = seed
    y = run(impl, lora_linear, x, weight, b, lora_A, lora_B, SCALING, **kw)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], OUT)
    got = grads(y, [x, lora_A, lora_B], dtype)
    x32, A32, B32 = fp32_copy(x), fp32_copy(lora_A), fp32_copy(lora_B)
    ref = lora_linear_reference(x32, weight.float(), None if b is None else b.float(), A32, B32, SCALING, p,
                                mask if ref_mask is None else ref_mask)
    expected = grads(ref, [x32, A32, B32], dtype)
    assert_close(y, ref, dtype, "y")
    assert_grads_close(got, expected, dtype, ["x", "lora_A", "lora_B"])
    assert weight.grad is None and (b is None or b.grad is None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", ["off", "mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_lora_linear_matches_reference(impl, dtype, dropout, bias):
    x, weight, b, lora_A, lora_B = _layer(dtype, bias=bias)
    p, mask = 0.0, None
    if dropout == "mask":
        p = 0.3
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE) >= p
    _check(impl, x, weight, b, lora_A, lora_B, dtype, p=p, mask=mask)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_triton_dropout_from_a_seed(dtype):
    """The kernels draw the mask from the seed in the forward pass and draw it again in the
    backward pass (dx and dA); ``lora_dropout_mask`` rebuilds it for the reference."""
    x, weight, b, lora_A, lora_B = _layer(dtype, seed=10)
    p, seed = 0.25, 1234
    mask = lora_dropout_mask(x.shape, p, seed, x.device)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    _check("triton", x, weight, b, lora_A, lora_B, dtype, p=p, seed=seed, ref_mask=mask)


def philox_keep_mask(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """The documented mask, computed independently of Triton: element (r, c) is kept when
    ``tl.rand(seed, r·cols + c) >= p``, where tl.rand is Philox-4x32-10 with counter
    (offset_lo, offset_hi, 0, 0) and key (seed_lo, seed_hi), its first word mapped to [0, 1)."""
    mask32 = np.uint64(0xFFFFFFFF)
    offsets = np.arange(rows * cols, dtype=np.uint64)
    c0, c1 = offsets & mask32, offsets >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_b, prod_a = B * c2, A * c0
        c0, c2, c1, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1,
                          prod_b & mask32, prod_a & mask32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    x = c0.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x).astype(np.float32) * np.float32(4.6566127342e-10)
    return (x >= np.float32(p)).reshape(rows, cols)


@needs_triton
def test_lora_dropout_mask_is_the_documented_philox_draw():
    mask = lora_dropout_mask((3, 5, 70), 0.3, 2**33 + 17, DEVICE)  # a seed above 2**32 uses both key words
    expected = philox_keep_mask(2**33 + 17, 15, 70, 0.3)
    assert np.array_equal(mask.reshape(15, 70).cpu().numpy(), expected)


@needs_triton
def test_lora_dropout_mask_is_a_function_of_the_seed():
    p = 0.25
    a = lora_dropout_mask((2, 40, 96), p, 7, DEVICE)
    assert torch.equal(a, lora_dropout_mask((2, 40, 96), p, 7, DEVICE))
    assert not torch.equal(a, lora_dropout_mask((2, 40, 96), p, 8, DEVICE))
    keep = a.float().mean().item()
    assert abs(keep - (1 - p)) < 0.02, keep  # 7,680 draws: 5 standard deviations is 0.025
    # element (row, col) depends on row·in + col only: a prefix of the rows is the same mask
    assert torch.equal(a.reshape(80, 96)[:50], lora_dropout_mask((50, 96), p, 7, DEVICE))


@needs_triton
def test_lora_triton_seed_drawn_from_torch_rng():
    x, weight, b, lora_A, lora_B = _layer(torch.float32, seed=20)
    x = x[:1]  # one row tile is enough here
    torch.manual_seed(3)
    y1 = run("triton", lora_linear, x, weight, b, lora_A, lora_B, SCALING, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = run("triton", lora_linear, x, weight, b, lora_A, lora_B, SCALING, dropout_p=0.5)
    y3 = run("triton", lora_linear, x, weight, b, lora_A, lora_B, SCALING, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_transposed_input(impl):
    """x as a column-major [rows, in] view: the kernels read it through its strides."""
    dtype = torch.float32
    _, weight, b, lora_A, lora_B = _layer(dtype, seed=30)
    x = randn(IN, 2 * SEQ, seed=31).t().requires_grad_()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(32)).to(DEVICE) >= 0.2
    _check(impl, x, weight, b, lora_A, lora_B, dtype, p=0.2, mask=mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_input_without_grad(impl, dtype):
    """The first layer's input needs no gradient: only dA and dB are computed."""
    x, weight, b, lora_A, lora_B = _layer(dtype, seed=40, x_grad=False)
    _check(impl, x, weight, b, lora_A, lora_B, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_rank_17_pads_to_32(impl):
    x, weight, b, lora_A, lora_B = _layer(torch.float32, rank=17, seed=50)
    _check(impl, x, weight, b, lora_A, lora_B, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_linear_under_bf16_autocast(impl):
    """fp32 tensors under autocast run in bf16, like F.linear would."""
    x, weight, b, lora_A, lora_B = _layer(torch.float32, seed=60)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = run(impl, lora_linear, x, weight, b, lora_A, lora_B, SCALING)
        got = grads(y, [x, lora_A, lora_B], torch.float32)
        x_r, A_r, B_r = fp32_copy(x), fp32_copy(lora_A), fp32_copy(lora_B)
        ref = lora_linear_reference(x_r, weight, b, A_r, B_r, SCALING)
        expected = grads(ref, [x_r, A_r, B_r], torch.float32)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in got] == [torch.float32] * 3  # the casts are differentiable
    assert_close(y, ref, torch.bfloat16, "y")
    assert_grads_close(got, expected, torch.bfloat16, ["x", "lora_A", "lora_B"])


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_lora_linear_casts_mixed_dtypes_itself(impl):
    """The op owns the casting: bf16 x and W with fp32 A and B (a bf16 model's fp32 adapter),
    autocast off, compute in x's dtype; the fp32 parameters get fp32 gradients, and every value
    equals the call on the tensors cast by the caller."""
    x, weight, b, lora_A, lora_B = _layer(torch.bfloat16, seed=80)
    A32, B32 = fp32_copy(lora_A), fp32_copy(lora_B)
    y = run(impl, lora_linear, x, weight, b, A32, B32, SCALING)
    y_cast = run(impl, lora_linear, x, weight, b, lora_A, lora_B, SCALING)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_cast)
    got = grads(y, [x, A32, B32], torch.bfloat16)
    expected = grads(y_cast, [x, lora_A, lora_B], torch.bfloat16)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, e in zip(got, expected):
        assert torch.equal(g, e.to(g.dtype))


@needs_triton
def test_lora_triton_falls_back_above_max_rank(caplog):
    """The fallback is logged once per reason per process; the test starts from a clean slate
    so that it passes whichever test ran (and fell back for the same reason) before it."""
    log_fallback.cache_clear()
    x, weight, b, lora_A, lora_B = _layer(torch.float32, rank=MAX_RANK + 1, seed=70)
    with caplog.at_level(logging.WARNING, logger="peftloop.kernels.lora_linear"):
        _check("triton", x, weight, b, lora_A, lora_B, torch.float32)
        assert caplog.text.count(f"rank {MAX_RANK + 1} > {MAX_RANK}") == 1
        _check("triton", x, weight, b, lora_A, lora_B, torch.float32)
    assert caplog.text.count(f"rank {MAX_RANK + 1} > {MAX_RANK}") == 1  # not again


def test_lora_linear_rejects_a_trainable_base():
    x, weight, b, lora_A, lora_B = _layer(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.requires_grad_(), b, lora_A, lora_B, SCALING)


def test_lora_linear_torch_paths_draw_a_mask_when_none_is_given():
    x, weight, b, lora_A, lora_B = _layer(torch.float32)
    for impl in ("torch", "reference"):
        with backend(impl):
            y_a = lora_linear(x, weight, b, lora_A, lora_B, SCALING, dropout_p=0.5, seed=5)
            y_b = lora_linear(x, weight, b, lora_A, lora_B, SCALING, dropout_p=0.5, seed=5)
            y_0 = lora_linear(x, weight, b, lora_A, lora_B, SCALING)
        assert torch.equal(y_a, y_b) and not torch.allclose(y_a, y_0)


# ---------------------------------------------------------------------------------------
# Property test: drawn shapes, every combination of which inputs need a gradient.
# Under the interpreter the tiles are 16x16x16 with GROUP_M = 2: rows past 32 make a third
# row tile (a group of one), features past 16 a second column tile, ranks pad to 16 or 32.
# ---------------------------------------------------------------------------------------


class LoRACase(NamedTuple):
    lead: tuple  # x's leading dims (their product is the row count)
    in_f: int
    out_f: int
    rank: int
    bias: bool
    needs: tuple  # requires_grad of (x, lora_A, lora_B)
    dropout: str  # "off", "mask" (a stored mask) or "seed" (drawn from a seed)
    dtype: torch.dtype


@st.composite
def lora_cases(draw):
    lead = draw(st.one_of(st.tuples(st.integers(1, 70)), st.tuples(st.integers(1, 3), st.integers(1, 23))))
    return LoRACase(lead, draw(st.integers(1, 48)), draw(st.integers(1, 40)),
                    draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17])), draw(st.booleans()),
                    draw(st.sampled_from(grad_combinations(3))),
                    draw(st.sampled_from(["off", "mask", "seed"])), draw(st.sampled_from(DTYPES)))


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(case=lora_cases())
# x without grad, 41 rows (3 row tiles: the last group has one), 37 in (3 column tiles): the
# dA-only backward must still write gb for every row (issue: gb rows left unwritten).
@example(case=LoRACase((41,), 37, 19, 5, False, (False, True, True), "off", F32))
@example(case=LoRACase((41,), 37, 19, 5, True, (False, True, False), "seed", BF16))
@example(case=LoRACase((1,), 37, 19, 1, False, (True, True, True), "off", F32))  # one row, rank 1
@example(case=LoRACase((1, 1), 1, 1, 1, True, (True, False, True), "mask", F32))  # one of everything
@example(case=LoRACase((2, 33), 17, 33, 17, False, (True, False, False), "seed", F32))  # rank 17 -> 32
@example(case=LoRACase((5,), 16, 16, 16, True, (False, False, True), "mask", BF16))  # exact tiles
@example(case=LoRACase((3, 7), 35, 19, 3, True, (False, False, False), "off", F32))  # nothing needs grad
def test_lora_linear_property(impl, case):
    dtype, rows = case.dtype, int(np.prod(case.lead))
    x = randn(*case.lead, case.in_f, dtype=dtype, seed=rows, requires_grad=case.needs[0])
    weight = randn(case.out_f, case.in_f, dtype=dtype, scale=case.in_f**-0.5, seed=1)
    b = randn(case.out_f, dtype=dtype, seed=2) if case.bias else None
    lora_A = randn(case.rank, case.in_f, dtype=dtype, scale=case.in_f**-0.5, seed=3,
                   requires_grad=case.needs[1])
    lora_B = randn(case.out_f, case.rank, dtype=dtype, scale=0.5, seed=4, requires_grad=case.needs[2])
    p, mask, seed, ref_mask = 0.0, None, None, None
    if case.dropout != "off":
        p = 0.3
    if case.dropout == "mask":
        mask = ref_mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(rows)).to(DEVICE) >= p
    elif case.dropout == "seed":
        seed = 1000 + rows
        if impl == "triton":
            ref_mask = lora_dropout_mask(x.shape, p, seed, x.device)
            assert ref_mask.view(torch.uint8).max() <= 1, "the mask kernel left bytes unwritten"
        else:
            ref_mask = dropout_mask_like(x, p, torch.Generator(x.device).manual_seed(seed))
    y = run(impl, lora_linear, x, weight, b, lora_A, lora_B, SCALING, dropout_p=p, dropout_mask=mask,
            seed=seed)
    assert y.dtype == dtype and y.shape == (*case.lead, case.out_f)
    x32, A32, B32 = fp32_copy(x), fp32_copy(lora_A), fp32_copy(lora_B)
    ref = lora_linear_reference(x32, weight.float(), fp32_copy(b), A32, B32, SCALING, p, ref_mask)
    check_op(y, ref, [x, lora_A, lora_B], [x32, A32, B32], dtype, ["x", "lora_A", "lora_B"], "lora_linear")
