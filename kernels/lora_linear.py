"""LoRA linear: ``y = x·Wᵀ (+ b) + s·(dropout(x)·Aᵀ)·Bᵀ`` with a frozen W.

Shapes: x ``[..., in]``, W ``[out, in]``, A ``[r, in]``, B ``[out, r]``, s = alpha/r
(rsLoRA: alpha/sqrt(r)). Dropout acts on the LoRA branch only; the base path sees x.

Implementations (see ``_dispatch``):
- ``lora_linear_reference``: the formula written with autograd. W is frozen, so autograd
  computes no dW either, but it keeps ``dropout(x)`` and recomputes nothing clever.
- ``LoRALinearFunction``: the torch fast path. Saves x (shared with whoever else saved it),
  a 1-byte dropout mask and ``x·Aᵀ`` (``[N, r]``, tiny), and reuses ``x·Aᵀ`` for dB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import backend_for


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, dropout_mask=None):
    """The definition of correct: plain torch, autograd does the rest."""
    y = F.linear(x, weight, bias)
    x_lora = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)


class LoRALinearFunction(torch.autograd.Function):
    r"""Forward and backward of a LoRA linear layer with a frozen base weight.

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
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        if dropout_mask is not None:
            mask2 = dropout_mask.reshape(x2.shape)
            x_lora = x2 * mask2 * (1.0 / (1.0 - dropout_p))
        else:
            mask2 = None
            x_lora = x2
        u = x_lora @ lora_A.t()
        y.addmm_(u, lora_B.t(), alpha=scaling)
        # Save x rather than x_lora: x is usually kept alive by the op before us anyway,
        # so saving it costs nothing, and x_lora is recomputed from x and the bool mask.
        ctx.save_for_backward(x2, weight, lora_A, lora_B, u, mask2)
        ctx.scaling, ctx.dropout_p, ctx.x_shape = scaling, dropout_p, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, u, mask2 = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        g = grad_y.reshape(-1, weight.shape[0])
        grad_u = (g @ lora_B).mul_(s)
        grad_A = grad_B = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_B = (g.t() @ u).mul_(s)
        if ctx.needs_input_grad[3]:
            x_lora = x2 if mask2 is None else x2 * mask2 * (1.0 / (1.0 - p))
            grad_A = grad_u.t() @ x_lora
        if ctx.needs_input_grad[0]:
            grad_x_lora = grad_u @ lora_A
            if mask2 is not None:
                grad_x_lora.mul_(mask2).mul_(1.0 / (1.0 - p))
            grad_x = torch.addmm(grad_x_lora, g, weight).reshape(ctx.x_shape)
        return grad_x, None, None, grad_A, grad_B, None, None, None


def dropout_mask_like(x: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask of x's shape: True with probability 1 - p."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, dropout_mask=None):
    """``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with W (and b) frozen: no gradient is computed for them.

    All tensors must share one dtype (the caller casts; see ``peftloop.lora.LoRALinear``).
    With ``dropout_p > 0`` pass ``dropout_mask`` (bool, x's shape) to fix the mask, or leave it
    None to draw one from torch's RNG.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    if dropout_p > 0.0 and dropout_mask is None:
        dropout_mask = dropout_mask_like(x, dropout_p)
    if dropout_p == 0.0:
        dropout_mask = None
    impl = backend_for(x)
    if impl == "reference":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask)
