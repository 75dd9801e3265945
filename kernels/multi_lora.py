"""Multi-adapter LoRA linear: one frozen base, K adapters, each on its own rows of the input.

    y[rows of adapter k] = x·Wᵀ + b + s_k·(dropout_k(x)·A_kᵀ)·B_kᵀ      (rows in no segment: x·Wᵀ + b)

Shapes: x ``[rows, ..., in]``, W ``[out, in]`` (or an NF4 state of that shape), A_k ``[r_k, in]``,
B_k ``[out, r_k]``; ranks, scalings and dropout rates differ between adapters. The rows of one
adapter are one contiguous ``Segment(adapter, start, end)`` over dim 0 of x.

The point of the op is that a micro-batch fused from several adapters' rows pays for the base
matmul once: x·Wᵀ runs over all rows (and dL/dx = g·W once in the backward pass), while each
adapter's rank-r_k products run over its own segment only, as dense matmuls. The maths per
segment is ``lora_linear``'s (see ``LoRALinearFunction``); gradients reach only the adapter
that owns a row.

Implementations (see ``_dispatch``):
- ``multi_lora_linear_reference``: per segment ``lora_linear_reference`` on its rows, the base
  alone elsewhere, with autograd.
- ``MultiLoRALinearFunction``, torch path: one F.linear over all rows, then per segment
  ``u = x_d·A_kᵀ`` and ``y += s_k·u·B_kᵀ`` in place on the segment's rows.
- ``MultiLoRALinearFunction``, Triton path (``fused``): the segmented kernels below. Each tile
  of rows lies inside one segment (or in no segment: base only), so the forward kernel is
  ``lora_linear``'s fused forward with the tile's adapter looked up from a tile table.

Dropout: each segment draws its mask (torch path) or seed (kernels) exactly as ``lora_linear``
draws it for x = that segment's rows, so adapter k's rows get the mask a ``LoRALinear`` holding
adapter k would draw on them. ``rng_states`` (adapter -> torch CPU RNG state) gives each adapter
its own random stream: the state is swapped in around the adapter's draw and the advanced state
stored back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import backend_for, matmul_dtype
from .lora_linear import (
    LoRANeeds,
    cast_all,
    check_dropout,
    compute_dtype,
    draw_dropout,
    log_fallback,
    lora_backward,
    lora_linear_reference,
    triton_ineligible,
)
from .nf4 import NF4State, nf4_dequantize, nf4_dequantize_reference


class Segment(NamedTuple):
    """Rows ``start:end`` (over dim 0 of x) belong to adapter ``adapter``."""

    adapter: int
    start: int
    end: int


class SegmentPlan(NamedTuple):
    """One non-empty segment as the Function runs it: rows of x viewed as ``[rows, in]``."""

    adapter: int
    start: int  # first row of x2
    end: int
    scaling: float
    dropout_p: float
    mask2: torch.Tensor | None  # bool [end - start, in], or None (no dropout or the kernels' seed)
    seed: int


def check_segments(segments, rows: int, n_adapters: int, op: str = "multi_lora_linear") -> list[Segment]:
    """The segments as ``Segment``s, refused unless each names an adapter, lies within the rows,
    overlaps no other and no adapter has two."""
    segments = [Segment(*map(int, s)) for s in segments]
    seen, covered = set(), []
    for s in segments:
        if not 0 <= s.adapter < n_adapters:
            raise ValueError(f"{op}: segment {tuple(s)} names adapter {s.adapter}; there are {n_adapters}")
        if not 0 <= s.start <= s.end <= rows:
            raise ValueError(f"{op}: segment {tuple(s)} is not within the {rows} rows of x")
        if s.adapter in seen:
            raise ValueError(f"{op}: adapter {s.adapter} has two segments; its rows must be contiguous")
        seen.add(s.adapter)
        covered.append((s.start, s.end, s))
    covered.sort()
    for (_, end, a), (start, _, b) in zip(covered, covered[1:]):
        if start < end:
            raise ValueError(f"{op}: segments {tuple(a)} and {tuple(b)} overlap")
    return segments


# ---------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------


def multi_lora_linear_reference(x, weight, bias, lora_As, lora_Bs, scalings, segments, dropout_ps=None,
                                dropout_masks=None):
    """The definition of correct: ``lora_linear_reference`` on each segment's rows (with its
    adapter's A, B, scaling, dropout rate and ``dropout_masks[k]``, of the segment's shape),
    ``x·Wᵀ + b`` on rows in no segment. ``weight`` may be an ``NF4State``."""
    if isinstance(weight, NF4State):
        weight = nf4_dequantize_reference(weight, x.dtype)
    segments = check_segments(segments, x.shape[0], len(lora_As))
    by_start = {s.start: s for s in segments if s.end > s.start}
    pieces, row = [], 0
    while row < x.shape[0]:
        s = by_start.get(row)
        if s is None:
            end = min([t.start for t in segments if t.start > row and t.end > t.start] + [x.shape[0]])
            pieces.append(F.linear(x[row:end], weight, bias))
            row = end
            continue
        k = s.adapter
        p = 0.0 if dropout_ps is None else dropout_ps[k]
        mask = None if (dropout_masks is None or p == 0.0) else dropout_masks[k]
        pieces.append(lora_linear_reference(x[s.start:s.end], weight, bias, lora_As[k], lora_Bs[k],
                                            scalings[k], p, mask))
        row = s.end
    if not pieces:
        return F.linear(x, weight, bias)
    return torch.cat(pieces, dim=0)


# ---------------------------------------------------------------------------------------
# The torch path, on 2-D tensors
# ---------------------------------------------------------------------------------------


def _masked(x2: torch.Tensor, mask2: torch.Tensor | None) -> torch.Tensor:
    return x2 if mask2 is None else torch.where(mask2, x2, 0.0)


def multi_lora_forward(x2, weight, bias, factors, plans):
    """``(y, us)``: y = x·Wᵀ + b over all rows, plus s_k·u_k·B_kᵀ on each segment's rows, with
    u_k = (x_k ⊙ M_k)·A_kᵀ/(1-p_k) (kept for dB) — ``lora_forward``'s arithmetic, one base
    matmul. ``factors``: ``[(A, B)]`` per plan. Low precision on the CPU as ``lora_forward``."""
    out_dtype, compute = x2.dtype, matmul_dtype(x2)
    if compute != out_dtype:
        x2, weight, bias = cast_all(compute, x2, weight, bias)
        factors = [cast_all(compute, A, B) for A, B in factors]
    y = F.linear(x2, weight, bias)
    us = []
    for plan, (A, B) in zip(plans, factors):
        u = _masked(x2[plan.start:plan.end], plan.mask2) @ A.t()
        if plan.mask2 is not None:
            u.mul_(1.0 / (1.0 - plan.dropout_p))
        y[plan.start:plan.end].addmm_(u, B.t(), alpha=plan.scaling)
        us.append(u)
    return y.to(out_dtype), us


def multi_lora_backward(g, x2, weight, factors, us, plans, need_x: bool, needs_A, needs_B):
    """``(dx, [(dA, dB)])``: dx = g·W over all rows (one matmul) plus each segment's
    s_k·(g_k·B_k)·A_k ⊙ M_k/(1-p_k); dA_k and dB_k by ``lora_backward`` on the segment's rows.
    Each gradient None unless asked for; results in g's dtype."""
    out_dtype, compute = g.dtype, matmul_dtype(g)
    grad_x = None
    if need_x:
        g_c, weight = cast_all(compute, g, weight)
        grad_x = g_c @ weight
    grads = []
    for plan, (A, B), u, need_A, need_B in zip(plans, factors, us, needs_A, needs_B):
        rows = slice(plan.start, plan.end)
        x_k = None if x2 is None else x2[rows]
        _, dA, dB = lora_backward(g[rows], x_k, None, A, B, u, plan.scaling, plan.dropout_p, plan.mask2,
                                  plan.seed, LoRANeeds(False, need_A, need_B))
        grads.append((dA, dB))
        if need_x:
            g_k, A_c, B_c = cast_all(compute, g[rows], A, B)
            keep_scale = 1.0 if plan.mask2 is None else 1.0 / (1.0 - plan.dropout_p)
            lora_dx = (g_k @ B_c).mul_(plan.scaling * keep_scale) @ A_c
            if plan.mask2 is not None:
                lora_dx.masked_fill_(~plan.mask2, 0.0)
            grad_x[rows] += lora_dx
    if grad_x is not None:
        grad_x = grad_x.to(out_dtype)
    return grad_x, grads


# ---------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------


class MultiLoRAPlan(NamedTuple):
    """What the Function needs besides its tensors: the segments and how to run them."""

    segments: tuple[SegmentPlan, ...]
    nf4_state: NF4State | None  # the base as 4 bits (then the weight argument is None)
    fused: bool  # the Triton kernels


def _base_weight(plan: MultiLoRAPlan, weight, dtype: torch.dtype):
    """W in the compute dtype: the argument, or the NF4 base dequantised (never kept)."""
    return weight if plan.nf4_state is None else nf4_dequantize(plan.nf4_state, dtype)


class MultiLoRALinearFunction(torch.autograd.Function):
    r"""Forward and backward of K LoRA adapters on one frozen base, each on its own rows.

    Forward, with x2 = x viewed as [N, in] and segment k its rows R_k:

        y        = x · Wᵀ + b                                   one matmul over all N rows
        u_k      = (x_{R_k} ⊙ M_k) · A_kᵀ / (1 − p_k)           [|R_k|, r_k]   saved for dB_k
        y_{R_k} += s_k · u_k · B_kᵀ

    Backward, with g = dL/dy:

        dL/dx     = g · W                                       one matmul over all N rows
        dL/du_k   = s_k · g_{R_k} · B_k
        dL/dx_{R_k} += (dL/du_k · A_k) ⊙ M_k / (1 − p_k)
        dL/dA_k   = (dL/du_k)ᵀ · x_{R_k} ⊙ M_k / (1 − p_k)      only adapter k's rows
        dL/dB_k   = s_k · g_{R_k}ᵀ · u_k

    Inputs: x, W (None for an NF4 base, held in the plan), b, the plan, then A and B of each
    segment in the plan's order. Rows in no segment get the base only and touch no adapter;
    an adapter without rows is not an input at all, so its gradient stays None. No dW, no db.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan: MultiLoRAPlan, *factors):
        x2 = x.reshape(-1, x.shape[-1])
        pairs = list(zip(factors[0::2], factors[1::2]))
        w = _base_weight(plan, weight, x.dtype)
        y, us = multi_lora_forward(x2, w, bias, pairs, plan.segments)
        del w
        needs_any_A = any(ctx.needs_input_grad[4::2])
        ctx.save_for_backward(x2 if needs_any_A else None, weight, *factors, *us)
        ctx.plan, ctx.x_shape, ctx.dtype = plan, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        plan = ctx.plan
        x2, weight, *rest = ctx.saved_tensors
        n = len(plan.segments)
        factors, us = rest[:2 * n], rest[2 * n:]
        pairs = list(zip(factors[0::2], factors[1::2]))
        need_x = ctx.needs_input_grad[0]
        needs_A, needs_B = ctx.needs_input_grad[4::2], ctx.needs_input_grad[5::2]
        w = _base_weight(plan, weight, ctx.dtype) if need_x else None
        g = grad_y.reshape(-1, grad_y.shape[-1])
        backward = multi_lora_backward
        dx, grads = backward(g, x2, w, pairs, us, plan.segments, need_x, needs_A, needs_B)
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        return (dx, None, None, None, *[d for pair in grads for d in pair])


# ---------------------------------------------------------------------------------------
# The op: checks, casting, dispatch, dropout
# ---------------------------------------------------------------------------------------


def _draw(x_k, p: float, mask, seed, fused: bool, state: torch.Tensor | None):
    """``draw_dropout`` for one segment, from ``state`` (a torch CPU RNG state) when given: it is
    swapped in around the draw, and the advanced state returned in its place."""
    if state is None:
        return draw_dropout(x_k, p, mask, seed, fused), None
    outer = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        drawn = draw_dropout(x_k, p, mask, seed, fused)
        return drawn, torch.get_rng_state()
    finally:
        torch.set_rng_state(outer)


def multi_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, segments, dropout_ps=None,
                      dropout_masks=None, seeds=None, rng_states=None):
    """K LoRA adapters on one frozen base: segment ``(k, start, end)``'s rows (dim 0 of x) get
    ``x·Wᵀ + b + s_k·(dropout_k(x)·A_kᵀ)·B_kᵀ``; rows in no segment ``x·Wᵀ + b``.

    ``weight``: W ``[out, in]`` or an ``NF4State`` (dequantised for each pass, never kept).
    ``lora_As``, ``lora_Bs``, ``scalings``, ``dropout_ps`` (default all 0) are indexed by adapter.
    Dtypes as ``lora_linear``: everything is cast to ``compute_dtype(x)`` by the op.
    Dropout of adapter k as ``lora_linear`` on the segment's rows: ``dropout_masks[k]`` (bool, the
    segment's shape) or ``seeds[k]`` (kernels) fix it; otherwise it is drawn from torch's RNG,
    from ``rng_states[k]`` when that is given (updated in place to the advanced state).
    """
    n_adapters = len(lora_As)
    if len(lora_Bs) != n_adapters or len(scalings) != n_adapters:
        raise ValueError(f"multi_lora_linear: {n_adapters} lora_As, {len(lora_Bs)} lora_Bs, "
                         f"{len(scalings)} scalings")
    nf4_state = weight if isinstance(weight, NF4State) else None
    if nf4_state is None and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("multi_lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    if nf4_state is not None and bias is not None and bias.requires_grad:
        raise ValueError("multi_lora_linear: the bias of a 4-bit layer must be frozen (requires_grad=False)")
    if x.dim() < 2:
        raise ValueError(f"multi_lora_linear: x {tuple(x.shape)} must be [rows, ..., in]")
    segments = check_segments(segments, x.shape[0], n_adapters)
    dropout_ps = [0.0] * n_adapters if dropout_ps is None else list(dropout_ps)
    dtype = compute_dtype(x)
    impl = backend_for(x)
    present = [s for s in segments if s.end > s.start]
    if impl == "triton":  # the segmented kernels come next; until then the torch path
        impl = "torch"
    if impl == "triton":
        reasons = [triton_ineligible(dtype, lora_As[s.adapter].shape[0]) for s in present]
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            log_fallback(reason)
            impl = "torch"
    if impl == "reference":
        return _run_reference(x, weight, bias, lora_As, lora_Bs, scalings, present, dropout_ps, dropout_masks,
                              seeds, rng_states, dtype)
    x, bias = cast_all(dtype, x, bias)
    weight = None if nf4_state is not None else weight.to(dtype)
    rows_per_x_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    plans, factors = [], []
    for s in present:
        k = s.adapter
        check_dropout("multi_lora_linear", x[s.start:s.end], dropout_ps[k],
                      None if dropout_masks is None else dropout_masks[k])
        mask, seed = _segment_dropout(x[s.start:s.end], k, dropout_ps[k], dropout_masks, seeds, rng_states,
                                      impl == "triton")
        start, end = s.start * rows_per_x_row, s.end * rows_per_x_row
        mask2 = None if mask is None else mask.reshape(end - start, x.shape[-1])
        plans.append(SegmentPlan(k, start, end, float(scalings[k]), float(dropout_ps[k]), mask2, seed))
        factors += cast_all(dtype, lora_As[k], lora_Bs[k])
    plan = MultiLoRAPlan(tuple(plans), nf4_state, impl == "triton")
    with torch.autocast(x.device.type, enabled=False):
        return MultiLoRALinearFunction.apply(x, weight, bias, plan, *factors)


def _segment_dropout(x_k, k: int, p: float, dropout_masks, seeds, rng_states, fused: bool):
    """``(mask, seed)`` of adapter k's segment, drawn as ``lora_linear`` draws for x = x_k."""
    mask = None if dropout_masks is None else dropout_masks[k]
    seed = None if seeds is None else seeds[k]
    state = None if rng_states is None else rng_states.get(k)
    (mask, seed), advanced = _draw(x_k, p, mask, seed, fused, state)
    if advanced is not None:
        rng_states[k] = advanced
    return mask, seed


def _run_reference(x, weight, bias, lora_As, lora_Bs, scalings, present, dropout_ps, dropout_masks, seeds,
                   rng_states, dtype):
    """The reference backend: masks drawn as the torch path draws them, then the reference."""
    x, bias = cast_all(dtype, x, bias)
    if not isinstance(weight, NF4State):
        weight = weight.to(dtype)
    masks = {}
    for s in present:
        k = s.adapter
        masks[k], _ = _segment_dropout(x[s.start:s.end], k, dropout_ps[k], dropout_masks, seeds, rng_states,
                                       False)
    As = [A.to(dtype) for A in lora_As]
    Bs = [B.to(dtype) for B in lora_Bs]
    with torch.autocast(x.device.type, enabled=False):
        return multi_lora_linear_reference(x, weight, bias, As, Bs, scalings, present, dropout_ps, masks)
