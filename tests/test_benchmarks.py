"""The benchmark harness measures what it says: the same job in every system, and honest summaries.

Timed figures never live in tests; these check the machinery on the small shape with a few steps:
the parity run gives equal loss curves in peftloop and the Trainer, every system's run reports
its steps, and the summary and table compute their ratios from the runs they are given. And the
suite's shape: every benchmark runs as ``python -m benchmarks.<name>``, writes its results
through the one writer, and every results file is named ``<benchmark>-<machine>-<date>.<ext>``."""

from __future__ import annotations

import argparse
import json
import pkgutil
import subprocess
import sys

import pytest

import benchmarks
from benchmarks.common import RESULT_NAME, RESULTS, ROOT, markdown_table, write_results
from benchmarks.compare import markdown, parity, run, summarize, write_base

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return write_base("small", tmp_path_factory.mktemp("bench") / "base-small")


@pytest.mark.slow
def test_parity_run_gives_the_same_loss_curve_in_both_systems(small_base, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = argparse.Namespace(warmup=0, threads=0, steps=3)
    result = parity(small_base, args, tmp_path, steps=3)
    assert len(result["peftloop"]) == len(result["trainer"]) == 3
    assert result["max_abs_diff"] <= 1e-4, result  # the bound, per step, in fp32
    # the curves are real losses of a 8,192-token vocabulary (random targets: ~ln 8192 = 9.01)
    assert all(8.0 < x < 10.0 for x in result["peftloop"])
    assert result["peftloop"] != [result["peftloop"][0]] * 3  # the adapter moves


@pytest.mark.slow
def test_every_system_runs_the_job_and_reports_its_steps(small_base, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = argparse.Namespace(warmup=1, threads=0, steps=2)
    for system in ("peftloop", "handloop"):
        r = run(system, small_base, "fp32", args, tmp_path)
        assert r["system"] == system and r["steps"] == 2 and len(r["step_times_s"]) == 2
        assert r["median_step_s"] > 0 and r["peak_rss_mib"] > 100 and "error" not in r
        assert len(r["losses"]) == 2


def test_summary_and_table_take_their_ratios_from_the_runs():
    runs = [{"system": "peftloop", "median_step_s": 1.0, "peak_rss_mib": 500.0},
            {"system": "peftloop", "median_step_s": 1.2, "peak_rss_mib": 520.0},
            {"system": "trainer", "median_step_s": 2.0, "peak_rss_mib": 1000.0},
            {"system": "trainer", "median_step_s": 2.2, "peak_rss_mib": 1010.0}]
    summary = summarize(runs, "small", "fp32", {"fp32": 100.0, "bf16": 10.0})
    # two passes: each system's slower pass is kept (the upper median), for both alike
    assert summary["peftloop"]["median_step_s"] == 1.2 and summary["trainer"]["median_step_s"] == 2.2
    assert summary["ratio"]["tokens_per_s"] == pytest.approx(2.2 / 1.2)
    assert summary["ratio"]["peak_rss"] == pytest.approx(520 / 1010)
    assert summary["peftloop"]["spread"] == pytest.approx(0.2)
    results = {"date": "2026-01-01", "machine": "m", "torch": "t", "threads": 2, "load_before": 0.1,
               "load_after": 0.2, "gemm_peak": {"fp32": 100.0, "bf16": 10.0},
               "configs": {"small/fp32": summary}}
    table = markdown(results, "python -m benchmarks.compare")
    assert "**1.83x**" in table and "**0.51x**" in table and "`python -m benchmarks.compare`" in table
    json.dumps(results)  # the results file is JSON


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_runs_as_a_module_and_answers_help(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in source, (f"benchmarks/{name}.py edits sys.path: it runs as "
                                      f"python -m benchmarks.{name}")
    assert 'if __name__ == "__main__":' in source
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")


def test_result_files_are_named_benchmark_machine_date():
    names = [p.name for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert names
    for name in names:
        match = RESULT_NAME.match(name)
        assert match, f"benchmarks/results/{name} is not <benchmark>-<machine>-<YYYY-MM-DD>.<json|md|png>"
        assert match["benchmark"] in MODULES, (f"benchmarks/results/{name}: no benchmark "
                                               f"{match['benchmark']!r}")


def test_write_results_writes_json_and_markdown_beside_it(tmp_path):
    records = [{"variant": "a", "seconds": 1.5}, {"variant": "b", "seconds": 0.25}]
    rows = [(r["variant"], f"{r['seconds']:.2f}") for r in records]
    table = markdown_table(["variant", "seconds"], rows, "lr")
    assert table[:2] == ["| variant | seconds |", "|---|---:|"]
    stem = write_results("ce_memory", records, title="A title", body=["Some prose.", "", *table],
                         meta={"method": "m"}, machine_name="Some CPU, 2 CPUs, AVX2", date="2026-01-02",
                         results=tmp_path)
    assert stem == tmp_path / "ce_memory-some-cpu-2-cpus-avx2-2026-01-02"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ".json", stem.name + ".md"]
    assert all(RESULT_NAME.match(p.name) for p in tmp_path.iterdir())
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["benchmark"] == "ce_memory" and data["machine"] == "Some CPU, 2 CPUs, AVX2"
    assert data["date"] == "2026-01-02" and data["command"].startswith("python -m benchmarks.ce_memory")
    assert data["method"] == "m" and data["records"] == records and "torch" in data
    md = stem.with_suffix(".md").read_text().splitlines()
    assert md[0] == "# A title"
    assert "Some CPU, 2 CPUs, AVX2" in md[2] and "`python -m benchmarks.ce_memory" in md[2]
    assert md[-5:] == ["", *table]
