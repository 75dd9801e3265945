"""Examples, batches and collation; the datasets a JSONL file becomes (records -> examples is
``peftloop.records``).

An example is a dict with ``input_ids`` and ``labels`` (lists of ints of equal length; label
-100 = no loss at that position, HF's convention: labels are *not* shifted, the loss shifts them).
Optionally ``position_ids`` (packed examples restart them at 0 at each document boundary), and on
eval examples ``prompt_ids`` and ``reference`` (the prompt's ids and the completion's text: what an
evaluation by generation needs, ``peftloop.generate``).

From a file (``load_datasets``), in order:

    JSONL line --parse--> record --ExampleBuilder--> example --truncate--> (pack) --> dataset

A record is ``{"text"}``, ``{"prompt", "completion"}`` (strings, or lists of chat messages) or
``{"messages": [{"role", "content"}, ...]}`` (docs/data.md). The dataset is a list in memory
(``SFTDataset``, shuffled per epoch, optionally grouped by length) or a lazy reader of the file
(``StreamingSFTDataset``: every epoch re-reads it through a seeded shuffle buffer), and the loop
takes micro-batches of either through ``micro_batches``. The order of an epoch depends only on
(seed, epoch), so the loop resumes by skipping micro-batches.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftloop.records import (
    IGNORE_INDEX,
    DataError,
    DataStats,
    ExampleBuilder,
    examples_from_file,
    held_out,
    pack,
)

LENGTH_GROUP_BATCHES = 50  # micro-batches per window sorted by length (transformers' LengthGroupedSampler's)


def collate(examples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest example: input_ids with pad_id, labels with -100,
    attention_mask 1 on real tokens; position_ids are padded with increasing positions."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), longest), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
    }
    has_positions = any("position_ids" in e for e in examples)
    if has_positions:
        batch["position_ids"] = torch.arange(longest).repeat(len(examples), 1)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["labels"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(e['labels'])} labels")
        batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.as_tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
        if has_positions:
            positions = e.get("position_ids", range(n))
            batch["position_ids"][i, :n] = torch.as_tensor(positions)
            # keep padding positions increasing so they never look like a new document
            batch["position_ids"][i, n:] = (torch.arange(n, longest)
                                            + int(batch["position_ids"][i, n - 1]) - n + 1)
    return batch


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels after the shift (position 0 never does) that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    sees the same order without saving it."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(data: Sequence | Iterable, batch_size: int, *, epoch: int = 0, seed: int = 0,
                  shuffle: bool = False, collate_fn=collate) -> Iterator[dict[str, torch.Tensor]]:
    """Collated micro-batches of one epoch. A sized dataset is shuffled per epoch (or ordered by
    its own ``order_for_epoch``: length grouping); an iterable is read in order (or through its
    ``examples_for_epoch``: a streaming dataset's seeded shuffle buffer). Either way the epoch's
    order is a function of (seed, epoch), so skipping its first n micro-batches resumes exactly."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        if hasattr(data, "order_for_epoch"):
            order = data.order_for_epoch(epoch, seed, shuffle, batch_size)
        else:
            order = epoch_order(len(data), epoch, seed, shuffle)
        for start in range(0, len(order), batch_size):
            yield collate_fn([data[i] for i in order[start:start + batch_size]])
    else:
        if hasattr(data, "examples_for_epoch"):
            it = data.examples_for_epoch(epoch, seed, shuffle, batch_size)
        else:
            it = iter(data)
        while chunk := list(itertools.islice(it, batch_size)):
            yield collate_fn(chunk)


def num_micro_batches(data, batch_size: int) -> int | None:
    """Micro-batches per epoch, or None for a dataset of unknown length."""
    return -(-len(data) // batch_size) if hasattr(data, "__len__") else None


def length_grouped_order(order: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``order`` with each window of LENGTH_GROUP_BATCHES micro-batches sorted longest first, and
    the longest example of all moved to the front: the first micro-batch is the largest, so an
    out-of-memory error shows at step 1, not hours in (transformers' LengthGroupedSampler)."""
    window = LENGTH_GROUP_BATCHES * batch_size
    grouped = [i for start in range(0, len(order), window)
               for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    if grouped:
        longest = max(range(0, len(grouped), window), key=lambda w: lengths[grouped[w]])
        grouped[0], grouped[longest] = grouped[longest], grouped[0]
    return grouped


# --------------------------------------------------------------------------------------------
# Datasets


class SFTDataset(Sequence):
    """Examples in memory. Shuffled per epoch by the loop; grouped by length when asked."""

    def __init__(self, examples: list[dict[str, list[int]]], group_by_length: bool = False,
                 stats: DataStats | None = None):
        self.examples = examples
        self.group_by_length = group_by_length
        self.stats = stats or DataStats()
        self.lengths = [len(e["input_ids"]) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    def order_for_epoch(self, epoch: int, seed: int, shuffle: bool, batch_size: int) -> list[int]:
        order = epoch_order(len(self), epoch, seed, shuffle)
        return length_grouped_order(order, self.lengths, batch_size) if self.group_by_length else order


class StreamingSFTDataset:
    """The examples of a JSONL file, read lazily in every epoch: memory holds one shuffle buffer.

    No ``__len__`` (the loop then needs max_steps). Each epoch reads the file from the top through
    a shuffle buffer seeded by (seed, epoch), then packs or groups by length as configured; the
    same (seed, epoch) gives the same sequence of examples, so resuming skips micro-batches exactly.
    ``stats`` counts the most recent pass over the file."""

    def __init__(self, path: Path, builder: ExampleBuilder, config,
                 keep: Callable[[int], bool] = lambda line: True):
        self.path, self.builder, self.config, self.keep = Path(path), builder, config, keep
        self.stats = DataStats()

    def examples_for_epoch(self, epoch: int, seed: int, shuffle: bool, batch_size: int) -> Iterator[dict]:
        self.stats = DataStats()
        stream: Iterable[dict] = examples_from_file(self.path, self.builder, self.config, self.stats,
                                                    self.keep)
        if self.config.packing:
            stream = pack(stream, self.config.max_seq_len)
        if shuffle:
            stream = buffer_shuffled(stream, self.config.shuffle_buffer,
                                     random.Random(seed * 100_003 + epoch))
        if self.config.group_by_length and not self.config.packing:  # packed rows are all about max_seq_len
            stream = length_grouped_stream(stream, batch_size)
        return iter(stream)

    def __iter__(self) -> Iterator[dict]:
        return self.examples_for_epoch(0, 0, False, 1)


def buffer_shuffled(stream: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Hold buffer_size items; emit a random one as each new one arrives, then the rest shuffled."""
    buffer: list = []
    for item in stream:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def length_grouped_stream(stream: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Consecutive windows of LENGTH_GROUP_BATCHES micro-batches, each sorted longest first."""
    it = iter(stream)
    while window := list(itertools.islice(it, LENGTH_GROUP_BATCHES * batch_size)):
        yield from sorted(window, key=lambda e: -len(e["input_ids"]))


def load_datasets(config, tokenizer, seed: int = 42):
    """(train, eval or None) from a DataConfig. Eval comes from eval_file, else from the lines
    eval_split holds out of train_file, and is never packed (padding gives the same losses). Eval
    examples of prompt/completion and chat records keep their prompt's ids and reference text, for
    an evaluation by generation (``TrainConfig.eval_generate_max_new_tokens``)."""
    if not config.train_file:
        raise DataError("data.train_file is not set", "config")
    builder = ExampleBuilder(tokenizer, config)
    eval_builder = ExampleBuilder(tokenizer, config, keep_task=True)
    train_path = _existing(config.train_file, "data.train_file")
    split = config.eval_split if not config.eval_file else 0.0
    in_train = (lambda line: not held_out(seed, line, split)) if split else (lambda line: True)
    if config.streaming:
        train = StreamingSFTDataset(train_path, builder, config, keep=in_train)
    else:
        train = in_memory(train_path, builder, config, in_train, packing=config.packing)
        if not len(train):
            raise DataError(f"{train_path}: no training examples ({train.stats.summary()})", "empty")
    evaluation = None
    if config.eval_file:
        evaluation = in_memory(_existing(config.eval_file, "data.eval_file"), eval_builder, config,
                               lambda line: True)
    elif split:
        evaluation = in_memory(train_path, eval_builder, config, lambda line: held_out(seed, line, split))
        if not len(evaluation):
            raise DataError(f"{train_path}: data.eval_split={split} held out no example; raise it or give "
                            "data.eval_file", "empty")
    return train, evaluation


def in_memory(path: Path, builder: ExampleBuilder, config, keep, packing: bool = False) -> SFTDataset:
    stats = DataStats()
    examples = examples_from_file(path, builder, config, stats, keep)
    examples = list(pack(examples, config.max_seq_len) if packing else examples)
    return SFTDataset(examples, group_by_length=config.group_by_length and not packing, stats=stats)


def _existing(name: str, key: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: {path}: file not found", "config")
    return path
