"""peftloop.tokenizer against transformers' tokenizer of the same folder: ids, special tokens,
chat templates; and the errors a broken folder gives."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftloop.tokenizer import Tokenizer, TokenizerError
from tests.hf_builders import TOKENIZER_STYLES, build_tokenizer_folder

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And what do bees make?"},
    {"role": "assistant", "content": " Honey. "},
]
TEXTS = ["Hello world, how are you?", "  two leading spaces, ünïcode ✓ and\ttabs\n\nnewlines", "",
         "<|im_start|>special tokens in text<|im_end|> <s> </s>"]


@pytest.fixture(scope="module", params=list(TOKENIZER_STYLES))
def pair(request, tmp_path_factory):
    """(style, ours, transformers') for one tokenizer style."""
    transformers = pytest.importorskip("transformers",
                                       reason="the 'ref' extra (transformers) is not installed")
    folder = build_tokenizer_folder(tmp_path_factory.mktemp(request.param), request.param)
    return (request.param, Tokenizer.from_pretrained(folder),
            transformers.AutoTokenizer.from_pretrained(folder))


def conversation_for(style: str) -> list[dict]:
    # the [INST] template has no system role and insists on user/assistant alternation
    return CONVERSATION[1:] if style == "llama2" else CONVERSATION


def test_encode_and_decode_match_transformers(pair):
    _, ours, theirs = pair
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == expected
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.sampled_from([*"abcdefghij ÉéÜ?!.,\n\t0123456789", "<s>", "<|im_end|>", "  "]),
                      max_size=40))
def test_encode_matches_transformers_on_any_text(pair, pieces):
    _, ours, theirs = pair
    text = "".join(pieces)
    assert ours.encode(text) == theirs(text)["input_ids"]


def test_special_tokens_match_transformers(pair):
    _, ours, theirs = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_gives_transformers_ids(pair, add_generation_prompt):
    style, ours, theirs = pair
    messages = conversation_for(style)
    for end in range(1, len(messages) + 1):
        expected = theirs.apply_chat_template(messages[:end], add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=True)["input_ids"]
        ids = ours.apply_chat_template(messages[:end], add_generation_prompt=add_generation_prompt)
        assert ids == expected
        assert ours.render_chat(messages[:end], add_generation_prompt) == theirs.apply_chat_template(
            messages[:end], add_generation_prompt=add_generation_prompt, tokenize=False)


def test_chat_spans_cover_exactly_the_assistant_turns(pair):
    style, ours, _ = pair
    messages = conversation_for(style)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    text, spans = ours.chat_spans(messages, assistant)
    assert text == ours.render_chat(messages)
    end_of_turn = {"llama2": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[style]
    for i, (start, end) in zip(assistant, spans):
        span = text[start:end]
        assert messages[i]["content"].strip() in span and end_of_turn in span
        assert "user" not in span and "[INST]" not in span and "assistant" not in span  # no role header


def test_template_errors_and_missing_templates(tmp_path):
    folder = build_tokenizer_folder(tmp_path / "inst", "llama2")
    tokenizer = Tokenizer.from_pretrained(folder)
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="has no chat_template"):
        Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "a"}])
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    assert Tokenizer.from_pretrained(folder).render_chat([{"role": "user", "content": "hi"}]) == "<user>hi"
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="syntax error on line 1"):
        Tokenizer.from_pretrained(folder).render_chat([{"role": "user", "content": "hi"}])


def test_named_templates_and_added_token_dicts(tmp_path):
    folder = build_tokenizer_folder(tmp_path / "chatml", "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"},
                               {"name": "default", "template": "plain"}]
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    config["pad_token"] = "<pad>"  # not in the vocabulary: added as a special token, as transformers does
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_pretrained(folder)
    assert tokenizer.render_chat([{"role": "user", "content": "x"}]) == "plain"
    assert tokenizer.eos_token_id == tokenizer.backend.token_to_id("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.vocab_size - 1
    assert tokenizer.encode("a<pad>", add_special_tokens=False)[-1] == tokenizer.pad_token_id


def test_add_eos_token_and_generation_config(tmp_path):
    folder = build_tokenizer_folder(tmp_path / "llama3", "llama3")
    tokenizer = Tokenizer.from_pretrained(folder)
    eot, end = tokenizer.backend.token_to_id("<|eot_id|>"), tokenizer.backend.token_to_id("<|end_of_text|>")
    assert tokenizer.stop_token_ids == [eot, end]  # generation_config.json's list
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = Tokenizer.from_pretrained(folder).encode("Hello")
    assert ids[-1] == eot and ids[0] != tokenizer.bos_token_id


def test_a_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
