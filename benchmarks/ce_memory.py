"""Peak memory of the loss: fused (chunked) linear cross-entropy vs materialised fp32 logits.

    python -m benchmarks.ce_memory                # SmolLM2-135M shape: 2,048 tokens, hidden 576, vocab 49,152
    python -m benchmarks.ce_memory --tokens 4096  # any other shape

What is measured: the resident memory that one forward + backward of the loss adds on top
of its inputs (hidden states, head, labels), gradients included. Each variant runs in a
fresh subprocess:

1. import torch, build the inputs, and run the same variant once at a tiny shape, so that
   torch's thread pools and the BLAS/oneDNN buffers exist before the measurement;
2. read the resident set (VmRSS) as the baseline, reset the kernel's peak counter
   (``echo 5 > /proc/self/clear_refs`` resets VmHWM, Linux >= 4.0);
3. run forward + backward once at full size, read the peak (VmHWM).

peak growth = VmHWM - baseline. This counts every page the loss touched, whoever allocated
it (torch's CPU allocator is malloc: freed blocks above glibc's mmap threshold go back to
the kernel, smaller ones are reused, and either way the high-water mark is what the
machine had to provide). The first run at full size is the one measured: no earlier
full-size run leaves freed memory behind to be reused.

Each child then runs the step twice more for its time (the minimum of the three is
reported; the memory figure is the first run's).

Variants: "materialised" is the reference, ``F.cross_entropy(F.linear(h, W).float(), y)``;
"fused" is ``peftloop.kernels.linear_cross_entropy`` on the CPU (its chunked torch path).
The head is frozen (LoRA) unless --trainable-head. Results go to
benchmarks/results/ce_memory-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import markdown_table, reset_peak, run_child, status_kib, write_results


def _run_variant(variant: str, dtype_name: str, tokens: int, hidden: int, vocab: int,
                 trainable_head: bool) -> dict:
    """Runs inside the subprocess: returns the measurement of one variant."""
    import torch
    import torch.nn.functional as F

    from peftloop.kernels import linear_cross_entropy

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def make(n, h, v):
        x = torch.randn(n, h).to(dtype).requires_grad_()
        w = (torch.randn(v, h) * h**-0.5).to(dtype).requires_grad_(trainable_head)
        y = torch.randint(0, v, (n,))
        y[::10] = -100  # some masked positions, as with padding / prompts
        return x, w, y

    def step(x, w, y):
        if variant == "materialised":
            loss = F.cross_entropy(F.linear(x, w).float(), y, reduction="sum")
        else:
            loss = linear_cross_entropy(x, w, y, reduction="sum")
        loss.backward()
        return loss.item()

    step(*make(64, hidden, 512))  # warm-up at a tiny shape
    x, w, y = make(tokens, hidden, vocab)
    baseline = reset_peak()
    start = time.perf_counter()
    loss = step(x, w, y)
    seconds = [time.perf_counter() - start]
    peak = status_kib("VmHWM")
    for _ in range(2):  # time only (the memory figure is the first run's): the VM is noisy, report the min
        x.grad = w.grad = None
        start = time.perf_counter()
        step(x, w, y)
        seconds.append(time.perf_counter() - start)
    seconds = min(seconds)
    return {"variant": variant, "dtype": dtype_name, "trainable_head": trainable_head, "loss": loss,
            "baseline_mib": baseline / 1024, "peak_growth_mib": (peak - baseline) / 1024, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtypes", default="fp32",
                        help="fp32 and/or bf16 (bf16 matmuls are slow on CPUs without AVX512-BF16/AMX)")
    parser.add_argument("--trainable-head", action="store_true", help="also measure with the head trainable")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:  # inside the subprocess: one variant
        variant, dtype_name, trainable = args._child.split(":")
        print(json.dumps(_run_variant(variant, dtype_name, args.tokens, args.hidden, args.vocab,
                                      trainable == "1")))
        return 0

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFTLOOP_KERNELS")}
    heads = [False, True] if args.trainable_head else [False]
    records = []
    for trainable in heads:
        for dtype_name in args.dtypes.split(","):
            for variant in ("materialised", "fused"):
                rec = run_child("ce_memory", ["--tokens", str(args.tokens), "--hidden", str(args.hidden),
                                              "--vocab", str(args.vocab),
                                              "--_child", f"{variant}:{dtype_name}:{int(trainable)}"],
                                env=env)
                records.append(rec)
                print(f"{variant:12s} {dtype_name:4s} head {'trainable' if trainable else 'frozen   '} "
                      f"peak +{rec['peak_growth_mib']:8.1f} MiB  {rec['seconds']:6.2f} s  "
                      f"loss {rec['loss']:.4f}",
                      flush=True)

    baseline = {(r["trainable_head"]): r for r in records
                if r["variant"] == "materialised" and r["dtype"] == "fp32"}
    lines = []
    for r in records:
        ref = baseline.get(r["trainable_head"])
        r["ratio_vs_materialised_fp32"] = ref["peak_growth_mib"] / r["peak_growth_mib"] if ref else None
    for r in records:
        if r["variant"] == "fused" and r["ratio_vs_materialised_fp32"]:
            lines.append(f"ratio (materialised fp32 logits / fused {r['dtype']}, head "
                         f"{'trainable' if r['trainable_head'] else 'frozen'}): "
                         f"{r['ratio_vs_materialised_fp32']:.1f}x")
    print("\n".join(lines))

    if args.no_save:
        return 0
    shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab}
    method = "peak RSS growth (VmHWM after clear_refs) over the inputs, one fwd+bwd per fresh subprocess"
    rows = [(r["variant"], r["dtype"], "trainable" if r["trainable_head"] else "frozen",
             f"{r['peak_growth_mib']:.1f}",
             f"{r['ratio_vs_materialised_fp32']:.1f}x" if r["ratio_vs_materialised_fp32"] else "-",
             f"{r['seconds']:.2f}") for r in records]
    body = [f"Shape: {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}"
            + (" (SmolLM2-135M's head)." if (args.hidden, args.vocab) == (576, 49152) else "."),
            f"Method: {method} (see benchmarks/ce_memory.py).",
            "",
            *markdown_table(["variant", "dtype", "head", "peak growth (MiB)", "vs materialised fp32",
                             "fwd+bwd (s, min of 3)"], rows, align="lllrrr"),
            "", *lines]
    write_results("ce_memory", records,
                  title="Loss peak memory: fused linear cross-entropy vs materialised logits",
                  body=body, meta={"shape": shape, "method": method})
    return 0


if __name__ == "__main__":
    sys.exit(main())
