"""Which attention a forward pass runs, decided once for all its layers, and the per-document path.

Three paths, chosen by ``attention_plan`` from the batch (the same choice for every layer with the
same sliding window):

- **Plain causal** (``None``): SDPA with ``is_causal``. Unpacked rows, right padding, a prefill or
  one new token. The kernel skips the blocks above the diagonal: the fastest path where it is exact.
- **Per document** (``DocumentBuckets``): packed rows (position ids restart at each example). The
  documents are gathered into a few padded batches, one per length class (lengths in (2^(k-1), 2^k]),
  each padded to its longest document, and SDPA runs ``is_causal`` on each batch; the outputs are
  gathered back into token order. Nothing outside a document is computed, where the dense mask
  computes every [T, T] block of every row and throws most of it away. A pad slot of a padded
  batch repeats its document's first token: it sits after the document's real tokens, so causal
  attention never lets a real query see it, and its output is never gathered back (its gradient
  is zero).
- **Dense mask** (a boolean [B, 1, T, S] tensor from ``build_attention_mask``): left padding
  (generation), a KV cache with several new tokens, a sliding window shorter than a document.

Measured on SmolLM2-135M's attention shape: ``python -m benchmarks.attention``; see docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DocumentBuckets:
    """The documents of a packed [B, T] batch as padded batches, one per length class.

    Token (b, t) is number ``b·T + t`` of the flattened batch. The slots of all buckets, bucket
    after bucket, each bucket n documents × cap tokens (row-major), are ``slots`` ([Σ n·cap]: the
    token each slot holds); ``shapes`` are the (n, cap) of the buckets, ``inverse`` ([B·T]) each
    token's slot, ``is_pad`` ([Σ n·cap]) the slots that only pad a document."""

    slots: torch.Tensor
    shapes: list[tuple[int, int]]
    inverse: torch.Tensor
    is_pad: torch.Tensor
    longest: int
    """The longest document (a sliding window at least this long cuts nothing)."""


class GatherRows(torch.autograd.Function):
    r"""``y = x[index]`` along dim 0 where every row of x is read once, except rows whose
    gradient is known to be zero, read again: the backward pass is a gather too, never a
    scatter-add (on a CPU, torch's scatter-add for ``index_select`` ran at a few % of a copy's
    speed and cost more than the attention it served).

        forward:   y = x[index]
        backward:  dL/dx = (dL/dy)[inverse], with the rows in ``zero_rows`` set to 0

    Exact when ``index[inverse[i]] = i`` for every row i of x, and the gradient of every other
    row of y is zero, or the row is listed in ``zero_rows`` (rows of dL/dx with no row of y)."""

    @staticmethod
    def forward(ctx, x, index, inverse, zero_rows):
        ctx.save_for_backward(inverse, zero_rows)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_y):
        inverse, zero_rows = ctx.saved_tensors
        grad_x = grad_y.index_select(0, inverse)
        if zero_rows is not None:
            grad_x.masked_fill_(zero_rows.view(-1, *[1] * (grad_x.dim() - 1)), 0)
        return grad_x, None, None, None


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a new document begins: column 0, and wherever the position id is not the
    previous one + 1 (a packed example restarts at 0; two length-1 documents in a row are 0, 0).
    Transformers detects packed sequences the same way."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_buckets(position_ids: torch.Tensor) -> DocumentBuckets:
    """Groups the documents of a packed batch by length class (one host sync, once per forward)."""
    B, T = position_ids.shape
    device = position_ids.device
    # Column 0 always starts a document, so no document crosses a row of the flattened batch.
    starts = document_starts(position_ids).reshape(-1).nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([B * T], device=device))
    length_class = torch.ceil(torch.log2(lengths.double())).long()  # L in (2^(k-1), 2^k] -> k
    slots, shapes, pads = [], [], []
    inverse = torch.empty(B * T, dtype=torch.long, device=device)
    placed = 0
    for k in length_class.unique().tolist():
        chosen = length_class == k
        first, length = starts[chosen], lengths[chosen]
        cap = int(length.max())
        offset = torch.arange(cap, device=device)
        real = offset[None, :] < length[:, None]
        token = torch.where(real, first[:, None] + offset[None, :], first[:, None])  # pads: the first token
        slot = placed + torch.arange(token.numel(), device=device).view_as(token)
        inverse[token[real]] = slot[real]
        slots.append(token.reshape(-1))
        pads.append(~real.reshape(-1))
        shapes.append((len(first), cap))
        placed += token.numel()
    return DocumentBuckets(torch.cat(slots), shapes, inverse, torch.cat(pads), int(lengths.max()))


def attend_by_document(q, k, v, buckets: DocumentBuckets, enable_gqa: bool) -> torch.Tensor:
    """Causal attention within each document: q [B, H, T, D], k and v [B, H_kv, T, D] ->
    [B, T, H·D] (the layout o_proj reads).

    A pad slot's gradient is exactly zero (its output is never read back, so dL/dq = 0 there; its
    key and value are seen only by the pad queries after it, whose dL/dy is 0), so the gather of
    q, k and v is undone by a gather (``GatherRows``) with nothing to add up."""
    B, H, T, D = q.shape

    def by_bucket(x):
        # one gather per tensor for all buckets, then views of it
        rows = x.transpose(1, 2).reshape(B * T, x.shape[1], D)
        slots = GatherRows.apply(rows, buckets.slots, buckets.inverse, None)
        sizes = [n * cap for n, cap in buckets.shapes]
        return [part.view(n, cap, x.shape[1], D).transpose(1, 2)
                for part, (n, cap) in zip(slots.split(sizes), buckets.shapes)]

    outputs = []
    for q_b, k_b, v_b in zip(by_bucket(q), by_bucket(k), by_bucket(v)):
        y = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=enable_gqa)
        outputs.append(y.transpose(1, 2).reshape(-1, H * D))
    # back to token order; the pad slots get a zero gradient
    y = GatherRows.apply(torch.cat(outputs), buckets.inverse, buckets.slots, buckets.is_pad)
    return y.view(B, T, H * D)


def build_attention_mask(attention_mask, position_ids, T: int, past: int, sliding_window: int | None = None):
    """A boolean [B, 1, T, past+T] mask (True = attend), or None when plain causal attention is exact.

    Plain causal attention is exact with no padding in front of or between real tokens, no packed
    documents and no window cutting anything off, when the queries are the whole sequence (a
    prefill, past == 0) or a single new token. A mask is needed for padding on the left
    (generation), for packed sequences (position ids restart at each example: tokens attend only
    within their own example), and for a sliding window shorter than the sequence (key s is
    visible from query t when t - s < window, t and s counted in the cache, as transformers does).
    Right padding needs no mask: pads come after every real token, and their labels are -100.
    """
    B = position_ids.shape[0]
    S = past + T
    device = position_ids.device
    packed = is_packed(position_ids, past)
    windowed = sliding_window is not None and S > sliding_window
    padded = attention_mask is not None and not bool(attention_mask[:, :S].bool().all())
    if padded and not packed and past == 0:
        padded = not right_padded_only(attention_mask)
    if not (packed or windowed or padded) and (past == 0 or T == 1):
        return None
    query = torch.arange(past, S, device=device)[:, None]
    key = torch.arange(S, device=device)[None, :]
    allowed = key <= query
    if windowed:
        allowed &= query - key < sliding_window
    mask = allowed[None, None].expand(B, 1, T, S).clone()
    if attention_mask is not None:
        mask &= attention_mask.bool()[:, None, None, :S]
    if packed:
        doc = document_starts(position_ids).cumsum(dim=1)
        mask &= doc[:, None, :, None] == doc[:, None, None, :]
    # A query row with nothing to attend to (a left pad) would give NaN; let it see itself.
    mask |= (query == key)[None, None]
    return mask


def is_packed(position_ids: torch.Tensor, past: int) -> bool:
    """Several documents in one row of a prefill: position ids restart somewhere after column 0."""
    return past == 0 and position_ids.shape[1] > 1 and bool(document_starts(position_ids)[:, 1:].any())


def right_padded_only(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros: the pads come after every real token."""
    am = attention_mask.bool()
    return bool((am[:, 1:] <= am[:, :-1]).all())


def attention_plans(attention_mask, position_ids, T: int, past: int, windows) -> dict:
    """What each layer attends with, per distinct sliding window (None: full attention), computed
    once per forward: None (plain causal), a ``DocumentBuckets`` or a dense boolean mask.

    Packed rows run per document unless a window is shorter than the longest document (the
    buckets know no window), or the padding is not all on the right of every row (left padding
    puts pads in front of a document's tokens)."""
    buckets = None
    if is_packed(position_ids, past) and (attention_mask is None or right_padded_only(attention_mask)):
        buckets = document_buckets(position_ids)
    plans = {}
    for window in windows:
        if buckets is not None and (window is None or window >= buckets.longest):
            plans[window] = buckets
        else:
            plans[window] = build_attention_mask(attention_mask, position_ids, T, past, window)
    return plans
