"""benchmarks.many_adapters measures what it says: every (K, mode) row from its own processes, and
ratios and targets computed from the recorded figures. Timed figures never live here: the smoke run
trains a tiny model for two steps, and only the bookkeeping is checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks.common import RESULT_NAME, ROOT
from benchmarks.many_adapters import (
    MODES,
    TINY,
    child_spec,
    parse_args,
    ratios,
    run_spec,
    tables,
    variant,
    write_base,
)


@pytest.mark.slow
def test_smoke_run_records_every_k_and_mode_and_its_ratios(tmp_path):
    command = [sys.executable, "-m", "benchmarks.many_adapters", "--smoke", "--results", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result] = tmp_path.glob("*.json")
    assert RESULT_NAME.match(result.name) and result.name.startswith("many_adapters-")
    assert result.with_suffix(".md").is_file()
    data = json.loads(result.read_text())
    rows = {(r["k"], r["mode"]): r for r in data["records"]}
    assert sorted(rows) == sorted((k, mode) for k in (1, 2) for mode in MODES)
    for (k, mode), r in rows.items():
        assert "skipped" not in r, r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert math.isfinite(r["peak_rss_mib"]) and r["peak_rss_mib"] > 50  # a python process with torch
        assert r["processes"] == len(r["runs"]) == (1 if mode == "fused" else k)
        assert sorted(j for run in r["runs"] for j in run["jobs"]) == list(range(k))
        tokens = sum(run["measured_tokens"] for run in r["runs"])
        assert tokens == k * data["steps"] * data["micro_batch_size"] * data["seq_len"]
        assert r["tokens_per_s"] == pytest.approx(tokens / r["measured_s"])
        peaks = [run["peak_rss_mib"] for run in r["runs"]]
        assert r["peak_rss_mib"] == pytest.approx(sum(peaks) if mode == "concurrent" else max(peaks))
    assert rows[(2, "concurrent")]["threads_per_process"] == max(1, data["threads"] // 2)
    # the modes train the same jobs: job k's loss fused, alone, and alongside the others agree
    for k in (1, 2):
        fused = rows[(k, "fused")]["train_losses"]
        for mode in ("sequential", "concurrent"):
            assert rows[(k, mode)]["train_losses"] == pytest.approx(fused, rel=1e-4)
    for s in data["ratios"]:
        fused, seq, conc = (rows[(s["k"], mode)] for mode in MODES)
        speedup, memory = s["fused_over_sequential_tokens_per_s"], s["fused_over_concurrent_peak_rss"]
        assert speedup == pytest.approx(fused["tokens_per_s"] / seq["tokens_per_s"])
        assert memory == pytest.approx(fused["peak_rss_mib"] / conc["peak_rss_mib"])
    assert len(data["ratios"]) == 2
    if data["plot"]:
        assert (tmp_path / data["plot"]).is_file() and data["plot"].endswith(".png")


def test_gradient_checkpointing_reaches_the_child_and_names_its_results(tmp_path, monkeypatch):
    """--gradient-checkpointing checkpoints the model every mode trains (and only then), trains the
    same jobs (the same losses), and writes many_adapters__checkpointed-... beside the default run's;
    --limit-heap-retention reaches the child too (recorded, not applied: it is process-wide)."""
    assert variant(parse_args([])) is None
    assert variant(parse_args(["--gradient-checkpointing"])) == "checkpointed"
    assert variant(parse_args(["--micro-batch", "1", "--gradient-checkpointing"])) == "checkpointed_mb1"
    heap = parse_args(["--gradient-checkpointing", "--limit-heap-retention"])
    assert variant(heap) == "checkpointed_heaplimit"
    import torch

    import peftloop.allocator
    import peftloop.models

    calls = []
    enable = peftloop.models.enable_gradient_checkpointing
    monkeypatch.setattr(peftloop.models, "enable_gradient_checkpointing",
                        lambda model, **kw: calls.append(type(model).__name__) or enable(model, **kw))
    limited = []
    monkeypatch.setattr(peftloop.allocator, "limit_heap_retention", lambda: limited.append(True))
    base = write_base(TINY, tmp_path / "base")
    threads = torch.get_num_threads()
    losses = {}
    try:
        for flag in ([], ["--gradient-checkpointing", "--limit-heap-retention"]):
            args = parse_args(["--smoke", *flag])
            spec = child_spec(args, base, "fused", [0, 1], 1, tmp_path / f"run{len(flag)}")
            losses[bool(flag)] = run_spec(spec)["train_losses"]
    finally:
        torch.set_num_threads(threads)
    assert calls == ["LlamaForCausalLM"] and limited == [True]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def row(k, mode, tokens_per_s, peak, losses=(1.0,)):
    return {"shape": "s", "k": k, "mode": mode, "processes": 1, "threads_per_process": 2,
            "tokens_per_s": tokens_per_s, "wall_s": 1.0, "peak_rss_mib": peak, "sampled_rss_mib": peak,
            "sampled_anon_mib": peak, "peak_gpu_mib": None, "train_losses": list(losses)}


def test_ratios_and_targets_come_from_the_rows():
    rows = [row(4, "fused", 260.0, 300.0, (2.0, 3.0)), row(4, "sequential", 200.0, 250.0, (2.0, 3.5)),
            row(4, "concurrent", 210.0, 1000.0), row(2, "fused", 100.0, 500.0),
            row(2, "sequential", 100.0, 400.0), {"shape": "s", "k": 2, "mode": "concurrent", "processes": 2,
                                                 "skipped": "skipped: needs ~9 GiB"}]
    four, two = ratios(rows)
    assert four["fused_over_sequential_tokens_per_s"] == pytest.approx(1.3)
    assert four["fused_over_concurrent_peak_rss"] == pytest.approx(0.3)
    assert four["speedup_target_met"] is True and four["memory_target_met"] is True
    assert four["max_train_loss_diff"] == pytest.approx(0.5)
    assert two["fused_over_concurrent_peak_rss"] is None and "speedup_target_met" not in two
    rows[1]["tokens_per_s"] = 201.0  # 260 / 201 < 1.3
    rows[2]["peak_rss_mib"] = 700.0  # 300 / 700 > 0.4
    four = ratios(rows)[0]
    assert four["speedup_target_met"] is False and four["memory_target_met"] is False
    table = "\n".join(tables(rows, ratios(rows), gpu=False))
    assert "1.29x (**missed**)" in table and "0.43x (**missed**)" in table
    assert "skipped: needs ~9 GiB" in table
