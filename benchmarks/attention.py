"""Attention on packed chat rows: the FLOP rate of each path against the causal FLOPs actually needed.

    python -m benchmarks.attention                          # SmolLM2-135M's attention, bf16 and fp32
    python -m benchmarks.attention --repeats 3 --dtypes bf16 --threads 1,2

One layer's attention of SmolLM2-135M (9 query heads, 3 K/V heads, head_dim 64), forward and
forward + backward, through the code the model runs (``peftloop.models.attention``), on:

- ``4x256``: four unpacked rows of 256 tokens: SDPA ``is_causal`` (peftloop's path there) and SDPA on
  the equivalent dense causal mask;
- ``packed 2x1024``, ``packed 1x2048``: rows packed with chat documents whose lengths are drawn
  log-normal (mean 250 tokens, sigma 0.8, capped at what is left of the row; seed 0): SDPA on the
  dense block-diagonal mask (peftloop before the per-document path), the per-document path
  (``attend_by_document``: documents gathered into padded batches by length class, SDPA
  ``is_causal`` on each), and, as the floor, SDPA ``is_causal`` over each whole row, which is *not*
  the packed rows' attention (documents see each other) but costs what a row of one document does.

FLOPs needed, per head: a document of L tokens has L(L+1)/2 causal (query, key) pairs; the forward
pass multiplies each pair twice (q·k, p·v) over head_dim: 4·head_dim FLOPs per pair (2 per
multiply-add); the backward pass four times (dV, dP, dQ, dK): 8·head_dim per pair; forward +
backward 12·head_dim. Recomputing the scores in the backward pass, padding and masked-out pairs
are work a path chooses to do, not needed FLOPs: a path that does them shows a lower rate.
Reported: the median time of ``--repeats`` runs (paths alternate, after one warm-up each) and the
needed FLOPs divided by it, per ``torch.set_num_threads`` value (``--threads``). On a busy machine
every parallel op waits for its threads to be scheduled, so the paths with more (smaller) ops
look slow with 2 threads and not with 1: compare the two. Writes
``attention-<machine>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_results
from peftloop.models.attention import attend_by_document, build_attention_mask, document_buckets

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MEAN_LENGTH, SIGMA = 250, 0.8


def chat_documents(row_length: int, generator: torch.Generator) -> list[int]:
    """Document lengths filling one packed row: log-normal with mean MEAN_LENGTH, each capped at
    what is left of the row (the last one is cut, as packing cuts it)."""
    mu = math.log(MEAN_LENGTH) - SIGMA ** 2 / 2
    lengths: list[int] = []
    while sum(lengths) < row_length:
        drawn = max(1, round(math.exp(mu + SIGMA * torch.randn((), generator=generator).item())))
        lengths.append(min(drawn, row_length - sum(lengths)))
    return lengths


def position_ids_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def needed_flops(rows: list[list[int]], backward: bool) -> float:
    pairs = sum(n * (n + 1) // 2 for row in rows for n in row)
    return pairs * HEADS * HEAD_DIM * (12 if backward else 4)


def paths(rows: list[list[int]], packed: bool) -> dict:
    """name -> function(q, k, v) -> [B, T, H·D], each as the model calls it."""
    position_ids = position_ids_of(rows)
    B, T = position_ids.shape

    def sdpa(**kwargs):
        def run(q, k, v):
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
            return y.transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM)
        return run

    if not packed:
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
        return {"sdpa is_causal": sdpa(is_causal=True), "sdpa dense causal mask": sdpa(attn_mask=causal)}
    buckets = document_buckets(position_ids)
    return {
        "sdpa dense packed mask": sdpa(attn_mask=build_attention_mask(None, position_ids, T, 0)),
        "per document": lambda q, k, v: attend_by_document(q, k, v, buckets, enable_gqa=True),
        "floor: is_causal on whole rows": sdpa(is_causal=True),
    }


def time_paths(functions: dict, shape: tuple[int, int], dtype, backward: bool, repeats: int) -> dict:
    B, T = shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, HEAD_DIM, generator=generator).to(dtype).requires_grad_(backward)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    grad_y = torch.randn(B, T, HEADS * HEAD_DIM, generator=generator).to(dtype)

    def once(function) -> float:
        start = time.perf_counter()
        y = function(q, k, v)
        if backward:
            torch.autograd.grad(y, (q, k, v), grad_y)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        once(function)  # warm-up
    for _ in range(repeats):  # alternate, so a change in the machine's load hits every path alike
        for name, function in functions.items():
            times[name].append(once(function))
    return {name: statistics.median(t) for name, t in times.items()}


def cases(args) -> dict[str, tuple[list[list[int]], bool]]:
    generator = torch.Generator().manual_seed(0)
    found = {"4x256": ([[256]] * 4, False)}
    for rows, length in ((2, 1024), (1, 2048)):
        found[f"packed {rows}x{length}"] = ([chat_documents(length, generator) for _ in range(rows)], True)
    return {name: case for name, case in found.items() if name in args.cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path (median)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated torch.set_num_threads values (default: torch's)")
    parser.add_argument("--cases", default="4x256,packed 2x1024,packed 1x2048",
                        help="comma-separated: 4x256, packed 2x1024, packed 1x2048")
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    records = []
    for case, (rows, packed) in cases(args).items():
        functions = paths(rows, packed)
        shape = (len(rows), sum(rows[0]))
        for threads, dtype_name, backward in itertools.product(
                [int(t) for t in args.threads.split(",")], args.dtypes.split(","), (False, True)):
            torch.set_num_threads(threads)
            times = time_paths(functions, shape, DTYPES[dtype_name], backward, args.repeats)
            reference = times["sdpa dense packed mask" if packed else "sdpa dense causal mask"]
            for name, seconds in times.items():
                records.append({
                    "case": case, "documents": [len(r) for r in rows], "threads": threads,
                    "dtype": dtype_name,
                    "pass": "fwd+bwd" if backward else "fwd", "path": name, "ms": round(seconds * 1e3, 2),
                    "needed_gflop": round(needed_flops(rows, backward) / 1e9, 3),
                    "gflops": round(needed_flops(rows, backward) / seconds / 1e9, 2),
                    "speedup_vs_dense": round(reference / seconds, 2),
                })
                print(records[-1], flush=True)
    columns = ["case", "documents per row", "threads", "dtype", "pass", "path", "ms", "needed GFLOP",
               "GFLOP/s", "x dense mask"]
    cells = ([r["case"], r["documents"], r["threads"], r["dtype"], r["pass"], r["path"], r["ms"],
              r["needed_gflop"], r["gflops"], r["speedup_vs_dense"]] for r in records)
    table = markdown_table(columns, cells, align="llrllllrrrr")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = [f"SmolLM2-135M attention ({HEADS} heads, {KV_HEADS} K/V heads, head_dim {HEAD_DIM}); "
            f"load average after the run {load}; median of "
            f"{args.repeats}. GFLOP/s = causal FLOPs needed (4·head_dim per pair per head forward, "
            "12·head_dim forward + backward) / time. The floor is not the packed attention (see the "
            "module docstring).", "", *table]
    write_results("attention", records, title="Attention on packed chat rows", body=body,
                  meta={"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "repeats": args.repeats,
                        "document_lengths": f"log-normal mean {MEAN_LENGTH}, sigma {SIGMA}, seed 0"})


if __name__ == "__main__":
    main()
