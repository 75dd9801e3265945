"""Hyperparameter search with optuna: ``peftloop search``.

    peftloop search [--config base.toml] [--space space.toml] --n-trials N [--pruner median]
                    [--parallel K] [--output-dir DIR] [--metric NAME] [--direction minimize|maximize]
                    [--key value ...]

A study over the settings that space.toml names: learning rate, warmup, r, alpha, dropout,
target modules... Each trial, in order:

  1. the sampler picks the trial's values (``trial.suggest_*``, one per table of space.toml);
  2. a fresh base model gets LoRA with the trial's [lora] values (they shape the adapters, so
     they are applied before ``inject_lora``), seeded with [train] seed like every trial, so that
     trials differ by their settings alone and a re-run trial repeats exactly;
  3. ``train(..., trial=trial)`` trains with the trial's [train] values over base.toml's, reports
     every evaluation's metric to the trial, and stops early when the pruner cuts it;
  4. the final value of the metric is told to the study; the summary is rewritten.

With ``--parallel K`` the trials train K at a time, in one process over one base model
(``train_many``): steps 1-4 per trial, step 3 for the whole group at once; a pruned trial stops
and its group runs on (``search_in_groups``).

What it writes in OUTPUT (``--output-dir``, else [train] output_dir, else ``peftloop-search``):

    study.db       the study (SQLite). Run the same command again after a kill and it goes on: the
                   finished trials stay, the trial that was running is marked failed and run again
                   with the same values, until N trials have finished.
    trial-K/       trial K's run: log.jsonl, checkpoints, adapter/ (PEFT format)
    summary.md     every trial: state, value, settings, steps, time, adapter (and summary.json)

base.toml has the sections of ``peftloop train --config`` ([train], [lora], [model], [data]) and
``--key value`` flags override it. With no [model] name_or_path the search runs on the demo task
(``peftloop.demo``: reversing strings), with short trials and, without --space, ``DEMO_SPACE``.

space.toml has one table per setting (a [train] or [lora] field; ``"lora.r"`` when a name is in
both), and an optional [search] table::

    [search]
    metric = "eval_loss"      # any evaluation metric (eval_exact_match, ...); default eval_loss
    direction = "minimize"    # default: minimize a *loss or *perplexity, maximize anything else
    n_startup_trials = 2      # median pruner: trials that finish before any is pruned
    n_warmup_steps = 0        # median pruner: steps of each trial that are never pruned

    [learning_rate]
    type = "float"            # "float", "int" or "categorical"
    low = 1e-4
    high = 1e-2
    log = true                # optional: sample on a log scale; `step = ...` for a grid

    [target_modules]
    type = "categorical"
    choices = [["q_proj", "v_proj"], "all-linear"]   # a list is stored as "q_proj,v_proj"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftloop.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig
from peftloop.config_io import build, read_sections
from peftloop.data import collate
from peftloop.demo import (
    DEMO_LORA,
    DEMO_TRAIN,
    base_config,
    build_tokenizer,
    random_words,
    save_tokenizer,
    to_example,
)
from peftloop.inject import inject_lora
from peftloop.models import load_pretrained, save_pretrained
from peftloop.models.llama import LlamaForCausalLM
from peftloop.pretrained import load_base_model, load_data
from peftloop.search_space import (
    Space,
    check_groups,
    check_space,
    default_direction,
    parse_space,
    trial_sections,
)
from peftloop.search_summary import write_summary
from peftloop.train import NonFiniteError, seed_everything, train
from peftloop.train_many import SHARED_KEYS, Job, train_many

try:  # POSIX: one search at a time per output folder
    import fcntl
except ImportError:
    fcntl = None

STUDY_NAME = "peftloop-search"
"""One study per output folder, under a fixed name: running the same command again resumes it."""
# Demo trials are short (the demo trains 300 steps): enough to rank settings and to prune.
DEMO_SEARCH_TRAIN = {**DEMO_TRAIN, "max_steps": 30, "micro_batch_size": 16, "warmup_steps": 3,
                     "eval_every": 10, "eval_batch_size": 64, "log_every": 10, "progress_bar": False}
DEMO_EVAL_WORDS = 64
DEMO_SPACE = """\
[learning_rate]
type = "float"
low = 3e-4
high = 1e-2
log = true

[r]
type = "categorical"
choices = [4, 8, 16]

[lora_alpha]
type = "categorical"
choices = [8, 16, 32]

[lora_dropout]
type = "categorical"
choices = [0.0, 0.1]

[target_modules]
type = "categorical"
choices = [["q_proj", "v_proj"], "all-linear"]
"""


def require_optuna():
    """The optuna module. Imported here, not at the top: ``peftloop`` imports this module for its
    command line, and every other command would pay for importing optuna (half a second)."""
    try:
        import optuna  # the 'optuna' extra
    except ImportError:
        raise ConfigError("peftloop search needs optuna: pip install 'peftloop[optuna]'") from None
    return optuna


# ------------------------------------------------------------------------------------------------
# The task every trial trains on


@dataclass
class Task:
    """Fresh base models and the data: what every trial trains on."""

    new_base: Callable[[], nn.Module]
    """A fresh base model, without adapters (``train_many`` injects a group's adapters itself)."""
    train_data: Any
    eval_data: Any
    collate_fn: Callable
    tokenizer: Any = None
    """Decodes completions for task metrics (None: the demo compares token ids)."""

    def new_model(self, lora_config: LoraConfig) -> nn.Module:
        """A fresh base model with LoRA injected by the given config."""
        return inject_lora(self.new_base(), lora_config)


def demo_task(output_dir: Path, seed: int) -> Task:
    """The demo's task (``peftloop.demo``): its base model, written to OUTPUT/base, and its data,
    with a smaller evaluation set so that trials are short."""
    tokenizer = build_tokenizer()
    base = LlamaForCausalLM(base_config(tokenizer.get_vocab_size()))
    base.init_weights(torch.Generator().manual_seed(0))
    base_dir = output_dir / "base"
    save_pretrained(base, base_dir)
    save_tokenizer(tokenizer, base_dir)
    rng = random.Random(seed)
    eval_words = random_words(DEMO_EVAL_WORDS, rng)
    train_words = random_words(4000, rng, exclude=set(eval_words))
    train_data = [to_example(tokenizer, w) for w in train_words]
    eval_data = [to_example(tokenizer, w) for w in eval_words]
    return Task(lambda: load_pretrained(base_dir, dtype="fp32"), train_data, eval_data, collate)


def pretrained_task(model_config: ModelConfig, data_config: DataConfig, seed: int, source: str) -> Task:
    """A Hugging Face checkpoint (hub id or folder) and JSONL data, as ``peftloop train`` loads them;
    the data is read once, the model once per trial (once per group with --parallel)."""
    if not data_config.train_file:
        raise ConfigError(f"{source}: no training data: set --data (data.train_file)")
    loaded = load_data(model_config, data_config, seed=seed)
    if loaded.eval_data is None:
        raise ConfigError(f"{source}: a search needs evaluation data to compare trials: set data.eval_file "
                          "or data.eval_split")
    return Task(lambda: load_base_model(loaded.folder, model_config), loaded.train_data, loaded.eval_data,
                loaded.collate_fn, loaded.tokenizer)


def task_defaults(model_config: ModelConfig, output_dir: Path,
                  parallel: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """([train], [lora]) values that base.toml's override: the demo's short trials, or what
    ``peftloop train`` assumes (LoRA on every linear layer but the head). Trials trained together
    (``parallel`` > 1) share the base, so the demo's trained copy of the head (modules_to_save) is
    left out of their LoRA: ``--modules_to_save ""`` makes a --parallel 1 search the same."""
    if model_config.name_or_path is None:
        lora = {**DEMO_LORA, "base_model_name_or_path": str(output_dir / "base")}
        if parallel > 1:
            lora.pop("modules_to_save")
        return DEMO_SEARCH_TRAIN, lora
    return {}, {"target_modules": "all-linear", "base_model_name_or_path": model_config.name_or_path}


# ------------------------------------------------------------------------------------------------
# The study


def open_study(output_dir: Path, space: Space, sections: dict[str, dict], pruner: str, seed: int):
    """OUTPUT/study.db, created or resumed. A study made with another space, metric or base config
    is refused. Trials a killed search left running are marked failed and queued to run again
    with the same values (one search per folder runs at a time: ``search_lock``)."""
    optuna = require_optuna()
    # the base as given (where the base model's files are is not a setting: a folder may be named
    # by a relative path one day and an absolute one the next)
    base = {**sections, "lora": {k: v for k, v in sections["lora"].items() if k != "base_model_name_or_path"}}
    record = json.loads(json.dumps({"space": space.record(), "base": base}))
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{(output_dir / 'study.db').resolve()}",
        load_if_exists=True, direction=space.direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.n_startup_trials,
                                           n_warmup_steps=space.n_warmup_steps)
        if pruner == "median" else optuna.pruners.NopPruner())
    saved = study.user_attrs.get("peftloop")
    if saved is None:
        study.set_user_attr("peftloop", record)
    elif saved != record:
        changed = [f"{part}.{key}" for part in ("space", "base") for key in {**saved[part], **record[part]}
                   if saved[part].get(key) != record[part].get(key)]
        raise ConfigError(f"{output_dir / 'study.db'} holds a study made with other settings "
                          f"({', '.join(changed)} differ): search into another --output-dir, or delete it")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        print(f"[search] trial {t.number} was interrupted: it runs again with the same values")
    # The sampler's draws depend on the history it sees: seeded by it, a resumed search is reproducible.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def finished_trials(study) -> list:
    """Trials that count towards --n-trials: complete, pruned, or failed by their own error (a
    trial failed because the search was killed is run again instead)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and "error" in t.user_attrs)]


def search(study, task: Task, sections: dict[str, dict], space: Space, n_trials: int, output_dir: Path,
           source: str, parallel: int = 1) -> None:
    """Ask, run and tell trials until ``n_trials`` have finished; the summary after each (after each
    group with ``parallel`` > 1: ``search_in_groups``)."""
    if parallel > 1:
        search_in_groups(study, task, sections, space, n_trials, parallel, output_dir, source)
        return
    while len(finished_trials(study)) < n_trials:
        try:
            run_trial(study, plan_trial(study.ask(), sections, space, output_dir, source), task, space,
                      source)
        finally:  # a trial that stops the search with its error is in the summary too
            write_summary(study, space, output_dir)


@dataclass
class PlannedTrial:
    """An asked trial with its values and the configs they make."""

    trial: Any
    values: dict[str, Any]
    train_config: TrainConfig
    lora_config: LoraConfig

    @property
    def number(self) -> int:
        return self.trial.number

    def group_key(self) -> tuple:
        """What the trials of one group share: train_many's SHARED_KEYS and the adapted modules (one
        forward pass runs under one precision, on one device, through one set of target layers)."""
        return (*(getattr(self.train_config, key) for key in SHARED_KEYS),
                repr(self.lora_config.target_modules), repr(self.lora_config.exclude_modules))


def plan_trial(trial, sections: dict[str, dict], space: Space, output_dir: Path, source: str) -> PlannedTrial:
    """The trial's values (the sampler picks them now) and its configs; its output folder is trial-N."""
    values = {p.name: p.suggest(trial) for p in space.params}
    trial_dir = output_dir / f"trial-{trial.number}"
    sections = trial_sections(sections, space, values)
    train_config = build(TrainConfig, {**sections["train"], "output_dir": str(trial_dir)}, "train", source)
    lora_config = build(LoraConfig, sections["lora"], "lora", source)
    trial.set_user_attr("output_dir", str(trial_dir))
    print(f"[search] trial {trial.number}: {describe(values)}", flush=True)
    return PlannedTrial(trial, values, train_config, lora_config)


def run_trial(study, planned: PlannedTrial, task: Task, space: Space, source: str) -> None:
    """One trial, told to the study: complete (the metric's final value), pruned, or failed. A
    diverged trial (NonFiniteError, a NaN metric) fails and the search goes on; any other error
    fails it and stops the search."""
    optuna = require_optuna()
    trial, train_config = planned.trial, planned.train_config
    start = time.perf_counter()
    try:
        seed_everything(train_config.seed)  # the same seed for every trial: LoRA's init, dropout, data order
        model = task.new_model(planned.lora_config)
        result = train(model, task.train_data, task.eval_data, train_config, collate_fn=task.collate_fn,
                       tokenizer=task.tokenizer, trial=trial, trial_metric=space.metric)
        value = final_value(result, space, source)
    except optuna.TrialPruned as e:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"[search] trial {trial.number}: {e} ({time.perf_counter() - start:.0f} s)", flush=True)
        return
    except NonFiniteError as e:
        tell_diverged(study, trial, e)
        return
    except Exception as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    tell_complete(study, planned, result, value, space, time.perf_counter() - start)


def final_value(result, space: Space, source: str) -> float:
    """The trial's value: its metric at the end; a NaN or infinite one is a divergence."""
    value = result.metrics.get(space.metric)
    if value is None:
        raise ConfigError(f"{source}: metric {space.metric!r} is not among the run's metrics "
                          f"({', '.join(sorted(result.metrics))})")
    if not math.isfinite(value):
        raise NonFiniteError(f"{space.metric} is {value}")
    return value


def tell_complete(study, planned: PlannedTrial, result, value: float, space: Space, seconds: float) -> None:
    trial = planned.trial
    trial.set_user_attr("steps", result.global_step)
    trial.set_user_attr("adapter", str(Path(planned.train_config.output_dir) / "adapter"))
    study.tell(trial, value)
    print(f"[search] trial {trial.number}: {space.metric} {value:.4f} after {result.global_step} steps "
          f"({seconds:.0f} s)", flush=True)


def tell_diverged(study, trial, error: Exception) -> None:
    optuna = require_optuna()
    trial.set_user_attr("error", f"diverged: {error}")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    print(f"[search] trial {trial.number} failed: diverged: {error}", flush=True)


# ------------------------------------------------------------------------------------------------
# --parallel K: trials trained K at a time on one base (train_many)


def search_in_groups(study, task: Task, sections: dict[str, dict], space: Space, n_trials: int, parallel: int,
                     output_dir: Path, source: str) -> None:
    """Trials trained together, up to ``parallel`` at a time, in one process over one base model.

    Trials that cannot share a forward pass (different target modules, precision or device:
    ``PlannedTrial.group_key``) run in separate groups: the asked trials wait in a pool, and each
    round trains the largest group of the pool that can run as one, after topping the pool up to
    ``parallel`` trials (never asking more than the trials still to finish). A pruned trial stops;
    its group runs on. The study is told each trial's outcome when its group ends."""
    waiting: list[PlannedTrial] = []
    while len(finished_trials(study)) < n_trials:
        still_to_finish = n_trials - len(finished_trials(study)) - len(waiting)
        for _ in range(max(0, min(parallel - len(waiting), still_to_finish))):
            waiting.append(plan_trial(study.ask(), sections, space, output_dir, source))
        group = largest_group(waiting, parallel)
        taken = {p.number for p in group}
        waiting = [p for p in waiting if p.number not in taken]
        try:
            run_group(study, group, task, space, source)
        finally:
            write_summary(study, space, output_dir)


def largest_group(waiting: list[PlannedTrial], parallel: int) -> list[PlannedTrial]:
    """Up to ``parallel`` waiting trials that can train together: the most numerous kind, the kind
    of the earliest asked trial on a tie (so that no trial waits for ever)."""
    kinds: dict[tuple, list[PlannedTrial]] = {}
    for planned in waiting:
        kinds.setdefault(planned.group_key(), []).append(planned)
    return max(kinds.values(), key=len)[:parallel]  # max keeps the first of equals: insertion order


def run_group(study, group: list[PlannedTrial], task: Task, space: Space, source: str) -> None:
    """One group trained together by train_many, each trial told its outcome. A group of one runs as
    ``run_trial`` (train_many gives what train() gives). A group that diverges (NonFiniteError out
    of train_many) cannot say whose step it was: its trials run again one at a time, from scratch,
    so that the diverged one fails alone. Any other error fails them all and stops the search."""
    optuna = require_optuna()
    if len(group) == 1:
        run_trial(study, group[0], task, space, source)
        return
    print(f"[search] trials {', '.join(str(p.number) for p in group)} train together", flush=True)
    jobs = [Job(task.train_data, p.lora_config, p.train_config, task.eval_data, collate_fn=task.collate_fn,
                trial=p.trial, trial_metric=space.metric) for p in group]
    try:
        results = train_many(task.new_base(), jobs)
    except NonFiniteError as e:
        print(f"[search] the group diverged ({e}): its trials run again one at a time", flush=True)
        for planned in group:
            shutil.rmtree(planned.train_config.output_dir, ignore_errors=True)
            run_trial(study, planned, task, space, source)
        return
    except Exception as e:
        for planned in group:
            planned.trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            study.tell(planned.trial, state=optuna.trial.TrialState.FAIL)
        raise
    for planned, result in zip(group, results):
        tell_group_result(study, planned, result, space, source)


def tell_group_result(study, planned: PlannedTrial, result, space: Space, source: str) -> None:
    """A grouped trial's outcome, as run_trial tells it. Its seconds in the summary are its own
    (train_many's train_runtime_s: from the group's start to the step it ended at), not the group's."""
    optuna = require_optuna()
    trial, seconds = planned.trial, result.metrics["train_runtime_s"]
    trial.set_user_attr("seconds", round(seconds, 1))
    if result.metrics.get("pruned"):
        trial.set_user_attr("steps", result.global_step)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"[search] trial {trial.number}: pruned after step {result.global_step} ({space.metric} "
              f"{result.metrics[space.metric]:.4f}) ({seconds:.0f} s)", flush=True)
        return
    try:
        value = final_value(result, space, source)
    except NonFiniteError as e:
        tell_diverged(study, trial, e)
        return
    tell_complete(study, planned, result, value, space, seconds)


def describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class search_lock:
    """Holds OUTPUT/search.lock while a search runs there: a second one would take the first's
    running trials for interrupted ones. The lock goes with the process, however it ends."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "search.lock"

    def __enter__(self):
        self.file = self.path.open("w")
        if fcntl is not None:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                raise ConfigError(f"{self.path.parent}: another peftloop search is running there") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


# ------------------------------------------------------------------------------------------------
# The command


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    """``peftloop search``'s options, on the ``peftloop`` command's subparsers."""
    p = subparsers.add_parser(
        "search", allow_abbrev=False,
        help="search LoRA and training settings with optuna (no model: the demo task)",
        description="Search LoRA and training settings with optuna: one trial per set of values, the\n"
                    "study in OUTPUT/study.db (run the same command again to resume), a summary in\n"
                    "OUTPUT/summary.md. --key value flags set the base's [train], [lora], [model] and\n"
                    "[data] settings, as for peftloop train.",
        epilog="space.toml, one table per setting:\n\n" + DEMO_SPACE.split("\n\n[lora_alpha]")[0]
               + "\n\n[search] sets metric, direction, n_startup_trials and n_warmup_steps.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the base: a TOML file with [train], [lora], [model] and [data] sections")
    p.add_argument("--space", help="the settings to search: a TOML file, one table per setting "
                                   "(optional with the demo task)")
    # each flag in both spellings: the peftloop command writes every flag with _ before parsing
    p.add_argument("--n_trials", "--n-trials", type=int, required=True, metavar="N",
                   help="trials to finish (a resumed study counts the ones it has)")
    p.add_argument("--pruner", choices=["none", "median"], default="none",
                   help="median: stop a trial whose metric is worse than the median of earlier trials "
                        "at the same step")
    p.add_argument("--output_dir", "--output-dir", metavar="DIR",
                   help="where the study, the trials and the summary go (default: [train] output_dir, "
                        "else peftloop-search)")
    p.add_argument("--metric", help="the evaluation metric to optimize (default: [search] metric, else "
                                    "eval_loss)")
    p.add_argument("--direction", choices=["minimize", "maximize"],
                   help="default: minimize a loss or perplexity, maximize anything else")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="train K trials at a time, in one process over one base model (trials that "
                        "cannot share one forward pass, e.g. other target_modules, run in separate "
                        "groups); default 1")
    p.add_argument("--model", help="base model: a Hugging Face Hub id or a local folder (model.name_or_path)")
    p.add_argument("--data", help="training data: a JSONL file (data.train_file)")
    return p


def run_search(args, rest: list[str], check_only: bool = False) -> int:
    """``peftloop search``: everything is validated before the first trial starts. ``check_only``:
    validate the config, the space and every value it can give, then return (nothing written)."""
    optuna = require_optuna()
    source = args.config or "command line"
    sections = read_sections(args.config, rest, model=args.model, data=args.data)
    output_dir = Path(args.output_dir or sections["train"].pop("output_dir", None) or "peftloop-search")
    sections["train"].pop("output_dir", None)
    model_config = build(ModelConfig, sections["model"], "model", source)
    data_config = build(DataConfig, sections["data"], "data", source)
    if model_config.name_or_path is None and (sections["model"] or sections["data"]):
        given = [f"{s}.{k}" for s in ("model", "data") for k in sections[s]]
        raise ConfigError(f"{source}: {', '.join(given)} given without a model: "
                          "set --model (model.name_or_path)")
    space = read_space(args, demo=model_config.name_or_path is None)
    if args.n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {args.n_trials}")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    train_defaults, lora_defaults = task_defaults(model_config, output_dir, args.parallel)
    sections["train"] = {**train_defaults, **sections["train"]}
    sections["lora"] = {**lora_defaults, **sections["lora"]}
    check_space(space, sections, args.space or "the demo's space")
    if args.parallel > 1:
        check_groups(space, sections, args.space or "the demo's space")
    train_config = build(TrainConfig, sections["train"], "train", source)
    build(LoraConfig, sections["lora"], "lora", source)
    if check_only:
        return 0
    if args.pruner != "none" and not train_config.eval_every:
        print("[search] note: train.eval_every is 0: trials are evaluated only at the end, so none is pruned")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output_dir.mkdir(parents=True, exist_ok=True)
    with search_lock(output_dir):
        study = open_study(output_dir, space, sections, args.pruner, train_config.seed)
        done = len(finished_trials(study))
        print(f"[search] {output_dir / 'study.db'}: {done} of {args.n_trials} trials finished; "
              f"{space.direction} {space.metric} over {', '.join(p.name for p in space.params)}", flush=True)
        if model_config.name_or_path is None:
            task = demo_task(output_dir, train_config.seed)
        else:
            task = pretrained_task(model_config, data_config, train_config.seed, source)
        search(study, task, sections, space, args.n_trials, output_dir, source, args.parallel)
        table = write_summary(study, space, output_dir)
    best = table["best_trial"]
    if best is None:
        print(f"[search] no trial completed (all pruned or failed); summary -> {output_dir / 'summary.md'}")
        return 1
    print(f"[search] best trial {best['trial']}: {space.metric} {best['value']:.4f} "
          f"({describe(best['params'])})")
    print(f"[search] adapter (PEFT format) -> {best['adapter']}")
    print(f"[search] summary -> {output_dir / 'summary.md'}")
    return 0


def read_space(args, demo: bool) -> Space:
    if args.space:
        try:
            text = Path(args.space).read_text()
        except FileNotFoundError:
            raise ConfigError(f"space file not found: {args.space}") from None
        space = parse_space(text, args.space)
    elif demo:
        space = parse_space(DEMO_SPACE, "the demo's space")
    else:
        raise ConfigError("--space is needed: a TOML file with one table per setting to search")
    if args.metric:
        space = dataclasses.replace(space, metric=args.metric, direction=default_direction(args.metric))
    if args.direction:
        space = dataclasses.replace(space, direction=args.direction)
    return space


def main(argv: list[str] | None = None) -> int:
    """``python -m peftloop.search ARGS``: the same as ``peftloop search ARGS``."""
    parser = argparse.ArgumentParser(prog="peftloop")
    add_search_parser(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(["search", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_search(args, rest)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"peftloop: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
