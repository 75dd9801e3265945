"""The GPU run in one command: kernel tests on CUDA, kernel benchmarks, peftloop vs Trainer at Llama-3.2-1B.

    python -m benchmarks.gpu_suite                          # one CUDA GPU: under 8 minutes on an H200
    python -m benchmarks.gpu_suite --smoke --results DIR    # the same three parts on the CPU, tiny shapes

Three parts, each in its own processes and each with a time budget (seconds; what a part leaves
unused goes to the next, so the whole never takes more than their sum, 460 s by default). A part
that runs over is stopped (its process group killed) and recorded as ``timed_out`` with what it
had done by then; a part that fails is recorded and the next one still runs.

1. ``kernel_tests``: ``pytest tests/kernels`` with TRITON_INTERPRET unset, so Triton compiles for
   the GPU and the tests run on CUDA tensors (tests/kernels/kernel_utils.py picks CUDA when it is
   there; the root conftest sets the interpreter only when it is not). pytest-xdist spreads the
   tests over workers when it is installed (compilation is CPU-bound), pytest-timeout stops a
   hung test. Recorded: passed / failed / error / skipped counts and the failures' names.
2. ``gpu_kernels``: ``python -m benchmarks.gpu_kernels --budget ...`` (its own results file
   beside this one); recorded: the forward + backward times per kernel and shape, speed-ups.
3. ``end_to_end``: the LoRA job of ``benchmarks/run_one.py`` (r=16 on every projection, 4 x 2
   micro-batches of 256 tokens, fused AdamW) on a Llama-3.2-1B-shaped model (random weights,
   seed 42, written once in Hugging Face format, bf16) by peftloop and by the Trainer + peft, one
   process each: tokens/s (median step after warm-up) and the peak GPU memory
   (``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, load included) in bf16;
   then the loss parity: both systems from one PEFT-initialised adapter, no dropout, the same
   batches in order, fp32 (bf16 rounding would hide a real difference), the max |difference| of
   the step losses. The parity pair runs concurrently (no timing is taken from it).

``--smoke`` runs the same parts on the CPU at tiny sizes: a few kernel test files under the
Triton interpreter, ``gpu_kernels --smoke`` (kernels and eager, two ops), and the end-to-end
comparison on a 2-layer, 64-wide model with Llama-3.2-1B's rope scaling, a few steps. It writes to
``--results`` (default benchmarks/results/tmp/smoke, ignored by git), never into results/ itself.

Results: ``benchmarks/results/gpu_suite-<gpu>-<date>.{json,md}`` (one record per part) and
``gpu_kernels-<gpu>-<date>.{json,md}``. Work files (the 2.5 GB base checkpoint, the adapter, the
runs) go to ``<results>/tmp/gpu_suite``. Exit status: 0 when every part passed, 1 otherwise,
2 without a GPU (and without ``--smoke``).

On the lent H200 (the device tool's ``run``, from the repository root, ``timeout_s`` 600; the image
has torch, triton, transformers, peft, pytest, hypothesis; the editable install maps
``peftloop.kernels`` to kernels/, and a link does it where that install fails):

    export PYTHONUNBUFFERED=1; unset TRITON_INTERPRET; nvidia-smi >$OUT/setup.log 2>&1;
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>$OUT/setup.log 2>&1;
    python3 -c 'import peftloop.kernels' 2>>$OUT/setup.log || ln -sfn ../kernels peftloop/kernels;
    timeout 570 python3 -m benchmarks.gpu_suite 2>&1 | tee $OUT/gpu_suite.log;
    cp benchmarks/results/gpu_*-nvidia-* $OUT/; ls -l $OUT

(one line: join these; about 8 minutes. The four result files and the two logs come back in $OUT:
copy the result files into benchmarks/results/ and commit them. To rerun one part with more
time: ``python3 -m benchmarks.gpu_suite --parts end_to_end --end-to-end-s 400``.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, SHAPES, Shape, machine, markdown_table, write_results

# The per-part budgets in seconds (the whole run: their sum, under 8 minutes with the start-up).
BUDGETS = {"kernel_tests": 130, "gpu_kernels": 100, "end_to_end": 230}
SMOKE_BUDGETS = {"kernel_tests": 180, "gpu_kernels": 120, "end_to_end": 240}  # only a guard against a hang

SMOKE_TESTS = ["tests/kernels/test_swiglu.py", "tests/kernels/test_triton_utils.py", "-m", "not slow"]
# The smoke model keeps Llama-3.2-1B's config.json fields (explicit head_dim, llama3 rope scaling),
# so the smoke run reads the same kind of config in both systems.
SMOKE_SHAPE = Shape("smoke", 64, 2, 4, 2, 128, 512, True, rope_theta=500000.0, max_position_embeddings=131072,
                    head_dim=16, rope_scaling=SHAPES["llama-1b"].rope_scaling)
# (speed steps, of which warm-up, parity steps)
STEPS = {"gpu": (12, 4, 5), "smoke": (3, 1, 2)}
SYSTEMS = ("peftloop", "trainer")
CHILD = [sys.executable, "-m", "benchmarks.gpu_suite", "--_child"]  # the helpers below, in a fresh process


# ---------------------------------------------------------------------------------------------
# Child processes under a deadline


@dataclass
class Finished:
    rc: int | None
    timed_out: bool
    output: str
    seconds: float


def _kill(proc: subprocess.Popen) -> None:
    """Kills the child's whole process group (pytest's workers, torch.compile's, ...)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_all(commands: dict[str, list[str]], limit_s: float, env: dict | None = None) -> dict[str, Finished]:
    """Runs the commands at the same time from the repository root, each in its own process group,
    echoing their output (prefixed with the label); kills what is still running after ``limit_s``."""
    start = time.perf_counter()
    procs, outputs, readers = {}, {}, []
    for label, cmd in commands.items():
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        procs[label], outputs[label] = proc, []
        reader = threading.Thread(target=_echo, args=(proc, label, outputs[label]), daemon=True)
        reader.start()
        readers.append(reader)
    results = {}
    try:
        for label, proc in procs.items():
            left = max(0.0, limit_s - (time.perf_counter() - start))
            try:
                rc, timed_out = proc.wait(timeout=left), False
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc, timed_out = proc.wait(), True
                print(f"[{label}] stopped: over its {limit_s:.0f} s budget", flush=True)
            results[label] = Finished(rc, timed_out, "", time.perf_counter() - start)
    finally:  # also after a SIGTERM or an error of ours: nothing a child started outlives it
        for proc in procs.values():
            _kill(proc)
    for reader in readers:
        reader.join(timeout=10)
    for label, finished in results.items():
        finished.output = "".join(outputs[label])
    return results


def run_one_command(cmd: list[str], limit_s: float, label: str, env: dict | None = None) -> Finished:
    return run_all({label: cmd}, limit_s, env)[label]


def _echo(proc: subprocess.Popen, label: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        print(f"[{label}] {line}", end="", flush=True)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_all's finally: the children die with us


def child_env(smoke: bool) -> dict:
    """The children's environment: on a GPU without TRITON_INTERPRET (Triton compiles for the
    device), in the smoke run with it (Triton interpreted on the CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Part 1: the kernel tests


OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# "tests/x.py::name PASSED" (pytest -v), "[gw0] [ 3%] PASSED tests/x.py::name" (xdist),
# "FAILED tests/x.py::name - ..." (-rfE)
TEST_LINE = re.compile(rf"(?P<id>tests/\S+::\S+)\s+(?P<outcome>{OUTCOMES})\b"
                       rf"|\b(?P<outcome2>{OUTCOMES})\s+(?P<id2>tests/\S+::\S+)")
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def parse_pytest(output: str) -> dict:
    """Counts and failures from pytest -v output: each test's last outcome (so a run stopped
    half-way still counts what it finished), the closing summary's counts when it got there."""
    outcome = {}
    for line in output.splitlines():
        m = TEST_LINE.search(line)
        if m:
            outcome[m["id"] or m["id2"]] = m["outcome"] or m["outcome2"]
    counts = {k: sum(v == k.upper() for v in outcome.values()) for k in ("passed", "failed", "skipped")}
    counts["errors"] = sum(v == "ERROR" for v in outcome.values())
    final = [line for line in output.splitlines() if re.match(r"=+ .* in [\d.]+s", line)]
    if final:
        for n, kind in SUMMARY_COUNT.findall(final[-1]):
            key = "errors" if kind.startswith("error") else kind
            if key in counts:
                counts[key] = int(n)
    # "collected 60 items / 4 deselected / 56 selected", or xdist's "8 workers [56 items]"
    collected = re.findall(r"(\d+) selected", output) or re.findall(r"(?:collected|\[)\s*(\d+) items", output)
    return {**counts, "collected": int(collected[-1]) if collected else None,
            "failures": sorted(t for t, v in outcome.items() if v in ("FAILED", "ERROR"))}


def kernel_tests(smoke: bool, limit_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", *(SMOKE_TESTS if smoke else ["tests/kernels"]),
           "-v", "-rfE", "--color=no", "-p", "no:cacheprovider"]
    if not smoke and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 2) // 2)))]
    if not smoke and importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "100"]
    done = run_one_command(cmd, limit_s, "tests", child_env(smoke))
    found = parse_pytest(done.output)
    status = ("timed_out" if done.timed_out else "ok" if done.rc == 0
              else "failed" if done.rc == 1 else "error")
    record = {"status": status, "seconds": done.seconds, "command": _shown(cmd), **found}
    if status == "error" or (status != "ok" and not found["failures"]):
        record["output_tail"] = tail(done.output)
    return record


# ---------------------------------------------------------------------------------------------
# Part 2: the kernel benchmarks


def gpu_kernels(smoke: bool, limit_s: float, results: Path) -> dict:
    # gpu_kernels stops starting cases at its budget; the margin leaves it time to finish the
    # case under way and write its files before this part's hard limit.
    budget = max(1.0, limit_s - (15 if smoke else 35))
    cmd = [sys.executable, "-m", "benchmarks.gpu_kernels", "--budget", f"{budget:.0f}",
           "--results", str(results)]
    if smoke:
        cmd += ["--smoke", "--providers", "peftloop,eager", "--ops", "rms_norm,lora_linear"]
    else:
        cmd += ["--shapes", "llama-1b,llama-8b"]
    start = time.time()
    done = run_one_command(cmd, limit_s, "kernels", child_env(smoke))
    written = sorted((p for p in results.glob("gpu_kernels-*.json") if p.stat().st_mtime >= start - 1),
                     key=lambda p: p.stat().st_mtime)
    record = {"status": "timed_out" if done.timed_out else "ok" if done.rc == 0 and written else "failed",
              "seconds": done.seconds, "command": _shown(cmd)}
    if not written:
        record["output_tail"] = tail(done.output)
        return record
    data = json.loads(written[-1].read_text())
    record.update(results=written[-1].name, measurements=len(data["records"]),
                  skipped=data.get("skipped", []), errors=data.get("errors", []),
                  rows=kernel_rows(data["records"]))
    return record


def kernel_rows(records: list[dict]) -> list[dict]:
    """Forward + backward time per kernel and shape: peftloop, eager, compile, and the speed-ups."""
    times = {(r["kernel"], r["x"], r["provider"]): r["p50"] for r in records
             if r["metric"] == "time" and r["mode"] == "full"}
    rows = []
    for kernel, shape in sorted({(k, x) for k, x, _ in times}):
        t = {p: times.get((kernel, shape, p)) for p in ("peftloop", "eager", "compile")}
        rows.append({"kernel": kernel, "shape": shape, **{f"{p}_ms": v for p, v in t.items()},
                     "vs_eager": t["eager"] / t["peftloop"] if t["eager"] and t["peftloop"] else None,
                     "vs_compile": t["compile"] / t["peftloop"] if t["compile"] and t["peftloop"] else None})
    return rows


# ---------------------------------------------------------------------------------------------
# Part 3: peftloop against the Trainer + peft, end to end


def end_to_end(smoke: bool, limit_s: float, work: Path) -> dict:
    """Base, adapter, the two timed bf16 runs one after the other, the fp32 parity pair together,
    all within one deadline; a step that fails is recorded and the later ones still run."""
    deadline = time.perf_counter() + limit_s
    shape = SMOKE_SHAPE if smoke else SHAPES["llama-1b"]
    steps, warmup, parity_steps = STEPS["smoke" if smoke else "gpu"]
    env = child_env(smoke=False)  # peftloop runs Triton on CUDA tensors, torch on CPU ones: never interpreted
    missing = [m for m in ("transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    record = {"status": "ok", "shape": shape.name, "config": shape.config_dict(), "dtype": "bf16",
              "steps": steps, "warmup": warmup, "speed": {}, "problems": []}
    if missing:
        return {**record, "status": "error", "problems": [f"not installed: {', '.join(missing)}"]}

    def left() -> float:
        return deadline - time.perf_counter()

    def child(label: str, *args: str) -> bool:
        if left() <= 0:
            record["problems"].append(f"{label}: not run, the part's budget was spent")
            record["status"] = "timed_out"
            return False
        done = run_one_command([*CHILD, *args], left(), label, env)
        return _check(record, label, done)

    base, adapter = work / f"base-{shape.name}-bf16", work / "parity-adapter"
    if not _same_config(base, shape) and not child("base", "write_base", json.dumps(shape.config_dict()),
                                                    str(base)):
        return record
    for system in SYSTEMS:
        out = work / f"speed-{system}.json"
        out.unlink(missing_ok=True)
        if child(system, "run_one", *_run_one_args(system, base, "bf16", steps, warmup, work, out)):
            record["speed"][system] = _speed(json.loads(out.read_text()))
            if "error" in record["speed"][system]:  # run_one's own verdict: a non-finite loss
                record["problems"].append(f"{system}: {record['speed'][system]['error']}")
                record["status"] = "failed"
    if all(s in record["speed"] for s in SYSTEMS):
        ours, theirs = record["speed"]["peftloop"], record["speed"]["trainer"]
        record["ratio"] = {k: ours[k] / theirs[k] for k in ("tokens_per_s", "peak_gpu_allocated_mib",
                                                             "peak_gpu_reserved_mib", "peak_rss_mib")
                           if ours.get(k) and theirs.get(k)}
    if child("adapter", "adapter", str(base), str(adapter)):
        record["parity"] = parity(record, base, adapter, parity_steps, work, left(), env)
    return record


def parity(record: dict, base: Path, adapter: Path, steps: int, work: Path, limit_s: float, env) -> dict:
    outs = {s: work / f"parity-{s}.json" for s in SYSTEMS}
    commands = {}
    for system, out in outs.items():
        out.unlink(missing_ok=True)
        args = _run_one_args(system, base, "fp32", steps, 0, work, out)
        commands[f"parity-{system}"] = [*CHILD, "run_one", *args, "--parity", "--adapter", str(adapter)]
    done = run_all(commands, max(1.0, limit_s), env)
    if not all([_check(record, label, d) for label, d in done.items()]):  # a list: every failure recorded
        return {"dtype": "fp32", "steps": steps}
    losses = {s: json.loads(out.read_text())["losses"] for s, out in outs.items()}
    a, b = losses["peftloop"], losses["trainer"]
    diff = max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else math.nan
    return {"dtype": "fp32", "steps": steps, **losses, "max_abs_diff": diff}


def _run_one_args(system, base, dtype, steps, warmup, work, out) -> list[str]:
    return ["--system", system, "--base", str(base), "--dtype", dtype, "--steps", str(steps),
            "--warmup", str(warmup), "--threads", "0", "--workdir", str(work / "runs" / system),
            "--out", str(out)]


def _check(record: dict, label: str, done: Finished) -> bool:
    if done.rc == 0:
        return True
    why = "over the part's budget" if done.timed_out else f"exit status {done.rc}"
    record["problems"].append(f"{label}: {why}\n{tail(done.output, 15)}")
    if record["status"] == "ok" or done.timed_out:
        record["status"] = "timed_out" if done.timed_out else "failed"
    return False


def _speed(run: dict) -> dict:
    keys = ("tokens_per_s", "median_step_s", "peak_gpu_allocated_mib", "peak_gpu_reserved_mib",
            "peak_rss_mib", "wall_s", "losses", "step_times_s", "error")
    return {k: run.get(k) for k in keys if k in run}


def _same_config(base: Path, shape: Shape) -> bool:
    """The base is written once and reused while its shape is unchanged (save_pretrained writes it
    into a temporary folder and renames it: a config.json means a complete checkpoint)."""
    try:
        written = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(written.get(k) == v for k, v in shape.config_dict().items() if k != "torch_dtype")


# ---------------------------------------------------------------------------------------------
# The children (python -m benchmarks.gpu_suite --_child ...)


def child_main(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    import torch

    if kind == "write_base":  # random weights, seed 42, made on the GPU when there is one (fast)
        from peftloop.models import save_pretrained
        from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

        config, folder = LlamaConfig.from_dict(json.loads(args[0])), Path(args[1])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model.init_weights(torch.Generator(device).manual_seed(42))
        if folder.exists():
            shutil.rmtree(folder)
        save_pretrained(model.to(torch.bfloat16), folder)  # bf16: as Llama-3.2-1B ships, half the bytes
        return 0
    if kind == "adapter":  # PEFT's init, written aside and renamed: never a half-written adapter
        from benchmarks.run_one import initial_adapter

        out = Path(args[1])
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        initial_adapter(Path(args[0]), partial, 0.0)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        return 0
    if kind == "run_one":  # run_one's own command line, plus the GPU's peak memory when it has none
        from benchmarks import run_one

        sys.argv = ["benchmarks/run_one.py", *args]
        rc = run_one.main()
        out = Path(args[args.index("--out") + 1])
        if rc == 0 and torch.cuda.is_available():
            result = json.loads(out.read_text())
            result.setdefault("peak_gpu_allocated_mib", torch.cuda.max_memory_allocated() / 2**20)
            result.setdefault("peak_gpu_reserved_mib", torch.cuda.max_memory_reserved() / 2**20)
            out.write_text(json.dumps(result) + "\n")
        return rc
    raise SystemExit(f"gpu_suite: unknown child {kind!r}")


# ---------------------------------------------------------------------------------------------
# The report


def report(parts: dict[str, dict], device: str, smoke: bool, budgets: dict, results: Path) -> Path:
    records = [{"part": name, **rec} for name, rec in parts.items()]
    body = ["Per-part budget and time used:", "",
            *markdown_table(["part", "status", "seconds", "limit (s)"], align="llrr",
                            rows=[(n, r["status"], f"{r['seconds']:.0f}", f"{r['limit_s']:.0f}")
                                  for n, r in parts.items()])]
    sections = {"kernel_tests": lambda r: _tests_md(r, device), "gpu_kernels": _kernels_md,
                "end_to_end": _e2e_md}
    for name, record in parts.items():
        body += ["", *sections[name](record)]
    libraries = [m for m in ("torch", "triton", "transformers", "peft") if importlib.util.find_spec(m)]
    return write_results("gpu_suite", records, title=f"The GPU suite on {device}", body=body,
                         machine_name=device, libraries=libraries, results=results,
                         meta={"smoke": smoke, "budgets_s": budgets})


def _tests_md(r: dict, device: str) -> list[str]:
    lines = [f"## 1. Kernel tests ({'Triton interpreted on the CPU' if 'smoke' in device else 'on the GPU'})",
             "", _command_md(r) + f"{r['status']}; " + ", ".join(
                 f"{r.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
             + f" of {r.get('collected') or '?'} collected, {r['seconds']:.0f} s."]
    if r.get("failures"):
        lines += ["", "Failures:", "", *(f"- `{name}`" for name in r["failures"])]
    return lines + _problem_md(r)


def _command_md(r: dict) -> str:
    return f"`{r['command']}`: " if r.get("command") else ""


def _ms(v):
    return "-" if v is None else f"{v:.3f}"


def _x(v):
    return "-" if v is None else f"{v:.3g}x"


def _kernels_md(r: dict) -> list[str]:
    lines = ["## 2. Kernel benchmarks (bf16, forward + backward, p50 ms)", "",
             _command_md(r) + f"{r['status']}, {r.get('measurements', 0)} measurements"
             + (f" in `{r['results']}`" if r.get("results") else "") + f", {r['seconds']:.0f} s."]
    if r.get("rows"):
        lines += ["", *markdown_table(
            ["kernel", "shape", "peftloop", "eager", "compile", "speed-up vs eager", "vs compile"],
            [(x["kernel"], x["shape"], _ms(x["peftloop_ms"]), _ms(x["eager_ms"]), _ms(x["compile_ms"]),
              _x(x["vs_eager"]), _x(x["vs_compile"])) for x in r["rows"]], align="llrrrrr")]
    if r.get("skipped"):
        lines += ["", f"Not measured (over the budget): {', '.join(r['skipped'])}."]
    lines += [f"- failed: {e['x']} {e['kernel']} {e['provider']}: `{e['error']}`"
              for e in r.get("errors", [])]
    return lines + _problem_md(r)


def _mib(v):
    return "-" if v is None else f"{v:,.0f}"


def _e2e_md(r: dict) -> list[str]:
    lines = [f"## 3. peftloop vs transformers.Trainer + peft, `{r.get('shape')}` shape", "",
             f"{r['status']}, {r['seconds']:.0f} s. LoRA r=16 on q,k,v,o,gate,up,down; 4 x 2 micro-batches "
             f"of 256 tokens; {r.get('dtype')}, {r.get('steps')} steps of which {r.get('warmup')} warm-up.",
             ""]
    speed = r.get("speed", {})
    if speed:
        lines += markdown_table(
            ["system", "tokens/s", "median step (s)", "peak GPU allocated (MiB)", "peak GPU reserved (MiB)",
             "peak RSS (MiB)"],
            [(s, f"{v['tokens_per_s']:,.0f}", f"{v['median_step_s']:.3f}",
              _mib(v.get("peak_gpu_allocated_mib")), _mib(v.get("peak_gpu_reserved_mib")),
              _mib(v.get("peak_rss_mib"))) for s, v in speed.items()],
            align="lrrrrr")
    if r.get("ratio"):
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r["ratio"].items())
        lines += ["", f"peftloop / Trainer: {ratios}."]
    p = r.get("parity", {})
    if "max_abs_diff" in p:
        lines += ["", f"Loss parity ({p['dtype']}, {p['steps']} steps, one initial adapter, no dropout): "
                  f"max |difference| {p['max_abs_diff']:.2e}.", "",
                  *markdown_table(["step", "peftloop", "trainer"],
                                  [(i + 1, f"{a:.6f}", f"{b:.6f}") for i, (a, b) in
                                   enumerate(zip(p["peftloop"], p["trainer"]))], align="rrr")]
    return lines + _problem_md(r)


def _problem_md(r: dict) -> list[str]:
    out = []
    for text in r.get("problems", []) + ([r["output_tail"]] if r.get("output_tail") else []):
        out += ["", "```", text, "```"]
    return out


def _shown(cmd: list[str]) -> str:
    """The command as it would be typed from the repository root (no machine paths)."""
    return shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["--_child"]:
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the three parts on the CPU at tiny sizes")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results; "
                                                      "--smoke: benchmarks/results/tmp/smoke)")
    for part, seconds in BUDGETS.items():
        parser.add_argument(f"--{part.replace('_', '-')}-s", type=float, dest=part, metavar="SECONDS",
                            help=f"{part}'s budget in seconds (default {seconds}; "
                                 f"--smoke: {SMOKE_BUDGETS[part]})")
    parser.add_argument("--parts", default=",".join(BUDGETS),
                        help=f"the parts to run, comma-separated (default: all: {','.join(BUDGETS)})")
    args = parser.parse_args()
    chosen = args.parts.split(",")
    if set(chosen) - set(BUDGETS):
        parser.error(f"--parts: unknown {', '.join(sorted(set(chosen) - set(BUDGETS)))}; "
                     f"the parts: {', '.join(BUDGETS)}")

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or pass --smoke to run the three parts on the CPU at tiny sizes", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = args.results or (RESULTS / "tmp" / "smoke" if args.smoke else RESULTS)
    work = results / "tmp" / "gpu_suite"
    work.mkdir(parents=True, exist_ok=True)
    device = f"{machine()} (smoke test)" if args.smoke else machine()
    budgets = {p: getattr(args, p) or (SMOKE_BUDGETS if args.smoke else BUDGETS)[p] for p in chosen}
    print(f"gpu_suite on {device}; budgets (s): {budgets}", flush=True)

    run_part = {"kernel_tests": lambda limit: kernel_tests(args.smoke, limit),
                "gpu_kernels": lambda limit: gpu_kernels(args.smoke, limit, results),
                "end_to_end": lambda limit: end_to_end(args.smoke, limit, work)}
    parts, spare = {}, 0.0
    for name in budgets:
        run, limit, start = run_part[name], budgets[name] + spare, time.perf_counter()
        try:
            record = run(limit)
        except Exception as e:  # a bug of ours in one part must not lose the others' figures
            record = {"status": "error", "problems": [f"{type(e).__name__}: {e}"]}
        except SystemExit:  # SIGTERM (an outer timeout): the children are dead; keep what was measured
            parts[name] = {"status": "killed", "seconds": time.perf_counter() - start, "limit_s": limit,
                           "problems": ["stopped by SIGTERM"]}
            report(parts, device, args.smoke, budgets, results)
            raise
        record.update(seconds=time.perf_counter() - start, limit_s=limit)
        spare = max(0.0, limit - record["seconds"])  # unused time goes to the next part
        parts[name] = record
        print(f"gpu_suite: {name} {record['status']} in {record['seconds']:.0f} s (limit {limit:.0f} s)",
              flush=True)
    report(parts, device, args.smoke, budgets, results)
    return 0 if all(r["status"] == "ok" for r in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
