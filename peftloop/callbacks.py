"""Callbacks: code that watches the loop (logging, early stopping) without changing its math.

A callback may set ``state.should_stop = True``; the loop stops after the current step (on every
rank). ``train()`` calls them in this order: ``JsonlLogger`` (rank 0), the caller's, then
``EarlyStopping`` when ``early_stopping_patience`` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    """Stop when ``metric`` has not improved (by more than ``min_delta``) for ``patience`` evaluations.
    The count lives in the state so that it survives a resume."""

    def __init__(self, patience: int, metric: str = "eval_loss", min_delta: float = 0.0):
        self.patience, self.metric, self.min_delta = patience, metric, min_delta

    def on_evaluate(self, state, metrics):
        value = metrics[self.metric]
        if state.best_metric is None or value < state.best_metric - self.min_delta:
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


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # an unreadable line (a crash mid-write) is dropped
