"""The training loop: one file, top to bottom.

    result = train(model, train_data, eval_data, TrainConfig(...))

``train()`` runs these phases, in this order, each a marked block:

  1. set-up    the model must carry adapters; device, processes, seeds, precision (autocast and
               a GradScaler that is a no-op unless fp16)
  2. plan      micro-batches per epoch -> optimizer steps -> warmup; the learning rate is lr_at(step)
  3. resume    rank 0 reads the checkpoint and loads the adapter; wrap (DDP / FSDP2); the optimizer;
               its state, the scaler's, the RNGs and the data position come back; callbacks start
  4. the loop  for each epoch, for each window (grad_accum micro-batches: one optimizer step):
                 a. learning rate   lr_at(step)
                 b. tokens          the window's label tokens, summed over ranks: the loss of the
                                    step is (sum of its token losses) / (that count)
                 c. micro-batches   forward, then backward of (summed loss) / (that count)
                 d. the update      unscale (fp16) -> clip (the norm before clipping is logged)
                                    -> optimizer step (the scaler skips it on inf/NaN)
                                    -> scaler update -> zero the gradients
                 e. log   f. evaluate   g. save a checkpoint   h. stop?
  5. the end   final evaluation, the adapter in PEFT's format in output_dir/adapter

Callbacks watch; the only thing one may change is ``state.should_stop``.

Under torchrun the same function runs on every rank (``distributed.py``): each rank takes its
slice of every global micro-batch, the token count is summed over ranks before the division, and
logging and saving happen on rank 0.

The model is any ``nn.Module`` with adapters injected. peftloop's own models return the summed
token loss from ``model(input_ids, labels=...)`` (fused, chunked head + loss); any other model
(a transformers one, say) returns logits and the loss is computed here.

Hyperparameter search: ``train(..., trial=optuna_trial)`` takes the trial's values for the
TrainConfig fields, reports every evaluation to it, and stops a trial the pruner cuts after the
current step (its checkpoints intact), raising ``optuna.TrialPruned``. ``peftloop.search`` drives it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftloop import checkpoint, distributed, files
from peftloop.adapter_format import adapter_state_dict, load_adapter_state_dict
from peftloop.callbacks import (
    Callback,
    EarlyStopping,
    JsonlLogger,
    TensorBoardCallback,
    format_log,
    peak_memory_mb,
)
from peftloop.config import LoraConfig, TrainConfig
from peftloop.data import IGNORE_INDEX, collate, input_tokens, label_tokens, micro_batches, num_micro_batches
from peftloop.generate import Task, evaluation_tasks, task_metric_sums
from peftloop.kernels import native_low_precision_cpu
from peftloop.optim import build_optimizer
from peftloop.schedule import lr_at, warmup_steps_for


@dataclass
class TrainState:
    """Where the loop is. Saved in every checkpoint; a resumed run continues from exactly here."""

    global_step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """The epoch the next micro-batch comes from."""
    examples_in_epoch: int = 0
    """Examples of that epoch already consumed, over all ranks (so resuming under another world
    size finds the same place)."""
    loss_sum: float = 0.0
    """Sum of the step losses so far (for the mean training loss)."""
    tokens_seen: int = 0
    skipped_steps: int = 0
    """Steps whose update was skipped: the fp16 scaler found inf/NaN, or nan_policy="skip" did."""
    nonfinite_steps: int = 0
    """Of those, the steps skipped by nan_policy (a NaN/inf loss or gradient in fp32/bf16)."""
    best_metric: float | None = None
    evals_without_improvement: int = 0
    should_stop: bool = field(default=False, metadata={"saved": False})
    is_main_process: bool = field(default=True, metadata={"saved": False})
    """False on every torchrun rank but 0: callbacks that write files should check it."""

    def record_step(self, window: Window, epoch: int, step_loss: float, tokens: int, skipped: bool,
                    nonfinite: bool) -> None:
        """One optimizer step taken (or skipped): its count, the data position a checkpoint saved
        now resumes from, and the running sums."""
        self.global_step += 1
        if window.last_in_epoch:
            self.epoch, self.examples_in_epoch = epoch + 1, 0
        else:
            self.epoch, self.examples_in_epoch = epoch, window.examples_done
        self.loss_sum += 0.0 if nonfinite else step_loss
        self.tokens_seen += int(tokens)
        self.skipped_steps += int(skipped)
        self.nonfinite_steps += int(nonfinite)


SAVED_FIELDS = [f.name for f in dataclasses.fields(TrainState) if f.metadata.get("saved", True)]
"""The TrainState fields a checkpoint holds."""


@dataclass(frozen=True)
class Window:
    """The data of one optimizer step: this rank's share of ``grad_accum`` consecutive global
    micro-batches (fewer at the end of an epoch), and where it leaves the epoch."""

    micro_batches: list[dict[str, torch.Tensor]]
    examples_done: int
    """Examples of the epoch consumed once this window is done, over all ranks."""
    last_in_epoch: bool


class NonFiniteError(RuntimeError):
    """A loss, gradient or adapter tensor became NaN/inf (nan_policy="stop", or before a save)."""


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
    trial=None,
    trial_metric: str = "eval_loss",
    tokenizer=None,
    eval_metrics: dict[str, Callable[[str, str], float]] | None = None,
) -> TrainResult:
    """Train the adapters of ``model`` on ``train_data``: the phases of the module docstring, in order.

    ``trial`` (hyperparameter search) is an ``optuna.Trial`` or a dict of values. Its values for
    TrainConfig fields (learning_rate, warmup_steps, weight_decay, ...) override ``config``. LoRA
    settings (r, lora_alpha, lora_dropout, target_modules, ...) shape the adapters, so they must be
    applied before ``inject_lora``: a value the model's adapters do not have is an error
    (``apply_trial``). An optuna.Trial also gets every evaluation's ``trial_metric`` at its step
    (``trial.report``); when its pruner says so before the last step, the run stops after the
    current step (a checkpoint due at that step is written, earlier ones stay intact; the adapter
    is written) and ``optuna.TrialPruned`` is raised. One process: under torchrun, give the trial
    to rank 0 only.

    Evaluation by generation (``config.eval_generate_max_new_tokens`` > 0): every evaluation also
    completes each eval prompt greedily and logs ``eval_exact_match`` and, for each
    ``eval_metrics[name]`` (a ``metric(prediction, reference) -> float``), ``eval_<name>``: the
    means over the prompts (``peftloop.generate``). ``tokenizer`` decodes the completions; without
    one, completions and references are compared as token ids (exact match only).
    """
    config = apply_trial(config or TrainConfig(), trial, getattr(model, "lora_config", None))
    if trial is not None and not isinstance(trial, Mapping) and eval_data is None:
        raise ValueError("train(trial=...): an optuna trial needs eval_data (nothing to report to it)")
    output_dir = Path(config.output_dir)

    # ---- 1. set-up: adapters, device, processes, seeds, precision ------------------------------
    lora_config = require_adapters(model)  # before anything is read or written on disk
    dist_, device = distributed.setup(config.strategy, resolve_device(config.device))
    model.to(device)
    # Ranks draw different dropout masks; the data order is seeded separately (data.epoch_order).
    seed_everything(config.seed + dist_.rank)
    # Evaluation by generation (off unless eval_generate_max_new_tokens): this rank's share of the
    # eval prompts and their references, read once.
    tasks = generation_tasks(model, eval_data, config, tokenizer, eval_metrics, dist_)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    if amp_dtype is not None and device.type == "cpu" and dist_.is_main and not native_low_precision_cpu():
        print(f"peftloop: note: this CPU has no native {config.precision} matmul (no AVX512-BF16/AMX): "
              f"peftloop's layers multiply the {config.precision} values in fp32 (same products, fp32 sums); "
              "other modules' matmuls under autocast run several times slower than fp32")

    def autocast():
        # bf16/fp16: matmuls run in the low precision, reductions and the loss in fp32.
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # fp16 overflows past 65504: scale the loss up so small gradients survive, unscale before the
    # step, and skip steps whose gradients overflowed. Disabled, every call is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    # ---- 2. plan: how many optimizer steps ---------------------------------------------------
    # A global micro-batch is micro_batch_size examples per rank; rank r collates its slice.
    global_micro_batch = config.micro_batch_size * dist_.world_size
    rank_collate = _rank_slice(collate_fn, dist_.rank, config.micro_batch_size)
    batches_per_epoch = num_micro_batches(train_data, global_micro_batch)
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

    # ---- 3. resume, wrap, optimizer, callbacks --------------------------------------------------
    # Rank 0 reads the checkpoint and loads its adapter before wrapping: wrap() hands rank 0's
    # tensors to every rank. If rank 0 fails, every rank raises, so none waits in a collective.
    saved = distributed.run_on_rank0(lambda: read_checkpoint_to_resume(config, model), dist_, "resume")
    resume_path = distributed.broadcast_object(saved and saved["path"], dist_)
    model = distributed.wrap(model, dist_, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    state = TrainState(is_main_process=dist_.is_main)
    if resume_path is not None:
        # the optimizer's moments, the scaler, every RNG and the data position: exactly where it was
        state = restore_training_state(saved, model, optimizer, scaler, dist_, resume_path)
        if dist_.is_main:
            print(f"peftloop: resumed from {resume_path} at step {state.global_step}")

    reports = [config.report_to] if isinstance(config.report_to, str) else config.report_to
    if "tensorboard" in reports:  # built on every rank, so a missing package stops all; rank 0 writes
        callbacks = [TensorBoardCallback(output_dir / "runs"), *callbacks]
    if dist_.is_main:
        callbacks = [JsonlLogger(output_dir / "log.jsonl"), *callbacks]
    if config.early_stopping_patience:
        callbacks = [*callbacks, EarlyStopping(config.early_stopping_patience, config.early_stopping_metric,
                                               greater_is_better=config.early_stopping_greater_is_better)]
    for cb in callbacks:
        cb.on_train_begin(state)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Mean token loss over the whole eval set (no label smoothing) and its perplexity; with
        eval_generate_max_new_tokens, the task metrics of greedy completions of the eval prompts."""
        model.eval()
        loss_total, tokens = 0.0, 0
        eval_collate = _rank_slice(collate_fn, dist_.rank, config.eval_batch_size)
        global_eval_batch = config.eval_batch_size * dist_.world_size
        for batch in micro_batches(eval_data, global_eval_batch, collate_fn=eval_collate):
            batch = _to_device(batch, device)
            with autocast():
                loss_total += float(summed_token_loss(model, batch))
            tokens += label_tokens(batch)
        task_sums = {}
        if config.eval_generate_max_new_tokens:  # each rank completes its share, without collectives
            with autocast():
                task_sums = task_metric_sums(distributed.unwrap(model), tasks,
                                             config.eval_generate_max_new_tokens, config.eval_batch_size,
                                             tokenizer, eval_metrics)
        model.train()
        loss_total = distributed.all_reduce_sum(loss_total, dist_, device)
        tokens = int(distributed.all_reduce_sum(tokens, dist_, device))
        eval_loss = loss_total / max(tokens, 1)
        metrics = {"step": state.global_step, "eval_loss": eval_loss,
                   "eval_perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": tokens}
        if task_sums:  # the means over every rank's prompts
            prompts = int(distributed.all_reduce_sum(len(tasks), dist_, device))
            for name, total in task_sums.items():
                metrics[f"eval_{name}"] = distributed.all_reduce_sum(total, dist_, device) / prompts
            metrics["eval_generated"] = prompts
        return metrics

    # ---- 4. the loop: epochs, windows, micro-batches, the update ---------------------------------
    model.train()
    progress = tqdm(total=total_steps, initial=state.global_step, dynamic_ncols=True, desc="train",
                    disable=not (config.progress_bar and dist_.is_main))
    last_eval: dict[str, float] = {}
    pruned = False  # an optuna trial's pruner asked to stop
    losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()
    start_time, start_step = time.perf_counter(), state.global_step

    for epoch in itertools.count(state.epoch):  # with max_steps, as many epochs as the steps need
        if state.global_step >= total_steps or state.should_stop:
            break
        # Each epoch's order is seeded by (seed, epoch), so a resumed run needs only its position.
        start = state.examples_in_epoch if epoch == state.epoch else 0
        windows = accumulation_windows(train_data, epoch, start, config, rank_collate, global_micro_batch)
        for window in windows:

            # a. learning rate of this step, a pure function of the step: there is no scheduler
            #    object to step or to save (LoRA+ groups carry their own multiplier)
            lr = learning_rate(state.global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

            # b. the loss normaliser: label tokens in the whole window, over all ranks, not per
            #    micro-batch: k micro-batches of b examples then give the gradient of one batch of k*b.
            rank_tokens = sum(label_tokens(b) for b in window.micro_batches)
            tokens_in_window = distributed.all_reduce_sum(rank_tokens, dist_, device)
            # DDP and FSDP average gradients over ranks; multiplying by the world size turns that
            # average back into the sum, so the step's gradient is that of the global token mean.
            loss_scale = dist_.world_size / max(tokens_in_window, 1)

            # c. forward + backward for each micro-batch; gradients add up across the window and
            #    are reduced across ranks only after the last one
            window_loss = torch.zeros((), device=device)
            last = len(window.micro_batches) - 1
            for i, batch in enumerate(window.micro_batches):
                batch = _to_device(batch, device)
                with distributed.no_gradient_sync(model, skip=i < last):
                    with autocast():
                        summed = summed_token_loss(model, batch, config.label_smoothing)
                    scaler.scale(summed * loss_scale).backward()
                window_loss += summed.detach().float() / max(tokens_in_window, 1)
                tokens_since_log += input_tokens(batch)
            step_loss = distributed.all_reduce_sum(float(window_loss), dist_, device)

            # d. the update: unscale -> clip -> step -> scaler update -> zero, every step, in this order.
            #    Unscale first, or clipping would compare the fp16 loss scale times the norm.
            scaler.unscale_(optimizer)
            grad_norm = float(distributed.full_tensor(  # clip_grad_norm_ returns the norm *before* clipping
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))))
            skip_update = apply_nan_policy(state.global_step + 1, step_loss, grad_norm, scaler, config, model)
            for cb in callbacks:
                cb.on_before_optimizer_step(state, model)
            scale_before = scaler.get_scale()
            if not skip_update:
                scaler.step(optimizer)  # skipped by the scaler when unscale_ found inf/NaN gradients (fp16)
            scaler.update()  # fp16: halve the scale after an overflow, double it after 2000 clean steps
            optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of filling them with zeros
            skipped = skip_update or scaler.get_scale() < scale_before

            # e. bookkeeping and logging
            state.record_step(window, epoch, step_loss, tokens_in_window, skipped, nonfinite=skip_update)
            losses_since_log.append(step_loss)
            if skip_update and dist_.is_main:
                progress.write(f"peftloop: step {state.global_step} skipped: loss {step_loss}, "
                               f"grad norm {grad_norm}")
            metrics = {"step": state.global_step, "loss": step_loss, "grad_norm": grad_norm, "lr": lr,
                       "skipped": skipped}
            for cb in callbacks:
                cb.on_step_end(state, metrics)
            progress.update(1)

            if state.global_step % config.log_every == 0 or state.global_step == total_steps:
                now = time.perf_counter()
                interval, elapsed = now - time_of_log, now - start_time
                tokens_since_log = distributed.all_reduce_sum(tokens_since_log, dist_, device)
                logs = {"step": state.global_step, "epoch": _epoch_progress(state, train_data),
                        "loss": sum(losses_since_log) / len(losses_since_log), "grad_norm": grad_norm,
                        "lr": lr,
                        # measurements, which differ between identical runs: throughput, seconds per
                        # step over this interval, seconds since this run began and still to go (at its
                        # mean pace so far), this process's peak memory
                        "tokens_per_s": tokens_since_log / max(interval, 1e-9),
                        "step_time": interval / len(losses_since_log),
                        "elapsed": elapsed,
                        "eta": elapsed / (state.global_step - start_step) * (total_steps - state.global_step),
                        "peak_memory_mb": peak_memory_mb(device)}
                # the bar shows elapsed, ETA and s/it itself
                progress.set_postfix_str(format_log(logs, ("loss", "lr", "tokens_per_s", "peak_memory_mb")))
                if not config.progress_bar and dist_.is_main:
                    print(format_log(logs), flush=True)
                for cb in callbacks:
                    cb.on_log(state, logs)
                losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()

            # f. evaluate
            if eval_data is not None and config.eval_every and state.global_step % config.eval_every == 0:
                last_eval = evaluate()
                if dist_.is_main:
                    task = last_eval.get("eval_exact_match")
                    progress.write(f"step {state.global_step}: eval_loss {last_eval['eval_loss']:.4f}"
                                   + (f", exact match {task:.1%}" if task is not None else ""))
                for cb in callbacks:
                    cb.on_evaluate(state, last_eval)
                # a search trial: report; one the pruner cuts finishes this step (and its checkpoint),
                # then stops. At the last step the run is over anyway: the trial completes.
                if trial is not None and report_to_trial(trial, last_eval, trial_metric) \
                        and state.global_step < total_steps:
                    pruned = state.should_stop = True

            # g. save a checkpoint; a failed write leaves the previous one intact
            if (config.save_every and state.global_step % config.save_every == 0) or \
                    (config.save_each_epoch and window.last_in_epoch):
                path = output_dir / f"checkpoint-{state.global_step}"
                error = write_checkpoint(path, model, optimizer, scaler, state, config, lora_config, dist_)
                if error is None:
                    for cb in callbacks:
                        cb.on_save(state, path)
                elif config.on_save_error == "stop":
                    raise files.CheckpointError(error)
                elif dist_.is_main:
                    progress.write(f"peftloop: {error}; training continues (on_save_error='continue')")

            # h. stop? Every rank stops together, whichever rank's callback asked.
            state.should_stop = distributed.any_rank(state.should_stop, dist_, device)
            if state.global_step >= total_steps or state.should_stop:
                break

    progress.close()

    # ---- 5. the end: final evaluation and the adapter ------------------------------------------
    runtime = time.perf_counter() - start_time
    if eval_data is not None and last_eval.get("step") != state.global_step:
        last_eval = evaluate()
        for cb in callbacks:
            cb.on_evaluate(state, last_eval)
        if trial is not None:
            report_to_trial(trial, last_eval, trial_metric)
    adapter = _gather_adapter(model)
    if dist_.is_main:
        checkpoint.write_adapter(output_dir / "adapter", adapter, lora_config)
    distributed.barrier(dist_)
    for cb in callbacks:
        cb.on_train_end(state)
    steps_this_run = state.global_step - start_step
    metrics = {
        "train_loss": state.loss_sum / max(state.global_step, 1),
        "train_runtime_s": runtime,
        "train_steps_per_s": steps_this_run / max(runtime, 1e-9),
        "skipped_steps": state.skipped_steps,
        "nonfinite_steps": state.nonfinite_steps,
        **{k: v for k, v in last_eval.items() if k != "step"},
    }
    if pruned:
        raise trial_pruned(state.global_step, trial_metric, last_eval)
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


def accumulation_windows(train_data, epoch: int, start: int, config: TrainConfig, collate_fn,
                         global_micro_batch: int) -> Iterator[Window]:
    """The windows of one epoch, from its ``start``-th example on (0, or a resumed run's position).

    The epoch's order is a function of (seed, epoch), so skipping the micro-batches before
    ``start`` lands exactly where the checkpoint stopped. The next window is read before this one
    is yielded, so that the last window of the epoch knows it is the last."""
    if start % global_micro_batch:
        raise ValueError(
            f"resume: the checkpoint stopped after {start} examples of epoch {epoch}, which is not a whole "
            f"number of global micro-batches of {global_micro_batch} (micro_batch_size x world size); "
            f"pick sizes that divide it")
    batches = micro_batches(train_data, global_micro_batch, epoch=epoch, seed=config.seed,
                            shuffle=config.shuffle, collate_fn=collate_fn)
    batches = itertools.islice(batches, start // global_micro_batch, None)
    window = list(itertools.islice(batches, config.grad_accum))
    if not window and start == 0:
        raise ValueError("train: the training data is empty")
    consumed = start
    while window:
        consumed += sum(b.pop("_examples") for b in window)
        following = list(itertools.islice(batches, config.grad_accum))
        yield Window(window, examples_done=consumed, last_in_epoch=not following)
        window = following


def apply_nan_policy(step: int, loss: float, grad_norm: float, scaler: torch.amp.GradScaler,
                     config: TrainConfig, model: nn.Module) -> bool:
    """The NaN policy, decided in one place: True when this step's update must be skipped.

    fp16 needs none: its scaler skips a step whose gradients overflowed, and lowers the scale.
    In fp32/bf16 a NaN/inf loss or gradient norm must not reach the weights: ``nan_policy="skip"``
    skips the update (counted and logged), ``"stop"`` raises NonFiniteError naming the step and
    the first bad parameter."""
    if scaler.is_enabled() or (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False
    if config.nan_policy == "stop":
        raise NonFiniteError(_nonfinite_report(step, loss, model))
    return True


def apply_trial(config: TrainConfig, trial, lora_config: LoraConfig | None) -> TrainConfig:
    """``config`` with a search trial's values (a dict, or an optuna.Trial's ``params``).

    TrainConfig fields override ``config``. LoRA fields must already be what ``lora_config`` (the
    model's adapters) has, as the search driver builds them: otherwise a ValueError says to apply
    them before inject_lora. A ``target_modules`` pattern ("all-linear", a regex) cannot be compared
    with the resolved names and is taken as applied. Other names: an error in a dict; in an
    optuna.Trial, the objective's own settings, left to it."""
    if trial is None:
        return config
    values = dict(trial) if isinstance(trial, Mapping) else dict(trial.params)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key, value in values.items():
        applied = lora_config is None or _same_setting(value, getattr(lora_config, key, None))
        if key in lora_fields and not applied:
            raise ValueError(
                f"train(trial=...): the trial sets lora.{key}={value!r}, but the model's adapters have "
                f"{getattr(lora_config, key)!r}: LoRA settings shape the adapters, so apply them before "
                f"inject_lora (LoraConfig({key}=...)); train() can only change TrainConfig fields")
        if key not in train_fields | lora_fields and isinstance(trial, Mapping):
            raise ValueError(f"train(trial=...): {key!r} is neither a TrainConfig nor a LoraConfig field")
    return dataclasses.replace(config, **{k: v for k, v in values.items() if k in train_fields})


def report_to_trial(trial, metrics: dict[str, Any], metric: str) -> bool:
    """Report ``metrics[metric]`` at its step to an optuna.Trial; True when the pruner says stop.
    A dict trial has nothing to report to."""
    if isinstance(trial, Mapping):
        return False
    if metric not in metrics:
        raise ValueError(f"train(trial=...): trial_metric={metric!r} is not one of the evaluation's "
                         f"metrics ({', '.join(k for k in metrics if k != 'step')})")
    trial.report(float(metrics[metric]), metrics["step"])
    return bool(trial.should_prune())


def trial_pruned(step: int, metric: str, metrics: dict[str, Any]) -> Exception:
    """The exception optuna expects from a pruned trial (``study.optimize`` records it as PRUNED)."""
    import optuna  # optional (the 'optuna' extra); only a pruned optuna.Trial gets here

    return optuna.TrialPruned(f"pruned after step {step} ({metric} {float(metrics[metric]):.4f})")


def generation_tasks(model: nn.Module, eval_data, config: TrainConfig, tokenizer,
                     eval_metrics: dict[str, Callable[[str, str], float]] | None,
                     dist_: distributed.Dist) -> list[Task]:
    """This rank's share (every world_size-th) of the eval set's generation tasks; [] when the
    evaluation does not generate. Refuses, before anything runs, what could not work: a model
    that is not peftloop's (generation uses its KV cache), FSDP (each rank generates alone, and an
    FSDP2 forward is a collective), a metric name the loss already uses, an early-stopping metric
    that will not be logged."""
    generating = eval_data is not None and config.eval_generate_max_new_tokens > 0
    task_names = ["exact_match", *(eval_metrics or {})] if generating else []
    logged = ["eval_loss", "eval_perplexity", *(f"eval_{name}" for name in task_names)]
    if config.early_stopping_patience and config.early_stopping_metric not in logged:
        raise ValueError(f"train.early_stopping_metric={config.early_stopping_metric!r} is not logged by "
                         f"this run's evaluations ({', '.join(logged)})")
    if eval_metrics and not generating:
        raise ValueError("train(eval_metrics=...): the metrics score generated completions: "
                         "set eval_generate_max_new_tokens and give eval_data")
    if not generating:
        return []
    taken = [name for name in eval_metrics or {}
             if name in ("loss", "perplexity", "tokens", "exact_match", "generated")]
    if taken:
        raise ValueError(f"train(eval_metrics=...): eval_{taken[0]} is logged already: rename {taken[0]!r}")
    if not getattr(distributed.unwrap(model), "supports_summed_loss", False):
        raise ValueError("train.eval_generate_max_new_tokens: generation needs a peftloop model "
                         f"(not {type(model).__name__})")
    if dist_.enabled and dist_.strategy == "fsdp":
        raise ValueError("train.eval_generate_max_new_tokens with strategy 'fsdp': not supported (each rank "
                         "generates its share alone); use 'ddp', or generate from the adapter afterwards")
    return evaluation_tasks(eval_data, tokenizer, eval_metrics)[dist_.rank::dist_.world_size]


def require_adapters(model: nn.Module) -> LoraConfig:
    """The model's LoraConfig, or a ValueError that says what to do when there is nothing to train."""
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None:
        raise ValueError(
            f"train: the model ({type(model).__name__}) has no LoRA adapters to train: call "
            "inject_lora(model, LoraConfig(...)) first, or load_adapter(model, folder, is_trainable=True) "
            "to continue training a saved adapter")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"train: the adapters of the model ({type(model).__name__}) are frozen (no parameter requires a "
            "gradient): load the adapter with load_adapter(model, folder, is_trainable=True)")
    return lora_config


def read_checkpoint_to_resume(config: TrainConfig, model: nn.Module) -> dict[str, Any] | None:
    """Rank 0's part of resuming: tidy up after a crash, find the checkpoint (the path given, or the
    newest complete one), read it and load its adapter into the (unwrapped) model. None: no resume."""
    files.recover_interrupted_writes(config.output_dir)
    path = _resume_path(config)
    if path is None:
        return None
    saved = checkpoint.load_checkpoint(path)
    load_adapter_state_dict(model, saved["adapter"], source=str(path))
    return {**saved, "path": path}


def restore_training_state(saved: dict[str, Any] | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, dist_: distributed.Dist, path: Path) -> TrainState:
    """Everything but the adapter (already loaded) from a checkpoint that rank 0 read (``saved`` is
    None on the other ranks): the optimizer, the scaler, each rank's RNGs and the loop state."""
    try:
        distributed.load_full_optimizer_state(model, optimizer, saved and saved["optimizer_state"], dist_)
    except (KeyError, ValueError, RuntimeError) as e:
        raise files.CheckpointError(
            f"{path}/optimizer.safetensors does not fit this model's trainable parameters ({e})") from None
    trainer_state = distributed.broadcast_object(saved and saved["trainer_state"], dist_)
    if trainer_state["scaler"]:
        scaler.load_state_dict(trainer_state["scaler"])
    rng_states = saved and saved["rng_states"]
    if dist_.enabled and dist_.is_main:  # one per current rank; ranks the checkpoint did not have reseed
        rng_states = [rng_states[r] if r < len(rng_states) else None for r in range(dist_.world_size)]
    mine = distributed.scatter_objects(rng_states, dist_) if dist_.enabled else rng_states[0]
    if mine is not None:
        checkpoint.set_rng_state(*mine)
    return TrainState(**{name: trainer_state[name] for name in SAVED_FIELDS}, is_main_process=dist_.is_main)


def write_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, state: TrainState, config: TrainConfig,
                     lora_config: LoraConfig, dist_: distributed.Dist) -> str | None:
    """Write ``path`` (checkpoint-N): the adapter, the optimizer, the scaler, every rank's RNGs and the
    loop state. Gathering is collective (FSDP2 shards, per-rank RNG); writing is rank 0's alone.

    Returns None, or (on every rank, so that all take the same branch) why it could not be written:
    the previous checkpoint is then intact. A NaN never reaches a checkpoint: NonFiniteError."""
    adapter = _gather_adapter(model)
    bad = next((k for k, v in adapter.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NonFiniteError(f"step {state.global_step}: not saving {path.name}: {bad} has NaN/inf values")
    optimizer_state = distributed.full_optimizer_state(model, optimizer)
    rng_states = distributed.gather_objects(checkpoint.rng_state(), dist_)
    error = None
    if dist_.is_main:
        trainer_state = {**_saved_state(state, config), "scaler": scaler.state_dict(),
                         "world_size": dist_.world_size, "micro_batch_size": config.micro_batch_size}
        try:
            checkpoint.save_checkpoint(path, adapter=adapter, lora_config=lora_config,
                                       optimizer_state=optimizer_state, rng_states=rng_states,
                                       trainer_state=trainer_state)
            checkpoint.rotate_checkpoints(path.parent, config.save_total_limit)
        except OSError as e:  # disk full, quota, permissions
            previous = checkpoint.latest_checkpoint(path.parent)
            error = f"could not write {path}: {e}; the newest complete checkpoint is {previous or 'none'}"
    return distributed.broadcast_object(error, dist_)


def _rank_slice(collate_fn, rank: int, per_rank: int):
    """A collate function that takes this rank's share of a global micro-batch. A rank whose share
    is empty (the ragged end of an epoch) gets one padding token with no label: it must still run
    forward and backward, or the collectives of the other ranks would wait for it forever."""

    def collate_share(examples):
        share = examples[rank * per_rank:(rank + 1) * per_rank]
        batch = collate_fn(share) if share else collate_fn([{"input_ids": [0], "labels": [IGNORE_INDEX]}])
        batch["_examples"] = len(examples)  # global count, for the data position
        return batch

    return collate_share


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (CPU and every CUDA device).

    torch seeds its default generator differently in every process, so anything random that
    happens before ``train()`` (LoRA's ``kaiming_uniform_`` init in ``inject_lora``, a model
    built from scratch) is reproducible only if this runs first, as the CLI and the demo do:
    ``seed_everything(seed); inject_lora(model, config); train(...)``."""
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
    return {**{name: getattr(state, name) for name in SAVED_FIELDS}, "config": dataclasses.asdict(config)}


def _same_setting(trial_value, model_value) -> bool:
    """A trial's LoRA value against the model's: "q_proj,v_proj" is the list of those names, and
    lists compare as sets (inject_lora keeps names sorted); a pattern string is not comparable."""
    if isinstance(model_value, (list, tuple)) and isinstance(trial_value, str):
        if not re.fullmatch(r"[\w\s,]+", trial_value):
            return True
        trial_value = [name.strip() for name in trial_value.split(",") if name.strip()]
    if isinstance(model_value, (list, tuple)) and isinstance(trial_value, (list, tuple)):
        return sorted(model_value) == sorted(trial_value)
    return trial_value == model_value


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def _epoch_progress(state: TrainState, train_data) -> float:
    if not hasattr(train_data, "__len__") or not len(train_data):
        return float(state.epoch)
    return round(state.epoch + state.examples_in_epoch / len(train_data), 4)


def _nonfinite_report(step: int, loss: float, model: nn.Module) -> str:
    """Which number went bad first: the loss, or the gradient of which parameter."""
    for name, p in distributed.unwrap(model).named_parameters():
        if p.grad is not None and not bool(torch.isfinite(distributed.full_tensor(p.grad)).all()):
            return f"step {step}: the gradient of {name} has NaN/inf values (loss {loss}); nan_policy='stop'"
    return f"step {step}: the loss is {loss}; nan_policy='stop'"


def _gather_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as whole CPU tensors under PEFT's keys (a collective under FSDP2)."""
    tensors = adapter_state_dict(distributed.unwrap(model))
    return {k: distributed.full_tensor(v).detach().to("cpu").contiguous() for k, v in tensors.items()}
