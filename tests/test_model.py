"""The Llama model: masks (padding, packing), tied heads, the summed loss, generation with a KV cache."""

import pytest
import torch
import torch.nn.functional as F

from peftloop.generate import generate
from tests.helpers import tiny_model


def test_left_padding_gives_the_unpadded_logits():
    model = tiny_model().eval()
    ids = torch.randint(3, 61, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        left_padded = model(padded, attention_mask=mask, position_ids=positions)
        torch.testing.assert_close(left_padded[:, 3:], model(ids), rtol=0, atol=1e-5)


def test_packed_sequences_do_not_attend_across_documents():
    model = tiny_model().eval()
    a, b = torch.randint(3, 61, (1, 5)), torch.randint(3, 61, (1, 4))
    packed = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model(packed, position_ids=positions)
        torch.testing.assert_close(out[:, :5], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 5:], model(b), rtol=0, atol=1e-5)


def test_tied_head_shares_the_embedding():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_model().parameters())


def test_summed_loss_equals_cross_entropy_over_shifted_labels():
    model = tiny_model()
    ids = torch.randint(3, 61, (3, 8))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2] = -100  # a row with no label at all
    with torch.no_grad():
        logits = model(ids)
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        torch.testing.assert_close(model(ids, labels=labels), expected, rtol=1e-5, atol=1e-5)
        smoothed = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum",
                                   label_smoothing=0.2)
        torch.testing.assert_close(model(ids, labels=labels, label_smoothing=0.2), smoothed,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[5, 5], [3, 7, 5]])
def test_greedy_generation_with_kv_cache_equals_recomputation(lengths):
    model = tiny_model(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in lengths]
    out = generate(model, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, out):
        ids = torch.tensor([prompt])
        for _ in range(6):  # no cache, no padding: argmax of the full forward pass
            with torch.no_grad():
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert new == ids[0, len(prompt):].tolist()


def test_generation_stops_at_eos_and_sampling_is_seeded():
    model = tiny_model(seed=3).eval()
    first = generate(model, [[1, 5, 6]], max_new_tokens=4)[0]
    stopped = generate(model, [[1, 5, 6]], max_new_tokens=4, eos_token_id=first[1])[0]
    assert stopped == first[:2]
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, [[1, 5, 6]], 8, temperature=1.0, top_p=0.9, generator=g)

    assert sample(1) == sample(1)


def test_packed_length_one_documents_attend_only_to_themselves():
    """Position ids 0, 0, 0, 1, 2: two length-1 documents, then one of length 3. There is no
    decrease in the position ids, only a repeat, and it still starts a new document."""
    model = tiny_model().eval()
    ids = torch.randint(3, 61, (1, 5))
    positions = torch.tensor([[0, 0, 0, 1, 2]])
    with torch.no_grad():
        out = model(ids, position_ids=positions)
        for start, end in [(0, 1), (1, 2), (2, 5)]:
            torch.testing.assert_close(out[:, start:end], model(ids[:, start:end]), rtol=0, atol=1e-5)


def test_sliding_window_attends_to_the_last_w_tokens_only():
    """With a window of 3 and one layer, the logits at position t depend on tokens t-2..t only:
    changing the tokens before that changes nothing, changing one inside the window does. The
    KV-cache path (one token at a time) gives the same logits as the full pass."""
    from peftloop.generate import KVCache

    model = tiny_model(model_type="mistral", sliding_window=3, num_hidden_layers=1).eval()
    ids = torch.randint(3, 61, (1, 8))
    changed_outside = ids.clone()
    changed_outside[0, :4] = (ids[0, :4] + 1 - 3) % 58 + 3
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(changed_outside)[:, 6:], full[:, 6:], rtol=0, atol=1e-5)
        changed_inside = ids.clone()
        changed_inside[0, 5] = (ids[0, 5] + 1 - 3) % 58 + 3
        assert (model(changed_inside)[:, 6:] - full[:, 6:]).abs().max() > 1e-4
        caches = [KVCache() for _ in range(model.config.num_hidden_layers)]
        stepwise = [model(ids[:, t:t + 1], kv_caches=caches) for t in range(8)]
    torch.testing.assert_close(torch.cat(stepwise, dim=1), full, rtol=0, atol=1e-5)
