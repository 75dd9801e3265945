"""Learning-rate schedules as one pure function of the step (nanoGPT's ``get_lr``).

The multipliers are transformers' (``get_linear_schedule_with_warmup``,
``get_cosine_with_min_lr_schedule_with_warmup``, ``get_constant_schedule_with_warmup``), so the same
settings give the same learning rate at every step in both systems.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Warmup in steps: warmup_steps when set, else ceil(warmup_ratio * total_steps) (HF's rule)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, kind: str,
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the first step is step 0)."""
    # 1) linear warmup from 0 (HF's schedule gives step 0 a learning rate of 0 when warming up)
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    if kind == "constant":
        return peak_lr
    # 2) after warmup, decay over the remaining steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return peak_lr * max(0.0, 1.0 - progress)
    if kind == "cosine":
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
    raise ValueError(f"unknown lr_scheduler {kind!r}")
