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
Results go to benchmarks/results/load_memory-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
    baseline = reset_peak()
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
            "resident_growth_mib": (after - baseline) / 1024,
            "peak_over_weights": (peak - baseline) * 1024 / weights, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", action="store_true",
                        help="also measure transformers' from_pretrained")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_measure(*args._child)))
        return 0

    loaders = ["peftloop", "transformers"] if args.transformers else ["peftloop"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_smollm2_shape(Path(tmp), ("fp32", "bf16"))
        for loader in loaders:
            for file_dtype, dtype in (("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp32")):
                rec = run_child("load_memory", ["--_child", loader, str(folders[file_dtype]),
                                                str(folders["tiny"]), dtype])
                records.append(rec)
                print(f"{loader:12s} {file_dtype} file -> {dtype}: weights {rec['weights_mib']:7.1f} MiB, "
                      f"peak +{rec['peak_growth_mib']:7.1f} MiB ({rec['peak_over_weights']:.2f}x), "
                      f"resident after +{rec['resident_growth_mib']:7.1f} MiB, {rec['seconds']:.2f} s",
                      flush=True)
    if args.no_save:
        return 0

    method = ("peak RSS growth (VmHWM after clear_refs) over a warmed-up process, "
              "one load per fresh subprocess")
    rows = [(r["loader"], r["file_dtype"], r["dtype"], f"{r['weights_mib']:.1f}",
             f"{r['peak_growth_mib']:.1f}", f"{r['peak_over_weights']:.2f}x",
             f"{r['resident_growth_mib']:.1f}", f"{r['seconds']:.2f}")
            for r in records]
    body = [(f"Checkpoint: SmolLM2-135M's shape ({records[0]['parameters']:,} parameters, tied embeddings), "
             "random weights, one model.safetensors."),
            f"Method: {method} (see benchmarks/load_memory.py).",
            "",
            *markdown_table(["loader", "file", "loaded as", "weights (MiB)", "peak growth (MiB)",
                             "peak / weights", "resident after (MiB)", "time (s)"], rows, align="lllrrrrr")]
    write_results("load_memory", records, title="Loading peak memory: SmolLM2-135M's shape", body=body,
                  meta={"shape": SMOLLM2_135M, "method": method})
    return 0


if __name__ == "__main__":
    sys.exit(main())
