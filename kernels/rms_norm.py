"""RMSNorm with Hugging Face Llama semantics: ``weight * (x / rms(x)).to(x.dtype)``.

    h = x.float();  rstd = rsqrt(mean(h², -1) + eps);  y = weight * (h * rstd).to(x.dtype)

Shapes: x ``[..., H]``, weight ``[H]``; y has x's shape and the promoted dtype of weight
and x (as ``LlamaRMSNorm`` does). The weight may be trainable (its gradient is returned)
or frozen (``requires_grad=False``: the dW reduction is skipped).

Implementations (see ``_dispatch``):
- ``rms_norm_reference``: the three lines above; autograd saves the fp32 copy of x.
- ``RMSNormFunction`` with ``impl="torch"``: saves x (in its own dtype) and the fp32
  ``rstd`` per row and derives the backward by hand. Inside
  ``recompute.recompute_activations()`` the output is not kept by the projections that consume
  it either (q, k, v or gate, up keep their input for dA): it is made again from x when the
  backward pass reaches them.
- ``RMSNormFunction`` with ``impl="triton"``: one program per row forward; backward with
  a fixed number of programs, each looping over a slice of rows and keeping its partial dW
  in registers, summed by torch at the end (deterministic: no atomics).
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import backend_for, interpreting
from ._triton_utils import cast, new_output, tl, triton
from .recompute import recomputable

# Rows per backward program are chosen so that there are about this many programs per SM:
# enough to fill the GPU, few enough that the [programs, H] fp32 partial-dW buffer stays
# small (Liger uses one program per SM). Under the interpreter 3 programs are enough to
# exercise the partial sums (and a remainder slice) at the small test shapes.
BWD_PROGRAMS_PER_SM = 2
BWD_PROGRAMS_INTERPRETER = 3
MAX_HIDDEN = 65536  # one row is one block; 64K fp32 is the most a block should hold


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The definition of correct: Hugging Face's ``LlamaRMSNorm.forward``."""
    input_dtype = x.dtype
    h = x.float()
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


# ---------------------------------------------------------------------------------------
# Triton kernels.
# ---------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, stride_x, stride_y, eps,
                         BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # HF rounds the normalised row to x's dtype before the weight multiplies it.
    normed = cast(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast(w * normed, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                         rows_per_program, stride_dy, stride_x, stride_dx,
                         BLOCK_H: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # int64 offsets: rows x stride can pass 2**31 elements. The row pointers advance by one
    # stride per iteration.
    dy_ptr += row_start.to(tl.int64) * stride_dy
    x_ptr += row_start.to(tl.int64) * stride_x
    dx_ptr += row_start.to(tl.int64) * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = x * rstd
        dn = dy * w
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        tl.store(dx_ptr + cols, cast(dx, dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += dy * cast(normed, x_ptr.dtype.element_ty).to(tl.float32)
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
    if HAS_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block_h: int) -> int:
    # Unsloth's calculate_settings: more warps for longer rows.
    return 16 if block_h >= 32768 else 8 if block_h >= 8192 else 4 if block_h >= 2048 else 2


def rms_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} > {MAX_HIDDEN}, the most one Triton block holds")
    y = new_output(x.shape, torch.promote_types(weight.dtype, x.dtype), x.device)
    y2 = y.view(-1, n_cols)
    rstd = new_output(n_rows, torch.float32, x.device)
    if n_rows:
        block_h = triton.next_power_of_2(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, weight, y2, rstd, n_cols, x2.stride(0), y2.stride(0), eps, BLOCK_H=block_h,
            num_warps=_num_warps(block_h),
        )
    return y, rstd


def _bwd_programs(n_rows: int, device: torch.device) -> int:
    if interpreting():
        return max(1, min(n_rows, BWD_PROGRAMS_INTERPRETER))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, BWD_PROGRAMS_PER_SM * sms))


def rms_norm_backward_triton(dy, x, weight, rstd, need_dw: bool):
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = new_output(x.shape, x.dtype, x.device)
    dx2 = dx.view(-1, n_cols)
    programs = _bwd_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 1
    if need_dw and n_rows:  # every program writes its row of partial sums
        dw_partial = new_output((programs, n_cols), torch.float32, x.device)
    else:  # no launch (dW of no rows is 0), or no dW: a placeholder the kernel never touches
        dw_partial = torch.zeros((1, n_cols) if need_dw else (1,), dtype=torch.float32, device=x.device)
    if n_rows:
        block_h = triton.next_power_of_2(n_cols)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx2, dw_partial, n_rows, n_cols, rows_per_program, dy2.stride(0),
            x2.stride(0), dx2.stride(0), BLOCK_H=block_h, HAS_DW=need_dw, num_warps=_num_warps(block_h),
        )
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


# ---------------------------------------------------------------------------------------
# Fast torch path (CPU).
# ---------------------------------------------------------------------------------------


def rms_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    y = weight * (h * rstd.unsqueeze(-1)).to(x.dtype)
    return y, rstd


def rms_norm_output(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
    """y alone, on the kernel or the torch path: what RMSNormFunction's forward computes, and what a
    recomputation in the backward pass must repeat bit for bit."""
    forward = rms_norm_forward_triton if impl == "triton" else rms_norm_forward_torch
    return forward(x, weight, eps)[0]


def rms_norm_backward_torch(dy, x, weight, rstd, need_dw: bool):
    rstd = rstd.unsqueeze(-1)
    normed = x.float() * rstd
    dn = dy.float() * weight.float()
    dx = dn.sub_(normed * (dn * normed).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
    dw = None
    if need_dw:
        rounded = normed.to(x.dtype).float()  # what the forward multiplied the weight by
        dw = (dy.float() * rounded).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    r"""``y = w ⊙ c(n)``, ``n = x · r``, ``r = (mean_k x_k² + ε)^(-1/2)`` per row of H elements;
    c rounds to x's dtype (the identity in fp32).

    Forward saves x and r (one fp32 per row).

    Backward, with g = dL/dy, treating the rounding c as the identity (straight-through, as
    autograd does for a dtype cast):

        dL/dw = Σ_rows g ⊙ c(n)                                  (only when w is trainable)
        dL/dn = g ⊙ w                                            =: d
        ∂r/∂x_j = −r³ · x_j / H
        dL/dx_j = r · d_j + Σ_k d_k x_k · ∂r/∂x_j
                = r · d_j − r³ · x_j · (1/H) Σ_k d_k x_k
                = r · (d_j − n_j · (1/H) Σ_k d_k n_k)

    All in fp32; dx is rounded to x's dtype and dw to w's.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, impl):
        if impl == "triton":
            y, rstd = rms_norm_forward_triton(x, weight, eps)
        else:
            y, rstd = rms_norm_forward_torch(x, weight, eps)
        ctx.impl = impl
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw, _, _ = ctx.needs_input_grad
        if ctx.impl == "triton":  # one kernel computes dx and the partial dW sums together
            dx, dw = rms_norm_backward_triton(dy, x, weight, rstd, need_dw)
        else:
            dx, dw = rms_norm_backward_torch(dy, x, weight, rstd.reshape(x.shape[:-1]), need_dw)
        return dx if need_dx else None, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x / rms(x)).to(x.dtype)`` with HF Llama semantics, dispatched by ``backend_for(x)``.

    Autocast changes nothing here (HF's RMSNorm computes in fp32 under autocast too). Inside
    ``recompute_activations()`` the result is recomputed from x for whichever op saves it,
    instead of being kept (not on the reference path, the definition).
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    impl = backend_for(x)
    if impl == "reference":
        return rms_norm_reference(x, weight, eps)
    with torch.autocast(x.device.type, enabled=False):
        y = RMSNormFunction.apply(x, weight, eps, impl)
    return recomputable(y, functools.partial(rms_norm_output, eps=eps, impl=impl), x, weight)
