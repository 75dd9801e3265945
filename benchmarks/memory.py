"""Where a LoRA training step's memory goes: peak RSS, the tensors autograd saves, the heap's retention.

    python -m benchmarks.memory                                  # SmolLM2-135M's shape, fp32 + bf16
    python -m benchmarks.memory --dtypes bf16 --variants default,mmap=1m,trim,recompute+mmap=1m --steps 3
    python -m benchmarks.memory --shape tiny --steps 1 --warmup 0 --no-save   # checks the script

The job is compare's (``benchmarks/run_one.py``): the base (random weights, seed 42) loaded in the
run's dtype, LoRA r=16, alpha 32, dropout 0.05 on q, k, v, o, gate, up and down, micro-batch 4 x
256 random tokens x accumulation 2, AdamW at 2e-4, ``precision`` = the dtype (bf16: autocast).

Every measurement is a fresh process (``run_child``):

- ``train``: loads the base, trains warm-up + measured steps with ``peftloop.train`` and reports
  the process's peak RSS (``ru_maxrss``, imports included, as run_one reports it), the RSS after
  the imports and after loading, and the median step time. A ``--variants`` entry joins with
  ``+`` any of: ``default`` (nothing: glibc's own policy, as ``train()`` leaves it),
  ``mmap=<size>`` (``peftloop.allocator.limit_heap_retention`` at that
  threshold, set before training), ``trim`` (``release_free_memory``
  after every optimizer step), ``recompute`` (the model's ``recompute_cheap_activations`` switch,
  on by default in peftloop and turned off by this benchmark in the variants without it: norm and
  SwiGLU outputs made again in backward). Variants alternate within each pass, so drift falls on
  all alike.
- ``saved``: one forward of one micro-batch under ``torch.autograd.graph.saved_tensors_hooks``,
  summing the bytes of every tensor autograd keeps for the backward pass, by the module that
  saved it (layer index dropped; ``mlp`` alone is SwiGLU, ``self_attn`` alone is RoPE and
  attention) and by dtype. A storage saved twice (one input, saved by q, k and v) counts once,
  for its first saver; parameters are not counted. Run as is and with ``recompute``.

What the peak holds beyond the loaded model: the saved tensors (one micro-batch's), the LoRA
gradients and AdamW's moments (small), the temporaries of the op running at the peak, and
memory glibc keeps after it was freed. The report's "rest" is the peak growth minus the saved
tensors: temporaries plus retention. Results: ``benchmarks/results/memory-<machine>-<date>``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import RESULTS, SHAPES, Shape, markdown_table, run_child, status_kib, write_results

SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 256, 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# tiny: checks the script; smollm-4: SmolLM2-135M's widths with 4 layers, to time allocator
# settings side by side (the same tensor sizes, a fraction of the work)
MEMORY_SHAPES = {**SHAPES, "tiny": Shape("tiny", 64, 2, 4, 2, 96, 512, True),
                 "smollm-4": Shape("smollm-4", 576, 4, 9, 3, 1536, 49152, True, rope_theta=100000.0)}
MIB = 2**20


def parse_size(text: str) -> int:
    """``131072``, ``128k``, ``1m``: bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", text.lower())
    if not match:
        raise ValueError(f"size {text!r}: expected a number of bytes, optionally with k, m or g")
    return int(match[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]


def parse_variant(variant: str) -> tuple[int | None, bool, bool]:
    """``default``, or ``+``-joined ``mmap=<size>``, ``trim``, ``recompute`` -> (mmap threshold,
    trim per step, recompute)."""
    threshold, trim, recompute = None, False, False
    for part in variant.split("+"):
        if part in ("trim", "recompute"):
            trim, recompute = trim or part == "trim", recompute or part == "recompute"
        elif part.startswith("mmap="):
            threshold = parse_size(part[len("mmap="):])
        elif part != "default":
            raise ValueError(f"variant {variant!r}: expected default, or mmap=<size>, trim and recompute "
                             "joined by +")
    return threshold, trim, recompute


# ---------------------------------------------------------------------------------------------
# In the child process


def load_model(base: str, dtype: str, recompute: bool):
    import torch

    from peftloop.config import LoraConfig
    from peftloop.inject import inject_lora
    from peftloop.models import load_pretrained

    model = load_pretrained(base, dtype=dtype)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    model.model.recompute_cheap_activations = recompute  # on by default in peftloop
    return model


def make_data(n_examples: int, vocab: int) -> list[dict]:
    import torch

    ids = torch.randint(3, vocab, (n_examples, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]


def measure_training(base: str, dtype: str, variant: str, warmup: int, steps: int, workdir: str) -> dict:
    import torch

    from peftloop import allocator as heap
    from peftloop.callbacks import Callback
    from peftloop.config import TrainConfig
    from peftloop.train import train

    threshold, trim, recompute = parse_variant(variant)
    rss_imports = status_kib("VmRSS")
    model = load_model(base, dtype, recompute)
    rss_loaded = status_kib("VmRSS")
    if threshold is not None:
        heap.limit_heap_retention(threshold)

    class Steps(Callback):
        def __init__(self):
            self.ends = [time.perf_counter()]
            self.rss_after = []

        def on_step_end(self, state, metrics):
            if trim:
                heap.release_free_memory()
            self.ends.append(time.perf_counter())
            self.rss_after.append(status_kib("VmRSS") / 1024)

    vocab = model.config.vocab_size
    data = make_data(MICRO_BATCH * GRAD_ACCUM * (warmup + steps), vocab)
    config = TrainConfig(output_dir=workdir, micro_batch_size=MICRO_BATCH, grad_accum=GRAD_ACCUM,
                         max_steps=warmup + steps, learning_rate=2e-4, max_grad_norm=1.0,
                         lr_scheduler="linear", precision=dtype, progress_bar=False, log_every=10**9,
                         device="cpu")
    timer = Steps()
    result = train(model, data, config=config, callbacks=[timer])
    durations = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {"kind": "train", "dtype": dtype, "variant": variant, "threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_imports_mib": rss_imports / 1024, "rss_after_load_mib": rss_loaded / 1024,
            "rss_after_step_mib": timer.rss_after, "step_times_s": durations,
            "median_step_s": statistics.median(durations[warmup:] or durations),
            "train_loss": result.train_loss}


def saver_name(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (one row for every layer)."""
    return re.sub(r"^model\.layers\.\d+\.", "", module_name) or "(top)"


def measure_saved(base: str, dtype: str, variant: str) -> dict:
    """One micro-batch's forward; the bytes autograd saves, by saver and dtype."""
    import torch

    model = load_model(base, dtype, parse_variant(variant)[2])
    model.train()
    ids = torch.tensor(make_data(MICRO_BATCH, model.config.vocab_size)[0]["input_ids"]).repeat(MICRO_BATCH, 1)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []

    def enter(name):
        return lambda module, args: stack.append(name)  # list.append returns None: input unchanged

    def leave(module, args, output):
        stack.pop()  # returns None: the output is unchanged

    for name, module in model.named_modules():
        module.register_forward_pre_hook(enter(name))
        module.register_forward_hook(leave)
    seen: set[int] = set()
    by_saver: dict[str, int] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() in parameters or storage.data_ptr() in seen or storage.nbytes() == 0:
            return t
        seen.add(storage.data_ptr())
        by_saver[saver_name(stack[-1] if stack else "")] += storage.nbytes()
        by_dtype[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(ids, labels=ids)
    loss.backward()  # the graph must be usable: what was saved is what backward reads
    layers = model.config.num_hidden_layers
    return {"kind": "saved", "dtype": dtype, "variant": variant, "tokens": MICRO_BATCH * SEQ_LEN,
            "layers": layers,
            "saved_mib": sum(by_saver.values()) / MIB,
            "by_saver_mib": {k: v / MIB for k, v in sorted(by_saver.items(), key=lambda kv: -kv[1])},
            "by_dtype_mib": {k: v / MIB for k, v in by_dtype.items()}}


# ---------------------------------------------------------------------------------------------
# The parent: bases, children, report


def write_base(shape: str, folder: Path) -> Path:
    """Compare's base for the big shapes (reused from results/tmp); the tiny one in the temp folder."""
    from benchmarks.compare import write_base as compare_base

    if shape in SHAPES:
        folder = RESULTS / "tmp" / f"base-{shape}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        return compare_base(shape, folder)
    if not (folder / "config.json").is_file():
        import torch

        from peftloop.models import save_pretrained
        from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig.from_dict(MEMORY_SHAPES[shape].config_dict()))
        model.init_weights(torch.Generator().manual_seed(42))
        save_pretrained(model, folder)
    return folder


def saved_for(saved: dict, dtype: str, variant: str) -> dict | None:
    """The saved-tensor record of a training variant: with or without recomputation."""
    return saved.get((dtype, parse_variant(variant)[2]))


def report(records: list[dict]) -> list[str]:
    saved = {(r["dtype"], parse_variant(r["variant"])[2]): r for r in records if r["kind"] == "saved"}
    groups = defaultdict(list)
    for r in records:
        if r["kind"] == "train":
            groups[(r["dtype"], r["variant"])].append(r)
    rows = []
    for (dtype, variant), runs in groups.items():
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        loaded = statistics.median(r["rss_after_load_mib"] for r in runs)
        step = statistics.median(r["median_step_s"] for r in runs)
        default = groups.get((dtype, "default"))
        base_step = statistics.median(r["median_step_s"] for r in default) if default else None
        base_peak = statistics.median(r["peak_rss_mib"] for r in default) if default else None
        s = saved_for(saved, dtype, variant)
        rows.append((dtype, variant, f"{peak:.0f}", f"{peak / base_peak:.2f}x" if base_peak else "-",
                     f"{loaded:.0f}", f"{peak - loaded:.0f}", f"{s['saved_mib']:.0f}" if s else "-",
                     f"{peak - loaded - s['saved_mib']:.0f}" if s else "-", f"{step:.2f}",
                     f"{step / base_step:.2f}x" if base_step else "-",
                     ", ".join(f"{r['peak_rss_mib']:.0f}" for r in runs)))
    lines = markdown_table(["dtype", "variant", "peak RSS (MiB)", "vs default", "after load", "step adds",
                            "saved tensors", "rest", "step (s)", "vs default", "peaks per pass"],
                           rows, align="llrrrrrrrrl")
    for (dtype, recompute), s in saved.items():
        per_layer = s["layers"]
        lines += ["", f"Saved for backward, {dtype}{', recompute' if recompute else ''}, one micro-batch of "
                  f"{s['tokens']} tokens: {s['saved_mib']:.1f} MiB; by dtype: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in s["by_dtype_mib"].items()), ""]
        in_layers = ("self_attn", "mlp", "input_", "post_")
        lines += markdown_table(
            ["saved by", "MiB (all layers)", "MiB per layer"],
            [(k, f"{v:.1f}", f"{v / per_layer:.2f}" if k.startswith(in_layers) else "-")
             for k, v in s["by_saver_mib"].items()], align="lrr")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(MEMORY_SHAPES), default="smollm")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default="default,mmap=1m,recompute+mmap=1m",
                        help="comma-separated: default, or mmap=<size>, trim and recompute joined by +")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    parser.add_argument("--passes", type=int, default=1, help="runs of each variant, alternating")
    parser.add_argument("--no-saved", action="store_true", help="skip the saved-tensor breakdown")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        kind, base, dtype, variant, *rest = args._child
        if kind == "saved":
            print(json.dumps(measure_saved(base, dtype, variant)))
        else:
            warmup, steps, workdir = rest
            print(json.dumps(measure_training(base, dtype, variant, int(warmup), int(steps), workdir)))
        return 0

    dtypes, variants = args.dtypes.split(","), args.variants.split(",")
    for variant in variants:
        parse_variant(variant)  # refuse a typo before anything runs
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        base = write_base(args.shape, Path(tmp) / "base")
        for dtype in dtypes:
            if not args.no_saved:
                for variant in ("default", "recompute"):
                    r = run_child("memory", ["--_child", "saved", str(base), dtype, variant])
                    records.append(r)
                    print(f"{dtype} {variant} saved {r['saved_mib']:.1f} MiB {r['by_saver_mib']}", flush=True)
            for _ in range(args.passes):
                for variant in variants:
                    r = run_child("memory", ["--_child", "train", str(base), dtype, variant, str(args.warmup),
                                             str(args.steps), str(Path(tmp) / "run")])
                    records.append(r)
                    print(f"{dtype} {variant:20s} peak {r['peak_rss_mib']:7.0f} MiB (after load "
                          f"{r['rss_after_load_mib']:.0f}), median step {r['median_step_s']:.2f} s, "
                          f"steps {[round(t, 2) for t in r['step_times_s']]}", flush=True)
    body = report(records)
    print("\n".join(body))
    if args.no_save:
        return 0
    meta = {"shape": args.shape, "seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH,
            "grad_accum": GRAD_ACCUM, "lora_r": 16, "target_modules": TARGETS, "warmup_steps": args.warmup,
            "measured_steps": args.steps, "passes": args.passes}
    intro = [f"Shape {args.shape}; micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens x {GRAD_ACCUM}; LoRA r=16 "
             f"on {', '.join(TARGETS)}; {args.warmup} warm-up + {args.steps} measured steps; peak RSS = "
             "ru_maxrss of a fresh process (imports included); 'rest' = peak - after load - saved tensors "
             "(temporaries, gradients, optimizer state, heap retention). See benchmarks/memory.py.", ""]
    write_results("memory", records, title=f"Memory of a LoRA step, {args.shape} shape", body=intro + body,
                  meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
