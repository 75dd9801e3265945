"""SwiGLU: ``silu(gate) * up``, the gate of the Llama MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``).

Shapes: gate and up ``[..., I]`` (the same shape); the result has that shape and the
promoted dtype of the two.

Implementations (see ``_dispatch``):
- ``swiglu_reference``: ``F.silu(gate) * up``; autograd saves gate, silu(gate) and up.
- ``SwiGLUFunction`` with ``impl="torch"``: saves only gate and up and recomputes the
  sigmoid in the backward pass (one activation-sized tensor less per MLP), computing the
  backward in fp32. Inside ``recompute.recompute_activations()`` the output is not kept by
  the projection that consumes it either (down_proj keeps its input for dA): it is made again
  from the saved gate and up when the backward pass reaches that projection.
- ``SwiGLUFunction`` with ``impl="triton"``: the same, one elementwise kernel each way,
  reading bf16/fp16/fp32 and computing in fp32 (one rounding instead of two in bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import backend_for, interpreting
from ._triton_utils import cast, new_output, tl, triton
from .recompute import recomputable

# Columns per program. 1024 is the block Liger and Unsloth settled on for this memory-bound
# op (4 warps x 32 lanes x 8 elements). Under the interpreter, 32 makes the small test
# shapes span several column blocks with a ragged tail.
BLOCK_GPU = 1024
BLOCK_INTERPRETER = 32
NUM_WARPS = 4


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The definition of correct: plain torch, as in Hugging Face's ``LlamaMLP``."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# Triton kernels: one program per (row, block of BLOCK columns).
# ---------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_cols, stride_gate, stride_up, stride_out,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * stride_out + cols, cast(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols, stride_grad, stride_gate,
                       stride_up, stride_dgate, stride_dup, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(grad_ptr + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dup = dy * g * sig
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + row * stride_dgate + cols, cast(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, cast(dup, dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as ``[rows, cols]`` with unit column stride (a view whenever one exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _block() -> int:
    return BLOCK_INTERPRETER if interpreting() else BLOCK_GPU


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _rows(gate), _rows(up)
    out = new_output(gate.shape, torch.promote_types(gate.dtype, up.dtype), gate.device)
    o2 = out.view(-1, out.shape[-1])
    n_rows, n_cols = g2.shape
    if out.numel():
        block = _block()
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            g2, u2, o2, n_cols, g2.stride(0), u2.stride(0), o2.stride(0), BLOCK=block, num_warps=NUM_WARPS
        )
    return out


def swiglu_backward_triton(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    d2, g2, u2 = _rows(grad), _rows(gate), _rows(up)
    dgate = new_output(gate.shape, gate.dtype, gate.device)
    dup = new_output(up.shape, up.dtype, up.device)
    dg2, du2 = dgate.view(-1, gate.shape[-1]), dup.view(-1, up.shape[-1])
    n_rows, n_cols = g2.shape
    if gate.numel():
        block = _block()
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            d2, g2, u2, dg2, du2, n_cols, d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0),
            du2.stride(0), BLOCK=block, num_warps=NUM_WARPS,
        )
    return dgate, dup


# ---------------------------------------------------------------------------------------
# Fast torch path (CPU).
# ---------------------------------------------------------------------------------------


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, impl: str) -> torch.Tensor:
    """``silu(gate) * up`` on the kernel or the torch path: what SwiGLUFunction's forward computes,
    and what a recomputation in the backward pass must repeat bit for bit."""
    if impl == "triton":
        return swiglu_forward_triton(gate, up)
    return F.silu(gate) * up


def swiglu_backward_torch(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    g = gate.float()
    sig = torch.sigmoid(g)
    dy = grad.float()
    dup = (dy * g).mul_(sig)
    # d silu(g)/dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    dgate = torch.rsub(sig, 1.0).mul_(g).add_(1.0).mul_(sig).mul_(dy).mul_(up)
    return dgate.to(gate.dtype), dup.to(up.dtype)


class SwiGLUFunction(torch.autograd.Function):
    r"""``h = silu(g) ⊙ u`` with silu(g) = g·σ(g), σ the logistic sigmoid.

    Forward saves g and u only; σ(g) is recomputed in the backward pass.

    Backward, with dh = dL/dh:

        dL/du = dh ⊙ silu(g) = dh ⊙ g·σ(g)
        dL/dg = dh ⊙ u ⊙ silu'(g)
        silu'(g) = σ(g) + g·σ(g)·(1 − σ(g))      (σ' = σ(1 − σ))
                 = σ(g)·(1 + g·(1 − σ(g)))

    Both are computed in fp32 and rounded once to the input dtypes.
    """

    @staticmethod
    def forward(ctx, gate, up, impl):
        ctx.impl = impl
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up, impl)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_dgate, need_dup, _ = ctx.needs_input_grad
        if ctx.impl == "triton":  # one kernel writes both
            dgate, dup = swiglu_backward_triton(grad, gate, up)
        else:
            dgate, dup = swiglu_backward_torch(grad, gate, up)
        return dgate if need_dgate else None, dup if need_dup else None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the Llama MLP gate), dispatched by ``backend_for(gate)``.

    Inside ``recompute_activations()`` the result is recomputed from gate and up for whichever op
    saves it (down_proj), instead of being kept (not on the reference path, the definition)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    impl = backend_for(gate)
    if impl == "reference":
        return swiglu_reference(gate, up)
    out = SwiGLUFunction.apply(gate, up, impl)
    return recomputable(out, functools.partial(swiglu_forward, impl=impl), gate, up)
