"""Batched generation against one prompt at a time: is a batch of 8 prompts well under 8 calls?

    python -m benchmarks.generate_batch                          # tiny, demo and a 576-wide model
    python -m benchmarks.generate_batch --shapes tiny --threads 1,2 --repeats 3

For each model shape, 8 prompts of different lengths (5 to 40 random tokens, seed 1) are
continued greedily for ``--new-tokens`` tokens by ``peftloop.generate.generate``, twice:

- ``batch``: one call with all 8 prompts (left padding, KV cache);
- ``one by one``: 8 calls of one prompt each.

Two cases: ``to the end`` (no stop token: every row runs all the new tokens) and ``stops``
(stop tokens picked from the free-running outputs so that the rows finish after different
numbers of tokens, as real completions do). The outputs of the two ways must be identical (asserted: the
run fails otherwise). Each measurement repeats ``--repeats`` times, the two ways alternating in
order; the medians are reported, with their ratio (batch / one by one: below 1 means the batch
is cheaper), for each ``torch.set_num_threads`` value of ``--threads`` (0: torch's default).

The shapes: ``tiny`` (the tests' Llama: hidden 32, 2 layers, vocabulary 61), ``demo`` (the
demo's base: hidden 128, 4 layers, vocabulary 19) and ``w576`` (SmolLM2-135M's width, heads and
vocabulary of 49,152, 4 of its 30 layers), random weights, fp32, on the CPU (CUDA when present).

The load average is recorded before and after: on a machine whose cores are busy with other
work, torch's intra-op threads wait for each other, and the larger operations of a batch are
the ones torch splits across threads. Results go to
benchmarks/results/generate_batch-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import markdown_table, write_results
from peftloop.generate import generate
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": dict(vocab_size=61, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "demo": dict(vocab_size=19, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "w576": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
}
PROMPT_LENGTHS = [5, 9, 13, 17, 21, 26, 31, 40]


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def build(shape: str, device: torch.device) -> tuple[LlamaForCausalLM, list[list[int]]]:
    config = LlamaConfig(max_position_embeddings=512, **SHAPES[shape])
    model = LlamaForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    return model.to(device).eval(), prompts


def stop_tokens(free_running: list[list[int]]) -> list[int]:
    """Stop tokens that end the rows after different numbers of new tokens, as real completions do.
    Row i should stop after about 4i + 4 tokens (4 to 32): of the tokens that first appear in its
    output, the one nearest that length becomes a stop token, unless it would stop another row
    before its own length (a row left without one runs to the end). Random weights repeat tokens,
    so the lengths come out near the targets, not on them."""
    targets = [min(4 * i + 3, len(out) - 1) for i, out in enumerate(free_running)]
    chosen: set[int] = set()
    for row, (out, target) in enumerate(zip(free_running, targets)):
        firsts = sorted((abs(k - target), k) for k, t in enumerate(out) if t not in out[:k])
        for _, k in firsts:
            token = out[k]
            if all(token not in other[:end] for j, (other, end) in enumerate(zip(free_running, targets))
                   if j != row):
                chosen.add(token)
                break
    return sorted(chosen)


def measure(model, prompts: list[list[int]], new_tokens: int, eos: list[int] | None, repeats: int) -> dict:
    def batch():
        return generate(model, prompts, new_tokens, eos_token_id=eos)

    def one_by_one():
        return [generate(model, [p], new_tokens, eos_token_id=eos)[0] for p in prompts]

    outputs = batch()
    assert outputs == one_by_one(), "batched greedy outputs differ from one prompt at a time"
    times: dict[str, list[float]] = {"batch": [], "one_by_one": []}
    ways = {"batch": batch, "one_by_one": one_by_one}
    for i in range(repeats):
        for name in (("batch", "one_by_one") if i % 2 == 0 else ("one_by_one", "batch")):
            start = time.perf_counter()
            ways[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    b, o = statistics.median(times["batch"]), statistics.median(times["one_by_one"])
    return {"batch_s": b, "one_by_one_s": o, "ratio": b / o, "times_s": times,
            "new_tokens_per_row": [len(x) for x in outputs], "identical": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,demo,w576",
                        help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each way (default 5)")
    parser.add_argument("--threads", default="0",
                        help="comma-separated torch.set_num_threads values; 0 = torch's default (default 0)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_threads = torch.get_num_threads()
    load_before = load_average()
    records = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        for shape in args.shapes.split(","):
            model, prompts = build(shape, device)
            free = generate(model, prompts, args.new_tokens)
            for case, eos in (("to the end", None), ("stops", stop_tokens(free))):
                r = measure(model, prompts, args.new_tokens, eos, args.repeats)
                records.append({"shape": shape, "case": case, "threads": torch.get_num_threads(),
                                "load": load_average(), **r})
                print(f"{shape:5} {case:10} threads {torch.get_num_threads()}: "
                      f"batch of 8 {r['batch_s']:.3f} s, one by one {r['one_by_one_s']:.3f} s, "
                      f"ratio {r['ratio']:.2f} (load {records[-1]['load']:.1f})", flush=True)
    load_after = load_average()
    rows = [(r["shape"], r["case"], r["threads"], f"{r['batch_s']:.3f}", f"{r['one_by_one_s']:.3f}",
             f"**{r['ratio']:.2f}**", min(r["new_tokens_per_row"]), max(r["new_tokens_per_row"]), "yes")
            for r in records]
    body = [f"8 prompts of {PROMPT_LENGTHS} tokens, {args.new_tokens} greedy new tokens at most, fp32, "
            f"{device.type}; median of {args.repeats} repeats, the two ways alternating. Ratio = batch / one "
            f"by one (below 1: the batch is cheaper). Load average {load_before:.1f} before, "
            f"{load_after:.1f} after.", "",
            *markdown_table(["shape", "case", "threads", "batch of 8 (s)", "8 x one (s)", "ratio",
                             "min new tokens", "max new tokens", "identical"], rows, "llrrrrrrl")]
    write_results("generate_batch", records, title="Batched generation against one prompt at a time",
                  body=body, meta={"new_tokens": args.new_tokens, "repeats": args.repeats,
                                   "prompt_lengths": PROMPT_LENGTHS, "shapes": {k: SHAPES[k] for k in
                                                                                args.shapes.split(",")},
                                   "load_before": load_before, "load_after": load_after})


if __name__ == "__main__":
    main()
