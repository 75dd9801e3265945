"""apply_rope: q and k rotations and their gradients against ``apply_rope_reference`` (HF)."""

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

from peftloop.kernels import apply_rope
from peftloop.kernels.rope import apply_rope_reference


def _cos_sin(batch, seq, dim, dtype, seed=0):
    """HF's tables: cos/sin of cat(freqs, freqs), position-dependent per batch row."""
    angles = randn(batch, seq, dim // 2, scale=3.0, seed=seed)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check(impl, q, k, cos, sin, dtype):
    q_rot, k_rot = run(impl, apply_rope, q, k, cos, sin)
    ref_dtypes = [t.dtype for t in apply_rope_reference(q.detach(), k.detach(), cos, sin)]
    assert [q_rot.dtype, k_rot.dtype] == ref_dtypes
    got = grads((q_rot, k_rot), [q, k], dtype)
    q32, k32 = fp32_copy(q), fp32_copy(k)
    ref_q, ref_k = apply_rope_reference(q32, k32, cos.float(), sin.float())
    expected = grads((ref_q, ref_k), [q32, k32], dtype)
    assert_close(q_rot, ref_q, dtype, "q rotated")
    assert_close(k_rot, ref_k, dtype, "k rotated")
    assert_grads_close(got, expected, dtype, ["q", "k"])
    return q_rot


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_transposed_views(impl, dtype):
    """The model's layout: [B, T, H, D] projections viewed as [B, H, T, D]; GQA (3 q heads, 1 kv head)."""
    B, T, H, H_kv, D = 2, 4, 3, 1, 12
    q = randn(B, T, H, D, dtype=dtype, seed=1).transpose(1, 2).requires_grad_()
    k = randn(B, T, H_kv, D, dtype=dtype, seed=2).transpose(1, 2).requires_grad_()
    cos, sin = _cos_sin(B, T, D, dtype)
    q_rot = _check(impl, q, k, cos, sin, dtype)
    assert q_rot.stride() == q.stride()  # the result keeps the input's layout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_contiguous_broadcast_tables(impl, dtype):
    """Contiguous q/k, one table for the whole batch ([1, T, D]), 4 q heads and 2 kv heads."""
    B, T, H, H_kv, D = 2, 3, 4, 2, 8
    q = randn(B, H, T, D, dtype=dtype, seed=3, requires_grad=True)
    k = randn(B, H_kv, T, D, dtype=dtype, seed=4, requires_grad=True)
    cos, sin = _cos_sin(1, T, D, dtype, seed=5)
    _check(impl, q, k, cos, sin, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_unequal_halves_and_2d_tables(impl):
    """Nothing assumes cos = cat(f, f): arbitrary tables, given as [T, D]."""
    B, T, H, D = 1, 3, 2, 6
    q = randn(B, H, T, D, seed=6, requires_grad=True)
    k = randn(B, H, T, D, seed=7, requires_grad=True)
    cos, sin = randn(T, D, seed=8), randn(T, D, seed=9)
    _check(impl, q, k, cos, sin, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_only_q_needs_grad(impl):
    q = randn(1, 2, 3, 4, seed=10, requires_grad=True)
    k = randn(1, 1, 3, 4, seed=11)
    cos, sin = _cos_sin(1, 3, 4, torch.float32)
    _check(impl, q, k, cos, sin, torch.float32)


def test_rope_tables_with_grad_take_the_reference_path():
    q, k = randn(1, 2, 3, 4, seed=12, requires_grad=True), randn(1, 2, 3, 4, seed=13)
    cos = randn(1, 3, 4, seed=14, requires_grad=True)
    sin = randn(1, 3, 4, seed=15)
    q_rot, _ = apply_rope(q, k, cos, sin)
    (dcos,) = torch.autograd.grad(q_rot.sum(), [cos])
    ref_cos = cos.detach().clone().requires_grad_()
    (ref_dcos,) = torch.autograd.grad(apply_rope_reference(q, k, ref_cos, sin)[0].sum(), [ref_cos])
    assert_close(dcos, ref_dcos, torch.float32, "d cos")


def test_rope_rejects_bad_shapes():
    q = torch.zeros(1, 2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="expected q"):
        apply_rope(q, q, torch.zeros(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
@property_settings(max_examples=10)
@given(batch=st.integers(1, 2), heads=st.integers(1, 5), kv_heads=st.integers(1, 3), seq=st.integers(1, 5),
       half=st.integers(1, 9), tables=st.sampled_from(["BTD", "1TD", "TD"]), transposed=st.booleans(),
       needs=st.sampled_from(grad_combinations(2)), dtype=st.sampled_from(DTYPES))
@example(batch=1, heads=1, kv_heads=1, seq=1, half=1, tables="TD", transposed=False, needs=(True, True),
         dtype=torch.float32)  # one position of one 2-element head
@example(batch=2, heads=5, kv_heads=3, seq=3, half=7, tables="BTD", transposed=True, needs=(True, False),
         dtype=torch.bfloat16)  # odd head counts: ragged last step of 2 heads; only q
@example(batch=2, heads=4, kv_heads=1, seq=2, half=3, tables="1TD", transposed=False, needs=(False, True),
         dtype=torch.float32)  # only k
@example(batch=1, heads=2, kv_heads=2, seq=2, half=2, tables="TD", transposed=True, needs=(False, False),
         dtype=torch.float32)  # nothing needs grad
def test_rope_property(impl, batch, heads, kv_heads, seq, half, tables, transposed, needs, dtype):
    """Drawn head counts, lengths and (odd) half dims; [B, T, D], [1, T, D] and [T, D] tables;
    contiguous or [B, T, H, D] transposed views; every combination of which of q, k need a gradient."""
    dim = 2 * half

    def qk(h, seed, need):
        if transposed:
            return randn(batch, seq, h, dim, dtype=dtype, seed=seed).transpose(1, 2).requires_grad_(need)
        return randn(batch, h, seq, dim, dtype=dtype, seed=seed, requires_grad=need)

    q, k = qk(heads, 1, needs[0]), qk(kv_heads, 2, needs[1])
    cos, sin = _cos_sin(batch if tables == "BTD" else 1, seq, dim, dtype, seed=3)
    if tables == "TD":
        cos, sin = cos[0], sin[0]
    out = run(impl, apply_rope, q, k, cos, sin)
    q32, k32 = fp32_copy(q), fp32_copy(k)
    ref = apply_rope_reference(q32, k32, cos.float(), sin.float())
    check_op(out, ref, [q, k], [q32, k32], dtype, ["q", "k"], "apply_rope")
