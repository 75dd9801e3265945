"""LoRA linear: ``y = x·Wᵀ (+ b) + s·(dropout(x)·Aᵀ)·Bᵀ`` with a frozen W.

Shapes: x ``[..., in]``, W ``[out, in]``, A ``[r, in]``, B ``[out, r]``, s = alpha/r
(rsLoRA: alpha/sqrt(r)). Dropout acts on the LoRA branch only; the base path sees x.

The arithmetic lives once, on 2-D tensors (x as ``[rows, in]``), in two implementations
with one signature: ``lora_forward``/``lora_backward`` (torch) and
``lora_forward_triton``/``lora_backward_triton`` (the kernels below). The autograd Functions
here and ``nf4.NF4LinearFunction`` (on the dequantised weight) call them.

Implementations (see ``_dispatch``):
- ``lora_linear_reference``: the formula written with autograd. W is frozen, so autograd
  computes no dW either, but it keeps ``dropout(x)`` and recomputes nothing clever.
- ``LoRALinearFunction``: the torch fast path. Saves x (shared with whoever else saved it),
  a 1-byte dropout mask and ``x·Aᵀ`` (``[N, r]``, tiny), and reuses ``x·Aᵀ`` for dB.
- ``LoRALinearTritonFunction``: three kernels. The forward is one kernel: each output tile
  accumulates x·Wᵀ and dropout(x)·Aᵀ over the same loads of x, then adds s·(x·Aᵀ)·Bᵀ and
  the bias in its epilogue. The backward's dx is one kernel of the same shape
  (dy·W and dy·B share the loads of dy, then s·((dy·B)·A)⊙mask/(1-p) in the epilogue);
  dA is a third kernel, dB one cuBLAS call. The dropout mask is never stored: it is a pure
  function ``tl.rand(seed, row·in + col) >= p`` of the element's index, so the forward, the
  backward, every tile and any tiling regenerate the same mask from one integer seed.

Dtypes: ``lora_linear`` (and ``nf4.nf4_lora_linear``) own the casting. They compute in one
dtype, ``compute_dtype(x)``: autocast's for x's device when autocast is on there, else x's
own; every tensor argument is cast to it (differentiably) before any implementation runs,
with autocast disabled inside.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._dispatch import autocast_dtype, backend_for, interpreting, matmul_dtype
from ._triton_utils import autotune, cast, dot, dot_options, new_output, tl, triton

logger = logging.getLogger(__name__)


class Dropout(enum.IntEnum):
    """Where the keep-mask of the LoRA branch's dropout comes from (the kernels' DROPOUT)."""

    OFF = 0  # p = 0: no mask
    FROM_SEED = 1  # drawn inside the kernels: kept when tl.rand(seed, row·in + col) >= p
    FROM_MASK = 2  # a stored bool mask of x's shape


# The modes as Triton compile-time constants for the kernels' bodies (a @triton.jit function
# may read only constexpr globals). Launchers pass ``DROPOUT=int(mode)``.
DROPOUT_OFF = tl.constexpr(int(Dropout.OFF))
DROPOUT_FROM_SEED = tl.constexpr(int(Dropout.FROM_SEED))
DROPOUT_FROM_MASK = tl.constexpr(int(Dropout.FROM_MASK))


def dropout_mode(dropout_p: float, mask2: torch.Tensor | None) -> Dropout:
    """The mode of a call: off at p = 0, else the given mask, else a seed (kernels only)."""
    if dropout_p == 0.0:
        return Dropout.OFF
    return Dropout.FROM_SEED if mask2 is None else Dropout.FROM_MASK


class LoRANeeds(NamedTuple):
    """Which gradients a backward pass computes (the others are None)."""

    x: bool
    lora_A: bool
    lora_B: bool


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, dropout_mask=None):
    """The definition of correct: plain torch, autograd does the rest."""
    y = F.linear(x, weight, bias)
    x_lora = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA ops compute in: autocast's for x's device when it is on, else x's."""
    return autocast_dtype(x) or x.dtype


def cast_all(dtype: torch.dtype, *tensors):
    """Each tensor ``.to(dtype)`` (itself when already there; differentiable); None stays None."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


# ---------------------------------------------------------------------------------------
# The maths, torch path, on 2-D tensors. LoRALinearFunction and NF4LinearFunction derive
# their backward passes from these; see LoRALinearFunction's docstring.
# ---------------------------------------------------------------------------------------


def _dropped(x2: torch.Tensor, mask2: torch.Tensor | None) -> torch.Tensor:
    """x ⊙ M (the 1/(1-p) rescaling rides on the [rows, r] products instead)."""
    return x2 if mask2 is None else torch.where(mask2, x2, 0.0)


def lora_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, mask2=None, seed=0):
    """``(y, u)``: y = x·Wᵀ + b + s·u·Bᵀ in x's dtype and u = (x ⊙ M)·Aᵀ/(1-p) ``[rows, r]``,
    kept for the backward pass in the dtype it was computed in. Without LoRA (A = B = None)
    y = x·Wᵀ + b and u is None.

    All tensors share one dtype; a bf16/fp16 CPU tensor on a CPU without the hardware for it
    is multiplied in fp32 and y rounded once (``_dispatch.matmul_dtype``). ``mask2`` (bool,
    x's shape) is required when ``dropout_p > 0``; ``seed`` is for the Triton twin's signature."""
    out_dtype, compute = x2.dtype, matmul_dtype(x2)
    if compute != out_dtype:
        x2, weight, bias, lora_A, lora_B = cast_all(compute, x2, weight, bias, lora_A, lora_B)
    y = F.linear(x2, weight, bias)
    u = None
    if lora_A is not None:
        # The rescaling multiplies the [rows, r] product, not the [rows, in] input: one
        # full-size elementwise op (the masking) instead of three with their conversions.
        u = _dropped(x2, mask2) @ lora_A.t()
        if mask2 is not None:
            u.mul_(1.0 / (1.0 - dropout_p))
        y.addmm_(u, lora_B.t(), alpha=scaling)
    return y.to(out_dtype), u


def lora_backward(g, x2, weight, lora_A, lora_B, u, scaling, dropout_p, mask2, seed, needs: LoRANeeds):
    """``(dx, dA, dB)`` from g = dL/dy ``[rows, out]``, each None unless ``needs`` asks for it.

    ``x2`` is read only for dA and ``weight`` only for dx: either may be None otherwise.
    Without LoRA (A = B = None) only dx = g·W. Results in g's dtype."""
    out_dtype, compute = g.dtype, matmul_dtype(g)
    if compute != out_dtype:
        g, x2, weight, lora_A, lora_B = cast_all(compute, g, x2, weight, lora_A, lora_B)
    grad_x = grad_A = grad_B = grad_u = None
    if lora_A is not None and (needs.x or needs.lora_A):
        # dL/du with the dropout rescaling folded in (it multiplies x ⊙ M in both uses)
        grad_u = (g @ lora_B).mul_(scaling if mask2 is None else scaling / (1.0 - dropout_p))
    if needs.lora_B:
        grad_B = (g.t() @ u).mul_(scaling)
    if needs.lora_A:
        grad_A = grad_u.t() @ _dropped(x2, mask2)
    if needs.x:
        if grad_u is None:
            grad_x = g @ weight
        else:
            grad_x_lora = grad_u @ lora_A
            if mask2 is not None:
                grad_x_lora.masked_fill_(~mask2, 0.0)
            grad_x = torch.addmm(grad_x_lora, g, weight)
    return cast_all(out_dtype, grad_x, grad_A, grad_B)


# ---------------------------------------------------------------------------------------
# Triton kernels.
#
# Names follow a plain matmul C[M, N] = Σ_K: for the forward M = rows of x, N = out
# features, K = in features; for dx, N = in features and K = out features (dx = dy·W).
# R is the LoRA rank, padded to BLOCK_R >= 16 (tl.dot's smallest dimension) with zeros.
# ---------------------------------------------------------------------------------------

# Autotuned on a GPU. 128x128x64 in 3 stages is the usual Hopper/Ampere bf16 GEMM tile; the
# others cover skinny outputs and fp32 (whose tiles take twice the shared memory; configs
# over the device's limit are pruned, see _triton_utils.autotune).
MM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# Under the interpreter: the smallest tile tl.dot takes, so the test shapes (tens of rows
# and features) span several tiles in every direction, with ragged last ones.
MM_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                                      num_warps=4, num_stages=1)
# dA = (dy·B)ᵀ·dropout(x): output [R, in] tiles of BLOCK_N columns, reduction over rows.
DA_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
DA_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
MAX_RANK = 128  # BLOCK_R rides along every tile; above this the torch path runs instead
DA_PROGRAMS_PER_SM = 2


def _mm_shared_bytes(config, args) -> int:
    """Upper bound of a LoRA matmul kernel's shared memory: ``num_stages`` copies of one
    K-step's tiles (x or dy, W, the rank-wide A or B tile, the 1-byte mask) plus the
    epilogue's rank-wide operands. Checked against the compiled kernels by ``_aot.py``."""
    kw, es, br = config.kwargs, args["x_ptr"].element_size(), args["BLOCK_R"]
    step = (kw["BLOCK_M"] + kw["BLOCK_N"] + br) * kw["BLOCK_K"] * es + kw["BLOCK_M"] * kw["BLOCK_K"]
    return config.num_stages * step + (br * kw["BLOCK_N"] + kw["BLOCK_M"] * br) * es


def _da_shared_bytes(config, args) -> int:
    kw, es, br = config.kwargs, args["x_ptr"].element_size(), args["BLOCK_R"]
    step = (br + kw["BLOCK_N"]) * kw["BLOCK_M"] * es + kw["BLOCK_M"] * kw["BLOCK_N"]
    return config.num_stages * step


@triton.jit
def _keep(seed, rows, cols, n_cols, dropout_p, mask_ptr, stride_mm, stride_mk, in_bounds,
          DROPOUT: tl.constexpr):
    """The dropout keep-mask of the [rows, cols] tile: from the seed (DROPOUT_FROM_SEED) or a
    stored mask (DROPOUT_FROM_MASK). The random number of element (m, k) depends on
    m·n_cols + k only."""
    if DROPOUT == DROPOUT_FROM_SEED:
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        keep = tl.rand(seed, offsets) >= dropout_p
    else:
        m = tl.load(mask_ptr + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mk,
                    mask=in_bounds, other=0)
        keep = m != 0
    return keep


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile coordinates in GROUP_M-row bands, so consecutive programs reuse the same
    columns of W while they are in L2 (the ordering of Triton's matmul tutorial)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@autotune(MM_CONFIGS, key=["M", "N", "K", "R"], interpreter_config=MM_INTERPRETER_CONFIG,
          shared_bytes=_mm_shared_bytes)
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, mask_ptr, y_ptr, u_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_mm, stride_mk, stride_ym, stride_yn, stride_um, stride_ur,
    scaling, dropout_p, keep_scale, seed,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + b for one [BLOCK_M, BLOCK_N] tile of y; the tiles of
    the first column also write u = dropout(x)·Aᵀ (needed for dB)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = tl.load(w_cols + rk[:, None] * stride_wk, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = dot(x, w, acc, PRECISION)
        if DROPOUT != DROPOUT_OFF:
            keep = _keep(seed, rm, rk, K, dropout_p, mask_ptr, stride_mm, stride_mk, x_mask, DROPOUT)
            x = cast(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), dtype)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        xa = dot(x, a, xa, PRECISION)
    u = cast(xa, dtype)  # rounded to the compute dtype, as the reference's x·Aᵀ is
    if pid_n == 0:
        tl.store(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur, u,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))
    b = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    acc += scaling * dot(u, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn, cast(acc, dtype),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@autotune(MM_CONFIGS, key=["M", "N", "K", "R"], interpreter_config=MM_INTERPRETER_CONFIG,
          shared_bytes=_mm_shared_bytes)
@triton.jit
def _lora_dx_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, mask_ptr, dx_ptr, gb_ptr,
    M, N, K, R,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_ar, stride_an, stride_bk, stride_br,
    stride_mm, stride_mn, stride_dm, stride_dn, stride_gbm, stride_gbr,
    scaling, dropout_p, keep_scale, seed,
    HAS_DX: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy·W + s·((dy·B)·A) ⊙ mask/(1-p) for one [BLOCK_M, BLOCK_N] tile of dx.

    x_ptr is dy ([M, K] with K = out features; named x_ptr so the shared-memory bound and
    the autotuner read its dtype like the forward's). N = in features: the columns of the
    grid's tiles. The tiles of the first column also write gb = dy·B (unscaled, [M, R]) for
    dA. HAS_DX=False (x needs no gradient): only gb, no dy·W, on a grid of one column of tiles,
    so N = 1 (N also tells ``_grouped_tile`` the grid's shape)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    g_rows = x_ptr + rm[:, None].to(tl.int64) * stride_gm
    w_cols = w_ptr + rn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        g = tl.load(g_rows + rk[None, :] * stride_gk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DX:
            w = tl.load(w_cols + rk[:, None].to(tl.int64) * stride_wk,
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = dot(g, w, acc, PRECISION)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rr[None, :] * stride_br,
                    mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        gb = dot(g, b, gb, PRECISION)
    gb_c = cast(gb, dtype)
    if pid_n == 0:
        tl.store(gb_ptr + rm[:, None] * stride_gbm + rr[None, :] * stride_gbr, gb_c,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))
    if HAS_DX:
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        lora = scaling * dot(gb_c, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
        out_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if DROPOUT != DROPOUT_OFF:
            keep = _keep(seed, rm, rn, N, dropout_p, mask_ptr, stride_mm, stride_mn, out_mask, DROPOUT)
            lora = tl.where(keep, lora * keep_scale, 0.0)
        acc += lora
        tl.store(dx_ptr + rm[:, None].to(tl.int64) * stride_dm + rn[None, :] * stride_dn, cast(acc, dtype),
                 mask=out_mask)


@autotune(DA_CONFIGS, key=["M", "K", "R"], interpreter_config=DA_INTERPRETER_CONFIG,
          shared_bytes=_da_shared_bytes)
@triton.jit
def _lora_da_kernel(
    gb_ptr, x_ptr, mask_ptr, da_ptr,
    M, K, R, rows_per_split,
    stride_gbm, stride_gbr, stride_xm, stride_xk, stride_mm, stride_mk,
    dropout_p, keep_scale, seed,
    DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One split's partial (dy·B)ᵀ·dropout(x) over its rows, for BLOCK_N columns of A.

    Program (n, s) writes da[s, :, n-tile] in fp32; the host sums the splits (no atomics,
    so the result is deterministic)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        gbt = tl.load(gb_ptr + rm[None, :].to(tl.int64) * stride_gbm + rr[:, None] * stride_gbr,
                      mask=(rm[None, :] < m_end) & (rr[:, None] < R), other=0.0)
        x_mask = (rm[:, None] < m_end) & (rn[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rn[None, :] * stride_xk, mask=x_mask,
                    other=0.0)
        if DROPOUT != DROPOUT_OFF:
            keep = _keep(seed, rm, rn, K, dropout_p, mask_ptr, stride_mm, stride_mk, x_mask, DROPOUT)
            x = cast(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), dtype)
        acc = dot(gbt, x, acc, PRECISION)
    tl.store(da_ptr + pid_s * R * K + rr[:, None] * K + rn[None, :], acc,
             mask=(rr[:, None] < R) & (rn[None, :] < K))


@triton.jit
def _dropout_mask_kernel(mask_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, rk, K, dropout_p, mask_ptr, 0, 0, None, DROPOUT_FROM_SEED)
    tl.store(mask_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], keep.to(tl.uint8),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


def lora_dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep-mask (bool, ``shape``) that the Triton path draws for ``seed``: element
    (row, col) of x viewed as ``[rows, in]`` is kept when ``rand(seed, row·in + col) >= p``.
    Lets the reference and the torch path reproduce a Triton run exactly."""
    shape = tuple(shape)
    rows, cols = (int(torch.tensor(shape[:-1]).prod()) if len(shape) > 1 else 1), shape[-1]
    mask = new_output((rows, cols), torch.uint8, device)
    if mask.numel():
        _dropout_mask_kernel[(triton.cdiv(rows, 32), triton.cdiv(cols, 32))](
            mask, rows, cols, seed, dropout_p, BLOCK_M=32, BLOCK_K=32)
    return mask.view(torch.bool).reshape(shape)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _da_splits(m: int, k: int, device: torch.device) -> int:
    if interpreting():
        return max(1, min(2, triton.cdiv(m, 16)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(m, 128), triton.cdiv(DA_PROGRAMS_PER_SM * sms, triton.cdiv(k, 64))))


def _tile_grid(M: int, N: int):
    """The launch grid of a tiled kernel over [M, N]: one program per tile. The kernel must be
    given the same M and N, from which ``_grouped_tile`` finds each program's tile."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _mask_args(mask2):
    """(pointer, row stride, col stride) of a stored mask; a dummy when the seed is used."""
    if mask2 is None:
        return None, 0, 0
    m8 = mask2.view(torch.uint8)
    return m8, m8.stride(0), m8.stride(1)


def lora_forward_triton(x2, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, mask2=None, seed=0):
    """``lora_forward`` on the kernels (one launch): ``(y, u)``, u ``[rows, r]`` in x's dtype.
    With ``dropout_p > 0`` the mask is ``mask2`` when given, else drawn from ``seed``."""
    M, K = x2.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = new_output((M, N), x2.dtype, x2.device)
    u = new_output((M, R), x2.dtype, x2.device)
    if M == 0:
        return y, u
    m8, smm, smk = _mask_args(mask2)
    _lora_fwd_kernel[_tile_grid(M, N)](
        x2, weight, bias, lora_A, lora_B, m8, y, u, M, N, K, R,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), smm, smk, y.stride(0), y.stride(1), u.stride(0), u.stride(1),
        scaling, dropout_p, 1.0 / (1.0 - dropout_p), seed,
        HAS_BIAS=bias is not None, DROPOUT=int(dropout_mode(dropout_p, mask2)), BLOCK_R=_rank_block(R),
        **dot_options(x2.device),
    )
    return y, u


def lora_backward_triton(g, x2, weight, lora_A, lora_B, u, scaling, dropout_p, mask2, seed, needs: LoRANeeds):
    """``lora_backward`` on the kernels: dx and gB = g·B in one kernel, dA in a second (from
    gB), dB = s·gᵀ·u by cuBLAS. As there, ``x2`` is read only for dA and ``weight`` only for dx."""
    M, N = g.shape  # N: out features
    K, R = lora_A.shape[1], lora_A.shape[0]
    mode = int(dropout_mode(dropout_p, mask2))
    m8, smm, smk = _mask_args(mask2)
    keep_scale = 1.0 / (1.0 - dropout_p)
    opts = dict(BLOCK_R=_rank_block(R), **dot_options(g.device))
    dx = new_output((M, K), g.dtype, g.device) if needs.x else None
    if M and (needs.x or needs.lora_A):
        gb = new_output((M, R), g.dtype, g.device)
        # Without dx only gb = g·B is wanted: one column of tiles computes it. The kernel's N
        # is the grid's column count (the in-features, or 1): _grouped_tile maps program ids to
        # tiles by it, and with any other N some programs land on columns the grid lacks and
        # rows of gb stay unwritten. Without dx the weight is never read (a dummy pointer).
        n_cols = K if needs.x else 1
        w, w_strides = (weight, weight.stride()) if needs.x else (lora_B, (0, 0))
        dx_strides = dx.stride() if needs.x else (0, 0)
        _lora_dx_kernel[_tile_grid(M, n_cols)](
            g, w, lora_A, lora_B, m8, dx, gb, M, n_cols, N, R,
            g.stride(0), g.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), smm, smk, *dx_strides, gb.stride(0), gb.stride(1),
            scaling, dropout_p, keep_scale, seed, HAS_DX=needs.x, DROPOUT=mode, **opts,
        )
    dA = dB = None
    if needs.lora_A:
        if M:
            splits = _da_splits(M, K, g.device)
            partial = new_output((splits, R, K), torch.float32, g.device)
            rows_per_split = triton.cdiv(M, splits)
            grid = lambda meta: (triton.cdiv(K, meta["BLOCK_N"]), splits)
            _lora_da_kernel[grid](
                gb, x2, m8, partial, M, K, R, rows_per_split, gb.stride(0), gb.stride(1), x2.stride(0),
                x2.stride(1), smm, smk, dropout_p, keep_scale, seed, DROPOUT=mode, **opts,
            )
            dA = partial.sum(0).mul_(scaling).to(lora_A.dtype)
        else:
            dA = torch.zeros_like(lora_A)
    if needs.lora_B:
        dB = (g.t() @ u).mul_(scaling)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------
# The autograd Functions: the torch path and the kernels, one body.
# ---------------------------------------------------------------------------------------


def _function_forward(ctx, fused, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, seed):
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = None if dropout_mask is None else dropout_mask.reshape(x2.shape)
    forward = lora_forward_triton if fused else lora_forward
    y, u = forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, mask2, seed)
    # x rather than x ⊙ M: x is usually kept alive by the op before us anyway, so saving it
    # costs nothing, and x ⊙ M is recomputed from x and the 1-byte mask (or the seed).
    ctx.save_for_backward(x2, weight, lora_A, lora_B, u, mask2)
    ctx.fused, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape = fused, scaling, dropout_p, seed, x.shape
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _function_backward(ctx, grad_y):
    x2, weight, lora_A, lora_B, u, mask2 = ctx.saved_tensors
    need_x, _weight, _bias, need_A, need_B, *_ = ctx.needs_input_grad
    g = grad_y.reshape(-1, weight.shape[0])
    backward = lora_backward_triton if ctx.fused else lora_backward
    dx, dA, dB = backward(g, x2, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, mask2, ctx.seed,
                          LoRANeeds(need_x, need_A, need_B))
    dx = None if dx is None else dx.reshape(ctx.x_shape)
    return dx, None, None, dA, dB, None, None, None, None


class LoRALinearFunction(torch.autograd.Function):
    r"""Forward and backward of a LoRA linear layer with a frozen base weight, torch path
    (``lora_forward``/``lora_backward``).

    Forward, over the N = prod(x.shape[:-1]) rows of x:

        x_d = x ⊙ M / (1 - p)          (M: Bernoulli(1 - p) mask; x_d = x when p = 0)
        u   = x_d · Aᵀ                  [N, r]   saved: it is needed again for dB
        y   = x · Wᵀ + b + s · u · Bᵀ

    Backward, with g = dL/dy [N, out]:

        dL/du = s · g · B               [N, r]
        dL/dB = s · gᵀ · u              [out, r]   (reuses u: no second x·Aᵀ)
        dL/dA = (dL/du)ᵀ · x_d          [r, in]
        dL/dx = g · W + (dL/du · A) ⊙ M / (1 - p)

    dL/dW = gᵀ · x is never formed: W is frozen, and that product is the single largest
    matmul of the backward pass ([out, N] × [N, in]). The bias is frozen too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, seed):
        return _function_forward(ctx, False, x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                 dropout_mask, seed)

    @staticmethod
    def backward(ctx, grad_y):
        return _function_backward(ctx, grad_y)


class LoRALinearTritonFunction(torch.autograd.Function):
    r"""The LoRA linear layer on the Triton kernels (``lora_forward_triton``/
    ``lora_backward_triton``); the same math as ``LoRALinearFunction``.

    Forward (one kernel), with M = Bernoulli keep-mask regenerated from ``seed``:

        u = (x ⊙ M/(1 − p)) · Aᵀ          accumulated next to x·Wᵀ over the same tiles of x
        y = x · Wᵀ + b + s · u · Bᵀ       the rank-r product in the tile's epilogue

    Backward, with g = dL/dy:

        gB    = g · B                                       [N, r]  (shares the loads of g with g·W)
        dL/dx = g · W + s · (gB · A) ⊙ M/(1 − p)           one kernel, mask regenerated per tile
        dL/dA = s · gBᵀ · (x ⊙ M/(1 − p))                  kernel, mask regenerated again
        dL/dB = s · gᵀ · u                                  cuBLAS; u saved by the forward

    Saved: x, u ([N, r]) and the seed (an int), never the mask; no dL/dW, W is frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, seed):
        return _function_forward(ctx, True, x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                 dropout_mask, seed)

    @staticmethod
    def backward(ctx, grad_y):
        return _function_backward(ctx, grad_y)


# ---------------------------------------------------------------------------------------
# The op: checks, casting, dispatch, dropout. Shared with nf4.nf4_lora_linear.
# ---------------------------------------------------------------------------------------


def triton_ineligible(dtype: torch.dtype, rank: int) -> str | None:
    """Why the LoRA kernels cannot run a call in ``dtype`` at rank ``rank`` (None when they can)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported by the kernels"
    if rank > MAX_RANK:
        return f"rank {rank} > {MAX_RANK}"
    return None


@functools.cache
def log_fallback(reason: str) -> None:
    """Warn, once per reason and process, that the torch path runs instead of the kernels."""
    logger.warning("lora_linear: running the torch path instead of Triton: %s", reason)


def dropout_mask_like(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A keep-mask of x's shape: True with probability 1 - p.

    On the CPU, torch's Mersenne-Twister ``bernoulli_`` was 16% of a SmolLM-shape LoRA step
    (13-18 ms per [1024, 1536] mask on the 2-core AVX2 box). The mask is instead made from 16-bit
    integers of numpy's PCG64 (4.6 ms), seeded by one draw from torch's generator, so
    ``torch.manual_seed`` and a checkpoint's RNG state still reproduce it exactly. p is thereby
    rounded to a multiple of 1/65536 (0.05 -> 0.0500031).
    """
    if x.device.type != "cpu":
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        return keep.bernoulli_(1.0 - p, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    words = np.random.Generator(np.random.PCG64(seed)).integers(-(1 << 15), 1 << 15, size=x.shape,
                                                                dtype=np.int16)
    return torch.from_numpy(words) >= round(p * (1 << 16)) - (1 << 15)


def check_dropout(op: str, x: torch.Tensor, dropout_p: float, dropout_mask: torch.Tensor | None) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p={dropout_p} must lie in [0, 1)")
    if dropout_p > 0.0 and dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"{op}: dropout_mask {tuple(dropout_mask.shape)} != x {tuple(x.shape)}")


def draw_dropout(x, dropout_p: float, dropout_mask, seed, fused: bool):
    """``(mask, seed)`` a call runs with. No dropout: (None, 0). The kernels (``fused``) draw
    the mask from a seed when no mask is given (one from torch's CPU generator when ``seed``
    is None, so ``torch.manual_seed`` reproduces it); the other paths need a bool mask, drawn
    by ``dropout_mask_like`` (from ``seed`` when one is given)."""
    if dropout_p == 0.0:
        return None, 0
    if dropout_mask is None:
        if fused:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed
        else:
            generator = None if seed is None else torch.Generator(x.device).manual_seed(seed)
            dropout_mask = dropout_mask_like(x, dropout_p, generator)
    return dropout_mask, 0 if seed is None else seed


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, dropout_mask=None, seed=None):
    """``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with W (and b) frozen: no gradient is computed for them.

    Dtypes: the op computes in ``compute_dtype(x)`` (autocast's for x's device when autocast
    is on, else x's dtype) and casts x, W, b, A and B to it itself, differentiably, on every
    backend: the result has that dtype, and fp32 A and B under bf16 receive fp32 gradients.
    With ``dropout_p > 0``: pass ``dropout_mask`` (bool, x's shape) to fix the mask on every
    path. Without one, the Triton path draws the mask from ``seed`` inside the kernels (an
    int; drawn from torch's CPU generator when None, so ``torch.manual_seed`` reproduces it;
    ``lora_dropout_mask`` rebuilds it), and the torch paths draw a bool mask from torch's RNG.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    check_dropout("lora_linear", x, dropout_p, dropout_mask)
    dtype = compute_dtype(x)
    x, weight, bias, lora_A, lora_B = cast_all(dtype, x, weight, bias, lora_A, lora_B)
    impl = backend_for(x)
    if impl == "triton":
        reason = triton_ineligible(dtype, lora_A.shape[0])
        if reason is not None:
            log_fallback(reason)
            impl = "torch"
    dropout_mask, seed = draw_dropout(x, dropout_p, dropout_mask, seed, fused=impl == "triton")
    with torch.autocast(x.device.type, enabled=False):
        if impl == "reference":
            return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask)
        function = LoRALinearTritonFunction if impl == "triton" else LoRALinearFunction
        return function.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, seed)
