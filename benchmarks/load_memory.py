"""Peak memory of loading a checkpoint: ``peftloop.models.load_pretrained`` against the size of the weights.

    python -m benchmarks.load_memory                   # SmolLM2-135M's shape, random weights
    python -m benchmarks.load_memory --transformers    # also transformers' from_pretrained, for reference

The checkpoint has SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49,152, tied embeddings) with random weights, written once by
peftloop's save_pretrained to a temporary folder, as a bf16 file (what the hub ships) and as an
fp32 file. Each variant runs in a fresh subprocess:

1. import torch and peftloop and load a tiny checkpoint once, so the imports, thread pools and
   allocator arenas exist before the measurement;
2. read the resident set (VmRSS) as the baseline and reset the kernel's peak counter
   (``echo 5 > /proc/self/clear_refs`` resets VmHWM, Linux >= 4.0);
3. load the checkpoint and read every weight once (``p.sum()``, no copy), then read the peak
   (VmHWM) and the resident set.

peak growth = VmHWM - baseline: every page the load touched, including file pages that a
memory-mapping reader maps (they count in RSS once touched, hence step 3's read: without it a
lazily mapped model would look free until its first forward pass). The weights' size is the bytes of the
model's parameters in the target dtype (the tied embedding counted once). "peak / weights" is
the figure docs/models.md quotes: 1.0x would be no overhead at all.
Results go to benchmarks/results/load_memory-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, slug, status_kib

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def write_checkpoints(root: Path) -> dict[str, Path]:
    """The SmolLM2-135M shape with random weights, as a bf16 and as an fp32 checkpoint, and a tiny one."""
    import torch

    from peftloop.models import save_pretrained
    from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

    folders = {}
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.init_weights(torch.Generator().manual_seed(0))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        folders[name] = save_pretrained(model.to(dtype), root / f"smollm2-135m-shape-{name}")
    tiny = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": 1, "vocab_size": 64}))
    folders["tiny"] = save_pretrained(tiny, root / "tiny")
    return folders


def _measure(loader: str, folder: str, tiny: str, dtype_name: str) -> dict:
    """Runs inside the subprocess: one load, measured."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if loader == "peftloop":
        from peftloop.models import load_pretrained

        def load(path):
            return load_pretrained(path, dtype=dtype_name)
    else:
        import transformers

        def load(path):
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    load(tiny)  # warm-up: imports, allocator, thread pools
    baseline = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    model = load(folder)
    seconds = time.perf_counter() - start
    params = {id(p): p for p in model.parameters()}.values()  # the tied embedding once
    with torch.no_grad():  # read every weight once: a memory-mapped loader's pages count only when touched
        for p in params:
            p.sum()
    peak, after = status_kib("VmHWM"), status_kib("VmRSS")
    weights = sum(p.numel() * p.element_size() for p in params)
    assert all(p.dtype == dtype for p in params)
    return {"loader": loader, "file_dtype": Path(folder).name.rsplit("-", 1)[-1], "dtype": dtype_name,
            "parameters": sum(p.numel() for p in params), "weights_mib": weights / 2**20,
            "baseline_mib": baseline / 1024, "peak_growth_mib": (peak - baseline) / 1024,
            "resident_growth_mib": (after - baseline) / 1024, "peak_over_weights": (peak - baseline) * 1024 / weights,
            "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", action="store_true", help="also measure transformers' from_pretrained")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_measure(*args._child)))
        return 0

    loaders = ["peftloop", "transformers"] if args.transformers else ["peftloop"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_checkpoints(Path(tmp))
        for loader in loaders:
            for file_dtype, dtype in (("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp32")):
                cmd = [sys.executable, "-m", "benchmarks.load_memory", "--_child", loader, str(folders[file_dtype]), str(folders["tiny"]),
                       dtype]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                records.append(rec)
                print(f"{loader:12s} {file_dtype} file -> {dtype}: weights {rec['weights_mib']:7.1f} MiB, peak "
                      f"+{rec['peak_growth_mib']:7.1f} MiB ({rec['peak_over_weights']:.2f}x), resident after "
                      f"+{rec['resident_growth_mib']:7.1f} MiB, {rec['seconds']:.2f} s", flush=True)
    if args.no_save:
        return 0

    import torch

    where = machine()
    meta = {"benchmark": "load_memory", "machine": where, "torch": torch.__version__, "shape": SMOLLM2_135M,
            "method": "peak RSS growth (VmHWM after clear_refs) over a warmed-up process, one load per fresh "
                      "subprocess", "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"load_memory-{slug(where)}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    md = ["# Loading peak memory: SmolLM2-135M's shape",
          "",
          f"Machine: {where}; torch {torch.__version__}; {meta['date']}.",
          f"Checkpoint: SmolLM2-135M's shape ({records[0]['parameters']:,} parameters, tied embeddings), random "
          "weights, one model.safetensors.",
          f"Method: {meta['method']} (see benchmarks/load_memory.py).",
          f"Command: `python -m benchmarks.load_memory{' --transformers' if args.transformers else ''}`",
          "",
          "| loader | file | loaded as | weights (MiB) | peak growth (MiB) | peak / weights | resident after (MiB) "
          "| time (s) |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        md.append(f"| {r['loader']} | {r['file_dtype']} | {r['dtype']} | {r['weights_mib']:.1f} | "
                  f"{r['peak_growth_mib']:.1f} | {r['peak_over_weights']:.2f}x | {r['resident_growth_mib']:.1f} | "
                  f"{r['seconds']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
