"""The attention paths of peftloop.models.attention against the dense-mask reference.

Packed rows run per document (``attend_by_document`` on ``DocumentBuckets``); the reference is
SDPA on the dense block-diagonal causal mask ``build_attention_mask`` builds. Outputs and the
gradients of q, k and v (every combination of which of them need one) must agree for drawn
document splits, fp32 tightly and bf16 within its rounding; the whole model's packed logits must
equal each document run alone, and its LoRA gradients those of the dense-mask path.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from peftloop.models import attention, llama
from peftloop.models.attention import (
    DocumentBuckets,
    attend_by_document,
    attention_plans,
    build_attention_mask,
    document_buckets,
)
from tests.helpers import lora_model, tiny_model

TOLERANCE = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
NEEDS_GRAD = [needs for needs in itertools.product([False, True], repeat=3)]


def positions_of(rows: list[list[int]]) -> torch.Tensor:
    """Position ids of packed rows: each document counts from 0 (the rows have equal lengths)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def dense_reference(q, k, v, rows: list[list[int]]):
    """SDPA on the block-diagonal causal mask: query t sees key s <= t of its own document."""
    B, H, T, D = q.shape
    document = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                            for row in rows])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & (document[:, :, None] == document[:, None, :]))[:, None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)
    return y.transpose(1, 2).reshape(B, T, H * D)


@st.composite
def packed_rows(draw):
    """1-3 rows of the same length, each split into documents of 1 to 40 tokens (one document per
    row included), as packing leaves them."""
    T = draw(st.integers(1, 60))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        cuts = draw(st.lists(st.integers(1, T - 1), max_size=8, unique=True)) if T > 1 else []
        bounds = [0, *sorted(cuts), T]
        rows.append([b - a for a, b in zip(bounds, bounds[1:])])
    return rows


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=packed_rows(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       kv_heads=st.sampled_from([1, 2, 4]), needs=st.sampled_from(NEEDS_GRAD))
def test_per_document_attention_equals_the_dense_mask(rows, dtype, kv_heads, needs):
    position_ids = positions_of(rows)
    B, T = position_ids.shape
    generator = torch.Generator().manual_seed(T)
    shapes = [(B, 4, T, 8), (B, kv_heads, T, 8), (B, kv_heads, T, 8)]
    q, k, v = (torch.randn(s, generator=generator).to(dtype).requires_grad_(n) for s, n in zip(shapes, needs))
    buckets = document_buckets(position_ids)
    got = attend_by_document(q, k, v, buckets, enable_gqa=kv_heads != 4)
    want = dense_reference(q, k, v, rows)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    if any(needs):
        grad_y = torch.randn(got.shape, generator=generator).to(dtype)
        inputs = [x for x in (q, k, v) if x.requires_grad]
        got_grads = torch.autograd.grad(got, inputs, grad_y)
        want_grads = torch.autograd.grad(want, inputs, grad_y)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, **TOLERANCE[dtype])


def test_buckets_group_documents_by_length_class():
    buckets = document_buckets(positions_of([[3, 1, 4, 8], [16]]))
    # classes: 1 -> {1}; (2, 4] -> {3, 4}; (4, 8] -> {8}; (8, 16] -> {16}; each padded to its longest
    assert buckets.shapes == [(1, 1), (2, 4), (1, 8), (1, 16)]
    # the slots hold the tokens, pads repeating their document's first token
    assert buckets.slots.tolist() == [3, 0, 1, 2, 0, 4, 5, 6, 7, *range(8, 16), *range(16, 32)]
    assert buckets.longest == 16
    # every token appears once in the concatenated outputs
    assert sorted(buckets.inverse.tolist()) == sorted(set(buckets.inverse.tolist()))
    assert buckets.inverse.numel() == 32


def test_the_plan_picks_the_path():
    T = 12
    plain = torch.arange(T).expand(2, T)
    packed = positions_of([[5, 7], [12]])
    windows = {None, 4, 7}
    # unpacked rows: plain causal attention everywhere the window cuts nothing
    plans = attention_plans(None, plain, T, 0, windows)
    assert plans[None] is None and plans[7] is not None and isinstance(plans[4], torch.Tensor)
    # packed rows: per document where the window is at least the longest document (12), else a mask
    plans = attention_plans(None, packed, T, 0, {None, 4, 12})
    assert isinstance(plans[None], DocumentBuckets) and plans[12] is plans[None]
    assert isinstance(plans[4], torch.Tensor)
    # right padding keeps the per-document path; left padding needs the mask
    right = torch.ones(2, T, dtype=torch.long)
    right[1, 9:] = 0
    assert isinstance(attention_plans(right, packed, T, 0, {None})[None], DocumentBuckets)
    left = torch.ones(2, T, dtype=torch.long)
    left[1, :2] = 0
    assert isinstance(attention_plans(left, packed, T, 0, {None})[None], torch.Tensor)
    # with a KV cache (generation) the packed test does not apply
    assert attention_plans(None, torch.arange(3, 4).expand(2, 1), 1, 3, {None})[None] is None


def dense_plans(attention_mask, position_ids, T, past, windows):
    """What peftloop ran before the per-document path: a dense mask for every packed batch."""
    return {w: build_attention_mask(attention_mask, position_ids, T, past, w) for w in windows}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_logits_equal_each_document_alone(dtype, cpu_low_precision):
    model = tiny_model(seed=3, num_hidden_layers=3).eval()
    lengths = [7, 1, 12, 4]
    tokens = torch.randint(3, 61, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        packed = model(tokens, position_ids=positions_of([lengths])).float()
        alone = torch.cat([model(doc).float() for doc in tokens.split(lengths, dim=1)], dim=1)
    tolerance = TOLERANCE[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(packed, alone, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_the_dense_mask_path(monkeypatch, dtype, checkpointing, cpu_low_precision):
    """A packed, right-padded batch: the loss and every LoRA gradient of the per-document path equal
    those of the dense mask (the path it replaces), with and without gradient checkpointing."""
    position_ids = positions_of([[9, 1, 6, 4], [13, 5, 2]])
    T = position_ids.shape[1]
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[1, 18:] = 0  # row 2 ends in two pads (they continue its last document's positions)
    tokens = torch.randint(3, 61, (2, T), generator=torch.Generator().manual_seed(1))
    labels = tokens.masked_fill(attention_mask == 0, -100)
    labels[0, :5] = -100  # a prompt

    def loss_and_grads(plans, dtype):
        monkeypatch.setattr(llama, "attention_plans", plans)
        model = lora_model(seed=2, adapter_seed=4, lora_dropout=0.0)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(tokens, attention_mask, position_ids, labels=labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    calls = []
    monkeypatch.setattr(attention, "document_buckets", lambda p: calls.append(1) or document_buckets(p))
    loss, grads = loss_and_grads(attention_plans, dtype)
    assert len(calls) == 1  # built once for both layers (and not again by checkpointing's recompute)
    ref_loss, ref_grads = loss_and_grads(dense_plans, dtype)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype])
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOLERANCE[dtype], msg=name)
        return
    # bf16: each path rounds its own sums, and a LoRA gradient summed over every token is off by up
    # to ~10% of fp32's in either path. So both are measured against fp32: the per-document path
    # must be about as close to it as the dense mask is.
    exact_loss, exact = loss_and_grads(attention_plans, torch.float32)
    assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 1e-3 * abs(exact_loss)
    for name in grads:
        error, ref_error = (torch.linalg.norm(g[name] - exact[name]) for g in (grads, ref_grads))
        assert error <= 1.5 * ref_error + 1e-3 * torch.linalg.norm(exact[name]), (name, error, ref_error)
