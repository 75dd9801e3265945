"""linear_cross_entropy: loss and the gradients of hidden, weight and bias against the
materialised reference ``F.cross_entropy(F.linear(h, W, b).float(), y)``."""

from typing import NamedTuple

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_utils import (
    DEVICE,
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

from peftloop.kernels import linear_cross_entropy
from peftloop.kernels.linear_cross_entropy import CPU_CHUNK_FACTOR, chunk_rows, linear_cross_entropy_reference

N, H, V = 13, 24, 77  # 4-row chunks (the last one short); 3 vocabulary blocks in the interpreter


def _labels(n, vocab, ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[ignored] = -100
    return labels.to(DEVICE)


def _inputs(dtype, n=N, bias=False, weight_trainable=True, seed=0):
    hidden = randn(n, H, dtype=dtype, seed=seed, requires_grad=True)
    weight = randn(V, H, dtype=dtype, scale=H**-0.5 * 3, seed=seed + 1, requires_grad=weight_trainable)
    b = randn(V, dtype=dtype, seed=seed + 2, requires_grad=True) if bias else None
    return hidden, weight, b


def _check(impl, hidden, weight, labels, dtype, **kw):
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    bias = kw.get("bias")
    got = grads(loss * 3.0, [hidden, weight, bias], dtype)  # an upstream gradient other than 1
    h32, w32, b32 = fp32_copy(hidden), fp32_copy(weight), fp32_copy(bias)
    ref = linear_cross_entropy_reference(h32, w32, labels, **{**kw, "bias": b32})
    expected = grads(ref * 3.0, [h32, w32, b32], dtype)
    assert_close(loss, ref, dtype, "loss")
    assert_grads_close(got, expected, dtype, ["hidden", "weight", "bias"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lce_matches_reference(impl, dtype, smoothing, reduction):
    hidden, weight, _ = _inputs(dtype)
    labels = _labels(N, V, ignored=[0, 5, 6, 12])
    _check(impl, hidden, weight, labels, dtype, label_smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lce_bias_and_frozen_head(impl, dtype):
    hidden, weight, bias = _inputs(dtype, bias=True, weight_trainable=False, seed=3)
    labels = _labels(N, V, ignored=[2])
    _check(impl, hidden, weight, labels, dtype, bias=bias, label_smoothing=0.05)
    assert weight.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_large_logits_stay_exact(impl):
    """Logits in the hundreds (a confident model; exp overflows fp32 past 88): the online
    log-sum-exp must rescale by the running maximum, block after block."""
    dtype = torch.float32
    hidden, weight, _ = _inputs(dtype, seed=11)
    with torch.no_grad():
        weight[:3] *= 40.0  # the first vocabulary block dominates, later blocks are far below it
    labels = _labels(N, V, ignored=[3], seed=12)
    _check(impl, hidden, weight, labels, dtype, label_smoothing=0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_strided_hidden(impl):
    """hidden as a transposed-back view (column-major rows), as after a permute in a model."""
    dtype = torch.float32
    hidden = randn(H, N, seed=4).t().requires_grad_()
    _, weight, _ = _inputs(dtype, seed=5)
    _check(impl, hidden, weight, _labels(N, V, ignored=[1, 2]), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lce_every_label_ignored(impl, reduction):
    """sum: 0 with zero gradients; mean: NaN (0/0), as torch's cross_entropy gives."""
    hidden, weight, _ = _inputs(torch.float32, n=5, seed=6)
    labels = torch.full((5,), -100, device=DEVICE)
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, reduction=reduction)
    ref = linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction)
    assert_close(loss, ref, torch.float32, "loss")
    if reduction == "sum":
        dh, dw = torch.autograd.grad(loss, [hidden, weight])
        assert not dh.any() and not dw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_custom_ignore_index_and_no_grad(impl):
    hidden, weight, _ = _inputs(torch.float32, seed=7)
    labels = _labels(N, V, ignored=[]).masked_fill(torch.arange(N, device=DEVICE) % 4 == 0, 3)
    with torch.no_grad():
        loss = run(impl, linear_cross_entropy, hidden, weight, labels, ignore_index=3)
    ref = linear_cross_entropy_reference(hidden, weight, labels, ignore_index=3)
    assert not loss.requires_grad
    assert_close(loss, ref, torch.float32, "loss")


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_under_bf16_autocast(impl):
    """fp32 hidden and head under autocast: logits in bf16, as F.linear gives, then fp32 softmax."""
    hidden, weight, _ = _inputs(torch.float32, seed=8)
    labels = _labels(N, V, ignored=[4])
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = run(impl, linear_cross_entropy, hidden, weight, labels)
        got = grads(loss, [hidden, weight], torch.float32)
        h_ref, w_ref = fp32_copy(hidden), fp32_copy(weight)
        ref = linear_cross_entropy_reference(h_ref, w_ref, labels)
        expected = grads(ref, [h_ref, w_ref], torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    # Both sides computed the logits in bf16: compare at the bf16 tolerance.
    assert_close(loss, ref, torch.bfloat16, "loss")
    assert_grads_close(got, expected, torch.bfloat16, ["hidden", "weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lce_torch_path_over_several_chunks(dtype):
    """The torch path takes chunks 8x Liger's; with V >> H it still walks several (here 32 + 8 rows)."""
    n, h, v = 40, 8, 101
    assert chunk_rows(n, v, h, CPU_CHUNK_FACTOR) == 32
    hidden = randn(n, h, dtype=dtype, seed=13, requires_grad=True)
    weight = randn(v, h, dtype=dtype, seed=14, requires_grad=True)
    labels = _labels(n, v, ignored=[0, 33, 39], seed=15)
    _check("torch", hidden, weight, labels, dtype, label_smoothing=0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_second_backward_is_refused(impl):
    """The gradients are scaled in place by the backward pass, so it can run only once."""
    hidden, weight, _ = _inputs(torch.float32, seed=16)
    loss = run(impl, linear_cross_entropy, hidden, weight, _labels(N, V, ignored=[]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_lce_chunks_follow_liger_rule():
    # rows · V ≈ N · H: SmolLM2-135M's 2,048 tokens, hidden 576, vocabulary 49,152 -> 32-row chunks
    assert chunk_rows(2048, 49152, 576) == 32
    assert chunk_rows(N, V, H) == 4
    assert chunk_rows(1, 10, 100) == 1


def test_lce_rejects_bad_inputs():
    h, w = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(h, w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.tensor([0, 5, -100]))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), reduction="none")


# ---------------------------------------------------------------------------------------
# Property test: drawn sizes, ignored rows placed against the chunk boundaries, smoothing,
# both reductions, and every combination of which of hidden, weight and bias need a gradient.
# ---------------------------------------------------------------------------------------


class CECase(NamedTuple):
    n: int
    hidden: int
    vocab: int
    ignored: str  # "none", "some", "all", "first_chunk" (a whole chunk), "boundary" (both sides of one)
    ignore_index: int  # -100, or 0: a real class that marks ignored rows
    smoothing: float
    reduction: str
    bias: bool
    needs: tuple  # requires_grad of (hidden, weight, bias); weight False: a frozen head
    dtype: torch.dtype


@st.composite
def ce_cases(draw):
    return CECase(draw(st.integers(1, 40)), draw(st.integers(1, 24)), draw(st.integers(2, 100)),
                  draw(st.sampled_from(["none", "some", "all", "first_chunk", "boundary"])),
                  draw(st.sampled_from([-100, 0])), draw(st.sampled_from([0.0, 0.1, 1.0])),
                  draw(st.sampled_from(["sum", "mean"])), draw(st.booleans()),
                  draw(st.sampled_from(grad_combinations(3))), draw(st.sampled_from(DTYPES)))


def _case_labels(case, chunk):
    g = torch.Generator().manual_seed(case.n * 1000 + case.vocab)
    labels = torch.randint(0, case.vocab, (case.n,), generator=g)
    rows = torch.arange(case.n)
    ignored = {"none": rows < 0, "some": torch.rand(case.n, generator=g) < 0.3, "all": rows >= 0,
               "first_chunk": rows < chunk, "boundary": (rows == chunk - 1) | (rows == chunk)}[case.ignored]
    return labels.masked_fill(ignored, case.ignore_index).to(DEVICE)


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(case=ce_cases())
@example(case=CECase(13, 24, 77, "boundary", -100, 0.1, "mean", True, (True, True, True), F32))
@example(case=CECase(13, 24, 77, "first_chunk", -100, 0.0, "sum", False, (True, False, False), BF16))
@example(case=CECase(5, 7, 11, "all", -100, 0.1, "sum", True, (True, True, False), F32))  # every row ignored
# one row, label smoothing 1 (the uniform target)
@example(case=CECase(1, 3, 2, "none", -100, 1.0, "mean", False, (False, True, False), F32))
@example(case=CECase(40, 8, 101, "some", 0, 0.1, "sum", True, (False, False, True), BF16))  # only the bias
@example(case=CECase(9, 5, 33, "some", -100, 0.0, "mean", True, (False, False, False), F32))  # no grad at all
def test_lce_property(impl, case):
    dtype = case.dtype
    hidden = randn(case.n, case.hidden, dtype=dtype, seed=case.n, requires_grad=case.needs[0])
    weight = randn(case.vocab, case.hidden, dtype=dtype, scale=case.hidden**-0.5 * 3, seed=case.vocab,
                   requires_grad=case.needs[1])
    bias = randn(case.vocab, dtype=dtype, seed=7, requires_grad=case.needs[2]) if case.bias else None
    chunk = chunk_rows(case.n, case.vocab, case.hidden, 1 if impl == "triton" else CPU_CHUNK_FACTOR)
    labels = _case_labels(case, chunk)
    kw = dict(ignore_index=case.ignore_index, label_smoothing=case.smoothing, reduction=case.reduction)
    loss = run(impl, linear_cross_entropy, hidden, weight, labels, bias=bias, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    h32, w32, b32 = fp32_copy(hidden), fp32_copy(weight), fp32_copy(bias)
    ref = linear_cross_entropy_reference(h32, w32, labels, bias=b32, **kw)
    check_op(loss * 3.0, ref * 3.0, [hidden, weight, bias], [h32, w32, b32], dtype,
             ["hidden", "weight", "bias"], "linear_cross_entropy")
