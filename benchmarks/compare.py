"""peftloop against transformers.Trainer + peft (and a plain loop over the peft model), side by side.

    python -m benchmarks.compare                       # everything: small + smollm, fp32 + bf16
    python -m benchmarks.compare --models small --dtypes fp32 --passes 1   # a quick look

For each (model, dtype) every system trains the same LoRA job (``benchmarks/run_one.py``) in its
own process, the systems alternating (A B C A B C ...) so that drift of a shared machine falls on
all of them alike. Reported per configuration: the median step time after warm-up, tokens/s,
peak RSS, achieved GFLOP/s and its fraction of this machine's GEMM peak (measured in the same
run), and the ratios peftloop / Trainer. The spread between passes says how noisy the machine was.

A parity run trains 20 steps in fp32 from one initial adapter with no dropout in both systems and
compares the loss curves step by step. Results go to
``benchmarks/results/compare-<machine>-<date>.{json,md}``, the plot beside them (``.png``), and the
table into ``docs/benchmarks.md`` (unless ``--no-docs``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    ROOT,
    SHAPES,
    command_line,
    machine,
    markdown_table,
    result_stem,
    write_results,
)

DOCS = ROOT / "docs" / "benchmarks.md"
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"


def missing_references() -> list[str]:
    return [m for m in ("transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]


def write_base(shape_name: str, folder: Path) -> Path:
    """Random weights (seed 42) in Hugging Face format: the one base every system loads."""
    if (folder / "config.json").is_file():
        return folder
    code = (
        "import json, sys, torch\n"
        "from peftloop.models.llama import LlamaConfig, LlamaForCausalLM\n"
        "from peftloop.models import save_pretrained\n"
        "config = LlamaConfig.from_dict(json.loads(sys.argv[1]))\n"
        "model = LlamaForCausalLM(config)\n"
        "model.init_weights(torch.Generator().manual_seed(42))\n"
        "save_pretrained(model, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(SHAPES[shape_name].config_dict()), str(folder)],
                   check=True)
    return folder


def gemm_peak(threads: int) -> dict[str, float]:
    """GFLOP/s of a 2048^3 matmul (x·Wᵀ) in fp32 and bf16 on this machine, best of 5, in a fresh process.
    (On CPUs without native bf16, a bf16 x·W in the other layout can be 10x slower still.)"""
    code = (
        "import json, time, torch\n"
        f"torch.set_num_threads({threads}) if {threads} else None\n"
        "out = {}\n"
        "for name, dt in (('fp32', torch.float32), ('bf16', torch.bfloat16)):\n"
        "    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)\n"
        "    f = lambda: torch.nn.functional.linear(a, b)  # x·Wᵀ, the layout of every Linear forward\n"
        "    f()\n"
        "    best = min((lambda t: (f(), time.perf_counter() - t)[1])(time.perf_counter())"
        " for _ in range(5))\n"
        "    out[name] = 2 * 2048**3 / best / 1e9\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def run(system: str, base: Path, dtype: str, args, workdir: Path, parity_adapter: Path | None = None,
        steps: int | None = None) -> dict:
    out = workdir / f"{system}-{dtype}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.run_one", "--system", system, "--base", str(base),
           "--dtype", dtype, "--steps", str(steps or args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--workdir", str(workdir / "runs"), "--out", str(out)]
    if parity_adapter:
        cmd += ["--parity", "--adapter", str(parity_adapter), "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} {dtype} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def load_average() -> float:
    return os.getloadavg()[0]


def summarize(runs: list[dict], shape_name: str, dtype: str, peak: dict[str, float]) -> dict:
    """Median over passes of each system's median step; spread = max/min of those medians - 1."""
    shape = SHAPES[shape_name]
    tokens = 256 * 4 * 2
    flops = shape.flops_per_token_step(256) * tokens
    out = {}
    for system in sorted({r["system"] for r in runs}):
        mine = [r for r in runs if r["system"] == system]
        medians = sorted(r["median_step_s"] for r in mine)
        step = medians[len(medians) // 2]
        out[system] = {
            "median_step_s": step, "tokens_per_s": tokens / step,
            "peak_rss_mib": sorted(r["peak_rss_mib"] for r in mine)[len(mine) // 2],
            "gflops": flops / step / 1e9, "of_gemm_peak": flops / step / 1e9 / peak[dtype],
            "spread": medians[-1] / medians[0] - 1, "passes": len(mine),
        }
    if "peftloop" in out and "trainer" in out:
        out["ratio"] = {"tokens_per_s": out["peftloop"]["tokens_per_s"] / out["trainer"]["tokens_per_s"],
                        "peak_rss": out["peftloop"]["peak_rss_mib"] / out["trainer"]["peak_rss_mib"]}
    return out


def parity(base: Path, args, workdir: Path, steps: int) -> dict:
    """Same initial adapter, same data order, fp32, no dropout: the loss curves must agree."""
    adapter = workdir / "parity-adapter"
    code = ("import sys; from pathlib import Path; from benchmarks.run_one import initial_adapter; "
            "initial_adapter(Path(sys.argv[1]), Path(sys.argv[2]), 0.0)")
    subprocess.run([sys.executable, "-c", code, str(base), str(adapter)], check=True, cwd=ROOT)
    curves = {s: run(s, base, "fp32", args, workdir, parity_adapter=adapter, steps=steps)
              for s in ("peftloop", "trainer")}
    a, b = curves["peftloop"]["losses"], curves["trainer"]["losses"]
    return {"steps": steps, "peftloop": a, "trainer": b,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
            "step_times": {s: c["step_times_s"] for s, c in curves.items()}}


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if results.get("parity"):
        par = results["parity"]
        steps = range(1, par["steps"] + 1)
        ax1.plot(steps, par["trainer"], "o-", label="Trainer + peft", alpha=0.7)
        ax1.plot(steps, par["peftloop"], "x--", label="peftloop")
        ax1.set(title=f"loss, same start, fp32 ({par['model']}); max |diff| {par['max_abs_diff']:.1e}",
                xlabel="step", ylabel="loss")
        ax1.legend()
    labels, values, colors = [], [], []
    palette = {"peftloop": "tab:orange", "trainer": "tab:blue", "handloop": "tab:green"}
    for key, summary in results["configs"].items():
        for system in ("trainer", "handloop", "peftloop"):
            if system in summary:
                labels.append(f"{key}\n{system}")
                values.append(summary[system]["median_step_s"])
                colors.append(palette[system])
    ax2.barh(labels, values, color=colors)
    ax2.set(title="median step time (s), lower is better", xscale="log")
    ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def conditions(results: dict) -> str:
    """The machine's state during the run: its GEMM peak and its load."""
    return (f"GEMM peak (2048^3): fp32 {results['gemm_peak']['fp32']:.0f}, "
            f"bf16 {results['gemm_peak']['bf16']:.0f} "
            f"GFLOP/s. Load average {results['load_before']:.2f} before, {results['load_after']:.2f} after.")


def tables(results: dict) -> list[str]:
    """Every system's figures per configuration, the peftloop / Trainer ratios and the parity line."""
    names = {"peftloop": "peftloop", "trainer": "Trainer + peft", "handloop": "plain loop + peft"}
    rows, ratios = [], []
    for key, s in results["configs"].items():
        model, dtype = key.split("/")
        for system in ("trainer", "handloop", "peftloop"):
            if system in s:
                r = s[system]
                rows.append((model, dtype, names[system], f"{r['median_step_s']:.3f}",
                             f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f} MiB", f"{r['gflops']:.0f}",
                             f"{100 * r['of_gemm_peak']:.0f}%", f"{100 * r['spread']:.0f}%"))
        if "ratio" in s:
            ratios.append((model, dtype, f"**{s['ratio']['tokens_per_s']:.2f}x**",
                           f"**{s['ratio']['peak_rss']:.2f}x**"))
    lines = [*markdown_table(["model", "dtype", "system", "s/step", "tokens/s", "peak RSS", "GFLOP/s",
                              "of GEMM peak", "spread"], rows),
             "",
             *markdown_table(["model", "dtype", "tokens/s peftloop / Trainer", "peak RSS peftloop / Trainer"],
                             ratios)]
    if results.get("parity"):
        p = results["parity"]
        lines += ["", (f"Loss-curve parity ({p['model']}, fp32, same initial adapter, no dropout, "
                       f"{p['steps']} steps): max |peftloop - Trainer| = {p['max_abs_diff']:.2e} per step.")]
    return lines


def markdown(results: dict, command: str) -> str:
    """The table for docs/benchmarks.md, with the run's conditions and command above it."""
    lines = [(f"Measured {results['date']} on {results['machine']}, torch {results['torch']} "
              f"({results['threads']} threads); {conditions(results)} Command: `{command}`"),
             "",
             *tables(results)]
    if results.get("plot"):  # relative to docs/, as the page links it
        lines += ["", f"![loss curves and step times](../benchmarks/results/{Path(results['plot']).name})"]
    return "\n".join(lines)


def update_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    DOCS.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small,smollm")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--systems", default="peftloop,trainer,handloop")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (warm-up included)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parity-steps", type=int, default=20)
    p.add_argument("--parity-model", default="small")
    p.add_argument("--configs", help="explicit model/dtype pairs instead of --models x --dtypes, e.g. "
                                      "small/fp32,small/bf16,smollm/fp32")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    args = p.parse_args()
    command = command_line("compare")

    systems = args.systems.split(",")
    missing = missing_references()
    if missing:
        print(f"benchmarks: {', '.join(missing)} not installed (pip install -e '.[bench]'); "
              f"measuring peftloop alone, without ratios or parity")
        systems = ["peftloop"]
    work = RESULTS / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    import torch

    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "threads": args.threads or torch.get_num_threads(), "load_before": load_average(),
               "gemm_peak": gemm_peak(args.threads), "configs": {}, "runs": []}
    print(f"machine: {results['machine']}; GEMM peak fp32 {results['gemm_peak']['fp32']:.0f}, "
          f"bf16 {results['gemm_peak']['bf16']:.0f} GFLOP/s")
    if args.configs:
        pairs = [tuple(c.split("/")) for c in args.configs.split(",")]
    else:
        pairs = [(m, d) for m in args.models.split(",") for d in args.dtypes.split(",")]
    for model, dtype in pairs:
        if model not in SHAPES or dtype not in ("fp32", "bf16"):
            p.error(f"unknown configuration {model}/{dtype}: models {', '.join(SHAPES)}, dtypes fp32, bf16")
    for model, dtype in pairs:
        base = write_base(model, work / f"base-{model}")
        runs = []
        for n in range(args.passes):
            order = systems if n % 2 == 0 else list(reversed(systems))
            for system in order:
                r = run(system, base, dtype, args, work)
                r.update(model=model, pass_index=n)
                runs.append(r)
                print(f"{model:7s} {dtype} {system:9s} pass {n}: {r['median_step_s']:.3f} s/step, "
                      f"{r['peak_rss_mib']:.0f} MiB", flush=True)
        results["configs"][f"{model}/{dtype}"] = summarize(runs, model, dtype, results["gemm_peak"])
        results["runs"] += runs
    if "trainer" in systems and args.parity_steps:
        base = write_base(args.parity_model, work / f"base-{args.parity_model}")
        results["parity"] = {"model": args.parity_model, **parity(base, args, work, args.parity_steps)}
        print(f"parity: max |loss diff| over {args.parity_steps} steps = "
              f"{results['parity']['max_abs_diff']:.2e}")
    results["load_after"] = load_average()

    stem = result_stem("compare", results["machine"], results["date"])
    figure = plot(results, stem.with_suffix(".png"))
    results["plot"] = str(figure.relative_to(ROOT)) if figure else ""  # no machine paths in the results
    body = [f"{results['threads']} threads. {conditions(results)}", "", *tables(results)]
    if figure:  # relative to this file
        body += ["", f"![loss curves and step times]({figure.name})"]
    head = ("machine", "date", "torch", "runs")
    write_results("compare", results["runs"], title="peftloop against transformers.Trainer + peft", body=body,
                  meta={k: v for k, v in results.items() if k not in head}, machine_name=results["machine"],
                  date=results["date"])
    table = markdown(results, command)
    print("\n" + table)
    if not args.no_docs:
        update_docs(table)
    shutil.rmtree(work / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
