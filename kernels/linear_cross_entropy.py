"""Fused linear cross-entropy: ``cross_entropy(hidden · weightᵀ (+ bias), labels)`` without the logits.

The language-model head of a 49K-256K vocabulary makes the ``[tokens, vocab]`` logits the
largest tensor of a fine-tuning step (SmolLM2-135M, 2,048 tokens: 49,152 x 2,048 fp32 =
403 MB, plus as much again for the log-softmax and for its gradient). This op walks the
tokens in chunks: per chunk it forms the chunk's logits, reduces them to the chunk's loss,
turns the same buffer into the gradient of the logits, and immediately multiplies that
into the gradients of hidden (and of the weight when it is trainable). Only one chunk of
logits exists at a time; the gradients are finished when the forward pass returns, and
the backward pass only scales them by the incoming gradient (the algorithm of Liger's
``fused_linear_cross_entropy``).

Semantics (the reference, exactly): logits in the input dtype, softmax in fp32,
``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=...,
label_smoothing=ε, reduction=...)``. Shapes: hidden ``[N, H]``, weight ``[V, H]``, bias
``[V]``, labels ``[N]`` (already shifted by the caller). "sum" returns the summed token
losses over non-ignored tokens, "mean" divides by their number (NaN when every label is
ignored, with zero gradients, as torch does).

Implementations (see ``_dispatch``):
- ``linear_cross_entropy_reference``: the line above; materialises every logit.
- ``LinearCrossEntropyFunction`` with ``impl="torch"``: the chunk loop with the per-chunk
  softmax, loss and gradient written in torch (the CPU path).
- ``LinearCrossEntropyFunction`` with ``impl="triton"``: the same loop, the matmuls on
  cuBLAS, and the per-chunk softmax/loss/gradient in one Triton kernel that reads each
  logit row twice (an online log-sum-exp, then the gradient written over the logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import autocast_dtype, backend_for, interpreting, matmul_dtype
from ._triton_utils import cast, new_output, tl, triton

# Vocabulary columns per step of the CE kernel's loops. 4096 fp32 per program is Liger's
# order (MAX_FUSED_SIZE 65536 // 2 bf16 elements caps it); 32 under the interpreter, so
# test vocabularies of ~100 take several steps and end on a ragged one.
BLOCK_V_GPU = 4096
BLOCK_V_INTERPRETER = 32


def linear_cross_entropy_reference(hidden, weight, labels, *, bias=None, ignore_index=-100,
                                   label_smoothing=0.0, reduction="sum"):
    """The definition of correct: materialised logits, upcast to fp32, torch's cross-entropy."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)


def chunk_rows(n_tokens: int, vocab: int, hidden: int, factor: int = 1) -> int:
    """Rows per chunk: Liger's rule, which makes one chunk of logits about as large as the
    hidden states (``rows · V ≈ N · H``), rounded to a power of two; ``factor`` times that."""
    increase = math.ceil(vocab / hidden)
    return triton.next_power_of_2(max(1, math.ceil(factor * n_tokens / increase)))


# The CPU path takes chunks CPU_CHUNK_FACTOR times Liger's: a 32-row chunk's matmul runs at
# about half the speed of a 256-row one on the CPU (SmolLM2-135M's head, fp32, 2 cores),
# while 256 rows of logits (50 MB) are still ~8x less than the materialised fp32 logits
# and their softmax (1.2 GB at 2,048 tokens). The Triton path keeps Liger's rule.
CPU_CHUNK_FACTOR = 8


# ---------------------------------------------------------------------------------------
# Triton kernel: one program per row of a chunk of logits.
# ---------------------------------------------------------------------------------------


@triton.jit
def _ce_chunk_kernel(logits_ptr, labels_ptr, loss_ptr, stride_logits, vocab, ignore_index,
                     label_smoothing, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    label = tl.load(labels_ptr + row).to(tl.int32)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp (running max m, running Σ exp(z − m)) and Σ z for smoothing.
    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for v0 in range(0, vocab, BLOCK_V):
        mask = v0 + cols < vocab
        z = tl.load(logits_ptr + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    z_label = tl.load(logits_ptr + tl.where(valid, label, 0)).to(tl.float32)
    eps_v = label_smoothing / vocab
    # −Σ_j q_j log p_j with q = (1 − ε)·onehot(y) + ε/V and log p_j = z_j − lse
    loss = lse - (1.0 - label_smoothing) * z_label - eps_v * z_sum
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # Pass 2: dL/dz_j = p_j − (1 − ε)·[j = y] − ε/V, written over the logits (0 if ignored).
    if WRITE_GRAD:
        for v0 in range(0, vocab, BLOCK_V):
            mask = v0 + cols < vocab
            z = tl.load(logits_ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - eps_v - tl.where(v0 + cols == label, 1.0 - label_smoothing, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(logits_ptr + v0 + cols, cast(grad, logits_ptr.dtype.element_ty), mask=mask)


def _ce_chunk_triton(logits, labels, ignore_index, label_smoothing, write_grad):
    rows, vocab = logits.shape
    loss = new_output(rows, torch.float32, logits.device)
    block_v = BLOCK_V_INTERPRETER if interpreting() else min(BLOCK_V_GPU, triton.next_power_of_2(vocab))
    _ce_chunk_kernel[(rows,)](
        logits, labels, loss, logits.stride(0), vocab, ignore_index, label_smoothing,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return loss


# ---------------------------------------------------------------------------------------
# Fast torch path (CPU): the same per-chunk computation in torch, in place on one buffer.
# ---------------------------------------------------------------------------------------


def _ce_chunk_torch(logits, labels, ignore_index, label_smoothing, write_grad):
    vocab = logits.shape[1]
    z = logits.float()  # the chunk in fp32 (logits itself when already fp32: then all in place)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    loss = -(1.0 - label_smoothing) * z.gather(1, safe_labels).squeeze(1)
    if label_smoothing:
        loss -= (label_smoothing / vocab) * z.sum(1)
    m = z.amax(1, keepdim=True)
    p = z.sub_(m).exp_()  # exp(z - m), over z: no second chunk-sized buffer
    total = p.sum(1, keepdim=True)
    loss += (m + total.log()).squeeze(1)  # + lse
    loss = torch.where(valid, loss, 0.0)
    if write_grad:
        p.div_(total)  # the softmax
        if label_smoothing:
            p.sub_(label_smoothing / vocab)
        p.scatter_add_(1, safe_labels, torch.full_like(total, label_smoothing - 1.0))
        p.mul_(valid.unsqueeze(1))
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return loss


# ---------------------------------------------------------------------------------------
# The chunk loop, shared by both implementations.
# ---------------------------------------------------------------------------------------


def _fused_linear_ce(hidden, weight, bias, labels, ignore_index, label_smoothing, need_dh, need_dw, need_db,
                     ce_chunk):
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    write_grad = need_dh or need_dw or need_db
    rows = chunk_rows(n_tokens, vocab, hidden_size, 1 if ce_chunk is _ce_chunk_triton else CPU_CHUNK_FACTOR)
    loss_rows = new_output(n_tokens, torch.float32, hidden.device)
    dh = new_output(hidden.shape, hidden.dtype, hidden.device) if need_dh else None
    # fp32 accumulators for the sums over chunks; one rounding to the parameter dtype at the end.
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_db else None
    dw_chunk = None
    logits_buffer = new_output((min(rows, n_tokens), vocab), hidden.dtype, hidden.device)
    # The matmuls run in `compute`: the input dtype, or fp32 for bf16 on a CPU without bf16
    # hardware (_dispatch.matmul_dtype; one fp32 copy of the head for the whole loop). The
    # logits and dh are rounded to the input dtype where they are written, as a native GEMM would.
    compute = matmul_dtype(hidden)
    weight_c = weight.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    upcast = compute != hidden.dtype
    for start in range(0, n_tokens, rows):
        end = min(start + rows, n_tokens)
        h = hidden[start:end].to(compute)
        logits = logits_buffer[: end - start]
        if upcast:
            logits.copy_(h @ weight_c.t() if bias_c is None else torch.addmm(bias_c, h, weight_c.t()))
        elif bias is None:
            torch.mm(h, weight_c.t(), out=logits)
        else:
            torch.addmm(bias_c, h, weight_c.t(), out=logits)
        loss_rows[start:end] = ce_chunk(logits, labels[start:end], ignore_index, label_smoothing, write_grad)
        # now dL/dlogits of the chunk, in the input dtype (as autograd's cast gives)
        grad_logits = logits.to(compute)
        if need_dh:
            if upcast:
                dh[start:end] = grad_logits @ weight_c
            else:
                torch.mm(grad_logits, weight_c, out=dh[start:end])
        if need_dw:
            if dw.dtype == grad_logits.dtype:
                dw.addmm_(grad_logits.t(), h)
            else:  # one chunk's product in the input dtype, summed in fp32 (no running-sum rounding)
                if dw_chunk is None:
                    dw_chunk = new_output(weight.shape, hidden.dtype, hidden.device)
                torch.mm(grad_logits.t(), h, out=dw_chunk)
                dw += dw_chunk
        if need_db:
            db += grad_logits.float().sum(0)
    return loss_rows.sum(), dh, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    r"""``L = Σ_i ℓ_i`` over non-ignored rows i, ``z_i = W·h_i + b`` (never all at once), with
    ``ℓ_i = −Σ_j q_ij log softmax(z_i)_j`` and the smoothed target ``q_ij = (1 − ε)[j = y_i] + ε/V``.

    Per row, with lse_i = log Σ_j exp z_ij (computed online, max-shifted) and p = softmax(z_i):

        ℓ_i     = lse_i − (1 − ε)·z_{i,y_i} − (ε/V)·Σ_j z_ij          (Σ_j q_ij = 1)
        ∂ℓ_i/∂z_ij = p_ij − q_ij = p_ij − (1 − ε)[j = y_i] − ε/V
        ignored rows: ℓ_i = 0 and ∂ℓ_i/∂z_i = 0

    With G the chunk's [rows, V] matrix ∂L/∂z (written over its logits):

        ∂L/∂h = G · W          ∂L/∂W = Gᵀ · h          ∂L/∂b = Σ_rows G

    These are computed chunk by chunk in the forward pass (the logits are gone by the
    backward pass) and kept; for "mean" they are divided by the number of non-ignored rows.
    The backward pass multiplies them by the incoming scalar dL_out.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, impl, needs):
        need_dh, need_dw, need_db = needs
        ce_chunk = _ce_chunk_triton if impl == "triton" else _ce_chunk_torch
        loss, dh, dw, db = _fused_linear_ce(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                            need_dh, need_dw, need_db, ce_chunk)
        if reduction == "mean":
            count = (labels != ignore_index).sum()
            loss = loss / count  # NaN (0/0) when every label is ignored, as torch's
            # ...but the gradients are then 0 (no row contributes), as torch's, not 0/0.
            dh, dw, db = (None if g is None else g.div_(count.clamp(min=1)) for g in (dh, dw, db))
        ctx.backward_done = False
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(dh, dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients were finished in the forward pass; scale them in place (no second
        # [V, H] buffer for a trainable head), once: a second backward would scale them twice.
        if ctx.backward_done:
            raise RuntimeError("linear_cross_entropy: backward ran twice over one forward (retain_graph); "
                               "recompute the loss instead")
        ctx.backward_done = True
        dh, dw, db = ctx.saved_tensors
        dh = None if dh is None else dh.mul_(grad_loss.to(dh.dtype))
        dw = None if dw is None else dw.mul_(grad_loss).to(ctx.weight_dtype)
        db = None if db is None else db.mul_(grad_loss).to(ctx.bias_dtype)
        return dh, dw, db, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                         reduction="sum"):
    """Cross-entropy of ``hidden · weightᵀ (+ bias)`` against ``labels`` without materialising the logits.

    hidden ``[N, H]``, weight ``[V, H]``, labels ``[N]`` (shifted by the caller; ``ignore_index``
    marks tokens with no loss). Returns the fp32 scalar: the sum of the token losses over
    non-ignored tokens ("sum") or their mean ("mean"). Gradients flow to hidden, and to weight
    and bias when they require grad. Under autocast the logits are computed in the autocast
    dtype, as ``F.linear`` would.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; expected 'sum' or 'mean'")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1] \
            or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels "
            f"{tuple(labels.shape)}: expected hidden [N, H], weight [V, H], labels [N]"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must lie in [0, 1]")
    impl = backend_for(hidden)
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, reduction=reduction)
    dtype = autocast_dtype(hidden)
    if dtype is not None and hidden.is_floating_point():
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(
            f"linear_cross_entropy: hidden {hidden.dtype}, weight {weight.dtype}"
            + ("" if bias is None else f", bias {bias.dtype}")
            + " must share one dtype (or run under autocast)"
        )
    if labels.device.type == "cpu":  # free to check on the CPU; on a GPU it would cost a sync
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bad.any():
            raise ValueError(
                f"linear_cross_entropy: label {labels[bad][0].item()} outside [0, {weight.shape[0]})")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                                reduction, impl, needs)
