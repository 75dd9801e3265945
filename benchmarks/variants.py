"""Step time and peak memory of the LoRA variants on SmolLM2-135M's shape: LoRA, + gradient
checkpointing, QLoRA (NF4 + double quantisation), QLoRA + checkpointing, DoRA.

    python -m benchmarks.variants                    # every variant, 1 warm-up + 3 measured steps each
    python -m benchmarks.variants --steps 5 --only qlora,qlora_gc

The model has SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate
1536, vocabulary 49,152, tied embeddings) with random weights, written once as a bf16 safetensors
checkpoint (what the hub ships). Each variant runs in a fresh subprocess:

1. import torch and peftloop and load a one-layer checkpoint of the same width, so the imports,
   thread pools and allocator arenas exist before anything is measured;
2. read the resident set (VmRSS) as the baseline and reset the kernel's peak counter (VmHWM,
   ``echo 5 > /proc/self/clear_refs``);
3. load the checkpoint in fp32 (QLoRA: quantised to NF4 as it streams in, computing in fp32), inject
   LoRA r=16, alpha 32 on q, k, v, o, gate, up and down (DoRA: use_dora), turn on checkpointing if
   asked, and run ``peftloop.train`` for warm-up + measured optimizer steps: micro-batches of 4
   sequences of 256 random tokens, 2 per step (8 x 256 tokens a step), loss on every token, fp32;
4. report the median wall time of the measured steps (a callback timestamps each step's end),
   the resident growth after loading, and the peak growth (VmHWM - baseline) over the whole run.

Results go to benchmarks/results/variants-<machine>-<date>.{json,md}. The figures swing with
other load on the machine: run it when the machine is otherwise quiet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    SMOLLM2_135M,
    markdown_table,
    reset_peak,
    run_child,
    status_kib,
    write_results,
    write_smollm2_shape,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 256, 4, 2

# name -> (description, quantization, gradient checkpointing, DoRA)
VARIANTS = {
    "lora": ("LoRA", None, False, False),
    "lora_gc": ("LoRA + gradient checkpointing", None, True, False),
    "qlora": ("QLoRA (NF4, double quant)", "nf4", False, False),
    "qlora_gc": ("QLoRA + gradient checkpointing", "nf4", True, False),
    "dora": ("DoRA", None, False, True),
}


def _measure(variant: str, folder: str, tiny: str, warmup: int, steps: int, output_dir: str) -> dict:
    """Runs inside the subprocess: load, inject, train warmup + steps, measured."""
    import torch

    from peftloop.callbacks import Callback
    from peftloop.config import LoraConfig, TrainConfig
    from peftloop.inject import count_parameters, inject_lora
    from peftloop.models import enable_gradient_checkpointing, load_pretrained
    from peftloop.nf4 import nf4_layers
    from peftloop.train import train

    _, quantization, checkpointing, dora = VARIANTS[variant]
    # warm-up: imports, allocator, thread pools
    load_pretrained(tiny, dtype="fp32", quantization=quantization)
    baseline = reset_peak()
    start = time.perf_counter()
    model = load_pretrained(folder, dtype="fp32", quantization=quantization)
    load_seconds = time.perf_counter() - start
    loaded = status_kib("VmRSS") - baseline
    base_bytes = sum(p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values())
    linear_bytes = sum(p.untyped_storage().nbytes() for layer in nf4_layers(model).values()
                       for p in layer.parameters()) if quantization else \
        sum(4 * m.in_features * m.out_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head")
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=dora))
    if checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)

    class StepTimes(Callback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, state, metrics):
            self.ends.append(time.perf_counter())

    g = torch.Generator().manual_seed(0)
    n = MICRO_BATCH * GRAD_ACCUM * (warmup + steps)
    data = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(3, SMOLLM2_135M["vocab_size"], (n, SEQ_LEN), generator=g).tolist()]
    timer = StepTimes()
    config = TrainConfig(output_dir=output_dir, max_steps=warmup + steps, micro_batch_size=MICRO_BATCH,
                         grad_accum=GRAD_ACCUM, learning_rate=1e-4, shuffle=False, progress_bar=False,
                         log_every=10**6, precision="fp32")
    result = train(model, data, config=config, callbacks=[timer])
    durations = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {"variant": variant, "description": VARIANTS[variant][0], "quantization": quantization,
            "gradient_checkpointing": checkpointing, "dora": dora, "trainable_params": trainable,
            "total_params": total, "load_s": load_seconds, "loaded_mib": loaded / 1024,
            "model_mib": base_bytes / 2**20, "linear_weights_mib": linear_bytes / 2**20,
            "peak_growth_mib": (status_kib("VmHWM") - baseline) / 1024,
            "step_times_s": durations, "median_step_s": statistics.median(durations[warmup:]),
            "tokens_per_s": MICRO_BATCH * GRAD_ACCUM * SEQ_LEN / statistics.median(durations[warmup:]),
            "train_loss": result.train_loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before measuring")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        variant, folder, tiny, warmup, steps, out = args._child
        print(json.dumps(_measure(variant, folder, tiny, int(warmup), int(steps), out)))
        return 0

    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_smollm2_shape(Path(tmp), ("bf16",))
        for name in names:
            rec = run_child("variants", ["--_child", name, str(folders["bf16"]), str(folders["tiny"]),
                                         str(args.warmup), str(args.steps), str(Path(tmp) / f"run-{name}")])
            records.append(rec)
            print(f"{rec['description']:32s} median step {rec['median_step_s']:6.2f} s "
                  f"({rec['tokens_per_s']:5.0f} tok/s), peak +{rec['peak_growth_mib']:7.1f} MiB, "
                  f"model {rec['model_mib']:6.1f} MiB (Linear weights {rec['linear_weights_mib']:6.1f} MiB), "
                  f"steps {[round(t, 2) for t in rec['step_times_s']]}", flush=True)
    if args.no_save:
        return 0

    meta = {"shape": SMOLLM2_135M, "seq_len": SEQ_LEN, "micro_batch_size": MICRO_BATCH,
            "grad_accum": GRAD_ACCUM, "lora_r": 16, "lora_alpha": 32, "target_modules": TARGETS,
            "precision": "fp32", "warmup_steps": args.warmup, "measured_steps": args.steps,
            "method": "one fresh subprocess per variant; peak = VmHWM - VmRSS baseline after a warm-up load "
                      "(clear_refs), over load + training; step time = median of the measured steps"}
    lora = next((r for r in records if r["variant"] == "lora"), None)
    rows = [(r["description"], f"{r['median_step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
             f"{r['median_step_s'] / lora['median_step_s']:.2f}x" if lora else "-",
             f"{r['peak_growth_mib']:.0f}",
             f"{r['peak_growth_mib'] / lora['peak_growth_mib']:.2f}x" if lora else "-",
             f"{r['linear_weights_mib']:.1f}", f"{r['model_mib']:.1f}") for r in records]
    body = [(f"Model: SmolLM2-135M's shape ({records[0]['total_params']:,} parameters, tied embeddings), "
             "random weights, loaded in fp32 from a bf16 checkpoint (QLoRA: every Linear but the head in NF4 "
             "with double quantisation, computing in fp32)."),
            (f"Training: LoRA r=16, alpha 32 on {', '.join(TARGETS)}; {GRAD_ACCUM} micro-batches of "
             f"{MICRO_BATCH} x {SEQ_LEN} random tokens per step, loss on every token, fp32, AdamW; "
             f"{args.warmup} warm-up + {args.steps} measured steps."),
            f"Method: {meta['method']} (see benchmarks/variants.py).",
            "",
            *markdown_table(["variant", "median step (s)", "tokens/s", "step time vs LoRA",
                             "peak growth (MiB)", "peak vs LoRA", "Linear weights (MiB)",
                             "model after load (MiB)"], rows,
                            align="lrrrrrrr")]
    write_results("variants", records,
                  title="LoRA variants: step time and peak memory, SmolLM2-135M's shape",
                  body=body, meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
