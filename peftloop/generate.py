"""Text generation with a KV cache: greedy, or sampling with temperature and top-p; and the task
metrics of an evaluation by generation.

Prompts of different lengths are padded on the left, so every row's next token sits in the
last column; the attention mask hides the pads and position ids count real tokens only. A
batch costs little more than its longest prompt alone: the head runs on the last position only,
the cache is written in place, and a row that reaches a stop token leaves the batch (with the
padding no remaining row needs). Greedy outputs are those of one prompt at a time.
``generate`` works on token ids; ``generate_text`` adds the tokenizer (``peftloop generate``).

Task metrics (``train(..., eval_data, TrainConfig(eval_generate_max_new_tokens=N))``): each eval
example with a prompt becomes a :class:`Task` (``task_of``), its greedy completion is scored by
exact match and by the caller's ``metric(prediction, reference) -> float`` functions
(``task_metric_sums``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from peftloop.records import IGNORE_INDEX


class KVCache:
    """Keys and values of one attention layer: a buffer [batch, kv heads, capacity, head_dim]
    written in place at each step (grown by doubling when full); ``update`` returns the filled part."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            size = max(end, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0))
            self.k, self.v = self._grown(self.k, k, size), self._grown(self.v, v, size)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, size: int) -> torch.Tensor:
        buffer = new.new_empty(new.shape[0], new.shape[1], size, new.shape[3])
        if old is not None:
            buffer[:, :, :self.length] = old[:, :, :self.length]
        return buffer

    def keep(self, rows: torch.Tensor, start: int) -> None:
        """Keep only batch rows ``rows`` and the positions from ``start`` on (a copy)."""
        if self.k is not None:
            self.k, self.v = self.k[rows, :, start:], self.v[rows, :, start:]
            self.length -= start


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      caches: list[KVCache]) -> torch.Tensor:
    """The logits of the last position of each row: the head (``vocab x hidden``, the largest
    matrix of a small model) runs on one position per row, not on the whole prompt."""
    hidden = model.model(ids, mask, positions, caches)
    return model.lm_head(hidden[:, -1])


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not included; stops at eos, which is
    kept as the last id). ``model`` is a peftloop causal LM (``.model`` and ``.lm_head``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p, device=device)
        mask[i, longest - len(p):] = 1
    caches = [KVCache(longest + max_new_tokens) for _ in range(model.config.num_hidden_layers)]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompts still in the batch, by row
    step_ids, step_positions = ids, positions
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, step_ids, mask, step_positions, caches)
        next_ids = sample_next(logits, temperature, top_p, generator)
        done = []
        for row, (i, t) in enumerate(zip(active, next_ids.tolist())):
            out[i].append(t)
            if t in eos:
                done.append(row)
        step_ids = next_ids[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done:
            # Finished rows leave the batch, and so do the left-padding columns that only they
            # needed: the rest never run a position of theirs again. Masked keys add nothing to
            # the attention, so the remaining rows compute what they computed with them.
            rows = [r for r in range(len(active)) if r not in done]
            if not rows:
                break
            active = [active[r] for r in rows]
            keep = torch.tensor(rows, device=device)
            start = int(mask[keep].argmax(dim=1).min())  # the first column any remaining row uses
            mask, step_ids, step_positions = mask[keep, start:], step_ids[keep], step_positions[keep]
            for cache in caches:
                cache.keep(keep, start)
    model.train(was_training)
    return out


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, chat: bool = False,
                  system: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0) -> list[str]:
    """Text in, text out: each prompt encoded (or formatted as one user turn with the chat template
    when ``chat``), continued until a stop token, decoded without special tokens."""
    if chat:
        before = [{"role": "system", "content": system}] if system else []
        prompt_ids = [tokenizer.apply_chat_template([*before, {"role": "user", "content": p}],
                                                    add_generation_prompt=True) for p in prompts]
    else:
        prompt_ids = [tokenizer.encode(p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    outputs = generate(model, prompt_ids, max_new_tokens, eos_token_id=tokenizer.stop_token_ids,
                       pad_token_id=pad, temperature=temperature, top_p=top_p,
                       generator=torch.Generator().manual_seed(seed))
    return [tokenizer.decode(ids) for ids in outputs]


# ------------------------------------------------------------------------------------------------
# Task metrics: greedy completions of the eval prompts, scored against their references


@dataclass(frozen=True)
class Task:
    """One eval example as a generation task."""

    prompt_ids: list[int]
    """The tokens the completion is generated from."""
    reference: str | list[int]
    """What the completion should be: its text, or (no tokenizer) its token ids."""


def task_of(example: dict[str, Any], tokenizer=None) -> Task | None:
    """The task of one eval example, or None when it has no prompt (a text record, loss on every
    token). Examples read from prompt/completion or chat records (``peftloop.data``) carry
    ``prompt_ids`` and ``reference``, the completion's text. Any other example (``input_ids`` and
    ``labels`` built by hand): the prompt is the tokens before the first label, the reference the
    run of labelled tokens that follows, decoded when a tokenizer is given, else kept as ids."""
    if "prompt_ids" in example and "reference" in example:
        return Task([int(t) for t in example["prompt_ids"]], example["reference"])
    labels = [int(t) for t in example["labels"]]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
    if first == 0:  # no label, or labels from the first token on: there is no prompt
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    ids = [int(t) for t in example["input_ids"]]
    reference = ids[first:end]
    return Task(ids[:first], tokenizer.decode(reference) if tokenizer is not None else reference)


def evaluation_tasks(data: Iterable[dict[str, Any]], tokenizer=None,
                     metrics: dict[str, Callable[[str, str], float]] | None = None) -> list[Task]:
    """The tasks of an eval set, shortest prompt first (batches of similar lengths pad little).
    ValueError when there is none, or when text must be compared and no tokenizer is given."""
    tasks = [task for example in data if (task := task_of(example, tokenizer)) is not None]
    if not tasks:
        raise ValueError("eval_generate_max_new_tokens: no eval example has a prompt to generate from "
                         "(prompt/completion or chat records, or labels that start after the first token)")
    if tokenizer is None and (metrics or any(isinstance(t.reference, str) for t in tasks)):
        what = "eval_metrics compare texts" if metrics else "the eval examples' references are texts"
        raise ValueError(f"eval_generate_max_new_tokens: {what}: pass the tokenizer too "
                         "(train(..., tokenizer=tokenizer)) to decode the completions")
    return sorted(tasks, key=lambda t: len(t.prompt_ids))


def exact_match(prediction: str | list[int], reference: str | list[int]) -> float:
    """1.0 when the completion is the reference, else 0.0: texts compared after stripping the
    whitespace around them, token ids as they are."""
    if isinstance(reference, str):
        return float(prediction.strip() == reference.strip())
    return float(list(prediction) == list(reference))


@torch.no_grad()
def task_metric_sums(model, tasks: list[Task], max_new_tokens: int, batch_size: int, tokenizer=None,
                     metrics: dict[str, Callable[[str, str], float]] | None = None) -> dict[str, float]:
    """Greedy completions of ``tasks``, ``batch_size`` at a time, stopping at the tokenizer's stop
    tokens (no tokenizer: the model config's eos), scored: the sums over the tasks of
    ``exact_match`` and of each ``metrics[name](prediction, reference)``, keyed ``exact_match``
    and ``name``, every key present even with no task (the loop sums them over ranks)."""
    metrics = metrics or {}
    sums = {"exact_match": 0.0, **{name: 0.0 for name in metrics}}
    if tokenizer is not None:
        stop = tokenizer.stop_token_ids
        pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    else:
        stop, pad = model.config.eos_token_id, 0
    stop_ids = set([stop] if isinstance(stop, int) else (stop or []))
    for start in range(0, len(tasks), batch_size):
        batch = tasks[start:start + batch_size]
        outputs = generate(model, [t.prompt_ids for t in batch], max_new_tokens, eos_token_id=stop,
                           pad_token_id=pad)
        for task, ids in zip(batch, outputs):
            if isinstance(task.reference, str):
                prediction, reference = tokenizer.decode(ids), task.reference
            else:  # ids: a stop token ending either is the end, not part of the answer
                prediction, reference = _before_stop(ids, stop_ids), _before_stop(task.reference, stop_ids)
            sums["exact_match"] += exact_match(prediction, reference)
            for name, metric in metrics.items():
                sums[name] += float(metric(prediction, reference))
    return sums


def _before_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    return list(ids[:-1]) if ids and ids[-1] in stop_ids else list(ids)
