"""K fine-tuning jobs trained as one: one forward pass over the shared frozen base, one adapter per job.

    results = train_many(base_model, [Job(data_a, LoraConfig(r=8), TrainConfig(output_dir="runs/a")),
                                      Job(data_b, LoraConfig(r=16), TrainConfig(output_dir="runs/b", ...))])

Each job is what ``train()`` would run alone: its own data, LoRA config, optimizer, schedule, seed,
evaluation, early stopping, log and output folder. ``train_many`` puts all K adapters on the same
frozen base (``inject_many``: one ``MultiLoRALinear`` per target layer) and, at every step, runs:

  a. each live job's next window and its learning rate  lr_at(step) of its own schedule
  b. each job's label tokens in its window              its own loss normaliser
  c. fused micro-batches    the i-th micro-batch of every job, rows concatenated (right-padded to
                            one length, pads labelled -100), routed by ``RowRouting``: the base's
                            GEMMs run once over all rows, adapter k's update only on job k's rows.
                            Each job's summed token loss over its own rows, over its own token
                            count; one backward of the sum (the adapters are disjoint, so each
                            adapter's gradient is its own job's, as in train())
  d. each job's update      unscale -> clip its own norm -> NaN policy -> its optimizer -> zero
  e. log   f. evaluate   h. stop? (per job: a stopped job leaves the others running)
  g. save                   when any job is due a checkpoint, every live job writes one at that
                            step: the group resumes only from a step all its jobs saved

Equivalence is the contract: K jobs trained together give the adapters and the logged losses of the
K jobs trained one by one with ``train()`` (docs/many-adapters.md states the tolerance and why).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from peftloop import checkpoint, distributed, files
from peftloop.adapter_format import adapter_state_dict_of, load_adapter_state_dict_of
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
from peftloop.inject import inject_many
from peftloop.modules import is_adapter_wrapper
from peftloop.multi_lora import RowRouting, multi_lora_layers, set_routing
from peftloop.optim import build_optimizer
from peftloop.schedule import lr_at, warmup_steps_for
from peftloop.train import (
    SAVED_FIELDS,
    NonFiniteError,
    TrainResult,
    TrainState,
    Window,
    accumulation_windows,
    apply_nan_policy,
    apply_trial,
    report_to_trial,
    resolve_device,
    summed_token_loss,
)

SHARED_KEYS = ("precision", "device", "strategy", "resume_from_checkpoint")
"""TrainConfig fields every job of a group must have equal: one forward pass runs under one
precision on one device in one process, and the group resumes as a whole or not at all."""


@dataclass
class Job:
    """One fine-tuning job of a group: what ``train(model, train_data, eval_data, config, ...)``
    would be given alone, plus the LoRA config ``inject_lora`` would be given."""

    train_data: Any
    """Examples with input_ids and labels (-100 where no loss), as train() takes them."""
    lora: LoraConfig
    """This job's adapter. Every job must target the same modules; r, alpha, dropout may differ."""
    config: TrainConfig = field(default_factory=TrainConfig)
    """Its output_dir (one per job), seed, learning rate, schedule, warmup, weight decay, steps or
    epochs, micro-batch size and accumulation, evaluation, early stopping, checkpoints."""
    eval_data: Any = None
    callbacks: list[Callback] | tuple = ()
    collate_fn: Callable = collate
    trial: Any = None
    """An optuna.Trial (or a dict of values), as ``train(trial=...)``: its values override config;
    a pruned job stops (its result's metrics say ``pruned``), the others go on."""
    trial_metric: str = "eval_loss"


@dataclass
class JobRun:
    """A job in flight: everything train() keeps in local variables, once per job."""

    index: int
    job: Job
    config: TrainConfig
    lora: LoraConfig
    adapter: nn.Module
    """Adapter k's modules under the model's own names: its parameters, named as in train() alone."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    total_steps: int
    warmup: int
    state: TrainState
    callbacks: list[Callback]
    windows: Iterator[tuple[int, Window]] | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    pruned: bool = False
    result: TrainResult | None = None
    losses_since_log: list[float] = field(default_factory=list)
    tokens_since_log: int = 0
    time_of_log: float = 0.0
    start_step: int = 0
    start_time: float = 0.0

    @property
    def name(self) -> str:
        return f"job {self.index} ({self.config.output_dir})"

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def learning_rate(self, step: int) -> float:
        c = self.config
        return lr_at(step, peak_lr=c.learning_rate, total_steps=self.total_steps, warmup_steps=self.warmup,
                     kind=c.lr_scheduler, min_lr_ratio=c.min_lr_ratio)


def train_many(model: nn.Module, jobs: list[Job]) -> list[TrainResult]:
    """Train one adapter per job on ``model`` (a base without adapters) in one loop; see the module
    docstring. Returns one TrainResult per job, in order (a pruned job's metrics have ``pruned``).
    Each job's output_dir gets what train() writes: log.jsonl, checkpoint-N folders, adapter/."""
    configs = check_jobs(model, jobs)
    shared = configs[0]

    # ---- 1. set-up: the K adapters on the shared base, device, precision, dropout streams ---------
    inject_many(model, [job.lora for job in jobs], [c.seed for c in configs])
    loras = model.lora_configs  # as inject_lora records them: "all-linear" resolved, the base named
    dist_, device = distributed.setup(shared.strategy, resolve_device(shared.device))
    if dist_.enabled:
        raise ValueError("train_many: one process only (not under torchrun)")
    model.to(device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(shared.precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # train() alone reseeds (seed_everything(config.seed)) after injection, so its dropout draws
    # come from torch's CPU generator right after manual_seed(seed): each job gets that stream,
    # swapped in by the layer around its own draws only.
    rng_states = {k: torch.Generator().manual_seed(c.seed).get_state() for k, c in enumerate(configs)}

    # ---- 2./3. plan and resume: each job as train() plans it; the group's newest common checkpoint
    runs = [start_job(k, job, config, lora, model, device)
            for k, (job, config, lora) in enumerate(zip(jobs, configs, loras))]
    if shared.resume_from_checkpoint:
        resume_group(runs, model, rng_states)
    for run in runs:
        if run.result is None:
            begin(run)

    # ---- 4. the loop: one step of every live job per pass ------------------------------------------
    model.train()
    for run in runs:
        if run.result is None and run.state.global_step >= run.total_steps:  # resumed at its last step
            finish_job(run, model, device, autocast)
    live = [run for run in runs if run.result is None]
    progress = tqdm(total=max((r.total_steps for r in live), default=0),
                    initial=min((r.state.global_step for r in live), default=0), dynamic_ncols=True,
                    desc=f"train x{len(live)}", disable=not any(r.config.progress_bar for r in live))
    while live:
        # a. each job's window and learning rate
        windows, epochs, lrs = {}, {}, {}
        for run in live:
            epochs[run.index], windows[run.index] = next(run.windows)
            lrs[run.index] = run.learning_rate(run.state.global_step)
            for group in run.optimizer.param_groups:
                group["lr"] = lrs[run.index] * group["lr_scale"]

        # b. each job's loss normaliser: the label tokens of its whole window
        tokens = {run.index: sum(label_tokens(b) for b in windows[run.index].micro_batches) for run in live}

        # c. fused micro-batches: the i-th micro-batch of every job that has one
        window_loss = {run.index: torch.zeros((), device=device) for run in live}
        for i in range(max(len(w.micro_batches) for w in windows.values())):
            parts = [(run, windows[run.index].micro_batches[i]) for run in live
                     if i < len(windows[run.index].micro_batches)]
            batch, rows = fuse([b for _, b in parts])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            segments = [(run.index, first, end) for (run, _), (first, end) in zip(parts, rows)]
            # each job's own length: its dropout masks are drawn for its unpadded micro-batch
            lengths = {run.index: own["input_ids"].shape[1] for run, own in parts}
            set_routing(model, RowRouting(segments, rng_states, lengths))
            with autocast():
                losses = summed_losses(model, batch, rows, [run.config.label_smoothing for run, _ in parts])
            # train()'s loss_scale, 1 / tokens, multiplied as train() multiplies it (not a division,
            # which can round differently)
            objective = sum(run.scaler.scale(loss * (1 / max(tokens[run.index], 1)))
                            for (run, _), loss in zip(parts, losses))
            objective.backward()
            for (run, own), loss in zip(parts, losses):
                window_loss[run.index] += loss.detach().float() / max(tokens[run.index], 1)
                run.tokens_since_log += input_tokens(own)
        set_routing(model, None)

        # d.-f., h. each job's update, log, evaluation and stop decision, as in train()
        for run in live:
            finish_step(run, model, windows[run.index], epochs[run.index], lrs[run.index],
                        float(window_loss[run.index]), tokens[run.index], progress, device, autocast)
        progress.update(1)

        # the end of each job that stopped: final evaluation, its adapter, its result (before the
        # checkpoint below, so that the group's record of this step holds its result)
        for run in live:
            if run.state.global_step >= run.total_steps or run.state.should_stop:
                finish_job(run, model, device, autocast)

        # g. a checkpoint of every job that took this step, when any of them is due one
        if any(checkpoint_due(run, windows[run.index]) for run in live):
            save_group(live, runs, model, rng_states)
        live = [run for run in live if run.result is None]
        progress.set_postfix_str(f"{len(live)} live")
    progress.close()
    return [run.result for run in runs]


# ------------------------------------------------------------------------------------------------
# The pieces the loop calls.


def check_jobs(model: nn.Module, jobs: list[Job]) -> list[TrainConfig]:
    """Each job's config (a trial's values applied), after refusing what cannot run as one group."""
    if not jobs:
        raise ValueError("train_many: no jobs")
    if any(is_adapter_wrapper(m) for m in model.modules()):
        raise ValueError("train_many: the model already has adapters; give the base model: train_many "
                         "injects one adapter per job itself (inject_many)")
    configs = [apply_trial(job.config, job.trial, job.lora) for job in jobs]
    for k, config in enumerate(configs):
        for key in SHARED_KEYS:
            if getattr(config, key) != getattr(configs[0], key):
                raise ValueError(f"train_many: job {k} has {key}={getattr(config, key)!r} but job 0 has "
                                 f"{getattr(configs[0], key)!r}: the jobs of a group share {key}")
        if config.eval_generate_max_new_tokens:
            raise ValueError(f"train_many: job {k} sets eval_generate_max_new_tokens: evaluation by "
                             "generation is not supported in a group; evaluate the saved adapter instead")
        logged = ("eval_loss", "eval_perplexity")
        if config.early_stopping_patience and config.early_stopping_metric not in logged:
            raise ValueError(f"train_many: job {k}: early_stopping_metric={config.early_stopping_metric!r} "
                             "is not logged by a group's evaluations (eval_loss, eval_perplexity)")
        if (config.early_stopping_patience or jobs[k].trial is not None) and jobs[k].eval_data is None:
            raise ValueError(f"train_many: job {k} stops early or reports to a trial but has no eval_data")
    if configs[0].resume_from_checkpoint not in (None, False, True, ""):
        raise ValueError("train_many: resume_from_checkpoint must be True (each job's newest checkpoint "
                         "that the whole group saved), not a path")
    dirs = [Path(c.output_dir).resolve() for c in configs]
    for k, d in enumerate(dirs):
        if d in dirs[:k]:
            raise ValueError(f"train_many: jobs {dirs.index(d)} and {k} share output_dir "
                             f"{configs[k].output_dir}: each job writes its own log, checkpoints and adapter")
    return configs


def adapter_of(model: nn.Module, k: int) -> nn.Module:
    """Adapter k's modules arranged under the model's own paths (``model.layers.0.self_attn.q_proj``),
    so its parameters carry the names train() alone gives them: the optimizer's groups (weight
    decay, LoRA+), its checkpointed state and the NaN report then read as they do for one adapter."""
    root = nn.Module()
    for name, layer in multi_lora_layers(model).items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer.adapters[k])
    return root


def start_job(k: int, job: Job, config: TrainConfig, lora: LoraConfig, model: nn.Module,
              device: torch.device) -> JobRun:
    """Phase 2 of train() for one job: its steps and warmup; its optimizer and scaler."""
    batches_per_epoch = num_micro_batches(job.train_data, config.micro_batch_size)
    if config.max_steps > 0:
        total_steps = config.max_steps
    elif batches_per_epoch is None:
        raise ValueError(f"train_many: job {k}'s dataset has no length (streaming): set max_steps")
    else:
        total_steps = config.num_epochs * math.ceil(batches_per_epoch / config.grad_accum)
    adapter = adapter_of(model, k)
    return JobRun(index=k, job=job, config=config, lora=lora, adapter=adapter,
                  optimizer=build_optimizer(adapter, config),
                  scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
                  total_steps=total_steps,
                  warmup=warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio),
                  state=TrainState(), callbacks=list(job.callbacks))


def begin(run: JobRun) -> None:
    """Phase 3's end for one job: its callbacks (the log first, early stopping last) and its windows."""
    config = run.config
    reports = [config.report_to] if isinstance(config.report_to, str) else config.report_to
    if "tensorboard" in reports:
        run.callbacks = [TensorBoardCallback(run.output_dir / "runs"), *run.callbacks]
    run.callbacks = [JsonlLogger(run.output_dir / "log.jsonl"), *run.callbacks]
    if config.early_stopping_patience:
        run.callbacks.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_metric,
                                           greater_is_better=config.early_stopping_greater_is_better))
    for cb in run.callbacks:
        cb.on_train_begin(run.state)
    run.windows = job_windows(run)
    run.start_step, run.start_time = run.state.global_step, time.perf_counter()
    run.time_of_log = run.start_time


def job_windows(run: JobRun) -> Iterator[tuple[int, Window]]:
    """(epoch, window) of one job, epoch after epoch from where its state stands (train()'s two loops)."""
    first_epoch, start = run.state.epoch, run.state.examples_in_epoch
    collate_fn = micro_batch_collate(run.job.collate_fn)
    for epoch in itertools.count(first_epoch):
        for window in accumulation_windows(run.job.train_data, epoch, start if epoch == first_epoch else 0,
                                           run.config, collate_fn, run.config.micro_batch_size):
            yield epoch, window


def micro_batch_collate(collate_fn):
    """The collate function with the example count accumulation_windows reads (train()'s rank slice,
    for one process)."""

    def collate_counted(examples):
        batch = collate_fn(examples)
        batch["_examples"] = len(examples)
        return batch

    return collate_counted


def fuse(batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """One micro-batch of the jobs' micro-batches, rows concatenated, and each job's (first, end) rows.

    Shorter batches are right-padded to the longest: input 0, label -100, attention mask 0, position
    ids counting on from each row's last one (so a pad never looks like a new packed document).
    Causal attention keeps a row's real tokens blind to the pads after them, and -100 keeps the
    pads out of every loss: job k's rows compute what its own micro-batch computes alone (with
    dropout, once the routing carries each job's own length: ``RowRouting.lengths``)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    with_positions = any("position_ids" in b for b in batches)
    padded, rows, first = [], [], 0
    for b in batches:
        rows_b, length_b = b["input_ids"].shape
        extra = length - length_b
        out = {"input_ids": F.pad(b["input_ids"], (0, extra), value=0),
               "labels": F.pad(b["labels"], (0, extra), value=IGNORE_INDEX),
               "attention_mask": F.pad(b.get("attention_mask", torch.ones_like(b["input_ids"])), (0, extra))}
        if with_positions:
            positions = b.get("position_ids", torch.arange(length_b).expand(rows_b, length_b))
            following = positions[:, -1:] + torch.arange(1, extra + 1)
            out["position_ids"] = torch.cat([positions, following], dim=1)
        padded.append(out)
        rows.append((first, first + rows_b))
        first += rows_b
    return {key: torch.cat([p[key] for p in padded]) for key in padded[0]}, rows


def summed_losses(model: nn.Module, batch: dict[str, torch.Tensor], rows: list[tuple[int, int]],
                  label_smoothing: list[float]) -> list[torch.Tensor]:
    """Each job's summed token loss over its own rows of one fused forward pass. peftloop's models run
    their fused head + loss on the hidden states of those rows; another model's logits are sliced."""
    if getattr(model, "supports_summed_loss", False):
        hidden = model.model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return [model.summed_loss(hidden[a:b], batch["labels"][a:b], smoothing)
                for (a, b), smoothing in zip(rows, label_smoothing)]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(out, "logits", out)
    return [F.cross_entropy(logits[a:b, :-1].flatten(0, 1).float(), batch["labels"][a:b, 1:].flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)
            for (a, b), smoothing in zip(rows, label_smoothing)]


def finish_step(run: JobRun, model: nn.Module, window: Window, epoch: int, lr: float, step_loss: float,
                tokens_in_window: int, progress, device: torch.device, autocast) -> None:
    """Steps d, e, f and h of train() for one job, in train()'s order."""
    config, state = run.config, run.state

    # d. the update: unscale -> clip -> step -> scaler update -> zero
    run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(run.adapter.parameters()),
                                                     config.max_grad_norm or float("inf")))
    skip_update = apply_nan_policy(state.global_step + 1, step_loss, grad_norm, run.scaler, config,
                                   run.adapter)
    for cb in run.callbacks:
        cb.on_before_optimizer_step(state, model)
    scale_before = run.scaler.get_scale()
    if not skip_update:
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    skipped = skip_update or run.scaler.get_scale() < scale_before

    # e. bookkeeping and logging
    state.record_step(window, epoch, step_loss, tokens_in_window, skipped, nonfinite=skip_update)
    run.losses_since_log.append(step_loss)
    if skip_update:
        progress.write(f"peftloop: {run.name}: step {state.global_step} skipped: loss {step_loss}, "
                       f"grad norm {grad_norm}")
    metrics = {"step": state.global_step, "loss": step_loss, "grad_norm": grad_norm, "lr": lr,
               "skipped": skipped}
    for cb in run.callbacks:
        cb.on_step_end(state, metrics)
    if state.global_step % config.log_every == 0 or state.global_step == run.total_steps:
        log(run, grad_norm, lr, device)

    # f. evaluate
    if run.job.eval_data is not None and config.eval_every and state.global_step % config.eval_every == 0:
        run.last_eval = evaluate(run, model, device, autocast)
        progress.write(f"{run.name}: step {state.global_step}: eval_loss {run.last_eval['eval_loss']:.4f}")
        for cb in run.callbacks:
            cb.on_evaluate(state, run.last_eval)
        if run.job.trial is not None and report_to_trial(run.job.trial, run.last_eval, run.job.trial_metric) \
                and state.global_step < run.total_steps:
            run.pruned = state.should_stop = True


def log(run: JobRun, grad_norm: float, lr: float, device: torch.device) -> None:
    """train()'s log record, for one job (its tokens per second count its own tokens)."""
    state, now = run.state, time.perf_counter()
    interval, elapsed = now - run.time_of_log, now - run.start_time
    data = run.job.train_data
    epoch = (round(state.epoch + state.examples_in_epoch / len(data), 4)
             if hasattr(data, "__len__") and len(data) else float(state.epoch))
    logs = {"step": state.global_step, "epoch": epoch,
            "loss": sum(run.losses_since_log) / len(run.losses_since_log), "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": run.tokens_since_log / max(interval, 1e-9),
            "step_time": interval / len(run.losses_since_log),
            "elapsed": elapsed,
            "eta": elapsed / (state.global_step - run.start_step) * (run.total_steps - state.global_step),
            "peak_memory_mb": peak_memory_mb(device)}
    if not run.config.progress_bar:
        print(f"{run.name}: {format_log(logs)}", flush=True)
    for cb in run.callbacks:
        cb.on_log(state, logs)
    run.losses_since_log, run.tokens_since_log, run.time_of_log = [], 0, time.perf_counter()


@torch.no_grad()
def evaluate(run: JobRun, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
    """train()'s evaluation of one job: every row of the eval batches goes through its adapter."""
    model.eval()
    loss_total, tokens = 0.0, 0
    for batch in micro_batches(run.job.eval_data, run.config.eval_batch_size, collate_fn=run.job.collate_fn):
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        set_routing(model, RowRouting([(run.index, 0, batch["input_ids"].shape[0])]))
        with autocast():
            loss_total += float(summed_token_loss(model, batch))
        tokens += label_tokens(batch)
    set_routing(model, None)
    model.train()
    eval_loss = loss_total / max(tokens, 1)
    return {"step": run.state.global_step, "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": tokens}


def finish_job(run: JobRun, model: nn.Module, device: torch.device, autocast) -> None:
    """Phase 5 of train() for one job: final evaluation, its adapter in PEFT's format, its result."""
    state = run.state
    runtime = time.perf_counter() - run.start_time
    if run.job.eval_data is not None and run.last_eval.get("step") != state.global_step:
        run.last_eval = evaluate(run, model, device, autocast)
        for cb in run.callbacks:
            cb.on_evaluate(state, run.last_eval)
        if run.job.trial is not None:
            report_to_trial(run.job.trial, run.last_eval, run.job.trial_metric)
    checkpoint.write_adapter(run.output_dir / "adapter", adapter_tensors(model, run.index), run.lora)
    for cb in run.callbacks:
        cb.on_train_end(state)
    steps_this_run = state.global_step - run.start_step
    metrics = {"train_loss": state.loss_sum / max(state.global_step, 1),
               "train_runtime_s": runtime,
               "train_steps_per_s": steps_this_run / max(runtime, 1e-9),
               "skipped_steps": state.skipped_steps,
               "nonfinite_steps": state.nonfinite_steps,
               **{k: v for k, v in run.last_eval.items() if k != "step"}}
    if run.pruned:
        metrics["pruned"] = True
    run.result = TrainResult(state.global_step, metrics["train_loss"], metrics)


def adapter_tensors(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    return {key: v.detach().to("cpu").contiguous() for key, v in adapter_state_dict_of(model, k).items()}


# ------------------------------------------------------------------------------------------------
# Checkpoints of the group: every job that took step N writes its own checkpoint-N, as train()
# would, plus the group's record (which jobs go on after N, and the results of those that ended).


def checkpoint_due(run: JobRun, window: Window) -> bool:
    c = run.config
    return bool((c.save_every and run.state.global_step % c.save_every == 0) or
                (c.save_each_epoch and window.last_in_epoch))


def save_group(stepped: list[JobRun], runs: list[JobRun], model: nn.Module,
               rng_states: dict[int, torch.Tensor]) -> None:
    """checkpoint-N of every job that took step N; the old ones are rotated away only once all are
    written, so a kill at any moment leaves one step that every job has saved."""
    step = stepped[0].state.global_step
    record = {"jobs": [str(run.output_dir) for run in runs],
              "live": [run.index for run in stepped if run.result is None],
              "ended": {str(run.index): dataclasses.asdict(run.result) for run in runs
                        if run.result is not None}}
    written = []
    for run in stepped:
        path = run.output_dir / f"checkpoint-{step}"
        try:
            write_job_checkpoint(path, run, model, rng_states[run.index], record)
        except OSError as e:  # disk full, quota, permissions
            previous = checkpoint.latest_checkpoint(run.output_dir)
            error = f"could not write {path}: {e}; the newest complete checkpoint is {previous or 'none'}"
            if run.config.on_save_error == "stop":
                raise files.CheckpointError(error) from None
            print(f"peftloop: {run.name}: {error}; training continues (on_save_error='continue')")
            continue
        written.append((run, path))
    for run, path in written:
        checkpoint.rotate_checkpoints(run.output_dir, run.config.save_total_limit)
        for cb in run.callbacks:
            cb.on_save(run.state, path)


def write_job_checkpoint(path: Path, run: JobRun, model: nn.Module, rng_state: torch.Tensor,
                         record: dict[str, Any]) -> None:
    """train()'s checkpoint for one job: its adapter, optimizer, scaler, dropout stream and state."""
    adapter = adapter_tensors(model, run.index)
    bad = next((k for k, v in adapter.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NonFiniteError(f"{run.name}: step {run.state.global_step}: not saving {path.name}: "
                             f"{bad} has NaN/inf values")
    tensors, meta = checkpoint.rng_state()
    tensors["torch_cpu"] = rng_state.clone()  # the job's own dropout stream, where train() keeps it
    trainer_state = {**{name: getattr(run.state, name) for name in SAVED_FIELDS},
                     "config": dataclasses.asdict(run.config), "scaler": run.scaler.state_dict(),
                     "world_size": 1, "micro_batch_size": run.config.micro_batch_size, "group": record}
    checkpoint.save_checkpoint(path, adapter=adapter, lora_config=run.lora,
                               optimizer_state=distributed.full_optimizer_state(run.adapter, run.optimizer),
                               rng_states=[(tensors, meta)], trainer_state=trainer_state)


def resume_group(runs: list[JobRun], model: nn.Module, rng_states: dict[int, torch.Tensor]) -> None:
    """Put the group back at the newest step N whose record's live jobs all have a complete
    checkpoint-N: their adapters, optimizers, scalers, dropout streams and positions; the jobs that
    had ended by N get their results back and do not run again."""
    for run in runs:
        files.recover_interrupted_writes(run.output_dir)
    steps = sorted({int(p.name.split("-")[1]) for run in runs
                    for p in checkpoint.list_checkpoints(run.output_dir)}, reverse=True)
    for step in steps:
        saved = group_checkpoint(runs, step)
        if saved is not None:
            break
    else:
        print("peftloop: train_many: no checkpoint that the whole group saved; starting from step 0")
        return
    for run in runs:
        if run.index in saved:
            restore_job(run, model, saved[run.index], rng_states)
        else:
            ended = saved["ended"].get(str(run.index))
            run.result = TrainResult(**ended) if ended else None
            if run.result is None:
                raise files.CheckpointError(f"train_many: the group's checkpoint-{step} neither continues "
                                            f"nor ended {run.name}")
    print(f"peftloop: train_many resumed from checkpoint-{step}")


def group_checkpoint(runs: list[JobRun], step: int) -> dict | None:
    """The checkpoints of step ``step`` (job index -> what load_checkpoint read, and "ended"), or None
    when a job the group record names has none there or one that is damaged."""
    found = {}
    for run in runs:
        path = run.output_dir / f"checkpoint-{step}"
        if not path.is_dir():
            continue
        try:
            found[run.index] = {**checkpoint.load_checkpoint(path), "path": path}
        except files.CheckpointError:
            return None
    if not found:
        return None
    record = next(iter(found.values()))["trainer_state"].get("group")
    same_jobs = record is not None and \
        [Path(d).resolve() for d in record["jobs"]] == [run.output_dir.resolve() for run in runs]
    if not same_jobs:
        raise files.CheckpointError(f"train_many: checkpoint-{step} was not written by this group of jobs "
                                    f"({', '.join(str(run.output_dir) for run in runs)})")
    needed = set(record["live"])
    if not needed <= set(found):
        return None
    return {**{k: found[k] for k in needed}, "ended": record["ended"]}


def restore_job(run: JobRun, model: nn.Module, saved: dict[str, Any],
                rng_states: dict[int, torch.Tensor]) -> None:
    """One job's adapter, optimizer, scaler, dropout stream and loop state from its checkpoint-N."""
    load_adapter_state_dict_of(model, run.index, saved["adapter"])
    try:
        distributed.load_full_optimizer_state(run.adapter, run.optimizer, saved["optimizer_state"],
                                              distributed.Dist())
    except (KeyError, ValueError, RuntimeError) as e:
        raise files.CheckpointError(
            f"{saved['path']}/optimizer.safetensors does not fit {run.name}'s adapter ({e})") from None
    trainer_state = saved["trainer_state"]
    if trainer_state["scaler"]:
        run.scaler.load_state_dict(trainer_state["scaler"])
    rng_states[run.index] = saved["rng_states"][0][0]["torch_cpu"]
    run.state = TrainState(**{name: trainer_state[name] for name in SAVED_FIELDS})
