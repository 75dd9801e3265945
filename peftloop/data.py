"""Examples, batches and collation.

An example is a dict with ``input_ids`` and ``labels`` (lists of ints of equal length; label
-100 = no loss at that position, HF's convention: labels are *not* shifted, the loss shifts them).
Optionally ``position_ids`` (packed examples restart them at 0 at each document boundary).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


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
            batch["position_ids"][i, n:] = torch.arange(n, longest) + int(batch["position_ids"][i, n - 1]) - n + 1
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
    """Collated micro-batches of one epoch. A sized dataset is shuffled per epoch; an iterable
    (streaming) dataset is read in order."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        order = epoch_order(len(data), epoch, seed, shuffle)
        for start in range(0, len(order), batch_size):
            yield collate_fn([data[i] for i in order[start:start + batch_size]])
    else:
        it = iter(data)
        while chunk := list(itertools.islice(it, batch_size)):
            yield collate_fn(chunk)


def num_micro_batches(data, batch_size: int) -> int | None:
    """Micro-batches per epoch, or None for a dataset of unknown length."""
    return -(-len(data) // batch_size) if hasattr(data, "__len__") else None
