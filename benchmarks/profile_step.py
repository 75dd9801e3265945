"""Where one training micro-batch spends its time: peftloop's model against transformers + peft.

    python -m benchmarks.profile_step                       # SmolLM2-135M's shape, fp32
    python -m benchmarks.profile_step --model small --dtype bf16

Both systems load the same base (``benchmarks/results/tmp/base-<model>``, written as
``benchmarks.compare`` writes it), get LoRA r=16 on q,k,v,o,gate,up,down without dropout, and run
one warm-up and then ``--repeats`` profiled forward + backward passes of 4 x 256 tokens with the
summed token loss (peftloop: ``model(ids, labels=ids)``; peft: ``cross_entropy`` over the logits,
as the Trainer computes it). ``torch.profiler`` self CPU time of every aten op is put in one
bucket: matmuls, attention, loss (log-softmax, NLL and their backward), elementwise (norms, RoPE,
activations, dropout, casts and copies, the backward's additions) and everything else. The optimizer
step is timed apart: one fused AdamW step over the adapters. The table says where the step's
time goes and where the two systems differ. Results go to
benchmarks/results/profile_step-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import RESULTS, SHAPES, markdown_table, write_results
from benchmarks.compare import write_base
from benchmarks.run_one import MICRO_BATCH, SEQ_LEN, TARGETS

BUCKETS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_",
               "aten::_addmm_activation"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "_softmax_backward"),
}


def bucket(name: str) -> str:
    for label, keys in BUCKETS.items():
        if any(name == k or (not k.startswith("aten::") and k in name) for k in keys):
            return label
    if name.startswith(("aten::", "autograd::")):
        return "elementwise/other"
    return "python/other"


def peftloop_step(base: Path, dtype: str):
    from peftloop.config import LoraConfig
    from peftloop.inject import inject_lora
    from peftloop.models import load_pretrained

    model = load_pretrained(base, dtype=dtype)
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    return model, lambda ids: model(ids, labels=ids)


def peft_step(base: Path, dtype: str):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()

    def loss_of(ids):
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="sum")
    return model, loss_of


def profile(build, base: Path, dtype: str, repeats: int) -> dict[str, float]:
    model, loss_of = build(base, dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def micro_batch():
        with autocast:
            loss = loss_of(ids)
        loss.backward()

    micro_batch()  # warm-up: first-call allocations, oneDNN primitive caches
    seconds = defaultdict(float)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            micro_batch()
    wall = (time.perf_counter() - start) / repeats
    for event in prof.key_averages():
        seconds[bucket(event.key)] += event.self_cpu_time_total / 1e6 / repeats
    # Self CPU time sums over threads; scale the buckets to the wall time of a micro-batch.
    total = sum(seconds.values())
    out = {k: v / total * wall for k, v in seconds.items()}
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["optimizer step (once per 2 micro-batches)"] = time.perf_counter() - start
    out["wall per micro-batch"] = wall
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args()
    base = write_base(args.model, RESULTS / "tmp" / f"base-{args.model}")
    ours = profile(peftloop_step, base, args.dtype, args.repeats)
    theirs = profile(peft_step, base, args.dtype, args.repeats)
    buckets = ["matmul", "attention", "loss", "elementwise/other", "python/other",
               "optimizer step (once per 2 micro-batches)", "wall per micro-batch"]
    records = [{"bucket": b, "peftloop_s": ours.get(b, 0.0), "transformers_peft_s": theirs.get(b, 0.0)}
               for b in buckets]
    what = (f"one micro-batch ({MICRO_BATCH} x {SEQ_LEN} tokens), {args.model}, {args.dtype}: seconds "
            f"(buckets: self CPU time scaled to the wall time)")
    rows = [(r["bucket"], f"{r['peftloop_s']:.3f}", f"{r['transformers_peft_s']:.3f}",
             f"{r['peftloop_s'] / r['transformers_peft_s']:.2f}" if r["transformers_peft_s"] > 1e-4 else "-")
            for r in records]
    table = markdown_table(["bucket (s)", "peftloop", "transformers + peft", "ratio"], rows, align="lrrr")
    print(what, *table, sep="\n")
    if args.no_save:
        return 0
    write_results("profile_step", records,
                  title="Where one micro-batch's time goes: peftloop vs transformers + peft",
                  body=[f"{what[0].upper()}{what[1:]}.", "", *table],
                  libraries=("torch", "transformers", "peft"),
                  meta={"model": args.model, "dtype": args.dtype, "repeats": args.repeats,
                        "micro_batch_size": MICRO_BATCH, "seq_len": SEQ_LEN})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
