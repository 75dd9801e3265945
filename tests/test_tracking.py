"""Tracking: the measurements every log record carries (step time, elapsed, ETA, peak memory) and
the TensorBoard event files of ``report_to="tensorboard"``, read back and compared with log.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftloop import train
from peftloop.callbacks import TensorBoardCallback, format_log, peak_memory_mb
from peftloop.config import ConfigError, TrainConfig
from peftloop.config_io import parse_overrides
from peftloop.train import TrainState
from tests.helpers import StopAt, lora_model, toy_examples

MEASUREMENTS = ("tokens_per_s", "step_time", "elapsed", "eta", "peak_memory_mb")


def config(tmp_path: Path, **overrides) -> TrainConfig:
    fields = dict(output_dir=str(tmp_path), max_steps=6, micro_batch_size=4, log_every=2, eval_every=3,
                  learning_rate=1e-2, progress_bar=False, report_to="tensorboard")
    return TrainConfig(**{**fields, **overrides})


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file under log_dir, as TensorBoard reads them
    (including its purge of the steps a resumed run logs again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def f32(value: float) -> float:
    """TensorBoard stores a scalar as a float32."""
    return float(np.float32(value))


# --------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_scalars_are_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    train(lora_model(), toy_examples(32), toy_examples(8, seed=1), config(tmp_path))
    log = read_log(tmp_path)
    scalars = read_scalars(tmp_path / "runs")

    logs = [r for r in log if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "epoch", *MEASUREMENTS):
        assert scalars[f"train/{key}"] == {r["step"]: f32(r[key]) for r in logs}, key

    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for name in ("loss", "perplexity", "tokens"):
        assert scalars[f"eval/{name}"] == {r["step"]: f32(r[f"eval_{name}"]) for r in evals}, name
    assert "train/step" not in scalars and "eval/step" not in scalars


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    """Stopped at step 3 with checkpoint-2 written: the resumed run logs step 3 again, and
    TensorBoard shows each step once, with the values of log.jsonl (cut back the same way)."""
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    data = toy_examples(32)
    first = config(tmp_path, max_steps=4, log_every=1, eval_every=0, save_every=2)
    train(lora_model(), data, config=first, callbacks=[StopAt(3)])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]

    train(lora_model(), data, config=config(tmp_path, max_steps=4, log_every=1, eval_every=0, save_every=2,
                                              resume_from_checkpoint=True))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    scalars = read_scalars(tmp_path / "runs")
    for key in ("loss", "lr", "grad_norm"):
        assert scalars[f"train/{key}"] == {r["step"]: f32(r[key]) for r in log}, key


def test_only_the_main_process_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    callback = TensorBoardCallback(tmp_path / "runs")
    state = TrainState(is_main_process=False)
    callback.on_train_begin(state)
    callback.on_log(state, {"step": 1, "loss": 1.0})
    callback.on_evaluate(state, {"step": 1, "eval_loss": 1.0})
    callback.on_train_end(state)
    assert not (tmp_path / "runs").exists()


def test_a_missing_tensorboard_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'peftloop\[tensorboard\]'"):
        TensorBoardCallback(tmp_path / "runs")
    with pytest.raises(ImportError, match=r"pip install 'peftloop\[tensorboard\]'"):
        train(lora_model(), toy_examples(8), config=config(tmp_path / "out"))
    assert not (tmp_path / "out" / "log.jsonl").exists()  # stopped before the first step


def test_report_to_takes_a_name_or_a_list_and_refuses_others():
    assert TrainConfig().report_to == "none"
    assert TrainConfig(report_to=["tensorboard"]).report_to == ["tensorboard"]
    assert parse_overrides(["--report_to", "tensorboard"], {"train": TrainConfig}) == {
        "train": {"report_to": ["tensorboard"]}}
    with pytest.raises(ConfigError, match="train.report_to='wandb': expected 'none' or 'tensorboard'"):
        TrainConfig(report_to="wandb")


def test_no_event_files_unless_asked(tmp_path):
    train(lora_model(), toy_examples(8), config=config(tmp_path, max_steps=2, report_to="none"))
    assert read_log(tmp_path) and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# The measurements of each log record


def test_log_records_carry_step_time_elapsed_eta_and_peak_memory(tmp_path):
    train(lora_model(), toy_examples(32), config=config(tmp_path, max_steps=6, log_every=2, report_to="none"))
    logs = [r for r in read_log(tmp_path) if "loss" in r]
    for r in logs:
        assert all(r[k] > 0 for k in ("tokens_per_s", "step_time", "elapsed", "peak_memory_mb")), r
    elapsed = [r["elapsed"] for r in logs]
    assert elapsed == sorted(elapsed)
    # each interval's step time x its 2 steps: together no more than the time since the start
    assert sum(2 * r["step_time"] for r in logs) <= elapsed[-1] * 1.01
    # eta: the steps left at the mean pace so far; none left at the end
    for r in logs[:-1]:
        assert r["eta"] == pytest.approx(r["elapsed"] / r["step"] * (6 - r["step"]))
    assert logs[-1]["eta"] == 0.0


def test_the_console_line_shows_the_measurements_compactly(tmp_path, capsys):
    train(lora_model(), toy_examples(16), config=config(tmp_path, max_steps=2, log_every=2, report_to="none"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step=2 "))
    for key in ("loss", "lr", "grad_norm", *MEASUREMENTS):
        assert f" {key}=" in line, line


def test_format_log():
    logs = {"step": 7, "loss": 2.123456, "step_time": 0.12345, "elapsed": 83.4, "eta": 3725.0,
            "peak_memory_mb": 512.4, "tokens_per_s": 1234.56, "skipped": False}
    assert format_log(logs) == ("step=7 loss=2.123 step_time=0.123s elapsed=1:23 eta=1:02:05 "
                                "peak_memory_mb=512 tokens_per_s=1235 skipped=False")
    assert format_log(logs, ("loss", "missing", "eta")) == "loss=2.123 eta=1:02:05"


def test_peak_memory_on_cpu_is_the_resident_high_water_mark():
    resource = pytest.importorskip("resource")
    status = Path("/proc/self/status")
    rss_kb = None
    if status.exists():  # what the process holds now: the peak that follows is at least this
        rss_kb = next(int(line.split()[1]) for line in status.read_text().splitlines()
                      if line.startswith("VmRSS:"))
    peak = peak_memory_mb(torch.device("cpu"))
    assert rss_kb is None or peak >= rss_kb / 1024
    # ru_maxrss is the same counter on Linux (kB), read a moment later
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)


def test_peak_memory_on_cuda_is_the_most_allocated(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: seen.append(device) or 3 * 2**20)
    assert peak_memory_mb(torch.device("cuda", 1)) == 3.0
    assert seen == [torch.device("cuda", 1)]
