"""Hostile training data: every bad line is an error naming file and line (or skipped and
counted), memory stays bounded, and property-based fuzzing finds no other kind of failure."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftloop import records as records_module
from peftloop.config import DataConfig
from peftloop.data import DataError, load_datasets
from tests.helpers import tokenizer as tokenizer  # fixture


@pytest.mark.slow
def test_a_100_mb_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "fine"}\n{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write(b'"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: line of 104,857,613 bytes is longer than the"):
        load_datasets(DataConfig(train_file=str(path)), tokenizer)
    train, _ = load_datasets(DataConfig(train_file=str(path), skip_bad_lines=True), tokenizer)
    assert len(train) == 2 and train.stats.skipped["line too long"] == 1


def test_line_limit_without_a_final_newline(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(records_module, "MAX_LINE_BYTES", 64)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "' + b"x" * 200 + b'"}')
    with pytest.raises(DataError, match=r"train.jsonl:2: line of 212 bytes"):
        load_datasets(DataConfig(train_file=str(path)), tokenizer)


def test_deeply_nested_json(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n' + '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid JSON \(nested too deeply\)"):
        load_datasets(DataConfig(train_file=str(path)), tokenizer)


def test_invalid_utf8_inside_a_string_and_a_lone_surrogate(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"prompt": "a", "completion": "\xed\xa0\x80"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8"):
        load_datasets(DataConfig(train_file=str(path)), tokenizer)


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                                 "content": st.text(max_size=12) | json_values})
records = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=30) | json_values}),
    st.fixed_dictionaries({"prompt": st.text(max_size=20) | json_values,
                           "completion": st.text(max_size=20) | json_values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}),
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "other"]), json_values,
                    max_size=3),
    json_values,
)
lines = st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40)),
                 min_size=1, max_size=6)


@FUZZ
@given(lines=lines, skip=st.booleans(), packing=st.booleans())
def test_fuzz_the_data_loader(tmp_path, tokenizer, lines, skip, packing):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    config = DataConfig(train_file=str(path), skip_bad_lines=skip, packing=packing, max_seq_len=64)
    try:
        train, _ = load_datasets(config, tokenizer)
    except DataError as e:
        # the error names the file, and a line unless the whole file held no usable example
        assert str(path) in str(e)
        assert skip is False or "no training examples" in str(e)
        return
    for example in train:
        assert len(example["input_ids"]) == len(example["labels"]) <= 64
        assert all(isinstance(t, int) for t in example["input_ids"])
    stats = train.stats
    assert stats.examples + stats.dropped_no_labels + sum(stats.skipped.values()) == stats.records
