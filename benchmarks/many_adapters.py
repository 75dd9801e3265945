"""K LoRA jobs on one base: fused in one process (train_many) vs K train() runs one by one vs K at once.

    python -m benchmarks.many_adapters                    # small (K = 1, 2, 4, 8) + smollm (K = 1, 2, 4)
    python -m benchmarks.many_adapters --shapes small --ks 1,4 --steps 3
    python -m benchmarks.many_adapters --smoke --results /tmp/out   # tiny model, K = 1, 2: checks it
    python -m benchmarks.many_adapters --shapes smollm --gradient-checkpointing   # the base dominates
    python -m benchmarks.many_adapters --shapes smollm --micro-batch 1            # small per-job batches
    python -m benchmarks.many_adapters --shapes smollm --gradient-checkpointing --limit-heap-retention

The K jobs: LoRA r=16, alpha 32, dropout 0.05 on q, k, v, o, gate, up and down; job k has its own
seed (42 + k), learning rate (1e-4 x (k + 1), linear schedule, clipping at 1.0) and data (random
tokens, seed 1000 + k); every job trains on micro-batches of 4 x 256 tokens (one per step), so the
jobs have the same sizes. The base has random weights (seed 42), fp32 on the CPU (bf16 + bf16
autocast on a GPU). Each mode runs the K jobs in fresh processes (``--_child``):

- fused: one process loads the base once and trains the K jobs together with
  ``peftloop.train_many``: one forward pass of the shared base over the K jobs' micro-batches.
- sequential: K processes, one after another, each loading the base and training one job with
  ``peftloop.train``, as a shell loop over the CLI would. Separate processes (rather than K train()
  calls in one) so that each run is exactly what one concurrent process runs, and no run's peak
  carries what an earlier run left in the heap.
- concurrent: the same K processes, all at once, the cores shared fairly: each sets
  ``torch.set_num_threads(max(1, threads // K))`` (fused and sequential use all ``--threads``).
  With more processes than cores, the OS time-shares the cores.

Measured, per (shape, K, mode):

- tokens/s: the tokens of the measured steps (after ``--warmup`` steps) over their wall time.
  Every process waits, after its warm-up steps, until all processes of its mode have finished
  theirs (a file barrier), so the K concurrent processes measure the same window: all their tokens
  over the time from the barrier to the end of the slowest. Sequential: all tokens over the sum of
  the runs' measured windows (loading and warm-up left out, as for the others).
- wall: from launching the mode's first process to the end of its last, imports, loading and
  warm-up included (what the K jobs cost end to end).
- peak RSS: each process's own peak (``ru_maxrss``, imports included); fused: its one process,
  sequential: the largest of the K, concurrent: the sum of the K (what K processes need when
  their peaks coincide, which the barrier makes likely). The parent also samples the summed RSS
  of the mode's live processes every 50 ms: the largest sum, and the largest sum of their private
  (anonymous) memory, which leaves out the shared library pages each process's RSS counts again.

Three settings change which regime is measured, and so have results files of their own
(``many_adapters__checkpointed-...``, ``..._heaplimit``, ``many_adapters__mb1-...``):
``--gradient-checkpointing`` (every mode checkpoints the decoder layers, so a job's activations
are small beside the shared base),
``--limit-heap-retention`` (every process calls ``peftloop.allocator.limit_heap_retention()`` first:
without it glibc's heap keeps much of what a step frees, ~1 GB on the 135M shape, which hides
what the modes' live memory is) and a ``--micro-batch`` other than 4 (per-job batches too small to
keep the cores busy on their own).

Ratios per (shape, K): fused / sequential tokens/s and fused / concurrent peak RSS, with the issue's
targets at K = 4 (>= 1.3x and <= 0.4x) marked met or missed; and the largest difference between a
job's training loss fused and alone, a check that the modes train the same jobs. A concurrent or
fused run whose memory, estimated from the sequential runs, would not fit in the available memory
is skipped and says so. Results: ``benchmarks/results/many_adapters-<machine>-<date>.{json,md,png}``
(the plot: tokens/s and peak RSS against K, per mode and shape). On a GPU the default shape is
Llama-3.2-1B's (``llama-1b``, bf16), and the GPU's peak allocated memory is reported too
(``torch.cuda.max_memory_allocated``, concurrent: the sum; each process's CUDA context is not in
it) with its fused / concurrent ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    ROOT,
    SHAPES,
    Shape,
    machine,
    markdown_table,
    result_stem,
    status_kib,
    today,
    write_results,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("fused", "sequential", "concurrent")
TINY = Shape("tiny", 64, 2, 4, 2, 96, 512, True)  # --smoke's model
DEFAULT_KS = {"smollm": (1, 2, 4)}
"""K = 8 on the 135M shape is left out by default: 8 processes of ~2-3 GiB each do not fit a 24 GiB
machine shared with others, and its three modes alone would take ~8 minutes on 2 cores."""
TARGET_K, TARGET_SPEEDUP, TARGET_MEMORY = 4, 1.3, 0.4
MIB = 1024  # KiB per MiB: ru_maxrss and /proc report KiB
MICRO_BATCH = 4  # sequences per job and step by default; another size is a variant of its own


# ---------------------------------------------------------------------------------------------
# In the child process: one job (train) or K jobs (train_many), timed


def wait_at_barrier(folder: str, rank: int, parties: int, timeout_s: float = 3600.0) -> None:
    """Every process of a mode touches its file and waits until all ``parties`` have."""
    Path(folder, str(rank)).touch()
    deadline = time.time() + timeout_s
    while len(os.listdir(folder)) < parties:
        if time.time() > deadline:
            raise RuntimeError(f"barrier {folder}: {len(os.listdir(folder))} of {parties} processes after "
                               f"{timeout_s:.0f} s")
        time.sleep(0.005)


def make_clock(warmup: int, barrier: str | None, rank: int, parties: int, cuda: bool):
    """A callback that records the wall-clock end of each step (in a group: the last job's) and
    holds the process at the barrier once its warm-up steps are done."""
    import torch

    from peftloop.callbacks import Callback

    class Clock(Callback):
        def __init__(self):
            self.ends: dict[int, float] = {}
            self.waited = False

        def on_train_begin(self, state):
            self.mark(0)

        def on_step_end(self, state, metrics):
            self.mark(state.global_step)

        def mark(self, step: int) -> None:
            if cuda:
                torch.cuda.synchronize()
            if step == warmup and barrier and not self.waited:
                wait_at_barrier(barrier, rank, parties)
                self.waited = True
            self.ends[step] = time.time()

    return Clock()


def job_data(k: int, n: int, seq_len: int, vocab: int) -> list[dict]:
    import torch

    ids = torch.randint(3, vocab, (n, seq_len), generator=torch.Generator().manual_seed(1000 + k))
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]


def job_configs(k: int, spec: dict):
    """Job k's LoRA and training configs: its own seed and learning rate, the shared sizes."""
    from peftloop.config import LoraConfig, TrainConfig

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    config = TrainConfig(output_dir=str(Path(spec["workdir"]) / f"job-{k}"), seed=42 + k,
                         learning_rate=1e-4 * (k + 1), lr_scheduler="linear", max_grad_norm=1.0,
                         micro_batch_size=spec["micro_batch"], grad_accum=1,
                         max_steps=spec["warmup"] + spec["steps"], shuffle=False, precision=spec["dtype"],
                         device=spec["device"], progress_bar=False, log_every=10**9)
    return lora, config


def run_spec(spec: dict) -> dict:
    """Loads the base and trains spec["jobs"]: one with train(), several with train_many()."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["limit_heap_retention"]:
        from peftloop.allocator import limit_heap_retention

        limit_heap_retention()
    from peftloop.inject import inject_lora
    from peftloop.models import enable_gradient_checkpointing, load_pretrained
    from peftloop.train import seed_everything, train
    from peftloop.train_many import Job, train_many

    cuda = spec["device"] == "cuda"
    model = load_pretrained(spec["base"], dtype=spec["dtype"], device=spec["device"])
    if spec["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    rss_loaded = status_kib("VmRSS") / MIB
    vocab, steps = model.config.vocab_size, spec["warmup"] + spec["steps"]
    clock = make_clock(spec["warmup"], spec["barrier"], spec["rank"], spec["parties"], cuda)
    data = {k: job_data(k, spec["micro_batch"] * steps, spec["seq_len"], vocab) for k in spec["jobs"]}
    if len(spec["jobs"]) == 1 and spec["mode"] != "fused":
        k = spec["jobs"][0]
        lora, config = job_configs(k, spec)
        seed_everything(config.seed)  # what train_many's inject_many draws adapter k from
        inject_lora(model, lora)
        results = [train(model, data[k], config=config, callbacks=[clock])]
    else:
        jobs = [Job(data[k], *job_configs(k, spec), callbacks=[clock]) for k in spec["jobs"]]
        results = train_many(model, jobs)
    start, end = clock.ends[spec["warmup"]], clock.ends[steps]
    tokens_per_step = len(spec["jobs"]) * spec["micro_batch"] * spec["seq_len"]
    return {"jobs": spec["jobs"], "threads": torch.get_num_threads(), "start": start, "end": end,
            "measured_s": end - start, "measured_tokens": tokens_per_step * spec["steps"],
            "train_losses": [r.train_loss for r in results], "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


# ---------------------------------------------------------------------------------------------
# The parent: launch a mode's processes, sample their memory, summarise


def proc_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a live process in KiB; (0, 0) once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    fields[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


def launch(specs: list[dict], workdir: Path) -> dict:
    """Starts one child per spec at once, samples their summed RSS every 50 ms until all have ended,
    and returns their records, the wall time and the sampled peaks. A failed child stops the rest."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    procs = []
    for i, spec in enumerate(specs):
        log = workdir / f"child-{time.monotonic_ns()}-{i}"
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            cmd = [sys.executable, "-m", "benchmarks.many_adapters", "--_child", json.dumps(spec)]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err), log))
    rss_peak = anon_peak = 0
    while any(p.poll() is None for p, _ in procs):
        samples = [proc_kib(p.pid) for p, _ in procs if p.poll() is None]
        rss_peak = max(rss_peak, sum(s[0] for s in samples))
        anon_peak = max(anon_peak, sum(s[1] for s in samples))
        if any(p.returncode for p, _ in procs):
            break
        time.sleep(0.05)
    failed = next(((p, log) for p, log in procs if p.returncode), None)
    if failed:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        p, log = failed
        raise RuntimeError(f"{shlex_join(p.args)} failed ({p.returncode}):\n"
                           f"{Path(f'{log}.err').read_text()[-4000:]}")
    records = [json.loads(Path(f"{log}.out").read_text().strip().splitlines()[-1]) for _, log in procs]
    return {"records": records, "wall_s": time.perf_counter() - start,
            "sampled_rss_mib": rss_peak / MIB, "sampled_anon_mib": anon_peak / MIB}


def shlex_join(args) -> str:
    import shlex

    return shlex.join(str(a) for a in args)


def child_spec(args, base: Path, mode: str, jobs: list[int], threads: int, workdir: Path,
               barrier: Path | None = None, rank: int = 0, parties: int = 1) -> dict:
    return {"mode": mode, "base": str(base), "jobs": jobs, "threads": threads, "dtype": args.dtype,
            "device": args.device, "warmup": args.warmup, "steps": args.steps,
            "micro_batch": args.micro_batch, "seq_len": args.seq_len, "workdir": str(workdir),
            "gradient_checkpointing": args.gradient_checkpointing,
            "limit_heap_retention": args.limit_heap_retention,
            "barrier": str(barrier) if barrier else None, "rank": rank, "parties": parties}


def run_mode(args, base: Path, mode: str, k: int, workdir: Path) -> dict:
    """The K jobs in one mode: its processes, then one row of figures."""
    jobs = list(range(k))
    if mode == "fused":
        launches = [launch([child_spec(args, base, mode, jobs, args.threads, workdir / "fused")], workdir)]
    elif mode == "sequential":
        launches = [launch([child_spec(args, base, mode, [j], args.threads, workdir / f"seq-{j}")], workdir)
                    for j in jobs]
    else:
        barrier = workdir / "barrier"
        barrier.mkdir(parents=True)
        threads = max(1, args.threads // k)
        launches = [launch([child_spec(args, base, mode, [j], threads, workdir / f"conc-{j}", barrier, j, k)
                            for j in jobs], workdir)]
    runs = [r for launched in launches for r in launched["records"]]
    if mode == "concurrent":  # one window: the common barrier to the slowest process's end
        measured = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    else:  # fused: one process; sequential: the runs' windows one after another
        measured = sum(r["measured_s"] for r in runs)
    peaks = [r["peak_rss_mib"] for r in runs]
    gpu = [r["peak_gpu_mib"] for r in runs if r["peak_gpu_mib"] is not None]
    return {"k": k, "mode": mode, "processes": len(runs), "threads_per_process": runs[0]["threads"],
            "tokens_per_s": sum(r["measured_tokens"] for r in runs) / measured, "measured_s": measured,
            "wall_s": sum(launched["wall_s"] for launched in launches),
            "peak_rss_mib": sum(peaks) if mode == "concurrent" else max(peaks),
            "sampled_rss_mib": max(launched["sampled_rss_mib"] for launched in launches),
            "sampled_anon_mib": max(launched["sampled_anon_mib"] for launched in launches),
            "peak_gpu_mib": (sum(gpu) if mode == "concurrent" else max(gpu)) if gpu else None,
            "train_losses": [loss for r in runs for loss in r["train_losses"]], "runs": runs}


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / MIB


def too_big(mode: str, k: int, single: dict) -> str | None:
    """Why a mode would not fit in memory, estimated from one sequential run; None if it would."""
    if mode == "concurrent":
        need = k * single["peak_rss_mib"]
    else:  # fused: one base, K jobs' activations and adapters
        need = single["peak_rss_mib"] + (k - 1) * (single["peak_rss_mib"] - single["rss_after_load_mib"])
    room = 0.9 * available_mib()
    return f"skipped: needs ~{need / 1024:.1f} GiB, {room / 1024:.1f} GiB available" if need > room else None


def ratios(rows: list[dict]) -> list[dict]:
    """Per (shape, K): fused / sequential tokens/s, fused / concurrent peak RSS (and GPU memory), the
    targets at K = 4, and the largest |train loss fused - alone| over the jobs."""
    out = []
    for shape, k in dict.fromkeys((r["shape"], r["k"]) for r in rows):
        by_mode = {r["mode"]: r for r in rows if (r["shape"], r["k"]) == (shape, k) and "skipped" not in r}
        fused, seq, conc = (by_mode.get(m) for m in MODES)
        speedup = fused["tokens_per_s"] / seq["tokens_per_s"] if fused and seq else None
        memory = fused["peak_rss_mib"] / conc["peak_rss_mib"] if fused and conc else None
        loss_diff = (max(abs(a - b) for a, b in zip(fused["train_losses"], seq["train_losses"]))
                     if fused and seq else None)
        row = {"shape": shape, "k": k, "fused_over_sequential_tokens_per_s": speedup,
               "fused_over_concurrent_peak_rss": memory, "max_train_loss_diff": loss_diff}
        if fused and conc and fused["peak_gpu_mib"] is not None:
            row["fused_over_concurrent_peak_gpu"] = fused["peak_gpu_mib"] / conc["peak_gpu_mib"]
        if k == TARGET_K:
            row["speedup_target_met"] = None if speedup is None else speedup >= TARGET_SPEEDUP
            row["memory_target_met"] = None if memory is None else memory <= TARGET_MEMORY
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Report


def verdict(met: bool | None) -> str:
    return {True: " (met)", False: " (**missed**)", None: ""}[met]


def tables(rows: list[dict], summary: list[dict], gpu: bool) -> list[str]:
    def mib(x):
        return f"{x:.0f}" if x is not None else "-"

    figures = []
    for r in rows:
        if "skipped" in r:
            figures.append((r["shape"], r["k"], r["mode"], r["processes"], "-", r["skipped"],
                            *("-" for _ in range(4 + gpu))))
            continue
        figures.append((r["shape"], r["k"], r["mode"], r["processes"], r["threads_per_process"],
                        f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.1f}", mib(r["peak_rss_mib"]),
                        mib(r["sampled_rss_mib"]), mib(r["sampled_anon_mib"]),
                        *((mib(r["peak_gpu_mib"]),) if gpu else ())))
    columns = ["shape", "K", "mode", "processes", "threads each", "tokens/s", "wall (s)", "peak RSS (MiB)",
               "sampled RSS (MiB)", "sampled private (MiB)", *(["peak GPU (MiB)"] if gpu else [])]
    lines = markdown_table(columns, figures, align="lrlrrrrrrrr")

    def ratio(x, met=None, fmt="{:.2f}x"):
        return "-" if x is None else fmt.format(x) + verdict(met)

    ratio_rows = [(s["shape"], s["k"],
                   ratio(s["fused_over_sequential_tokens_per_s"], s.get("speedup_target_met")),
                   ratio(s["fused_over_concurrent_peak_rss"], s.get("memory_target_met")),
                   ratio(s["max_train_loss_diff"], fmt="{:.1e}"),
                   *((ratio(s.get("fused_over_concurrent_peak_gpu")),) if gpu else ())) for s in summary]
    return [*lines, "",
            *markdown_table(["shape", "K", f"tokens/s fused / sequential (target at K = {TARGET_K}: "
                                           f">= {TARGET_SPEEDUP}x)",
                             f"peak RSS fused / concurrent (target at K = {TARGET_K}: <= {TARGET_MEMORY}x)",
                             "max abs train loss fused - alone",
                             *(["peak GPU memory fused / concurrent"] if gpu else [])], ratio_rows,
                            align="lrrrrr")]


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 4 * len(shapes)), squeeze=False)
    for shape, (ax_speed, ax_memory) in zip(shapes, axes):
        for mode, marker in zip(MODES, "osd"):
            mine = [r for r in rows if r["shape"] == shape and r["mode"] == mode and "skipped" not in r]
            ks = [r["k"] for r in mine]
            ax_speed.plot(ks, [r["tokens_per_s"] for r in mine], marker=marker, label=mode)
            ax_memory.plot(ks, [r["peak_rss_mib"] / 1024 for r in mine], marker=marker, label=mode)
        ks = sorted({r["k"] for r in rows if r["shape"] == shape})
        ax_speed.set(title=f"{shape}: total tokens/s (higher is better)", xlabel="K jobs", ylabel="tokens/s",
                     xscale="log", xticks=ks, xticklabels=ks)
        ax_memory.set(title=f"{shape}: peak RSS (lower is better)", xlabel="K jobs", ylabel="GiB",
                      xscale="log", xticks=ks, xticklabels=ks)
        ax_speed.legend()
        ax_memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Main


def write_base(shape: Shape, folder: Path) -> Path:
    """Random weights (seed 42) in Hugging Face format, written once and reused."""
    if (folder / "config.json").is_file():
        return folder
    code = ("import json, sys, torch\n"
            "from peftloop.models.llama import LlamaConfig, LlamaForCausalLM\n"
            "from peftloop.models import save_pretrained\n"
            "model = LlamaForCausalLM(LlamaConfig.from_dict(json.loads(sys.argv[1])))\n"
            "model.init_weights(torch.Generator().manual_seed(42))\n"
            "save_pretrained(model, sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(shape.config_dict()), str(folder)], check=True,
                   cwd=ROOT)
    return folder


def parse_args(argv=None):
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: small,smollm on a "
                                    "CPU, llama-1b on a GPU)")
    p.add_argument("--ks", help="comma-separated numbers of jobs (default 1,2,4,8; 1,2,4 for smollm)")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per job")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps per job before measuring")
    p.add_argument("--micro-batch", type=int, default=MICRO_BATCH,
                   help="sequences per micro-batch (one per step)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every mode checkpoints the decoder layers "
                        "(results: many_adapters__checkpointed-...)")
    p.add_argument("--limit-heap-retention", action="store_true",
                   help="every process calls peftloop.allocator.limit_heap_retention() first "
                        "(results: many_adapters__heaplimit-...)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of a fused or sequential run; concurrent: threads // K each")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32",
                   help="the base's dtype and the training precision (bf16: autocast)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model, K = 1, 2, 1 warm-up + 1 step of 2 x 64 tokens")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the results go")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = "cuda" if cuda else "cpu"
    if args.smoke:
        args.shapes, args.ks = args.shapes or "tiny", args.ks or "1,2"
        args.steps, args.warmup, args.micro_batch, args.seq_len = 1, 1, 2, 64
    args.shapes = (args.shapes or ("llama-1b" if cuda else "small,smollm")).split(",")
    known = {**SHAPES, "tiny": TINY}
    for name in args.shapes:
        if name not in known:
            p.error(f"unknown shape {name!r}: choose from {', '.join(known)}")
    args.known = known
    return args


def variant(args) -> str | None:
    """The settings that change the regime measured get results files of their own
    (``many_adapters__<variant>-...``), so that such a run does not replace the default run's figures."""
    parts = ["checkpointed"] * args.gradient_checkpointing + ["heaplimit"] * args.limit_heap_retention
    if args.micro_batch != MICRO_BATCH and not args.smoke:
        parts.append(f"mb{args.micro_batch}")
    return "_".join(parts) or None


def ks_for(args, shape: str) -> list[int]:
    return [int(k) for k in args.ks.split(",")] if args.ks else list(DEFAULT_KS.get(shape, (1, 2, 4, 8)))


def measure_shape(args, shape: str, tmp: Path) -> list[dict]:
    folder = (tmp if shape == "tiny" else RESULTS / "tmp") / f"base-{shape}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    base = write_base(args.known[shape], folder)
    rows = []
    for k in ks_for(args, shape):
        single, done = None, {}
        for mode in ("sequential", "fused", "concurrent"):  # sequential first: its runs size the others
            reason = too_big(mode, k, single) if single and k > 1 else None
            if reason:
                row = {"shape": shape, "k": k, "mode": mode, "processes": k if mode != "fused" else 1,
                       "skipped": reason}
            else:
                row = {"shape": shape, **run_mode(args, base, mode, k, tmp / f"{shape}-{k}-{mode}")}
                single = single or max(row["runs"], key=lambda r: r["peak_rss_mib"])
            done[mode] = row
            shutil.rmtree(tmp / f"{shape}-{k}-{mode}", ignore_errors=True)
            print(f"{shape:8s} K={k} {mode:10s} " + (reason or (
                f"{row['tokens_per_s']:7.0f} tokens/s, wall {row['wall_s']:6.1f} s, peak RSS "
                f"{row['peak_rss_mib']:6.0f} MiB (sampled {row['sampled_rss_mib']:.0f}, private "
                f"{row['sampled_anon_mib']:.0f}), losses {[round(x, 4) for x in row['train_losses']]}")),
                flush=True)
        rows += [done[mode] for mode in MODES]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(run_spec(json.loads(args._child))))
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for shape in args.shapes for row in measure_shape(args, shape, Path(tmp))]
    summary = ratios(rows)
    where, date = machine(), today()
    args.results.mkdir(parents=True, exist_ok=True)
    stem = result_stem("many_adapters", where, date, args.results, variant(args))
    figure = plot(rows, stem.with_suffix(".png"))
    gpu = args.device == "cuda"
    body = [(f"The K jobs: LoRA r=16, alpha 32, dropout 0.05 on {', '.join(TARGETS)}; job k: seed 42 + k, "
             f"learning rate 1e-4 x (k + 1), its own random tokens; micro-batch {args.micro_batch} x "
             f"{args.seq_len} tokens per step; {args.warmup} warm-up + {args.steps} measured steps; "
             f"{args.dtype} on {args.device}; {args.threads} threads (concurrent: threads // K each); "
             f"activation checkpointing {'on' if args.gradient_checkpointing else 'off'} in every mode; "
             f"glibc heap retention {'limited' if args.limit_heap_retention else 'as glibc does it'}."),
            ("fused: one process, train_many. sequential: K processes one after another, train() each. "
             "concurrent: K processes at once. tokens/s: measured steps only (the concurrent processes "
             "start them together at a barrier); wall: launch to last exit. Peak RSS: ru_maxrss of the "
             "process (sequential: the largest; concurrent: the sum of the K); sampled: the largest summed "
             "RSS / private (anonymous) memory of the mode's live processes, every 50 ms. "
             "See benchmarks/many_adapters.py."),
            f"Load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.", "",
            *tables(rows, summary, gpu)]
    if figure:
        body += ["", f"![tokens/s and peak RSS against K]({figure.name})"]
    meta = {"shapes": args.shapes, "ks": {s: ks_for(args, s) for s in args.shapes}, "steps": args.steps,
            "warmup": args.warmup, "micro_batch_size": args.micro_batch, "seq_len": args.seq_len,
            "threads": args.threads, "dtype": args.dtype, "device": args.device, "lora_r": 16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "limit_heap_retention": args.limit_heap_retention,
            "target_modules": TARGETS, "load_before": load_before, "load_after": os.getloadavg()[0],
            "ratios": summary, "plot": figure.name if figure else None}
    write_results("many_adapters", rows, title="K LoRA jobs: fused vs sequential vs concurrent", body=body,
                  meta=meta, machine_name=where, date=date, results=args.results, variant=variant(args))
    print("\n".join(tables(rows, summary, gpu)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
