"""Generation: greedy with the KV cache against transformers' generate, sampling (temperature,
top-p), stop tokens, and text in / text out through the tokenizer."""

import pytest
import torch

from peftloop.generate import generate, generate_text, sample_next
from peftloop.models import load_pretrained
from peftloop.tokenizer import Tokenizer
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
    from tests.helpers import tiny_model

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
