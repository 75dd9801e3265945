"""Rotary position embedding (RoPE), Hugging Face convention, for q and k together.

    rotate_half(x) = cat(−x₂, x₁)           (x₁, x₂: the first and second half of the head dim)
    x_rot = x ⊙ cos + rotate_half(x) ⊙ sin

Shapes: q ``[B, n_heads, T, D]``, k ``[B, n_kv_heads, T, D]``, cos/sin ``[B, T, D]`` (HF
builds them as cat(freqs, freqs); nothing here assumes the two halves are equal) or
``[T, D]``; a batch of 1 broadcasts. q and k may be any strided views (typically
``[B, T, H, D]`` transposed to ``[B, H, T, D]``): the kernel reads through the strides and
the results keep the input layout. cos and sin are constants (no gradient is returned
for them; if one requires grad, the reference runs so autograd stays correct).

Implementations (see ``_dispatch``):
- ``apply_rope_reference``: HF's ``apply_rotary_pos_emb``.
- ``RoPEFunction`` with ``impl="torch"``: the same forward in one Function for q and k; the
  backward is the transposed rotation, so nothing but cos and sin is saved.
- ``RoPEFunction`` with ``impl="triton"``: one program per (batch, position) that loads
  that position's cos/sin once and rotates every head of q (then of k) in fp32.
"""

from __future__ import annotations

import torch

from ._dispatch import backend_for, interpreting
from ._triton_utils import cast, new_output, tl, triton

# Heads per step of a program's loop. All heads of a position at once on a GPU (Llama-8B:
# 32 q heads x 64 half-dims = 2048 elements per operand, comfortably in registers); 2 under
# the interpreter so the test shapes loop over heads with a ragged last step.
BLOCK_HEADS_GPU = 32
BLOCK_HEADS_INTERPRETER = 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """The definition of correct: HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    cos, sin = _as_btd(cos, q).unsqueeze(1), _as_btd(sin, q).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _as_btd(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cos/sin as ``[B, T, D]`` (``[T, D]`` gains a batch dimension)."""
    return t.unsqueeze(0) if t.dim() == 2 else t


# ---------------------------------------------------------------------------------------
# Triton kernel: forward and backward are the same program with the sign of the sin terms
# moved (see RoPEFunction's docstring).
# ---------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, seq_len, n_heads, half,
                 sx_b, sx_h, sx_t, sx_d, so_b, so_h, so_t, so_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 BACKWARD: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = (pid % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    c_row = cos_ptr + b * sc_b + t * sc_t
    s_row = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(c_row + d * sc_d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d + half) * sc_d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d * ss_d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (d + half) * ss_d, mask=d_mask, other=0.0).to(tl.float32)
    x_row = x_ptr + b * sx_b + t * sx_t
    o_row = out_ptr + b * so_b + t * so_t
    for h0 in range(0, n_heads, BLOCK_HEADS):
        h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (h[:, None] < n_heads) & d_mask[None, :]
        x1_ptrs = x_row + h[:, None] * sx_h + d[None, :] * sx_d
        o1_ptrs = o_row + h[:, None] * so_h + d[None, :] * so_d
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + half * sx_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o1_ptrs, cast(o1, out_ptr.dtype.element_ty), mask=mask)
        tl.store(o1_ptrs + half * so_d, cast(o2, out_ptr.dtype.element_ty), mask=mask)


def _rope_triton(x, cos, sin, out_dtype, backward: bool) -> torch.Tensor:
    batch, n_heads, seq_len, head_dim = x.shape
    out = new_output(x.shape, out_dtype, x.device, like=x)  # keeps x's layout (e.g. a transposed view)
    if x.numel() == 0:
        return out
    cos = cos.expand(batch, seq_len, head_dim)
    sin = sin.expand(batch, seq_len, head_dim)
    half = head_dim // 2
    if interpreting():
        block_heads = BLOCK_HEADS_INTERPRETER
    else:
        block_heads = min(BLOCK_HEADS_GPU, triton.next_power_of_2(n_heads))
    _rope_kernel[(batch * seq_len,)](
        x, out, cos, sin, seq_len, n_heads, half, *x.stride(), *out.stride(), *cos.stride(), *sin.stride(),
        BACKWARD=backward, BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------
# Fast torch path (CPU).
# ---------------------------------------------------------------------------------------


def _rope_torch(x, cos, sin, backward: bool) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if not backward:
        return x * cos + rotate_half(x) * sin
    # Rᵀ(v) = cat(v₂, −v₁) for R = rotate_half
    xs = x * sin
    xs1, xs2 = xs.chunk(2, dim=-1)
    return torch.cat((xs2, -xs1), dim=-1).add_(x * cos)


class RoPEFunction(torch.autograd.Function):
    r"""``o = x ⊙ c + R(x) ⊙ s`` per head, for q and k, with R(x) = cat(−x₂, x₁).

    Written by halves of the head dim (c₁, c₂, s₁, s₂ the halves of cos and sin):

        o₁ = x₁ ⊙ c₁ − x₂ ⊙ s₁
        o₂ = x₂ ⊙ c₂ + x₁ ⊙ s₂

    The map is linear in x, so the backward pass applies its transpose to g = dL/do:

        dL/dx₁ = g₁ ⊙ c₁ + g₂ ⊙ s₂
        dL/dx₂ = g₂ ⊙ c₂ − g₁ ⊙ s₁

    i.e. dL/dx = g ⊙ c + Rᵀ(g ⊙ s) with Rᵀ(v) = cat(v₂, −v₁). (With HF's cos = cat(f, f),
    this is the rotation by −θ.) Only cos and sin are saved; q and k are not needed.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, impl):
        ctx.impl = impl
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        q_dtype = torch.promote_types(q.dtype, cos.dtype)
        k_dtype = torch.promote_types(k.dtype, cos.dtype)
        if impl == "triton":
            return _rope_triton(q, cos, sin, q_dtype, False), _rope_triton(k, cos, sin, k_dtype, False)
        return _rope_torch(q, cos, sin, False), _rope_torch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        need_dq, need_dk, _, _, _ = ctx.needs_input_grad
        grads = []
        for g, dtype, need in zip((dq_rot, dk_rot), ctx.dtypes, (need_dq, need_dk)):
            if g is None or not need:
                grads.append(None)
            elif ctx.impl == "triton":
                grads.append(_rope_triton(g, cos, sin, dtype, True))
            else:
                grads.append(_rope_torch(g, cos, sin, True).to(dtype))
        return grads[0], grads[1], None, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)``, dispatched by ``backend_for(q)``."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, heads, T, D]")
    cos, sin = _as_btd(cos, q), _as_btd(sin, q)
    batch, _, seq_len, head_dim = q.shape
    if head_dim % 2 or k.shape[-1] != head_dim or cos.shape != sin.shape \
            or cos.shape[1:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch) \
            or k.shape[0] != batch or k.shape[2] != seq_len:
        raise ValueError(
            f"apply_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
            f"sin {tuple(sin.shape)}:"
            " expected q [B, H, T, D], k [B, H_kv, T, D], cos/sin [B or 1, T, D] with D even"
        )
    impl = backend_for(q)
    if impl == "reference" or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return apply_rope_reference(q, k, cos, sin)
    with torch.autocast(q.device.type, enabled=False):
        return RoPEFunction.apply(q, k, cos, sin, impl)
