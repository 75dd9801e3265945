"""Each Triton kernel against torch eager and torch.compile at Llama-1B and Llama-8B layer shapes, in bf16.

    python -m benchmarks.gpu_kernels          # one GPU, about 3-5 minutes (most of it torch.compile)
    python -m benchmarks.gpu_kernels --ops lora_linear,linear_cross_entropy --shapes llama-8b
    python -m benchmarks.gpu_kernels --smoke  # tiny shapes on the CPU (Triton interpreted): checks the script
    python -m benchmarks.gpu_kernels --budget 120   # stop starting new cases after 120 s (gpu_suite)

Providers: "peftloop" runs the op under ``backend("triton")`` (the fused kernels), "eager"
runs its plain-torch reference (``backend("reference")``), "compile" runs
``torch.compile`` of that same reference. Modes: "forward" and "full" (forward + backward).
Metrics: time in ms (p50, with p20 and p80, from ``triton.testing.do_bench``) and the peak
memory the op adds on top of its inputs (``torch.cuda.max_memory_allocated``), plus the
largest difference between the peftloop and eager outputs as a sanity check.

Shape by shape, the cases run the kernels and eager first, then ``torch.compile`` (the slow part:
it compiles each case), so a ``--budget`` that runs out drops the last shapes and compile figures
first; the cases left out and any case that raised are listed in the JSON (``skipped``, ``errors``).

Results go to benchmarks/results/gpu_kernels-<gpu>-<date>.json (one record per measurement, in the
schema of Liger's benchmark CSV: kernel, provider, mode, metric, unit, x, p50/p20/p80; the GPU is
the file's "machine") and a markdown table beside it (.md).

Not run yet on a GPU: ``python -m benchmarks.gpu_suite`` runs it there with the kernel tests and the
end-to-end comparison; the first GPU run should commit its results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import torch

import peftloop.kernels as K
from benchmarks.common import RESULTS, machine, markdown_table, write_results
from peftloop.kernels import backend


@dataclass(frozen=True)
class Shape:
    """One decoder layer's sizes, with the tokens of one micro-batch."""

    name: str
    tokens: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rank: int = 16


SHAPES = {
    # Llama-3.2-1B and Llama-3.1-8B (hidden, intermediate, heads, kv heads, head dim, vocabulary);
    # 4,096 tokens
    "llama-1b": Shape("llama-1b", 4096, 2048, 8192, 32, 8, 64, 128256),
    "llama-8b": Shape("llama-8b", 4096, 4096, 14336, 32, 8, 128, 128256),
}
SMOKE_SHAPE = Shape("smoke", 24, 32, 48, 4, 2, 8, 80, rank=4)
OPS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear", "lora_linear_dropout")


def make_case(op: str, s: Shape, device, dtype=torch.bfloat16):
    """(function of the inputs, inputs, the inputs whose gradients the backward computes)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    if op == "rms_norm":  # the LoRA case: the norm's weight is frozen
        x, w = randn(s.tokens, s.hidden, grad=True), randn(s.hidden) + 1.0
        return (lambda x, w: K.rms_norm(x, w, 1e-5)), (x, w), (x,)
    if op == "rope":  # q/k as the attention layer has them: [B, T, H, D] projections viewed as [B, H, T, D]
        q = randn(1, s.tokens, s.heads, s.head_dim).transpose(1, 2).requires_grad_()
        k = randn(1, s.tokens, s.kv_heads, s.head_dim).transpose(1, 2).requires_grad_()
        angles = (torch.arange(s.tokens, device=device)[:, None]
                  * torch.rand(s.head_dim // 2, generator=g).to(device))
        emb = torch.cat([angles, angles], -1)[None]
        return K.apply_rope, (q, k, emb.cos().to(dtype), emb.sin().to(dtype)), (q, k)
    if op == "swiglu":
        gate, up = randn(s.tokens, s.intermediate, grad=True), randn(s.tokens, s.intermediate, grad=True)
        return K.swiglu, (gate, up), (gate, up)
    if op == "linear_cross_entropy":  # frozen head (LoRA), 10% of the labels masked
        hidden = randn(s.tokens, s.hidden, grad=True)
        head = randn(s.vocab, s.hidden, scale=s.hidden**-0.5)
        labels = torch.randint(0, s.vocab, (s.tokens,), generator=g).to(device)
        labels[::10] = -100
        return (lambda h, w, y: K.linear_cross_entropy(h, w, y)), (hidden, head, labels), (hidden,)
    if op in ("lora_linear", "lora_linear_dropout"):  # gate_proj with a rank-16 adapter
        # With dropout each provider draws its mask as it would in training: the kernels from
        # the seed inside the kernels, eager/compile a Bernoulli mask per call (so their
        # outputs differ, and no difference is reported).
        p = 0.1 if op == "lora_linear_dropout" else 0.0
        x = randn(s.tokens, s.hidden, grad=True)
        w = randn(s.intermediate, s.hidden, scale=s.hidden**-0.5)
        a = randn(s.rank, s.hidden, scale=s.hidden**-0.5, grad=True)
        b = randn(s.intermediate, s.rank, scale=0.1, grad=True)
        return (lambda x, w, a, b: K.lora_linear(x, w, None, a, b, 2.0, dropout_p=p, seed=1234)), \
            (x, w, a, b), (x, a, b)
    raise ValueError(op)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def provider_fn(provider: str, fn):
    """The op as this provider runs it: kernels, eager reference, or compiled reference."""
    if provider == "peftloop":
        def run(*args):
            with backend("triton"):
                return fn(*args)
        return run
    if provider == "eager":
        def run(*args):
            with backend("reference"):
                return fn(*args)
        return run
    with backend("reference"):  # dynamo traces the reference ops
        compiled = torch.compile(fn, dynamic=False)

    def run(*args):
        with backend("reference"):
            return compiled(*args)
    return run


def timed(step, device, smoke: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds."""
    if smoke:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[1], times[0], times[2]
    import triton

    p50, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return p50, p20, p80


def measure(op: str, shape: Shape, provider: str, device, smoke: bool) -> list[dict]:
    fn, inputs, wrt = make_case(op, shape, device)
    run = provider_fn(provider, fn)
    cotangents = [torch.randn_like(o) for o in _outputs(run(*inputs))]  # also compiles / autotunes

    def forward():
        with torch.no_grad():
            run(*inputs)

    def full():
        outs = _outputs(run(*inputs))
        torch.autograd.grad(outs, wrt, cotangents)

    full()  # compile / autotune the backward too
    records = []
    for mode, step in (("forward", forward), ("full", full)):
        p50, p20, p80 = timed(step, device, smoke)
        records.append({"metric": "time", "unit": "ms", "mode": mode, "p50": p50, "p20": p20, "p80": p80})
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            records.append({"metric": "memory", "unit": "MiB", "mode": mode,
                            "p50": peak, "p20": peak, "p80": peak})
    diff = None
    if op != "lora_linear_dropout":
        with torch.no_grad():
            ours = _outputs(provider_fn("peftloop", fn)(*inputs))
            ref = _outputs(provider_fn("eager", fn)(*inputs))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, ref))
    for r in records:
        r.update(kernel=op, provider=provider, x=shape.name, max_abs_diff_vs_eager=diff)
    return records


def gpu_name(device) -> str:
    """The GPU and its CUDA version (as every benchmark names a GPU machine), or the smoke test's label."""
    return machine() if device.type == "cuda" else "cpu (smoke test, Triton interpreted)"


def write(records: list[dict], device, results=RESULTS, skipped=(), errors=()) -> None:
    rows = []
    index = {(r["kernel"], r["x"], r["mode"], r["provider"], r["metric"]): r for r in records}
    for kernel, x, mode in sorted({(r["kernel"], r["x"], r["mode"]) for r in records}):
        t = {p: index.get((kernel, x, mode, p, "time")) for p in ("peftloop", "eager", "compile")}
        m = {p: index.get((kernel, x, mode, p, "memory")) for p in ("peftloop", "eager")}
        speed = f"{t['eager']['p50'] / t['peftloop']['p50']:.2f}x" if t["eager"] and t["peftloop"] else "-"
        mem = f"{m['peftloop']['p50']:.0f} / {m['eager']['p50']:.0f}" if m["peftloop"] and m["eager"] else "-"
        rows.append((kernel, x, mode, _cell(t["peftloop"]), _cell(t["eager"]), _cell(t["compile"]),
                     speed, mem))
    gpu = gpu_name(device)
    body = ["bf16. Time: p50 ms (p20-p80). Memory: peak MiB over the inputs. Speed-up: eager / peftloop.", "",
            *markdown_table(["kernel", "shape", "mode", "peftloop", "eager", "compile", "speed-up",
                             "memory peftloop / eager (MiB)"], rows, align="llllllrl")]
    if skipped:
        body += ["", f"Not measured (over the time budget): {', '.join('/'.join(c) for c in skipped)}."]
    for e in errors:
        body += ["", f"Failed: {e['x']} {e['kernel']} {e['provider']}: `{e['error']}`"]
    write_results("gpu_kernels", records, title=f"Triton kernels vs torch eager and torch.compile ({gpu})",
                  body=body, machine_name=gpu, libraries=("torch", "triton"), results=results,
                  meta={"dtype": "bf16", "skipped": ["/".join(c) for c in skipped], "errors": list(errors)})


def _cell(record: dict | None) -> str:
    return f"{record['p50']:.3f} ({record['p20']:.3f}-{record['p80']:.3f})" if record else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--providers", default="peftloop,eager,compile")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds: start no new case after this (0: no limit)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    if args.smoke:
        device, shapes = torch.device("cpu"), [SMOKE_SHAPE]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --smoke to check the script on the CPU",
                  file=sys.stderr)
            return 2
        device, shapes = torch.device("cuda"), [SHAPES[s] for s in args.shapes.split(",")]
    start = time.perf_counter()
    records, skipped, errors = [], [], []
    for shape, op, provider in plan(shapes, args.ops.split(","), args.providers.split(",")):
        if args.budget and time.perf_counter() - start > args.budget:
            skipped.append((shape.name, op, provider))
            continue
        t0 = time.perf_counter()
        try:
            recs = measure(op, shape, provider, device, args.smoke)
        except Exception as e:  # one case that fails (a kernel error, out of memory) must not lose the rest
            errors.append({"x": shape.name, "kernel": op, "provider": provider,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
            print(f"{shape.name:9s} {op:22s} {provider:9s} FAILED {errors[-1]['error']}", flush=True)
            continue
        records += recs
        summary = "  ".join(f"{r['mode']} {r['p50']:.3f} {r['unit']}" for r in recs)
        diff = recs[0]["max_abs_diff_vs_eager"]
        print(f"{shape.name:9s} {op:22s} {provider:9s} {summary}  "
              f"diff {'-' if diff is None else f'{diff:.3g}'}"
              f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"total {time.perf_counter() - start:.0f}s"
          + (f"; over the budget, not measured: {len(skipped)} case(s)" if skipped else ""))
    if not args.no_save:
        write(records, device, args.results, skipped, errors)
    return 1 if errors else 0


def plan(shapes: list[Shape], ops: list[str], providers: list[str]) -> list[tuple[Shape, str, str]]:
    """Every (shape, op, provider), shape by shape, and within a shape torch.compile last: it takes
    most of the time (a compilation per case), so a budget that runs out costs the compile figures
    of a shape before its kernels' own, and the last shapes before the first."""
    return [(shape, op, provider) for shape in shapes
            for compiled in (False, True) for op in ops for provider in providers
            if (provider == "compile") == compiled]


if __name__ == "__main__":
    sys.exit(main())
