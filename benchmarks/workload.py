"""A realistic instruction-tuning workload of token ids: realistic lengths, masked prompts, learnable.

Lengths. Each record is one prompt and one completion whose lengths are drawn from a mix of four
well-known instruction sets, in equal parts, with the mean lengths (Llama tokens) of Wang et al.
2023, "How Far Can Camels Go? Exploring the State of Instruction Tuning on Open Resources"
(NeurIPS 2023 Datasets and Benchmarks, arXiv:2306.04751), Table 1:

    source            mean prompt   mean completion
    Alpaca                27.8           64.6
    Dolly                118.1           91.3
    OpenAssistant 1       34.8          212.5
    ShareGPT              71.0          357.8

(ShareChat, arXiv:2512.17843, Table 1, counts Alpaca independently: 19.67 +- 15.19 user tokens,
64.51 +- 64.85 assistant tokens; the completions agree with Camels' 64.6.) Each field is
log-normal with its source's mean and a spread taken from those Alpaca figures: the coefficient of
variation is 0.77 for prompts (sigma 0.68) and 1.0 for completions (sigma 0.83). Multi-turn
conversations are modelled as one prompt and one completion, so the long tail is if anything
shorter than real chat data. Over the mix: prompts 62.9 tokens on average, completions 181.6.

Template. A prompt is BOS, a 3-token user header and its body, then a 3-token assistant header;
the completion is its body and EOS. Prompt tokens (headers included) carry label -100; only the
completion is trained. A record longer than ``max_seq_len`` loses the end of its completion (the
prompt body is capped at max_seq_len / 2 first, so every record keeps label tokens).

Learnable. Prompt tokens are drawn from a Zipf law (exponent 1.1) over a 64-token slice of the
vocabulary; the completion is a deterministic function of the prompt: its first token is
``successor(last prompt token)`` and each next one the successor of the one before, through a
fixed permutation of the slice. A LoRA on a random base lowers the loss within a few steps (it
learns the slice, then the successor map), so loss curves visibly fall.

Everything is drawn from ``random.Random(seed)``: the same seed gives the same records.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

IGNORE_INDEX = -100
BOS, EOS = 1, 2  # the benchmark shapes' bos_token_id / eos_token_id
USER_HEADER, ASSISTANT_HEADER = (3, 4, 5), (6, 4, 5)  # stand-ins for "<|user|>\n" and "<|assistant|>\n"
FIRST_CONTENT_ID = 8
CONTENT_VOCAB = 64
ZIPF_EXPONENT = 1.1
PROMPT_SIGMA, COMPLETION_SIGMA = 0.68, 0.83  # log-normal sigma: coefficient of variation 0.77 and 1.0


@dataclass(frozen=True)
class Source:
    name: str
    mean_prompt: float
    mean_completion: float


SOURCES = (Source("Alpaca", 27.8, 64.6), Source("Dolly", 118.1, 91.3),
           Source("OpenAssistant 1", 34.8, 212.5), Source("ShareGPT", 71.0, 357.8))
"""Wang et al. 2023, Table 1: mean prompt and completion lengths in Llama tokens."""


def mean_prompt_tokens() -> float:
    """The mix's mean prompt body length (before the template and the cap)."""
    return sum(s.mean_prompt for s in SOURCES) / len(SOURCES)


def mean_completion_tokens() -> float:
    return sum(s.mean_completion for s in SOURCES) / len(SOURCES)


def lognormal_length(rng: random.Random, mean: float, sigma: float) -> int:
    """A log-normal draw with the given mean (mu = ln(mean) - sigma^2 / 2), rounded, at least 1."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


class Vocabulary:
    """The content slice of the vocabulary, its Zipf weights and the successor permutation."""

    def __init__(self, vocab_size: int, seed: int):
        size = min(CONTENT_VOCAB, vocab_size - FIRST_CONTENT_ID)
        if size < 2:
            raise ValueError(f"vocab_size {vocab_size} leaves no content tokens above id {FIRST_CONTENT_ID}")
        rng = random.Random(f"vocabulary-{seed}")
        self.ids = list(range(FIRST_CONTENT_ID, FIRST_CONTENT_ID + size))
        by_rank = self.ids[:]
        rng.shuffle(by_rank)  # which token is frequent: a fixed random choice
        self.by_rank = by_rank
        self.cumulative_weights = list(_accumulate(1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(size)))
        targets = self.ids[:]
        rng.shuffle(targets)
        self.successor = dict(zip(self.ids, targets))

    def zipf_tokens(self, rng: random.Random, n: int) -> list[int]:
        return rng.choices(self.by_rank, cum_weights=self.cumulative_weights, k=n)

    def chain(self, start: int, n: int) -> list[int]:
        """n tokens, each the successor of the one before, starting from successor(start)."""
        out, token = [], start
        for _ in range(n):
            token = self.successor[token]
            out.append(token)
        return out


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def record_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt body, completion body) lengths of n records, before the template and the cap. Drawn
    from their own stream, so the lengths do not depend on the vocabulary."""
    rng = random.Random(f"lengths-{seed}")
    lengths = []
    for _ in range(n):
        source = SOURCES[rng.randrange(len(SOURCES))]
        lengths.append((lognormal_length(rng, source.mean_prompt, PROMPT_SIGMA),
                        lognormal_length(rng, source.mean_completion, COMPLETION_SIGMA)))
    return lengths


def chat_examples(n: int, vocab_size: int, max_seq_len: int = 1024, seed: int = 0) -> list[dict]:
    """n examples ``{"input_ids", "labels"}``: the templated records, prompts masked, capped."""
    vocabulary = Vocabulary(vocab_size, seed)
    rng = random.Random(f"tokens-{seed}")
    examples = []
    for prompt_len, completion_len in record_lengths(n, seed):
        body = vocabulary.zipf_tokens(rng, min(prompt_len, max_seq_len // 2))
        prompt = [BOS, *USER_HEADER, *body, *ASSISTANT_HEADER]
        completion = [*vocabulary.chain(body[-1], completion_len), EOS]
        completion = completion[:max(1, max_seq_len - len(prompt))]
        examples.append({"input_ids": prompt + completion,
                         "labels": [IGNORE_INDEX] * len(prompt) + completion})
    return examples


def completion_of(example: dict) -> list[int]:
    """The labelled tokens of an example (its completion)."""
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def synthetic_examples(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """The synthetic job's data, learnable: n sequences of exactly seq_len tokens, every token
    labelled; a quarter is Zipf tokens, the rest the successor chain of its last one."""
    vocabulary = Vocabulary(vocab_size, seed)
    rng = random.Random(f"synthetic-{seed}")
    head = max(1, seq_len // 4)
    examples = []
    for _ in range(n):
        body = vocabulary.zipf_tokens(rng, head)
        ids = body + vocabulary.chain(body[-1], seq_len - head)
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def percentile(sorted_values: list[int], q: float) -> int:
    """The q-quantile by the nearest-rank method."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def length_stats(examples: list[dict]) -> dict:
    """Lengths of the examples (tokens, template included) and the fraction of tokens with a loss."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    tokens = sum(lengths)
    labelled = sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)
    return {"examples": len(examples), "tokens": tokens, "label_tokens": labelled,
            "mean": tokens / len(examples), "p50": percentile(lengths, 0.5), "p90": percentile(lengths, 0.9),
            "max": lengths[-1], "label_fraction": labelled / tokens}
