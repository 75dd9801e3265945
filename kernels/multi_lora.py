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
stored back. ``lengths`` (adapter -> its sequence length alone) covers rows right-padded along
dim 1 to a common length: segment k's mask is drawn for ``x_k[:, :lengths[k]]``, as ``lora_linear``
draws it for that shape, and padded with "kept" (see ``_segment_dropout``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import backend_for, interpreting, matmul_dtype
from ._triton_utils import autotune, cast, dot, dot_options, new_output, tl, triton
from .lora_linear import (
    DROPOUT_FROM_SEED,
    DROPOUT_OFF,
    Dropout,
    LoRANeeds,
    cast_all,
    check_dropout,
    compute_dtype,
    draw_dropout,
    log_fallback,
    lora_backward,
    lora_dropout_mask,
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
    """``(dx, [(dA, dB)])``: each segment's dx, dA_k and dB_k by ``lora_backward`` on its own rows
    (dx = g_k·W + s_k·(g_k·B_k)·A_k ⊙ M_k/(1-p_k), the base product and the low-rank one summed
    in one addmm), rows in no segment dx = g·W. Calling the single-adapter core segment by segment,
    rather than one g·W over all rows plus each segment's term, keeps every row's gradient the
    same floating-point expression as a single LoRALinear's (addmm rounds differently from a
    matmul followed by an add), so K jobs trained together equal K trained alone bit for bit. The
    base dx still reads each row once. Each gradient None unless asked for; results in g's dtype."""
    grad_x = new_output((g.shape[0], weight.shape[1]), g.dtype, g.device) if need_x else None
    covered = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device) if need_x else None
    grads = []
    for plan, (A, B), u, need_A, need_B in zip(plans, factors, us, needs_A, needs_B):
        rows = slice(plan.start, plan.end)
        x_k = None if x2 is None else x2[rows]
        dx, dA, dB = lora_backward(g[rows], x_k, weight, A, B, u, plan.scaling, plan.dropout_p, plan.mask2,
                                   plan.seed, LoRANeeds(need_x, need_A, need_B))
        grads.append((dA, dB))
        if need_x:
            grad_x[rows], covered[rows] = dx, True
    if need_x and not bool(covered.all()):
        rest = ~covered  # rows of no adapter: the base only
        grad_x[rest] = lora_backward(g[rest], None, weight, None, None, None, 1.0, 0.0, None, 0,
                                     LoRANeeds(True, False, False))[0]
    return grad_x, grads


# ---------------------------------------------------------------------------------------
# Triton: the segmented kernels.
#
# The rows of x are cut into tiles of SEG_BLOCK_M rows that never straddle a segment
# boundary: each segment (and each run of rows in no segment) is tiled on its own, its last
# tile ragged. A tile table (first row, end row, segment or -1) tells each program where it
# is, and a segment table (rank, offsets of A and B in the packed factors, scaling, dropout)
# which adapter applies. So every tile is one adapter's rows and its matmuls stay dense:
# the forward and the dx kernels are lora_linear's (base and low-rank products over the same
# loads, the rank-r_k product in the epilogue) with the adapter looked up per tile; a tile of
# rows in no segment does the base matmul only. The factors of all segments are packed into
# one buffer each (A_k [r_k, in] and B_k [out, r_k], row-major, one after the other).
#
# Matmul names as in lora_linear.py: C[M, N] = Σ_K; R ranks, padded to BLOCK_R (the largest
# rank of the call, at least 16) with zeros.
# ---------------------------------------------------------------------------------------

SEG_BLOCK_M_GPU, SEG_BLOCK_M_INTERPRETER = 64, 16
SEG_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
SEG_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
SEG_DA_CONFIGS = [triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
                  triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3)]
SEG_DA_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
DA_PROGRAMS_PER_SM = 2


def seg_block_m() -> int:
    """Rows per tile: fixed (not autotuned), since the tile table is built for it on the host."""
    return SEG_BLOCK_M_INTERPRETER if interpreting() else SEG_BLOCK_M_GPU


def _seg_mm_shared_bytes(config, args) -> int:
    """Upper bound of the forward/dx kernels' shared memory, as lora_linear's ``_mm_shared_bytes``."""
    kw, es, br, bm = config.kwargs, args["x_ptr"].element_size(), args["BLOCK_R"], args["BLOCK_M"]
    step = (bm + kw["BLOCK_N"] + br) * kw["BLOCK_K"] * es + bm * kw["BLOCK_K"]
    return config.num_stages * step + (br * kw["BLOCK_N"] + bm * br) * es


def _seg_da_shared_bytes(config, args) -> int:
    kw, es, br, bm = config.kwargs, args["x_ptr"].element_size(), args["BLOCK_R"], args["BLOCK_M"]
    return config.num_stages * ((br + kw["BLOCK_N"]) * bm * es + bm * kw["BLOCK_N"])


@triton.jit
def _segment_keep(seed, rows, seg_first, cols, n_cols, dropout_p, mask_ptr, stride_mm, stride_mk, in_bounds,
                  DROPOUT: tl.constexpr):
    """The keep-mask of a [rows, cols] tile of a segment starting at row ``seg_first``: from the
    seed, ``tl.rand(seed, (row - seg_first)·n_cols + col) >= p`` (what ``lora_linear``'s kernels
    draw for x = the segment's rows alone), or a stored mask over all rows."""
    if DROPOUT == DROPOUT_FROM_SEED:
        offsets = (rows - seg_first)[:, None].to(tl.int64) * n_cols + cols[None, :]
        keep = tl.rand(seed, offsets) >= dropout_p
    else:
        m = tl.load(mask_ptr + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mk,
                    mask=in_bounds, other=0)
        keep = m != 0
    return keep


@triton.jit
def _tile_of(pid, n_col_tiles, tile_start_ptr, tile_end_ptr, tile_seg_ptr):
    """(tile, column tile, first row, end row, segment or -1) of a program; the column tiles of one
    row tile are consecutive programs, so they share its rows of x in L2."""
    tile = pid // n_col_tiles
    pid_n = pid % n_col_tiles
    return (tile, pid_n, tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile),
            tl.load(tile_seg_ptr + tile))


@autotune(SEG_CONFIGS, key=["N", "K", "BLOCK_R"], interpreter_config=SEG_INTERPRETER_CONFIG,
          shared_bytes=_seg_mm_shared_bytes)
@triton.jit
def _multi_lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, mask_ptr, y_ptr, u_ptr,
    tile_start_ptr, tile_end_ptr, tile_seg_ptr,
    seg_first_ptr, seg_rank_ptr, seg_a_ptr, seg_b_ptr, seg_scaling_ptr, seg_p_ptr, seg_keep_scale_ptr,
    seg_seed_ptr, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mm, stride_mk, stride_ym, stride_yn,
    stride_um, stride_ur,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = x·Wᵀ + b (+ s_k·(dropout_k(x)·A_kᵀ)·B_kᵀ when the tile's rows are adapter k's) for one
    [BLOCK_M, BLOCK_N] tile; the tiles of the first column also write u = dropout_k(x)·A_kᵀ."""
    _, pid_n, first, end, seg = _tile_of(tl.program_id(0), tl.cdiv(N, BLOCK_N), tile_start_ptr, tile_end_ptr,
                                         tile_seg_ptr)
    has_lora = seg >= 0
    seg = tl.maximum(seg, 0)
    R = tl.where(has_lora, tl.load(seg_rank_ptr + seg), 0)
    seg_first = tl.load(seg_first_ptr + seg)
    dropout_p = tl.load(seg_p_ptr + seg)
    keep_scale = tl.load(seg_keep_scale_ptr + seg)
    seed = tl.load(seg_seed_ptr + seg)
    a_ptr += tl.load(seg_a_ptr + seg)
    b_ptr += tl.load(seg_b_ptr + seg)
    rm = first + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm[:, None] < end) & (rk[None, :] < K)
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = tl.load(w_cols + rk[:, None] * stride_wk, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = dot(x, w, acc, PRECISION)
        if has_lora:
            if DROPOUT != DROPOUT_OFF:
                keep = _segment_keep(seed, rm, seg_first, rk, K, dropout_p, mask_ptr, stride_mm, stride_mk,
                                     x_mask, DROPOUT)
                x = cast(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), dtype)
            a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K),
                        other=0.0)
            xa = dot(x, a, xa, PRECISION)
    if has_lora:
        u = cast(xa, dtype)  # rounded to the compute dtype, as lora_linear's u is
        if pid_n == 0:
            tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, u,
                     mask=(rm[:, None] < end) & (rr[None, :] < BLOCK_R))
        b = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < N),
                    other=0.0)
        acc += tl.load(seg_scaling_ptr + seg) * dot(u, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                                                    PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn, cast(acc, dtype),
             mask=(rm[:, None] < end) & (rn[None, :] < N))


@autotune(SEG_CONFIGS, key=["N", "K", "BLOCK_R", "HAS_DX"], interpreter_config=SEG_INTERPRETER_CONFIG,
          shared_bytes=_seg_mm_shared_bytes)
@triton.jit
def _multi_lora_dx_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, mask_ptr, dx_ptr, gb_ptr,
    tile_start_ptr, tile_end_ptr, tile_seg_ptr,
    seg_first_ptr, seg_rank_ptr, seg_a_ptr, seg_b_ptr, seg_scaling_ptr, seg_p_ptr, seg_keep_scale_ptr,
    seg_seed_ptr, N, K,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_mm, stride_mn, stride_dm, stride_dn, stride_gbm,
    stride_gbr,
    HAS_DX: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = g·W (+ s_k·((g·B_k)·A_k) ⊙ M_k/(1-p_k) on adapter k's rows) for one tile (x_ptr is g,
    N the in-features, K the out-features); the first column's tiles write gb = g·B_k."""
    _, pid_n, first, end, seg = _tile_of(tl.program_id(0), tl.cdiv(N, BLOCK_N), tile_start_ptr, tile_end_ptr,
                                         tile_seg_ptr)
    has_lora = seg >= 0
    seg = tl.maximum(seg, 0)
    R = tl.where(has_lora, tl.load(seg_rank_ptr + seg), 0)
    a_ptr += tl.load(seg_a_ptr + seg)
    b_ptr += tl.load(seg_b_ptr + seg)
    rm = first + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    g_rows = x_ptr + rm[:, None].to(tl.int64) * stride_gm
    w_cols = w_ptr + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        g = tl.load(g_rows + rk[None, :] * stride_gk, mask=(rm[:, None] < end) & (rk[None, :] < K), other=0.0)
        if HAS_DX:
            w = tl.load(w_cols + rk[:, None].to(tl.int64) * stride_wk,
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = dot(g, w, acc, PRECISION)
        if has_lora:
            b = tl.load(b_ptr + rk[:, None] * R + rr[None, :], mask=(rk[:, None] < K) & (rr[None, :] < R),
                        other=0.0)
            gb = dot(g, b, gb, PRECISION)
    out_mask = (rm[:, None] < end) & (rn[None, :] < N)
    if has_lora:
        gb_c = cast(gb, dtype)
        if pid_n == 0:
            tl.store(gb_ptr + rm[:, None] * stride_gbm + rr[None, :] * stride_gbr, gb_c,
                     mask=(rm[:, None] < end) & (rr[None, :] < BLOCK_R))
        if HAS_DX:
            a = tl.load(a_ptr + rr[:, None] * N + rn[None, :], mask=(rr[:, None] < R) & (rn[None, :] < N),
                        other=0.0)
            scaling = tl.load(seg_scaling_ptr + seg)
            lora = scaling * dot(gb_c, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
            if DROPOUT != DROPOUT_OFF:
                seg_first = tl.load(seg_first_ptr + seg)
                dropout_p = tl.load(seg_p_ptr + seg)
                keep = _segment_keep(tl.load(seg_seed_ptr + seg), rm, seg_first, rn, N, dropout_p, mask_ptr,
                                     stride_mm, stride_mn, out_mask, DROPOUT)
                lora = tl.where(keep, lora * tl.load(seg_keep_scale_ptr + seg), 0.0)
            acc += lora
    if HAS_DX:
        tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dm + rn[None, :] * stride_dn, cast(acc, dtype),
                 mask=out_mask)


@autotune(SEG_DA_CONFIGS, key=["K", "BLOCK_R"], interpreter_config=SEG_DA_INTERPRETER_CONFIG,
          shared_bytes=_seg_da_shared_bytes)
@triton.jit
def _multi_lora_da_kernel(
    gb_ptr, x_ptr, mask_ptr, da_ptr,
    seg_first_ptr, seg_end_ptr, seg_rank_ptr, seg_p_ptr, seg_keep_scale_ptr, seg_seed_ptr,
    K, SPLITS,
    stride_gbm, stride_gbr, stride_xm, stride_xk, stride_mm, stride_mk,
    DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One split's partial (g·B_k)ᵀ·dropout_k(x) over its share of segment k's rows, for BLOCK_N
    columns of A_k: program (n, segment, split) writes da[segment, split, :, n-tile] in fp32,
    and the host sums the splits (no atomics: deterministic)."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(seg_first_ptr + seg)
    rows_per_split = tl.cdiv(tl.load(seg_end_ptr + seg) - first, SPLITS)
    m_start = first + split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, tl.load(seg_end_ptr + seg))
    R = tl.load(seg_rank_ptr + seg)
    dropout_p = tl.load(seg_p_ptr + seg)
    keep_scale = tl.load(seg_keep_scale_ptr + seg)
    seed = tl.load(seg_seed_ptr + seg)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        gbt = tl.load(gb_ptr + rm[None, :].to(tl.int64) * stride_gbm + rr[:, None] * stride_gbr,
                      mask=(rm[None, :] < m_end) & (rr[:, None] < R), other=0.0)
        x_mask = (rm[:, None] < m_end) & (rn[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rn[None, :] * stride_xk, mask=x_mask,
                    other=0.0)
        if DROPOUT != DROPOUT_OFF:
            keep = _segment_keep(seed, rm, first, rn, K, dropout_p, mask_ptr, stride_mm, stride_mk, x_mask,
                                 DROPOUT)
            x = cast(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), dtype)
        acc = dot(gbt, x, acc, PRECISION)
    base = da_ptr + (seg * SPLITS + split).to(tl.int64) * BLOCK_R * K
    tl.store(base + rr[:, None] * K + rn[None, :], acc, mask=(rr[:, None] < BLOCK_R) & (rn[None, :] < K))


class SegmentTables(NamedTuple):
    """The kernels' view of a call's segments, on the device."""

    tile_start: torch.Tensor  # int32 [tiles]: first row of each tile
    tile_end: torch.Tensor  # int32 [tiles]: end of the tile's segment (or of its run of base-only rows)
    tile_seg: torch.Tensor  # int32 [tiles]: the tile's segment, -1 for base-only rows
    seg_first: torch.Tensor  # int32 [segments]
    seg_end: torch.Tensor  # int32 [segments]
    seg_rank: torch.Tensor  # int32 [segments]
    seg_a: torch.Tensor  # int64 [segments]: offset of A_k in the packed A
    seg_b: torch.Tensor  # int64 [segments]: offset of B_k in the packed B
    seg_scaling: torch.Tensor  # fp32 [segments]
    seg_p: torch.Tensor  # fp32 [segments]
    seg_keep_scale: torch.Tensor  # fp32 [segments]: 1/(1-p), rounded once from the double (as lora_linear's)
    seg_seed: torch.Tensor  # int64 [segments]
    block_r: int  # the largest rank, padded (at least 16: tl.dot's smallest dimension)
    dropout: Dropout  # one mode for the call: a segment without dropout keeps every element

    def tile_args(self) -> tuple[torch.Tensor, ...]:
        return self.tile_start, self.tile_end, self.tile_seg

    def segment_args(self) -> tuple[torch.Tensor, ...]:
        """The per-segment tables in the order the forward and dx kernels take them."""
        return (self.seg_first, self.seg_rank, self.seg_a, self.seg_b, self.seg_scaling, self.seg_p,
                self.seg_keep_scale, self.seg_seed)


def segment_tables(plans, factors, rows: int, device, block_m: int) -> SegmentTables:
    starts, ends, segs = [], [], []

    def tile(first: int, end: int, seg: int) -> None:
        for start in range(first, end, block_m):
            starts.append(start)
            ends.append(end)
            segs.append(seg)

    row = 0
    for i, plan in enumerate(plans):  # in row order (the caller sorts them)
        tile(row, plan.start, -1)
        tile(plan.start, plan.end, i)
        row = plan.end
    tile(row, rows, -1)
    if not plans:  # the kernels read segment 0's entries even when no tile has a segment
        plans = [SegmentPlan(0, 0, 0, 0.0, 0.0, None, 0)]
        factors = [(torch.zeros(0, 1), torch.zeros(1, 0))]
    ranks = [A.shape[0] for A, _ in factors]
    a_sizes = [A.numel() for A, _ in factors]
    b_sizes = [B.numel() for _, B in factors]
    a_offsets = [sum(a_sizes[:i]) for i in range(len(a_sizes))]
    b_offsets = [sum(b_sizes[:i]) for i in range(len(b_sizes))]
    if any(p.dropout_p > 0 for p in plans):
        mode = Dropout.FROM_MASK if any(p.mask2 is not None for p in plans) else Dropout.FROM_SEED
    else:
        mode = Dropout.OFF

    def ints(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return SegmentTables(
        ints(starts), ints(ends), ints(segs), ints([p.start for p in plans]), ints([p.end for p in plans]),
        ints(ranks), ints(a_offsets, torch.int64), ints(b_offsets, torch.int64),
        ints([p.scaling for p in plans], torch.float32), ints([p.dropout_p for p in plans], torch.float32),
        ints([1.0 / (1.0 - p.dropout_p) for p in plans], torch.float32),
        ints([p.seed for p in plans], torch.int64), max(16, triton.next_power_of_2(max(ranks))), mode)


def _packed(tensors, like: torch.Tensor) -> torch.Tensor:
    """The factors one after the other, flat (one zero when there are none: the kernels offset
    the pointer of segment 0 even when no tile has a segment)."""
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else like.new_zeros(1)


def _full_mask(plans, rows: int, cols: int, device) -> tuple[torch.Tensor, int, int]:
    """A stored-mask call: one uint8 mask over all rows, each segment's stored mask or the one
    its seed draws, 1 where there is no dropout."""
    mask = torch.ones(rows, cols, dtype=torch.uint8, device=device)
    for plan in plans:
        if plan.mask2 is not None:
            mask[plan.start:plan.end] = plan.mask2.to(torch.uint8)
        elif plan.dropout_p > 0:
            drawn = lora_dropout_mask((plan.end - plan.start, cols), plan.dropout_p, plan.seed, device)
            mask[plan.start:plan.end] = drawn.to(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _mask_of(tables: SegmentTables, plans, rows: int, cols: int, device):
    if tables.dropout == Dropout.FROM_MASK:
        return _full_mask(plans, rows, cols, device)
    return None, 0, 0


def multi_lora_forward_triton(x2, weight, bias, factors, plans):
    """``multi_lora_forward`` on the segmented kernel (one launch over all rows): ``(y, us)``."""
    M, K = x2.shape
    N = weight.shape[0]
    block_m = seg_block_m()
    tables = segment_tables(plans, factors, M, x2.device, block_m)
    y = new_output((M, N), x2.dtype, x2.device)
    u = new_output((M, tables.block_r), x2.dtype, x2.device)
    if M:
        mask, smm, smk = _mask_of(tables, plans, M, K, x2.device)
        a = _packed([A for A, _ in factors], x2)
        b = _packed([B for _, B in factors], x2)
        n_tiles = tables.tile_start.numel()
        _multi_lora_fwd_kernel[lambda meta: (n_tiles * triton.cdiv(N, meta["BLOCK_N"]),)](
            x2, weight, bias, a, b, mask, y, u, *tables.tile_args(), *tables.segment_args(), N, K,
            *x2.stride(), *weight.stride(), smm, smk, *y.stride(), *u.stride(),
            HAS_BIAS=bias is not None, DROPOUT=int(tables.dropout), BLOCK_R=tables.block_r, BLOCK_M=block_m,
            **dot_options(x2.device),
        )
    return y, [u[p.start:p.end, :A.shape[0]] for p, (A, _) in zip(plans, factors)]


def _da_splits(plans, k: int, device) -> int:
    if interpreting():
        return 2
    longest = max(p.end - p.start for p in plans)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(k, 64) * len(plans)
    return max(1, min(triton.cdiv(longest, 128), triton.cdiv(DA_PROGRAMS_PER_SM * sms, programs)))


def multi_lora_backward_triton(g, x2, weight, factors, us, plans, need_x: bool, needs_A, needs_B):
    """``multi_lora_backward`` on the segmented kernels: dx and gb = g·B_k in one kernel over all
    rows, dA_k of every segment in a second (from gb), dB_k = s_k·g_kᵀ·u_k by cuBLAS."""
    M, N = g.shape  # N: out features
    K = factors[0][0].shape[1] if factors else (weight.shape[1] if weight is not None else 0)
    block_m = seg_block_m()
    tables = segment_tables(plans, factors, M, g.device, block_m)
    mask, smm, smk = _mask_of(tables, plans, M, K, g.device)
    opts = dict(BLOCK_R=tables.block_r, BLOCK_M=block_m, DROPOUT=int(tables.dropout), **dot_options(g.device))
    a = _packed([A for A, _ in factors], g)
    b = _packed([B for _, B in factors], g)
    dx = new_output((M, K), g.dtype, g.device) if need_x else None
    need_gb = any(needs_A)
    if M and (need_x or need_gb):
        gb = new_output((M, tables.block_r), g.dtype, g.device)
        # Without dx only gb is wanted: one column of tiles (the grid's N is 1, so every program
        # maps to a tile the grid has), and the weight is never read (a dummy pointer).
        n_cols = K if need_x else 1
        w, w_strides = (weight, weight.stride()) if need_x else (b, (0, 0))
        dx_strides = dx.stride() if need_x else (0, 0)
        n_tiles = tables.tile_start.numel()
        _multi_lora_dx_kernel[lambda meta: (n_tiles * triton.cdiv(n_cols, meta["BLOCK_N"]),)](
            g, w, a, b, mask, dx, gb, *tables.tile_args(), *tables.segment_args(), n_cols, N,
            g.stride(0), g.stride(1), *w_strides, smm, smk, *dx_strides, gb.stride(0), gb.stride(1),
            HAS_DX=need_x, **opts,
        )
    grads = [[None, None] for _ in plans]
    if need_gb and plans:
        splits = _da_splits(plans, K, g.device)
        partial = new_output((len(plans), splits, tables.block_r, K), torch.float32, g.device)
        grid = lambda meta: (triton.cdiv(K, meta["BLOCK_N"]), len(plans), splits)  # noqa: E731
        _multi_lora_da_kernel[grid](
            gb, x2, mask, partial, tables.seg_first, tables.seg_end, tables.seg_rank, tables.seg_p,
            tables.seg_keep_scale, tables.seg_seed, K, splits, gb.stride(0), gb.stride(1), x2.stride(0),
            x2.stride(1), smm, smk, **opts,
        )
        for i, (plan, (A, _)) in enumerate(zip(plans, factors)):
            if needs_A[i]:
                grads[i][0] = partial[i, :, :A.shape[0]].sum(0).mul_(plan.scaling).to(A.dtype)
    for i, (plan, u) in enumerate(zip(plans, us)):
        if needs_B[i]:
            grads[i][1] = (g[plan.start:plan.end].t() @ u).mul_(plan.scaling)
    return dx, [tuple(pair) for pair in grads]


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
        forward = multi_lora_forward_triton if plan.fused else multi_lora_forward
        y, us = forward(x2, w, bias, pairs, plan.segments)
        del w
        needs_any_A = any(ctx.needs_input_grad[4::2])
        # The dropout masks go through save_for_backward, not ctx.plan: saved-tensor hooks
        # (activation checkpointing, offloading) must see them, or every checkpointed layer's
        # masks would stay alive on the graph until its backward pass.
        masks = [seg.mask2 for seg in plan.segments]
        ctx.save_for_backward(x2 if needs_any_A else None, weight, *factors, *us, *masks)
        ctx.plan = plan._replace(segments=tuple(seg._replace(mask2=None) for seg in plan.segments))
        ctx.x_shape, ctx.dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        plan = ctx.plan
        x2, weight, *rest = ctx.saved_tensors
        n = len(plan.segments)
        factors, us, masks = rest[:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        plan = plan._replace(segments=tuple(seg._replace(mask2=m) for seg, m in zip(plan.segments, masks)))
        pairs = list(zip(factors[0::2], factors[1::2]))
        need_x = ctx.needs_input_grad[0]
        needs_A, needs_B = ctx.needs_input_grad[4::2], ctx.needs_input_grad[5::2]
        w = _base_weight(plan, weight, ctx.dtype) if need_x else None
        g = grad_y.reshape(-1, grad_y.shape[-1])
        backward = multi_lora_backward_triton if plan.fused else multi_lora_backward
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
                      dropout_masks=None, seeds=None, rng_states=None, lengths=None):
    """K LoRA adapters on one frozen base: segment ``(k, start, end)``'s rows (dim 0 of x) get
    ``x·Wᵀ + b + s_k·(dropout_k(x)·A_kᵀ)·B_kᵀ``; rows in no segment ``x·Wᵀ + b``.

    ``weight``: W ``[out, in]`` or an ``NF4State`` (dequantised for each pass, never kept).
    ``lora_As``, ``lora_Bs``, ``scalings``, ``dropout_ps`` (default all 0) are indexed by adapter.
    Dtypes as ``lora_linear``: everything is cast to ``compute_dtype(x)`` by the op.
    Dropout of adapter k as ``lora_linear`` on the segment's rows: ``dropout_masks[k]`` (bool, the
    segment's shape) or ``seeds[k]`` (kernels) fix it; otherwise it is drawn from torch's RNG,
    from ``rng_states[k]`` when that is given (updated in place to the advanced state).
    ``lengths[k]`` (a dict by adapter; x of 3+ dims): adapter k's rows are right-padded along dim 1
    from that length to x's; the drawn mask is ``lora_linear``'s for ``x_k[:, :lengths[k]]``, the
    pad positions kept. A 2-D x has no sequence dim: ``lengths`` is not used then.
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
    if impl == "triton":
        reasons = [triton_ineligible(dtype, lora_As[s.adapter].shape[0]) for s in present]
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            log_fallback(reason)
            impl = "torch"
    if impl == "reference":
        return _run_reference(x, weight, bias, lora_As, lora_Bs, scalings, present, dropout_ps, dropout_masks,
                              seeds, rng_states, lengths, dtype)
    x, bias = cast_all(dtype, x, bias)
    weight = None if nf4_state is not None else weight.to(dtype)
    rows_per_x_row = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    plans, factors = [], []
    for s in present:
        k = s.adapter
        check_dropout("multi_lora_linear", x[s.start:s.end], dropout_ps[k],
                      None if dropout_masks is None else dropout_masks[k])
        mask, seed = _segment_dropout(x[s.start:s.end], k, dropout_ps[k], dropout_masks, seeds, rng_states,
                                      impl == "triton", lengths)
        start, end = s.start * rows_per_x_row, s.end * rows_per_x_row
        mask2 = None if mask is None else mask.reshape(end - start, x.shape[-1])
        plans.append(SegmentPlan(k, start, end, float(scalings[k]), float(dropout_ps[k]), mask2, seed))
        factors += cast_all(dtype, lora_As[k], lora_Bs[k])
    # Drawn in the order given (the global RNG's order without rng_states), run in row order.
    order = sorted(range(len(plans)), key=lambda i: plans[i].start)
    plans = [plans[i] for i in order]
    factors = [t for i in order for t in factors[2 * i:2 * i + 2]]
    plan = MultiLoRAPlan(tuple(plans), nf4_state, impl == "triton")
    with torch.autocast(x.device.type, enabled=False):
        return MultiLoRALinearFunction.apply(x, weight, bias, plan, *factors)


def _segment_dropout(x_k, k: int, p: float, dropout_masks, seeds, rng_states, fused: bool, lengths=None):
    """``(mask, seed)`` of adapter k's segment, drawn as ``lora_linear`` draws for x = x_k, or, when
    ``lengths[k]`` trims x_k's dim 1 (x_k of 3+ dims, a shorter length), for x = x_k[:, :lengths[k]].

    A trimmed draw is padded with True (kept) along dim 1 to x_k's shape: the pad positions' LoRA
    outputs are computed but never read (train_many labels them -100 and causal attention keeps
    real tokens from seeing the pads after them), and the single op never draws for them. On the
    kernels (``fused``) the seed drawn for the trimmed shape becomes a stored mask,
    ``lora_dropout_mask`` of that shape, padded: the seed path's element index row·in + col counts
    over the padded rows, which would be another mask (the price: the call then runs on one stored
    uint8 mask of x's size, ``_full_mask``)."""
    mask = None if dropout_masks is None else dropout_masks[k]
    seed = None if seeds is None else seeds[k]
    state = None if rng_states is None else rng_states.get(k)
    length = _trimmed_length(x_k, k, lengths) if mask is None and p > 0.0 else None
    drawn_on = x_k if length is None else x_k[:, :length]
    (mask, seed), advanced = _draw(drawn_on, p, mask, seed, fused, state)
    if advanced is not None:
        rng_states[k] = advanced
    if length is not None:
        if mask is None:  # the kernels' seed: the mask it draws for the trimmed shape
            mask = lora_dropout_mask(drawn_on.shape, p, seed, x_k.device)
        padded = torch.ones(x_k.shape, dtype=torch.bool, device=x_k.device)
        padded[:, :length] = mask
        mask = padded
    return mask, seed


def _trimmed_length(x_k, k: int, lengths) -> int | None:
    """Adapter k's own length of dim 1 when it is shorter than x_k's, else None (no trimming: no
    length, a 2-D x_k, or the full length)."""
    length = None if lengths is None else lengths.get(k)
    if length is None or x_k.dim() < 3:
        return None
    if not 0 <= int(length) <= x_k.shape[1]:
        raise ValueError(f"multi_lora_linear: lengths[{k}]={length} is not within x's dim 1 ({x_k.shape[1]})")
    return None if int(length) == x_k.shape[1] else int(length)


def _run_reference(x, weight, bias, lora_As, lora_Bs, scalings, present, dropout_ps, dropout_masks, seeds,
                   rng_states, lengths, dtype):
    """The reference backend: masks drawn as the torch path draws them, then the reference."""
    x, bias = cast_all(dtype, x, bias)
    if not isinstance(weight, NF4State):
        weight = weight.to(dtype)
    masks = {}
    for s in present:
        k = s.adapter
        masks[k], _ = _segment_dropout(x[s.start:s.end], k, dropout_ps[k], dropout_masks, seeds, rng_states,
                                       False, lengths)
    As = [A.to(dtype) for A in lora_As]
    Bs = [B.to(dtype) for B in lora_Bs]
    with torch.autocast(x.device.type, enabled=False):
        return multi_lora_linear_reference(x, weight, bias, As, Bs, scalings, present, dropout_ps, masks)
