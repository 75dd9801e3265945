"""The training loop: one file, top to bottom.

    result = train(model, train_data, eval_data, TrainConfig(...))

Phases, in the order they run:

  1. set-up       device, seeds, precision (autocast + a GradScaler that is a no-op unless fp16)
  2. plan         micro-batches per epoch -> optimizer steps -> warmup, total
  3. optimizer    AdamW over the trainable parameters; resume restores it with everything else
  4. the step     for each optimizer step:
                    a. learning rate = lr_at(step)
                    b. take the accumulation window (grad_accum micro-batches) and count its
                       label tokens: the loss of the step is (sum of token losses) / (that count)
                    c. forward + backward per micro-batch, each scaled by 1 / count
                    d. unscale (fp16) -> clip (log the norm before clipping) -> optimizer step
                       (the scaler skips it when a gradient is inf/NaN) -> zero grads
  5. bookkeeping  log, evaluate, save a checkpoint, stop early; callbacks watch, never change the math
  6. the end      final evaluation, the adapter in PEFT's format in output_dir/adapter

The model is any ``nn.Module`` with adapters injected. peftloop's own models return the summed
token loss from ``model(input_ids, labels=...)`` (fused, chunked head + loss); any other model
(a transformers one, say) returns logits and the loss is computed here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftloop import checkpoint
from peftloop.callbacks import Callback, EarlyStopping, JsonlLogger
from peftloop.config import TrainConfig
from peftloop.data import IGNORE_INDEX, collate, input_tokens, label_tokens, micro_batches, num_micro_batches
from peftloop.optim import build_optimizer
from peftloop.schedule import lr_at, warmup_steps_for


@dataclass
class TrainState:
    """Where the loop is. Saved in every checkpoint; a resumed run continues from exactly here."""

    global_step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """The epoch the next micro-batch comes from."""
    batch_in_epoch: int = 0
    """Micro-batches of that epoch already consumed."""
    loss_sum: float = 0.0
    """Sum of the step losses so far (for the mean training loss)."""
    tokens_seen: int = 0
    skipped_steps: int = 0
    """Steps the fp16 scaler skipped because a gradient was inf/NaN."""
    best_metric: float | None = None
    evals_without_improvement: int = 0
    should_stop: bool = field(default=False, metadata={"saved": False})


@dataclass
class TrainResult:
    global_step: int
    train_loss: float
    """Mean of the step losses over the whole run (including steps before a resume)."""
    metrics: dict[str, Any]


def train(
    model: nn.Module,
    train_data,
    eval_data=None,
    config: TrainConfig | None = None,
    callbacks: list[Callback] | tuple = (),
    collate_fn=collate,
) -> TrainResult:
    config = config or TrainConfig()
    output_dir = Path(config.output_dir)

    # ---- 1. set-up: device, seeds, precision -------------------------------------------------
    device = resolve_device(config.device)
    model.to(device)
    seed_everything(config.seed)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    def autocast():
        # bf16/fp16: matmuls run in the low precision, reductions and the loss in fp32.
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # fp16 overflows past 65504: scale the loss up so small gradients survive, unscale before the
    # step, and skip steps whose gradients overflowed. Disabled, every call is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    # ---- 2. plan: how many optimizer steps -------------------------------------------------
    batches_per_epoch = num_micro_batches(train_data, config.micro_batch_size)
    if config.max_steps > 0:
        total_steps = config.max_steps
    elif batches_per_epoch is None:
        raise ValueError("train: the dataset has no length (streaming): set max_steps")
    else:
        # A short last window still makes a step: its loss is normalised by its own tokens.
        total_steps = config.num_epochs * math.ceil(batches_per_epoch / config.grad_accum)
    warmup = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)

    def learning_rate(step: int) -> float:
        return lr_at(step, peak_lr=config.learning_rate, total_steps=total_steps, warmup_steps=warmup,
                     kind=config.lr_scheduler, min_lr_ratio=config.min_lr_ratio)

    # ---- 3. optimizer, callbacks, resume -----------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    state = TrainState()
    resume_path = _resume_path(config)
    if resume_path is not None:
        saved = checkpoint.load_checkpoint(resume_path, model, optimizer, scaler)
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)
                              if f.metadata.get("saved", True)})
        print(f"peftloop: resumed from {resume_path} at step {state.global_step}")

    callbacks = [JsonlLogger(output_dir / "log.jsonl"), *callbacks]
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(config.early_stopping_patience))
    for cb in callbacks:
        cb.on_train_begin(state)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Mean token loss over the whole eval set (no label smoothing) and its perplexity."""
        model.eval()
        loss_total, tokens = 0.0, 0
        for batch in micro_batches(eval_data, config.eval_batch_size, collate_fn=collate_fn):
            batch = _to_device(batch, device)
            with autocast():
                loss_total += float(summed_token_loss(model, batch))
            tokens += label_tokens(batch)
        model.train()
        eval_loss = loss_total / max(tokens, 1)
        return {"step": state.global_step, "eval_loss": eval_loss,
                "eval_perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": tokens}

    def save(reason: str) -> None:
        path = output_dir / f"checkpoint-{state.global_step}"
        checkpoint.save_checkpoint(path, model, optimizer, scaler, _saved_state(state, config))
        checkpoint.rotate_checkpoints(output_dir, config.save_total_limit)
        for cb in callbacks:
            cb.on_save(state, path)

    # ---- 4. the loop ----------------------------------------------------------------------
    model.train()
    windows = accumulation_windows(train_data, config, state, collate_fn)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not config.progress_bar,
                    dynamic_ncols=True, desc="train")
    last_eval: dict[str, float] = {}
    losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()
    start_time, start_step = time.perf_counter(), state.global_step

    while state.global_step < total_steps and not state.should_stop:
        window, next_epoch, next_batch, epoch_ended = next(windows)

        # a. learning rate of this step (LoRA+ groups carry their own multiplier)
        lr = learning_rate(state.global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

        # b. the loss normaliser: label tokens in the whole window, not per micro-batch, so that
        #    k micro-batches of b examples give the same gradient as one batch of k*b examples.
        tokens_in_window = sum(label_tokens(b) for b in window)

        # c. forward + backward for each micro-batch; gradients add up across the window
        window_loss = torch.zeros((), device=device)
        for batch in window:
            batch = _to_device(batch, device)
            with autocast():
                loss = summed_token_loss(model, batch, config.label_smoothing) / max(tokens_in_window, 1)
            scaler.scale(loss).backward()
            window_loss += loss.detach().float()
            tokens_since_log += input_tokens(batch)

        # d. unscale -> clip -> step -> zero. clip_grad_norm_ returns the norm *before* clipping.
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
        for cb in callbacks:
            cb.on_before_optimizer_step(state, model)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped when unscale_ found inf/NaN gradients (fp16 only)
        scaler.update()
        step_skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
        optimizer.zero_grad(set_to_none=True)

        # ---- 5. bookkeeping --------------------------------------------------------------
        step_loss = float(window_loss)
        state.global_step += 1
        state.epoch, state.batch_in_epoch = next_epoch, next_batch
        state.loss_sum += step_loss
        state.tokens_seen += tokens_in_window
        state.skipped_steps += int(step_skipped)
        losses_since_log.append(step_loss)
        metrics = {"step": state.global_step, "loss": step_loss, "grad_norm": float(grad_norm), "lr": lr,
                   "skipped": step_skipped}
        for cb in callbacks:
            cb.on_step_end(state, metrics)
        progress.update(1)

        if state.global_step % config.log_every == 0 or state.global_step == total_steps:
            elapsed = time.perf_counter() - time_of_log
            logs = {"step": state.global_step, "epoch": _epoch_progress(state, batches_per_epoch),
                    "loss": sum(losses_since_log) / len(losses_since_log), "grad_norm": float(grad_norm),
                    "lr": lr, "tokens_per_s": tokens_since_log / max(elapsed, 1e-9)}
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{logs['tokens_per_s']:.0f}")
            if not config.progress_bar:
                print(" ".join(f"{k}={_fmt(v)}" for k, v in logs.items()), flush=True)
            for cb in callbacks:
                cb.on_log(state, logs)
            losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()

        if eval_data is not None and config.eval_every and state.global_step % config.eval_every == 0:
            last_eval = evaluate()
            progress.write(f"step {state.global_step}: eval_loss {last_eval['eval_loss']:.4f}")
            for cb in callbacks:
                cb.on_evaluate(state, last_eval)

        if (config.save_every and state.global_step % config.save_every == 0) or \
                (config.save_each_epoch and epoch_ended):
            save("interval")

    progress.close()

    # ---- 6. the end: final evaluation and the adapter ------------------------------------------
    runtime = time.perf_counter() - start_time
    if eval_data is not None and last_eval.get("step") != state.global_step:
        last_eval = evaluate()
        for cb in callbacks:
            cb.on_evaluate(state, last_eval)
    checkpoint.save_adapter(model, output_dir / "adapter")
    for cb in callbacks:
        cb.on_train_end(state)
    steps_this_run = state.global_step - start_step
    metrics = {
        "train_loss": state.loss_sum / max(state.global_step, 1),
        "train_runtime_s": runtime,
        "train_steps_per_s": steps_this_run / max(runtime, 1e-9),
        "skipped_steps": state.skipped_steps,
        **{k: v for k, v in last_eval.items() if k != "step"},
    }
    return TrainResult(state.global_step, metrics["train_loss"], metrics)


# ------------------------------------------------------------------------------------------------
# The pieces the loop calls. None of them makes a decision the loop cannot see.


def summed_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0):
    """Sum (not mean) of next-token cross-entropies over the label tokens of one micro-batch."""
    inner = getattr(model, "module", model)  # DDP/FSDP wrappers keep the model in .module
    if getattr(inner, "supports_summed_loss", False):
        return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     position_ids=batch.get("position_ids"), labels=batch["labels"],
                     label_smoothing=label_smoothing)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


def accumulation_windows(train_data, config: TrainConfig, state: TrainState, collate_fn):
    """Yield (micro-batches of one step, epoch after it, micro-batch index after it, epoch ended?)
    forever, starting at the state's data position. Epochs follow each other; each has its own
    seeded order, so resuming needs only (epoch, micro-batch index)."""
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        batches = micro_batches(train_data, config.micro_batch_size, epoch=epoch, seed=config.seed,
                                shuffle=config.shuffle, collate_fn=collate_fn)
        batches = itertools.islice(batches, skip, None)
        position = skip
        window = list(itertools.islice(batches, config.grad_accum))
        if not window and position == 0:
            raise ValueError("train: the training data is empty")
        while window:
            position += len(window)
            following = list(itertools.islice(batches, config.grad_accum))
            if following:
                yield window, epoch, position, False
            else:
                yield window, epoch + 1, 0, True
            window = following
        epoch, skip = epoch + 1, 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume_from_checkpoint in (None, False, ""):
        return None
    if config.resume_from_checkpoint is True:
        path = checkpoint.latest_checkpoint(config.output_dir)
        if path is None:
            print(f"peftloop: no complete checkpoint in {config.output_dir}; starting from step 0")
        return path
    path = Path(config.resume_from_checkpoint)
    checkpoint.verify_manifest(path)
    return path


def _saved_state(state: TrainState, config: TrainConfig) -> dict[str, Any]:
    saved = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.metadata.get("saved", True)}
    return {**saved, "config": dataclasses.asdict(config)}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _epoch_progress(state: TrainState, batches_per_epoch: int | None) -> float:
    if not batches_per_epoch:
        return float(state.epoch)
    return round(state.epoch + state.batch_in_epoch / batches_per_epoch, 4)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

