"""Generation: greedy with the KV cache against transformers' generate, sampling (temperature,
top-p), stop tokens, text in / text out through the tokenizer, and a batch generating exactly
what each of its prompts generates alone."""

import pytest
import torch

from peftloop.generate import KVCache, generate, generate_text, sample_next
from peftloop.models import load_pretrained
from peftloop.tokenizer import Tokenizer
from tests.helpers import tiny_model
from tests.hf_builders import build_checkpoint, load_reference


@pytest.mark.parametrize("family", ["qwen2-sliding", "llama3"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")
    folder = build_checkpoint(tmp_path / family, family, seed=5)
    ours, theirs = load_pretrained(folder), load_reference(folder)
    prompts = [[5, 9, 14, 3, 7, 11], [8, 2, 6]]  # different lengths: left padding in one batch
    out = generate(ours, prompts, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    for prompt, new in zip(prompts, out):
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        assert new == expected[0, len(prompt):].tolist()


def test_sample_next_keeps_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, 1.0, 0.7, g)) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is the first two
    assert 0.5 < draws.count(0) / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    all_draws = {int(sample_next(logits, 1.0, 1.0, g)) for _ in range(400)}
    assert all_draws == {0, 1, 2, 3}
    assert int(sample_next(logits, 0.0, 0.1, g)) == 0  # temperature 0 is greedy
    cold = [int(sample_next(logits, 0.05, 1.0, g)) for _ in range(100)]
    assert cold.count(0) > 95  # a low temperature sharpens towards the argmax


def test_generation_stops_at_any_stop_token():
    model = tiny_model(seed=3).eval()
    first = generate(model, [[1, 5, 6]], max_new_tokens=6)[0]
    stopped = generate(model, [[1, 5, 6]], max_new_tokens=6, eos_token_id=[999, first[2]])[0]
    assert stopped == first[:3]


def test_generate_text_encodes_formats_and_decodes(tmp_path):
    pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")
    folder = build_checkpoint(tmp_path / "qwen2", "qwen2", seed=1)
    model, tokenizer = load_pretrained(folder), Tokenizer.from_pretrained(folder)
    text = generate_text(model, tokenizer, ["The river"], max_new_tokens=5)[0]
    ids = generate(model, [tokenizer.encode("The river")], 5, eos_token_id=tokenizer.stop_token_ids,
                   pad_token_id=tokenizer.pad_token_id)[0]
    assert text == tokenizer.decode(ids)
    chat = generate_text(model, tokenizer, ["Hi"], max_new_tokens=5, chat=True, system="Be brief.")[0]
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert chat == tokenizer.decode(generate(model, [prompt], 5, eos_token_id=tokenizer.stop_token_ids,
                                             pad_token_id=tokenizer.pad_token_id)[0])
    sampled = [generate_text(model, tokenizer, ["The river"], 6, temperature=1.0, top_p=0.9, seed=s)[0]
               for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]


# ---- batched = one prompt at a time ----------------------------------------------------------


def one_by_one(model, prompts, max_new_tokens, **kwargs):
    return [generate(model, [p], max_new_tokens, **kwargs)[0] for p in prompts]


@pytest.mark.parametrize("lengths", [[1, 2, 3], [7, 7, 7, 7], [1, 12, 5, 30, 2, 19, 8, 3], [40]])
@pytest.mark.parametrize("overrides", [{}, {"model_type": "mistral", "sliding_window": 6}],
                         ids=["llama", "sliding-window"])
def test_a_batch_generates_what_each_prompt_generates_alone(lengths, overrides):
    """Left padding, the cache and the head on the last position only: every row's greedy tokens are
    those of its prompt alone, for prompts of one length or many, a window shorter than the text."""
    model = tiny_model(seed=4, **overrides).eval()
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in lengths]
    batched = generate(model, prompts, 12)
    assert batched == one_by_one(model, prompts, 12)
    assert [len(out) for out in batched] == [12] * len(prompts)


def test_rows_that_stop_leave_the_batch_and_the_rest_generate_the_same():
    """With stop tokens the rows end at different steps; a finished row (and the left padding only it
    needed) leaves the batch, and the others go on exactly as they would alone."""
    model = tiny_model(seed=4).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (25, 3, 14, 8, 1, 19)]
    free = generate(model, prompts, 16)
    # a stop token each row meets at a different step (or never)
    stop = max({t for out in free for t in out},
               key=lambda t: len({out.index(t) if t in out else 99 for out in free}))
    batched = generate(model, prompts, 16, eos_token_id=stop)
    assert batched == one_by_one(model, prompts, 16, eos_token_id=stop)
    ends = {len(out) for out in batched}
    assert len(ends) >= 3, ends  # the rows really did finish at different steps
    for out, full in zip(batched, free):
        assert out == full[:len(out)] and (out[-1] == stop or len(out) == 16)
        assert stop not in out[:-1]


def test_the_cache_grows_past_its_capacity():
    """A KVCache with no capacity grows by doubling; the model gives the logits of the full pass."""
    model = tiny_model(seed=2).eval()
    ids = torch.randint(3, 61, (2, 11))
    with torch.no_grad():
        full = model(ids)
        caches = [KVCache() for _ in range(model.config.num_hidden_layers)]
        stepwise = torch.cat([model(ids[:, t:t + 1], kv_caches=caches) for t in range(11)], dim=1)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)
    assert caches[0].length == 11 and caches[0].k.shape[2] >= 11
