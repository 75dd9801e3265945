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

Under torchrun the same function runs on every rank (``distributed.py``): each rank takes its
slice of every global micro-batch, the token count is summed over ranks before the division, and
logging and saving happen on rank 0.

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

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from peftloop import checkpoint, distributed
from peftloop.callbacks import Callback, EarlyStopping, JsonlLogger
from peftloop.config import TrainConfig
from peftloop.data import IGNORE_INDEX, collate, input_tokens, label_tokens, micro_batches, num_micro_batches
from peftloop.inject import adapter_state_dict, load_adapter_state_dict
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
) -> TrainResult:
    config = config or TrainConfig()
    output_dir = Path(config.output_dir)

    # ---- 1. set-up: device, processes, seeds, precision ---------------------------------------
    dist_, device = distributed.setup(config.strategy, resolve_device(config.device))
    model.to(device)
    # Ranks draw different dropout masks; the data order is seeded separately (data.epoch_order).
    seed_everything(config.seed + dist_.rank)
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

    # ---- 2. plan: how many optimizer steps -------------------------------------------------
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

    # ---- 3. resume, wrap, optimizer ------------------------------------------------------------
    lora_config = model.lora_config
    # Rank 0 reads the checkpoint; the adapter goes in before wrapping (wrap() hands rank 0's
    # tensors to every rank). A failure is shared, so no rank is left waiting in a collective.
    resume_path, saved, error = None, None, None
    if dist_.is_main:
        checkpoint.recover_interrupted_writes(output_dir)
        try:
            resume_path = _resume_path(config)
            if resume_path is not None:
                saved = checkpoint.load_checkpoint(resume_path)
                load_adapter_state_dict(model, saved["adapter"], source=str(resume_path))
        except Exception as e:
            error = e
    resume_path, error_text = distributed.broadcast_object((resume_path, error and f"{type(error).__name__}: {error}"), dist_)
    if error is not None:
        raise error
    if error_text:
        raise RuntimeError(f"rank 0 could not resume: {error_text}")
    model = distributed.wrap(model, dist_, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    state = TrainState(is_main_process=dist_.is_main)
    if resume_path is not None:
        state = _restore(state, saved, model, optimizer, scaler, dist_, resume_path)
        if dist_.is_main:
            print(f"peftloop: resumed from {resume_path} at step {state.global_step}")

    if dist_.is_main:
        callbacks = [JsonlLogger(output_dir / "log.jsonl"), *callbacks]
    if config.early_stopping_patience:
        callbacks = [*callbacks, EarlyStopping(config.early_stopping_patience)]
    for cb in callbacks:
        cb.on_train_begin(state)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Mean token loss over the whole eval set (no label smoothing) and its perplexity."""
        model.eval()
        loss_total, tokens = 0.0, 0
        eval_collate = _rank_slice(collate_fn, dist_.rank, config.eval_batch_size)
        for batch in micro_batches(eval_data, config.eval_batch_size * dist_.world_size, collate_fn=eval_collate):
            batch = _to_device(batch, device)
            with autocast():
                loss_total += float(summed_token_loss(model, batch))
            tokens += label_tokens(batch)
        model.train()
        loss_total = distributed.all_reduce_sum(loss_total, dist_, device)
        tokens = int(distributed.all_reduce_sum(tokens, dist_, device))
        eval_loss = loss_total / max(tokens, 1)
        return {"step": state.global_step, "eval_loss": eval_loss,
                "eval_perplexity": math.exp(min(eval_loss, 700.0)), "eval_tokens": tokens}

    def save() -> None:
        # Gathering is collective (FSDP2 shards, per-rank RNG); writing is rank 0's alone.
        path = output_dir / f"checkpoint-{state.global_step}"
        adapter = _gather_adapter(model)
        bad = next((k for k, v in adapter.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:  # a NaN never reaches a checkpoint
            raise NonFiniteError(f"step {state.global_step}: not saving {path.name}: {bad} has NaN/inf values")
        optimizer_state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng_states = distributed.gather_objects(checkpoint.rng_state(), dist_)
        error = None
        if dist_.is_main:
            trainer_state = {**_saved_state(state, config), "scaler": scaler.state_dict(),
                             "world_size": dist_.world_size, "micro_batch_size": config.micro_batch_size}
            try:
                checkpoint.save_checkpoint(path, adapter=adapter, lora_config=lora_config,
                                           optimizer_state=optimizer_state, rng_states=rng_states,
                                           trainer_state=trainer_state)
                checkpoint.rotate_checkpoints(output_dir, config.save_total_limit)
            except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
                previous = checkpoint.latest_checkpoint(output_dir)
                error = f"could not write {path}: {e}; the newest complete checkpoint is {previous or 'none'}"
        error = distributed.broadcast_object(error, dist_)  # every rank takes the same branch
        if error is not None:
            if config.on_save_error == "stop":
                raise checkpoint.CheckpointError(error)
            if dist_.is_main:
                progress.write(f"peftloop: {error}; training continues (on_save_error='continue')")
            return
        for cb in callbacks:
            cb.on_save(state, path)

    # ---- 4. the loop ----------------------------------------------------------------------
    model.train()
    windows = accumulation_windows(train_data, config, state, rank_collate, global_micro_batch)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not (config.progress_bar and dist_.is_main),
                    dynamic_ncols=True, desc="train")
    last_eval: dict[str, float] = {}
    losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()
    start_time, start_step = time.perf_counter(), state.global_step

    while state.global_step < total_steps and not state.should_stop:
        window, next_epoch, next_example, epoch_ended = next(windows)

        # a. learning rate of this step (LoRA+ groups carry their own multiplier)
        lr = learning_rate(state.global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

        # b. the loss normaliser: label tokens in the whole window, over all ranks, not per
        #    micro-batch: k micro-batches of b examples then give the gradient of one batch of k*b.
        tokens_in_window = distributed.all_reduce_sum(sum(label_tokens(b) for b in window), dist_, device)
        # DDP and FSDP average gradients over ranks; multiplying by the world size turns that
        # average back into the sum, so the step's gradient is that of the global token mean.
        loss_scale = dist_.world_size / max(tokens_in_window, 1)

        # c. forward + backward for each micro-batch; gradients add up across the window and
        #    are reduced across ranks only after the last one
        window_loss = torch.zeros((), device=device)
        for i, batch in enumerate(window):
            batch = _to_device(batch, device)
            with distributed.no_gradient_sync(model, skip=i < len(window) - 1):
                with autocast():
                    summed = summed_token_loss(model, batch, config.label_smoothing)
                scaler.scale(summed * loss_scale).backward()
            window_loss += summed.detach().float() / max(tokens_in_window, 1)
            tokens_since_log += input_tokens(batch)

        # d. unscale -> clip -> step -> zero. clip_grad_norm_ returns the norm *before* clipping.
        step_loss = distributed.all_reduce_sum(float(window_loss), dist_, device)
        scaler.unscale_(optimizer)
        grad_norm = float(distributed.full_tensor(
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))))
        # fp16's scaler skips overflowed steps by itself; otherwise a NaN/inf must not reach the weights.
        nonfinite = not scaler.is_enabled() and not (math.isfinite(step_loss) and math.isfinite(grad_norm))
        if nonfinite and config.nan_policy == "stop":
            raise NonFiniteError(_nonfinite_report(state.global_step + 1, step_loss, model))
        for cb in callbacks:
            cb.on_before_optimizer_step(state, model)
        scale_before = scaler.get_scale()
        if not nonfinite:
            scaler.step(optimizer)  # skipped when unscale_ found inf/NaN gradients (fp16 only)
            scaler.update()
        step_skipped = nonfinite or (scaler.is_enabled() and scaler.get_scale() < scale_before)
        optimizer.zero_grad(set_to_none=True)
        if nonfinite and dist_.is_main:
            progress.write(f"peftloop: step {state.global_step + 1} skipped: loss {step_loss}, grad norm {grad_norm}")

        # ---- 5. bookkeeping --------------------------------------------------------------
        state.global_step += 1
        state.epoch, state.examples_in_epoch = next_epoch, next_example
        state.loss_sum += step_loss if not nonfinite else 0.0
        state.tokens_seen += int(tokens_in_window)
        state.skipped_steps += int(step_skipped)
        state.nonfinite_steps += int(nonfinite)
        losses_since_log.append(step_loss)
        metrics = {"step": state.global_step, "loss": step_loss, "grad_norm": float(grad_norm), "lr": lr,
                   "skipped": step_skipped}
        for cb in callbacks:
            cb.on_step_end(state, metrics)
        progress.update(1)

        if state.global_step % config.log_every == 0 or state.global_step == total_steps:
            elapsed = time.perf_counter() - time_of_log
            tokens_since_log = distributed.all_reduce_sum(tokens_since_log, dist_, device)
            logs = {"step": state.global_step, "epoch": _epoch_progress(state, train_data),
                    "loss": sum(losses_since_log) / len(losses_since_log), "grad_norm": float(grad_norm),
                    "lr": lr, "tokens_per_s": tokens_since_log / max(elapsed, 1e-9)}
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{logs['tokens_per_s']:.0f}")
            if not config.progress_bar and dist_.is_main:
                print(" ".join(f"{k}={_fmt(v)}" for k, v in logs.items()), flush=True)
            for cb in callbacks:
                cb.on_log(state, logs)
            losses_since_log, tokens_since_log, time_of_log = [], 0, time.perf_counter()

        if eval_data is not None and config.eval_every and state.global_step % config.eval_every == 0:
            last_eval = evaluate()
            if dist_.is_main:
                progress.write(f"step {state.global_step}: eval_loss {last_eval['eval_loss']:.4f}")
            for cb in callbacks:
                cb.on_evaluate(state, last_eval)

        if (config.save_every and state.global_step % config.save_every == 0) or \
                (config.save_each_epoch and epoch_ended):
            save()
        # every rank stops together, whichever rank's callback asked
        state.should_stop = distributed.any_rank(state.should_stop, dist_, device)

    progress.close()

    # ---- 6. the end: final evaluation and the adapter ------------------------------------------
    runtime = time.perf_counter() - start_time
    if eval_data is not None and last_eval.get("step") != state.global_step:
        last_eval = evaluate()
        for cb in callbacks:
            cb.on_evaluate(state, last_eval)
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


def accumulation_windows(train_data, config: TrainConfig, state: TrainState, collate_fn, global_micro_batch: int):
    """Yield (this rank's micro-batches of one step, epoch after it, examples of that epoch consumed
    after it, epoch ended?) forever, starting at the state's data position. Each epoch has its own
    seeded order, so resuming needs only (epoch, examples consumed)."""
    epoch, consumed = state.epoch, state.examples_in_epoch
    if consumed % global_micro_batch:
        raise ValueError(
            f"resume: the checkpoint stopped after {consumed} examples of epoch {epoch}, which is not a whole "
            f"number of global micro-batches of {global_micro_batch} (micro_batch_size x world size); "
            f"pick sizes that divide it")
    while True:
        batches = micro_batches(train_data, global_micro_batch, epoch=epoch, seed=config.seed,
                                shuffle=config.shuffle, collate_fn=collate_fn)
        batches = itertools.islice(batches, consumed // global_micro_batch, None)
        window = list(itertools.islice(batches, config.grad_accum))
        if not window and consumed == 0:
            raise ValueError("train: the training data is empty")
        while window:
            consumed += sum(b.pop("_examples") for b in window)
            following = list(itertools.islice(batches, config.grad_accum))
            if following:
                yield window, epoch, consumed, False
            else:
                yield window, epoch + 1, 0, True
            window = following
        epoch, consumed = epoch + 1, 0


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
    saved = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.metadata.get("saved", True)}
    return {**saved, "config": dataclasses.asdict(config)}


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
    inner = distributed.unwrap(model)
    return {k: distributed.full_tensor(v).detach().to("cpu").contiguous() for k, v in adapter_state_dict(inner).items()}


def _restore(state: TrainState, saved, model, optimizer, scaler, dist_, path: Path) -> TrainState:
    """Everything but the adapter (already loaded) from a checkpoint read on rank 0."""
    try:
        set_optimizer_state_dict(
            model, optimizer, saved["optimizer_state"] if dist_.is_main else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist_.enabled))
    except (KeyError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(
            f"{path}/optimizer.safetensors does not fit this model's trainable parameters ({e})") from None
    trainer_state = distributed.broadcast_object(saved["trainer_state"] if dist_.is_main else None, dist_)
    if trainer_state["scaler"]:
        scaler.load_state_dict(trainer_state["scaler"])
    rng_states = saved["rng_states"] if dist_.is_main else None
    if dist_.enabled and dist_.is_main:  # one per current rank; ranks the checkpoint did not have reseed
        rng_states = [rng_states[r] if r < len(rng_states) else None for r in range(dist_.world_size)]
    mine = distributed.scatter_objects(rng_states, dist_) if dist_.enabled else rng_states[0]
    if mine is not None:
        checkpoint.set_rng_state(*mine)
    fields = {f.name: trainer_state[f.name] for f in dataclasses.fields(TrainState) if f.metadata.get("saved", True)}
    return TrainState(**fields, is_main_process=state.is_main_process)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

