"""Callbacks: code that watches the loop (logging, early stopping) without changing its math, and
the measurements the log records carry.

A callback may set ``state.should_stop = True``; the loop stops after the current step (on every
rank). ``train()`` calls them in this order: ``JsonlLogger`` (rank 0), ``TensorBoardCallback``
(rank 0, when ``report_to`` names "tensorboard"), the caller's, then ``EarlyStopping`` when
``early_stopping_patience`` is set.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

try:
    import resource  # the CPU peak-memory fallback where there is no /proc (macOS); absent on Windows
except ImportError:
    resource = None


class Callback:
    """Override what you need. ``state`` is the loop's ``TrainState``."""

    def on_train_begin(self, state) -> None: ...
    def on_before_optimizer_step(self, state, model) -> None:
        """After backward, unscaling and clipping: the gradients the optimizer is about to apply."""

    def on_step_end(self, state, metrics: dict[str, Any]) -> None: ...
    def on_log(self, state, logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, state, metrics: dict[str, Any]) -> None: ...
    def on_save(self, state, checkpoint_dir: Path) -> None: ...
    def on_train_end(self, state) -> None: ...


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved (by more than ``min_delta``) for ``patience`` evaluations:
    lower is better, or higher with ``greater_is_better`` (exact match). The count lives in the
    state so that it survives a resume."""

    def __init__(self, patience: int, metric: str = "eval_loss", min_delta: float = 0.0,
                 greater_is_better: bool = False):
        self.patience, self.metric, self.min_delta = patience, metric, min_delta
        self.sign = -1.0 if greater_is_better else 1.0  # compare sign * value: lower is better

    def on_evaluate(self, state, metrics):
        value = metrics[self.metric]
        if state.best_metric is None or self.sign * value < self.sign * state.best_metric - self.min_delta:
            state.best_metric, state.evals_without_improvement = value, 0
        else:
            state.evals_without_improvement += 1
            if state.evals_without_improvement >= self.patience:
                state.should_stop = True


class JsonlLogger(Callback):
    """Appends every log and evaluation record as one JSON line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, state):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, drop records from steps after the checkpoint: they will be logged again.
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, state, logs):
        self._write(logs)

    def on_evaluate(self, state, metrics):
        self._write(metrics)

    def _write(self, record):
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not kill the run over a log line
            if not getattr(self, "_warned", False):
                print(f"peftloop: cannot append to {self.path}: {e}; logging to the file stops")
                self._warned = True


class TensorBoardCallback(Callback):
    """Writes every number of the log and evaluation records as a TensorBoard scalar under
    ``log_dir``, against the optimizer step: ``train/<key>`` for a log record's keys (``train/loss``,
    ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``train/step_time``,
    ``train/peak_memory_mb``, ...), ``eval/<name>`` for an evaluation's ``eval_<name>``.
    ``train()`` adds one writing to ``OUTPUT/runs`` when ``report_to`` names "tensorboard";
    ``tensorboard --logdir OUTPUT/runs`` shows it. Only the main process writes.

    After a resume, TensorBoard drops the events of the steps after the checkpoint (they are
    logged again), as ``JsonlLogger`` drops their lines. Needs the ``tensorboard`` package
    (``pip install 'peftloop[tensorboard]'``): without it the constructor says so."""

    def __init__(self, log_dir: str | Path, flush_secs: int = 30):
        try:  # optional: only this callback needs it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"TensorBoardCallback (report_to='tensorboard') needs the tensorboard package, "
                              f"which is not installed ({e}): pip install 'peftloop[tensorboard]'") from None
        self.log_dir, self.flush_secs = Path(log_dir), flush_secs
        self._summary_writer = SummaryWriter
        self.writer = None

    def on_train_begin(self, state):
        if not state.is_main_process:
            return
        # purge_step: TensorBoard discards the events this folder holds for steps > global_step.
        self.writer = self._summary_writer(str(self.log_dir), purge_step=state.global_step + 1,
                                           flush_secs=self.flush_secs)

    def on_log(self, state, logs):
        self._scalars("train/", logs, state.global_step)

    def on_evaluate(self, state, metrics):
        self._scalars("eval/", {k.removeprefix("eval_"): v for k, v in metrics.items()}, state.global_step)

    def on_save(self, state, checkpoint_dir):
        if self.writer is not None:  # what a checkpoint has seen is on disk with it
            self.writer.flush()

    def on_train_end(self, state):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, global_step=step)


# ------------------------------------------------------------------------------------------------
# What the log records measure, and how the console shows them


def peak_memory_mb(device: torch.device) -> float | None:
    """This process's peak memory so far, in MiB. On CUDA: the most memory tensors on ``device``
    have held at once (``torch.cuda.max_memory_allocated``; the caching allocator reserves more).
    On a CPU: the resident set's high-water mark (VmHWM of /proc/self/status; ``ru_maxrss``
    where there is no /proc), which counts everything the process holds, Python included.
    None where neither exists (Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if resource is None:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


def format_log(logs: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    """``key=value`` pairs of a log record (``keys`` only, when given), compact: durations as
    m:ss, step time in seconds, memory in whole MiB, other floats to 4 significant digits."""
    return " ".join(f"{k}={_format_value(k, logs[k])}" for k in (logs if keys is None else keys) if k in logs)


def _format_value(key: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    if key in ("elapsed", "eta"):
        minutes, seconds = divmod(round(value), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    if key == "step_time":
        return f"{value:.3g}s"
    if key in ("peak_memory_mb", "tokens_per_s"):
        return f"{value:.0f}"
    return f"{value:.4g}"


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # an unreadable line (a crash mid-write) is dropped
