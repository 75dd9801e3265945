"""benchmarks/gpu_suite.py, the one command of a GPU run, checked on this CPU machine: its --smoke run
goes through the same three parts (kernel tests, kernel benchmarks, peftloop vs the Trainer) and
reports real figures; without a GPU the real run stops at once and says why; the pytest output it
counts and the budget it enforces behave as the GPU run needs them to."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.common import RESULTS, ROOT
from benchmarks.gpu_suite import parse_pytest, run_all


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_smoke_run_reports_the_three_parts_with_real_figures(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    before = {p.name for p in RESULTS.glob("gpu_*")}
    command = [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--results", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [report] = tmp_path.glob("gpu_suite-*-smoke-test-*.json")
    data = json.loads(report.read_text())
    parts = {r["part"]: r for r in data["records"]}
    assert list(parts) == ["kernel_tests", "gpu_kernels", "end_to_end"]
    assert all(r["status"] == "ok" for r in parts.values()), {n: r["status"] for n, r in parts.items()}

    tests = parts["kernel_tests"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0 and not tests["failures"]
    assert tests["passed"] + tests["skipped"] == tests["collected"]

    kernels = parts["gpu_kernels"]
    assert kernels["measurements"] > 0 and (tmp_path / kernels["results"]).is_file()
    assert kernels["rows"]
    assert all(_finite(r["peftloop_ms"]) and r["peftloop_ms"] > 0 for r in kernels["rows"])

    e2e = parts["end_to_end"]
    for system in ("peftloop", "trainer"):
        speed = e2e["speed"][system]
        assert _finite(speed["tokens_per_s"]) and speed["tokens_per_s"] > 0, speed
        assert len(speed["losses"]) == e2e["steps"] and all(_finite(x) for x in speed["losses"])
    parity = e2e["parity"]
    assert len(parity["peftloop"]) == len(parity["trainer"]) == parity["steps"] > 0
    assert _finite(parity["max_abs_diff"]) and parity["max_abs_diff"] < 1e-3  # fp32, same adapter and batches

    markdown = report.with_suffix(".md").read_text()
    for heading in ("## 1. Kernel tests", "## 2. Kernel benchmarks", "## 3. peftloop vs"):
        assert heading in markdown
    assert {p.name for p in RESULTS.glob("gpu_*")} == before, "the smoke run wrote into benchmarks/results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without a GPU")
def test_without_a_gpu_the_real_run_stops_at_once_and_says_why(tmp_path):
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.gpu_suite", "--results", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr
    assert time.perf_counter() - start < 60
    assert not list(tmp_path.iterdir())


PLAIN = """\
============================= test session starts ==============================
collected 5 items / 1 deselected / 4 selected

tests/kernels/test_rope.py::test_rope[dtype0-torch] PASSED               [ 25%]
tests/kernels/test_rope.py::test_rope[dtype0-triton] FAILED              [ 50%]
tests/kernels/test_rope.py::test_odd PASSED                              [ 75%]
tests/kernels/test_rope.py::test_odd ERROR                               [ 75%]
tests/kernels/test_swiglu.py::test_skip SKIPPED (no Triton)              [100%]
=========================== short test summary info ============================
FAILED tests/kernels/test_rope.py::test_rope[dtype0-triton] - AssertionError: 3 elements differ
ERROR tests/kernels/test_rope.py::test_odd - RuntimeError: teardown
============== 1 failed, 2 passed, 1 skipped, 1 error in 12.34s ===============
"""
XDIST_STOPPED = """\
8 workers [271 items]
[gw1] [  0%] PASSED tests/kernels/test_nf4_kernel.py::test_dequant[shape0-64]
[gw0] [  1%] FAILED tests/kernels/test_lora_linear.py::test_forward[bf16-p0]
[gw2] [  1%] PASSED tests/kernels/test_rms_norm.py::test_rms_norm_property
"""


def test_pytest_output_is_counted_whether_the_run_finished_or_was_stopped():
    done = parse_pytest(PLAIN)
    # the closing summary's counts (pytest counts a test that passed and then failed its teardown twice)
    counts = (done["passed"], done["failed"], done["errors"], done["skipped"], done["collected"])
    assert counts == (2, 1, 1, 1, 4)
    assert done["failures"] == ["tests/kernels/test_rope.py::test_odd",
                                "tests/kernels/test_rope.py::test_rope[dtype0-triton]"]
    stopped = parse_pytest(XDIST_STOPPED)  # no closing summary: what finished is still counted
    assert (stopped["passed"], stopped["failed"], stopped["collected"]) == (2, 1, 271)
    assert stopped["failures"] == ["tests/kernels/test_lora_linear.py::test_forward[bf16-p0]"]


def test_a_child_over_its_budget_is_stopped_with_everything_it_started():
    hung = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            "print('grandchild', p.pid, flush=True)\n"
            "time.sleep(300)\n")
    start = time.perf_counter()
    done = run_all({"quick": [sys.executable, "-c", "print('fine')"], "hung": [sys.executable, "-c", hung]},
                   limit_s=15)
    assert time.perf_counter() - start < 60
    assert done["quick"].rc == 0 and not done["quick"].timed_out and "fine" in done["quick"].output
    assert done["hung"].timed_out and done["hung"].rc != 0
    grandchild = int(done["hung"].output.split("grandchild")[1].split()[0])
    deadline = time.time() + 10
    while _running(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(grandchild), "the hung child's own child survived the budget"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that never comes in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")
