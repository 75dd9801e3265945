"""JSONL records -> examples: reading lines, parsing records, tokenizing them with labels.

    JSONL line --read_jsonl--> bytes --parse_record--> record --ExampleBuilder--> example
              --truncate--> (pack) --> the datasets of ``peftloop.data``

A record is ``{"text"}``, ``{"prompt", "completion"}`` (strings, or lists of chat messages) or
``{"messages": [{"role", "content"}, ...]}`` (docs/data.md). A bad line raises ``DataError``
naming ``file:line``, or is counted and skipped (``skip_bad_lines``); ``DataStats`` counts what
a pass over a file gave.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftloop.tokenizer import TokenizerError

IGNORE_INDEX = -100  # the label of a position without loss (prompt, padding): Hugging Face's convention


class DataError(ValueError):
    """A bad record; the message starts with ``file:line``. ``reason`` is the short kind, for counting."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DataStats:
    """What reading a file gave: the counts the CLI reports."""

    records: int = 0
    """Non-blank lines read (of this split)."""
    examples: int = 0
    """Examples kept."""
    truncated: int = 0
    """Examples longer than max_seq_len, cut to it."""
    dropped_no_labels: int = 0
    """Examples with no label token left after truncation (the completion was cut off), dropped."""
    skipped: Counter = field(default_factory=Counter)
    """Malformed lines skipped (skip_bad_lines), by reason."""
    first_skipped: str | None = None
    """The full error of the first skipped line."""
    tokens: int = 0
    """Tokens in the kept examples."""

    def summary(self) -> str:
        parts = [f"{self.records} records -> {self.examples} examples ({self.tokens:,} tokens)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_len")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped (no label token left after truncation)")
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            parts.append(f"{sum(self.skipped.values())} bad lines skipped "
                         f"({reasons}; first: {self.first_skipped})")
        return "; ".join(parts)


MAX_LINE_BYTES = 32 << 20
"""A JSONL line longer than this (32 MiB: far beyond any training example) is a bad line. It is
never held in memory whole: reading stops at the limit and the rest of the line is skipped."""


def read_jsonl(path: Path) -> Iterator[tuple[int, bytes | DataError]]:
    """(line number from 1, raw bytes) for each non-blank line, read lazily; an over-long line
    comes as (number, DataError) so that the caller can raise it or skip and count it."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    size += len(rest)
                size += len(rest)
                yield number, DataError(f"{path}:{number}: line of {size:,} bytes is longer than the "
                                        f"{MAX_LINE_BYTES:,}-byte limit", "line too long")
            elif raw.strip():
                yield number, raw


def parse_record(raw: bytes | DataError, where: str) -> dict[str, Any]:
    """One line -> one JSON object. Decoded line by line, so a bad byte is reported at its line."""
    if isinstance(raw, DataError):
        raise raw
    try:
        record = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)", "invalid JSON") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})", "invalid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})", "invalid JSON") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", "not an object")
    return record


class ExampleBuilder:
    """One record -> one example (input_ids, labels), by the record's format.

    With ``keep_task`` (the eval set), a prompt/completion or chat example also keeps what an
    evaluation by generation needs (``peftloop.generate.task_of``): ``prompt_ids``, the tokens the
    completion is generated from, and ``reference``, the completion's text (for a conversation: the
    last assistant turn, and the prompt is the conversation before it with the generation prompt)."""

    def __init__(self, tokenizer, config, keep_task: bool = False):
        self.tokenizer = tokenizer
        self.config = config
        self.keep_task = keep_task

    def __call__(self, record: dict[str, Any], where: str) -> dict[str, list[int]]:
        kind = self.format_of(record, where)
        if kind == "text":
            return self.text_example(record, where)
        if kind == "messages":
            messages = self.messages(record, self.config.messages_field, where)
            trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if self.config.completion_only_loss and not trained:
                raise DataError(f"{where}: {self.config.messages_field!r} "
                                "has no assistant message to train on",
                                "no assistant message")
            return self.with_task(self.chat_example(messages, trained, where), messages, trained)
        return self.prompt_completion_example(record, where)

    def format_of(self, record: dict[str, Any], where: str) -> str:
        c = self.config
        if c.format != "auto":
            return c.format
        if c.messages_field in record:
            return "messages"
        if c.prompt_field in record or c.completion_field in record:
            return "prompt_completion"
        if c.text_field in record:
            return "text"
        fields = f"{c.text_field!r}, {c.prompt_field!r}/{c.completion_field!r} or {c.messages_field!r}"
        raise DataError(f"{where}: no {fields} field (the record has {sorted(record)})", "no known field")

    # the three formats ------------------------------------------------------------------------

    def text_example(self, record, where):
        text = self.string(record, self.config.text_field, where)
        ids = self.with_eos(self.tokenizer.encode(text, add_special_tokens=True))
        return {"input_ids": ids, "labels": list(ids)}

    def prompt_completion_example(self, record, where):
        c = self.config
        if isinstance(record.get(c.prompt_field), list):  # conversational: prompt and completion are messages
            prompt = self.messages(record, c.prompt_field, where, allow_empty=True)
            completion = self.messages(record, c.completion_field, where)
            messages = prompt + completion
            trained = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
            if not trained:
                raise DataError(f"{where}: {c.completion_field!r} has no assistant message",
                                "no assistant message")
            return self.with_task(self.chat_example(messages, trained, where), messages, trained)
        prompt = self.string(record, c.prompt_field, where, allow_empty=True)
        completion = self.string(record, c.completion_field, where)
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if self.tokenizer.add_eos_token and prompt_ids and prompt_ids[-1] == self.tokenizer.eos_token_id:
            prompt_ids = prompt_ids[:-1]  # the post-processor's EOS belongs after the completion
        # The completion is tokenized on its own, as generation will continue from the prompt's ids.
        completion_ids = self.with_eos(self.tokenizer.encode(completion, add_special_tokens=False))
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids if c.completion_only_loss else list(ids)
        if self.keep_task:
            return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "reference": completion}
        return {"input_ids": ids, "labels": labels}

    def chat_example(self, messages, trained: list[int], where):
        """Render with the chat template; label the tokens that start inside a trained turn's span."""
        try:
            if self.config.completion_only_loss:
                text, spans = self.tokenizer.chat_spans(messages, trained)
            else:
                text, spans = self.tokenizer.render_chat(messages), []
        except TokenizerError as e:
            if "has no chat_template" in str(e):
                raise  # a property of the tokenizer, not of this line: never skipped
            raise DataError(f"{where}: {e}", "chat template error") from None
        ids, offsets = self.tokenizer.encode_with_offsets(text, add_special_tokens=False)
        if not self.config.completion_only_loss:
            return {"input_ids": ids, "labels": list(ids)}
        labels = [t if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                  for t, (start, _) in zip(ids, offsets)]
        return {"input_ids": ids, "labels": labels}

    def with_task(self, example, messages, trained: list[int]):
        """``example`` plus, with keep_task, the last trained assistant turn as the reference and the
        conversation before it (rendered with the generation prompt) as the prompt. A template that
        cannot render that prefix (no earlier turn) leaves the example without a task."""
        if not self.keep_task:
            return example
        last = trained[-1]
        try:
            prompt_ids = self.tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True)
        except TokenizerError:
            return example
        return {**example, "prompt_ids": prompt_ids, "reference": messages[last]["content"]}

    # fields -------------------------------------------------------------------------------------

    def string(self, record, name: str, where: str, allow_empty: bool = False) -> str:
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (the record has {sorted(record)})",
                            f"missing {name!r}")
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}",
                            f"{name!r} not a string")
        if not allow_empty and not value.strip():
            raise DataError(f"{where}: field {name!r} is empty", f"empty {name!r}")
        return value

    def messages(self, record, name: str, where: str, allow_empty: bool = False) -> list[dict[str, Any]]:
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (the record has {sorted(record)})",
                            f"missing {name!r}")
        messages = record[name]
        if not isinstance(messages, list) or (not messages and not allow_empty):
            raise DataError(f"{where}: field {name!r} must be a non-empty list of {{\"role\", \"content\"}} "
                            f"messages", f"bad {name!r}")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {name}[{i}] must be an object with string "
                                "\"role\" and \"content\"",
                                "bad message")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{where}: {name}[{i}] is an empty assistant message",
                                "empty assistant message")
        return messages

    def with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if self.config.add_eos and eos is not None and (not ids or ids[-1] != eos):
            return [*ids, eos]
        return ids


TOKEN_FIELDS = ("input_ids", "labels", "position_ids")
"""The per-token lists of an example (what truncation cuts; ``prompt_ids`` and ``reference`` stay whole)."""


def truncate(example: dict[str, list[int]], max_seq_len: int) -> tuple[dict[str, list[int]], bool]:
    if len(example["input_ids"]) <= max_seq_len:
        return example, False
    return {k: v[:max_seq_len] if k in TOKEN_FIELDS else v for k, v in example.items()}, True


def has_labels(example: dict[str, list[int]]) -> bool:
    """Whether any token after the first carries a loss (the first is never predicted)."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def examples_from_file(path: Path, builder: ExampleBuilder, config, stats: DataStats,
                       keep: Callable[[int], bool] = lambda line: True) -> Iterator[dict[str, list[int]]]:
    """The examples of the lines ``keep`` accepts, lazily, counting into ``stats``. A bad line
    raises DataError naming the file and line, or is skipped and counted with skip_bad_lines."""
    for number, line in read_jsonl(path):
        if not keep(number):
            continue
        stats.records += 1
        try:
            example = builder(parse_record(line, f"{path}:{number}"), f"{path}:{number}")
        except DataError as e:
            if not config.skip_bad_lines:
                raise
            stats.skipped[e.reason] += 1
            stats.first_skipped = stats.first_skipped or str(e)
            continue
        example, cut = truncate(example, config.max_seq_len)
        stats.truncated += cut
        if not has_labels(example):
            stats.dropped_no_labels += 1
            continue
        stats.examples += 1
        stats.tokens += len(example["input_ids"])
        yield example


def pack(examples: Iterable[dict[str, list[int]]], max_seq_len: int) -> Iterator[dict[str, list[int]]]:
    """Concatenate examples, in order, into sequences of at most max_seq_len tokens.

    Position ids restart at 0 at each example, which is how the model finds the boundaries (no
    attention across them). The first label of each example becomes -100: otherwise the last
    token of the previous example would be trained to predict it. Unpacked, that label is never
    used either (the loss shifts labels by one), so each example's loss is unchanged."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        n = len(e["input_ids"])
        if ids and len(ids) + n > max_seq_len:
            yield {"input_ids": ids, "labels": labels, "position_ids": positions}
            ids, labels, positions = [], [], []
        ids += e["input_ids"]
        labels += [IGNORE_INDEX, *e["labels"][1:]]
        positions += range(n)
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": positions}


def held_out(seed: int, line: int, fraction: float) -> bool:
    """Whether line ``line`` belongs to the eval split: a hash of (seed, line) below the fraction.
    Depends on nothing else, so streaming and in-memory reading agree."""
    digest = hashlib.blake2b(f"{seed}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


