"""peftloop against transformers.Trainer + peft, side by side: a synthetic job and a realistic one.

    python -m benchmarks.compare                       # both workloads at their default sizes
    python -m benchmarks.compare --workloads chat      # the realistic workload alone (smollm, bf16 + fp32)
    python -m benchmarks.compare --workloads synthetic --models small --dtypes fp32 --passes 1  # quick

Synthetic job: for each (model, dtype) every system (peftloop, the Trainer, a plain loop over the
peft model) trains the same LoRA job on 256-token sequences, every token labelled
(``benchmarks/run_one.py``), each in its own process, the systems alternating (A B C, C B A) so
that drift of a shared machine falls on all of them alike. Reported: the median step time after
warm-up, tokens/s, peak RSS, achieved GFLOP/s and its fraction of this machine's GEMM peak
(measured in the same run), the ratios peftloop / Trainer, and the spread between passes.

Realistic workload (``benchmarks/workload.py``): one epoch over the same instruction records
(realistic lengths, prompts masked) through each system's real data path: peftloop packed and
padded (grouped by length), the Trainer padded, grouped by length and padding-free
(``DataCollatorWithFlattening``). Reported: label tokens/s and real (non-pad) tokens/s over the
epoch, the epoch's time, peak RSS, and peftloop's best against the Trainer's best configuration.

A parity run trains 20 steps in fp32 from one initial adapter with no dropout in both systems on
the synthetic job's learnable data and compares the loss curves step by step. Both workloads are
checked against the targets (``TARGETS``). Results go to
``benchmarks/results/compare-<machine>-<date>.{json,md}``, the plot beside them (``.png``), and the
tables into ``docs/benchmarks.md`` (unless ``--no-docs``).
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
from benchmarks.workload import chat_examples, length_stats

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
        steps: int | None = None, workload: str = "synthetic") -> dict:
    out = workdir / f"{system}-{dtype}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.run_one", "--system", system, "--base", str(base),
           "--dtype", dtype, "--steps", str(steps or args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--workdir", str(workdir / "runs"), "--out", str(out)]
    if workload == "chat":
        cmd += ["--workload", "chat", "--examples", str(args.chat_examples),
                "--max-seq-len", str(args.chat_max_seq_len), "--warmup", "1"]
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


CHAT_SYSTEMS = ("trainer_padded", "trainer_grouped", "trainer_flattening",
                "peftloop_padded", "peftloop_packed")
CHAT_NAMES = {"trainer_padded": "Trainer, padded", "trainer_grouped": "Trainer, grouped by length",
              "trainer_flattening": "Trainer, padding-free (flattening)",
              "peftloop_padded": "peftloop, padded (grouped by length)",
              "peftloop_packed": "peftloop, packed"}


def best_of(summary: dict, prefix: str) -> str | None:
    """The configuration of one system (its names start with ``prefix``) with the most label tokens/s."""
    mine = [s for s in summary if s.startswith(prefix)]
    return max(mine, key=lambda s: summary[s]["label_tokens_per_s"]) if mine else None


def summarize_chat(runs: list[dict]) -> dict:
    """Per system, the upper median over passes of the epoch's time; throughput = the epoch's label
    (or real) tokens / that time; the ratio of peftloop's best configuration to the Trainer's best."""
    out = {}
    for system in sorted({r["system"] for r in runs}):
        mine = sorted((r for r in runs if r["system"] == system), key=lambda r: r["epoch_s"])
        run = mine[len(mine) // 2]
        out[system] = {
            "epoch_s": run["epoch_s"], "label_tokens_per_s": run["label_tokens"] / run["epoch_s"],
            "real_tokens_per_s": run["real_tokens"] / run["epoch_s"],
            "peak_rss_mib": sorted(r["peak_rss_mib"] for r in mine)[len(mine) // 2],
            "padding": 1 - run["real_tokens"] / run["processed_tokens"], "steps": run["steps"],
            "examples_per_step": run["examples_per_step"], "losses": run["losses"],
            "label_tokens_seen": run.get("label_tokens_seen") or list(range(1, len(run["losses"]) + 1)),
            "spread": mine[-1]["epoch_s"] / mine[0]["epoch_s"] - 1, "passes": len(mine),
        }
    ours, theirs = best_of(out, "peftloop"), best_of(out, "trainer")
    if ours and theirs:
        speed = out[ours]["label_tokens_per_s"] / out[theirs]["label_tokens_per_s"]
        out["ratio"] = {"peftloop": ours, "trainer": theirs, "label_tokens_per_s": speed,
                        "peak_rss": out[ours]["peak_rss_mib"] / out[theirs]["peak_rss_mib"]}
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


TARGETS = {  # (workload, dtype) on the SmolLM2-135M shape: peftloop's tokens/s over the Trainer's
    ("chat", "bf16"): 2.0, ("chat", "fp32"): 1.6, ("synthetic", "bf16"): 1.6, ("synthetic", "fp32"): 1.4}
TARGET_MODEL, GEMM_PEAK_TARGET, RSS_TARGET = "smollm", 0.55, 0.4


def targets(results: dict) -> list[tuple[str, str, str, bool]]:
    """(target, the measured figure, its bound, met) for each configuration of TARGET_MODEL measured."""
    rows = []
    for workload, configs in (("synthetic", results.get("configs", {})), ("chat", results.get("chat", {}))):
        for key, s in configs.items():
            model, dtype = key.split("/")
            if model != TARGET_MODEL or "ratio" not in s:
                continue
            speed = s["ratio"]["label_tokens_per_s" if workload == "chat" else "tokens_per_s"]
            what = "label tokens/s" if workload == "chat" else "tokens/s"
            bound = TARGETS[(workload, dtype)]
            rows.append((f"{workload} {key}: {what} peftloop / Trainer", f"{speed:.2f}x", f">= {bound}x",
                         speed >= bound))
            rows.append((f"{workload} {key}: peak RSS peftloop / Trainer", f"{s['ratio']['peak_rss']:.2f}x",
                         f"<= {RSS_TARGET}x", s["ratio"]["peak_rss"] <= RSS_TARGET))
            if workload == "synthetic" and dtype == "bf16" and "peftloop" in s:
                share = s["peftloop"]["of_gemm_peak"]
                rows.append((f"synthetic {key}: peftloop's whole step, of the bf16 GEMM peak",
                             f"{100 * share:.0f}%", f">= {100 * GEMM_PEAK_TARGET:.0f}%",
                             share >= GEMM_PEAK_TARGET))
    return rows


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    rows = [w for w in ("synthetic", "chat") if results.get("configs" if w == "synthetic" else "chat")]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.5 * len(rows)), squeeze=False)
    for (left, right), workload in zip(axes, rows):
        if workload == "synthetic":
            plot_synthetic(results, left, right)
        else:
            plot_chat(results, left, right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_synthetic(results: dict, ax1, ax2) -> None:
    if results.get("parity"):
        par = results["parity"]
        steps = range(1, par["steps"] + 1)
        ax1.plot(steps, par["trainer"], "o-", label="Trainer + peft", alpha=0.7)
        ax1.plot(steps, par["peftloop"], "x--", label="peftloop")
        ax1.set(title=(f"synthetic: loss, same start, fp32 ({par['model']}); "
                       f"max |diff| {par['max_abs_diff']:.1e}"), xlabel="step", ylabel="loss")
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
    ax2.set(title="synthetic: median step time (s), lower is better", xscale="log")
    ax2.tick_params(axis="y", labelsize=7)


def plot_chat(results: dict, ax1, ax2) -> None:
    """Loss against label tokens seen (steps hold different numbers of them), every system of the
    first configuration; label tokens/s bars."""
    first = next(iter(results["chat"]))
    summary = results["chat"][first]
    for system in CHAT_SYSTEMS:
        if system in summary:
            ax1.plot(summary[system]["label_tokens_seen"], summary[system]["losses"],
                     "o-" if system.startswith("trainer") else "x--", label=CHAT_NAMES[system], alpha=0.8)
    ax1.set(title=f"realistic workload: loss of each optimizer step ({first}, one epoch)",
            xlabel="label tokens seen", ylabel="loss")
    ax1.legend(fontsize=7)
    labels, values, colors = [], [], []
    for key, summary in results["chat"].items():
        for system in CHAT_SYSTEMS:
            if system in summary:
                labels.append(f"{key}\n{CHAT_NAMES[system]}")
                values.append(summary[system]["label_tokens_per_s"])
                colors.append("tab:orange" if system.startswith("peftloop") else "tab:blue")
    ax2.barh(labels, values, color=colors)
    ax2.set(title="realistic workload: label tokens/s, higher is better")
    ax2.tick_params(axis="y", labelsize=7)


def conditions(results: dict) -> str:
    """The machine's state during the run: its GEMM peak and its load."""
    return (f"GEMM peak (2048^3): fp32 {results['gemm_peak']['fp32']:.0f}, "
            f"bf16 {results['gemm_peak']['bf16']:.0f} "
            f"GFLOP/s. Load average {results['load_before']:.2f} before, {results['load_after']:.2f} after.")


def tables(results: dict) -> list[str]:
    """Both workloads' tables, then the targets."""
    lines = []
    if results.get("configs"):
        lines += ["**Synthetic job** (256-token sequences, every token labelled, no padding):", "",
                  *synthetic_tables(results)]
    if results.get("chat"):
        lines += [""] if lines else []
        lines += chat_tables(results)
    rows = targets(results)
    if rows:
        lines += ["", "**Targets** (the SmolLM2-135M shape):", "",
                  *markdown_table(["target", "measured", "bound", ""],
                                  [(t, m, b, "met" if ok else "**missed**") for t, m, b, ok in rows])]
    return lines


def synthetic_tables(results: dict) -> list[str]:
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
                       f"{p['steps']} steps, learnable data: loss {p['peftloop'][0]:.3f} -> "
                       f"{p['peftloop'][-1]:.3f}): max |peftloop - Trainer| = {p['max_abs_diff']:.2e} "
                       "per step.")]
    return lines


def chat_tables(results: dict) -> list[str]:
    """The realistic workload: its data, every system's figures, peftloop's best / the Trainer's best."""
    d = results["chat_data"]
    lines = [(f"**Realistic instruction workload** ({d['examples']} records, one epoch, 8 per optimizer "
              f"step; lengths mean {d['mean']:.0f}, p50 {d['p50']}, p90 {d['p90']}, max {d['max']} tokens, "
              f"capped at {d['max_seq_len']}; {100 * d['label_fraction']:.0f}% of the tokens carry a "
              "label):"),
             ""]
    rows, ratios = [], []
    for key, s in results["chat"].items():
        model, dtype = key.split("/")
        for system in CHAT_SYSTEMS:
            if system in s:
                r = s[system]
                rows.append((model, dtype, CHAT_NAMES[system], f"{r['label_tokens_per_s']:.0f}",
                             f"{r['real_tokens_per_s']:.0f}", f"{r['epoch_s']:.1f}",
                             f"{100 * r['padding']:.0f}%", f"{r['examples_per_step']:.1f}",
                             f"{r['peak_rss_mib']:.0f} MiB",
                             f"{100 * r['spread']:.0f}%"))
        if "ratio" in s:
            q = s["ratio"]
            ratios.append((model, dtype, CHAT_NAMES[q["peftloop"]], CHAT_NAMES[q["trainer"]],
                           f"**{q['label_tokens_per_s']:.2f}x**", f"**{q['peak_rss']:.2f}x**"))
    lines += markdown_table(["model", "dtype", "system", "label tokens/s", "real tokens/s", "epoch (s)",
                             "padding", "examples/step", "peak RSS", "spread"], rows, "lllrrrrrrr")
    if ratios:
        lines += ["", *markdown_table(["model", "dtype", "peftloop's best", "the Trainer's best",
                                       "label tokens/s, best / best", "peak RSS, best / best"], ratios)]
    return lines


def markdown(results: dict, command: str) -> str:
    """The tables for docs/benchmarks.md, with the run's machine, conditions and command above them."""
    lines = [(f"Measured {results['date']} on {results['machine']}, torch {results['torch']} "
              f"({results['threads']} threads); {conditions(results)} Command: `{command}`"),
             "",
             *tables(results)]
    if results.get("plot"):  # relative to docs/, as the page links it
        lines += ["", f"![loss curves and throughput](../benchmarks/results/{Path(results['plot']).name})"]
    return "\n".join(lines)


def update_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    DOCS.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def config_pairs(text: str, p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    pairs = [tuple(c.split("/")) for c in text.split(",") if c]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in ("fp32", "bf16"):
            p.error(f"unknown configuration {'/'.join(pair)}: models {', '.join(SHAPES)}, dtypes fp32, bf16")
    return pairs


def measure_synthetic(pairs, systems, args, work: Path, results: dict) -> None:
    for model, dtype in pairs:
        base = write_base(model, work / f"base-{model}")
        runs = []
        for n in range(args.passes):
            order = systems if n % 2 == 0 else list(reversed(systems))
            for system in order:
                r = run(system, base, dtype, args, work)
                r.update(model=model, pass_index=n, workload="synthetic")
                runs.append(r)
                print(f"{model:7s} {dtype} {system:9s} pass {n}: {r['median_step_s']:.3f} s/step, "
                      f"{r['peak_rss_mib']:.0f} MiB", flush=True)
        results["configs"][f"{model}/{dtype}"] = summarize(runs, model, dtype, results["gemm_peak"])
        results["runs"] += runs


def measure_chat(pairs, systems, args, work: Path, results: dict) -> None:
    for model, dtype in pairs:
        base = write_base(model, work / f"base-{model}")
        runs = []
        for n in range(args.chat_passes):
            order = systems if n % 2 == 0 else list(reversed(systems))
            for system in order:
                r = run(system, base, dtype, args, work, workload="chat")
                r.update(model=model, pass_index=n)
                runs.append(r)
                print(f"{model:7s} {dtype} {system:18s} pass {n}: "
                      f"{r['label_tokens_per_s']:.0f} label tokens/s, epoch {r['epoch_s']:.1f} s, "
                      f"{r['peak_rss_mib']:.0f} MiB", flush=True)
        results["chat"][f"{model}/{dtype}"] = summarize_chat(runs)
        results["runs"] += runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="synthetic,chat", help="synthetic, chat or both")
    p.add_argument("--models", default="small,smollm", help="synthetic job: shapes")
    p.add_argument("--dtypes", default="fp32,bf16", help="synthetic job: dtypes")
    p.add_argument("--systems", default="peftloop,trainer,handloop", help="synthetic job: systems")
    p.add_argument("--steps", type=int, default=6,
                   help="synthetic job: optimizer steps per run (warm-up included)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parity-steps", type=int, default=20)
    p.add_argument("--parity-model", default="small")
    p.add_argument("--configs", help="synthetic job: explicit model/dtype pairs instead of --models x "
                                      "--dtypes, e.g. small/fp32,small/bf16,smollm/fp32")
    p.add_argument("--chat-configs", default="smollm/bf16,smollm/fp32",
                   help="realistic workload: model/dtype pairs")
    p.add_argument("--chat-systems", default=",".join(CHAT_SYSTEMS), help="realistic workload: systems")
    p.add_argument("--chat-examples", type=int, default=48,
                   help="realistic workload: records in the epoch (48: about 22 minutes for smollm bf16 + "
                        "fp32, five systems, on a quiet 2-core AVX-512 machine, measured 2026-12-02)")
    p.add_argument("--chat-max-seq-len", type=int, default=1024,
                   help="realistic workload: the length cap, and peftloop's packed row length")
    p.add_argument("--chat-passes", type=int, default=1)
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the tables in docs/benchmarks.md")
    p.add_argument("--results-dir", type=Path, default=RESULTS,
                   help="where the results (and tmp/, the base checkpoints) go; default benchmarks/results")
    args = p.parse_args()
    command = command_line("compare")
    workloads = args.workloads.split(",")
    if not set(workloads) <= {"synthetic", "chat"} or not workloads:
        p.error(f"--workloads: synthetic, chat or both, not {args.workloads}")
    pairs = config_pairs(args.configs or ",".join(f"{m}/{d}" for m in args.models.split(",")
                                                 for d in args.dtypes.split(",")), p)
    chat_pairs = config_pairs(args.chat_configs, p)

    systems, chat_systems = args.systems.split(","), args.chat_systems.split(",")
    missing = missing_references()
    if missing:
        print(f"benchmarks: {', '.join(missing)} not installed (pip install -e '.[bench]'); "
              f"measuring peftloop alone, without ratios or parity")
        systems = ["peftloop"]
        chat_systems = [s for s in chat_systems if s.startswith("peftloop")]
    work = args.results_dir / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    import torch

    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "threads": args.threads or torch.get_num_threads(), "load_before": load_average(),
               "gemm_peak": gemm_peak(args.threads), "workloads": workloads, "configs": {}, "chat": {},
               "runs": []}
    print(f"machine: {results['machine']}; GEMM peak fp32 {results['gemm_peak']['fp32']:.0f}, "
          f"bf16 {results['gemm_peak']['bf16']:.0f} GFLOP/s")
    if "synthetic" in workloads:
        measure_synthetic(pairs, systems, args, work, results)
        if "trainer" in systems and args.parity_steps:
            base = write_base(args.parity_model, work / f"base-{args.parity_model}")
            results["parity"] = {"model": args.parity_model, **parity(base, args, work, args.parity_steps)}
            print(f"parity: max |loss diff| over {args.parity_steps} steps = "
                  f"{results['parity']['max_abs_diff']:.2e}")
    if "chat" in workloads:
        vocab = SHAPES[chat_pairs[0][0]].vocab_size  # the lengths do not depend on the vocabulary
        stats = length_stats(chat_examples(args.chat_examples, vocab, args.chat_max_seq_len, seed=0))
        results["chat_data"] = {**stats, "max_seq_len": args.chat_max_seq_len}
        measure_chat(chat_pairs, chat_systems, args, work, results)
    results["load_after"] = load_average()

    stem = result_stem("compare", results["machine"], results["date"], args.results_dir)
    figure = plot(results, stem.with_suffix(".png"))
    results["plot"] = ""  # no machine paths in the results
    if figure:
        results["plot"] = str(figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure.name)
    body = [f"{results['threads']} threads. {conditions(results)}", "", *tables(results)]
    if figure:  # relative to this file
        body += ["", f"![loss curves and throughput]({figure.name})"]
    head = ("machine", "date", "torch", "runs")
    write_results("compare", results["runs"], title="peftloop against transformers.Trainer + peft", body=body,
                  meta={k: v for k, v in results.items() if k not in head}, machine_name=results["machine"],
                  date=results["date"], results=args.results_dir)
    table = markdown(results, command)
    print("\n" + table)
    if not args.no_docs:
        update_docs(table)
    shutil.rmtree(work / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
