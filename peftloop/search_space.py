"""The search space of ``peftloop search``: space.toml parsed, checked against the base config,
and turned into each trial's [train] and [lora] values (see ``peftloop.search`` for the format)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import tomllib

from peftloop.config import ConfigError, LoraConfig, TrainConfig
from peftloop.config_io import SCHEMA, build

SEARCHABLE = ("train", "lora")
"""The sections a space may search: [model] and [data] are loaded once for every trial."""
NOT_SEARCHABLE = {"output_dir", "resume_from_checkpoint", "base_model_name_or_path"}
KINDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
         "categorical": {"choices"}}
SETTINGS = {"metric", "direction", "n_startup_trials", "n_warmup_steps"}
GROUP_METRICS = ("eval_loss", "eval_perplexity")
"""What train_many's evaluations log: the metrics a --parallel search can optimize."""


@dataclass(frozen=True)
class Param:
    """One searched setting: a table of space.toml."""

    name: str
    section: str
    """"train" or "lora": where the value goes."""
    kind: str
    """"float", "int" or "categorical"."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    """The values; a list value (target_modules) is offered to optuna as its comma-joined label."""

    def suggest(self, trial) -> Any:
        """The trial's value (optuna records it under ``name``)."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return self.value_of(trial.suggest_categorical(self.name, [label(c) for c in self.choices]))

    def value_of(self, stored: Any) -> Any:
        """The setting for a value as optuna stores it (a categorical list comes back as its label)."""
        if self.kind != "categorical":
            return stored
        return next(c for c in self.choices if label(c) == stored)

    def candidates(self) -> list[Any]:
        """Values to validate the space with: both ends of a range, every choice."""
        return [self.low, self.high] if self.kind != "categorical" else list(self.choices)


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    metric: str = "eval_loss"
    direction: str = "minimize"
    n_startup_trials: int = 2
    n_warmup_steps: int = 0

    def record(self) -> dict[str, Any]:
        """What a study remembers of its space, to refuse resuming with another one."""
        return {"metric": self.metric, "direction": self.direction,
                "params": [dataclasses.asdict(p) for p in self.params]}


def label(choice: Any) -> Any:
    return ",".join(choice) if isinstance(choice, list) else choice


def parse_space(text: str, source: str) -> Space:
    """A space from the text of space.toml; every error names ``source`` and the table."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    settings = raw.pop("search", {})
    unknown = set(settings) - SETTINGS
    if unknown:
        raise ConfigError(f"{source}: [search] has unknown keys {sorted(unknown)} "
                          f"(known: {sorted(SETTINGS)})")
    params = tuple(_param(name, table, source) for name, table in raw.items())
    if not params:
        raise ConfigError(f"{source}: no settings to search (one table per setting, e.g. [learning_rate])")
    names = [p.name for p in params]
    if len(set(names)) < len(names):
        raise ConfigError(f"{source}: a setting is searched twice: {names}")
    metric = settings.get("metric", "eval_loss")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{source}: [search] metric must be an evaluation metric's name, got {metric!r}")
    direction = settings.get("direction", default_direction(metric))
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{source}: [search] direction={direction!r}: expected 'minimize' or 'maximize'")
    space = Space(params, metric, direction, n_startup_trials=settings.get("n_startup_trials", 2),
                  n_warmup_steps=settings.get("n_warmup_steps", 0))
    for key in ("n_startup_trials", "n_warmup_steps"):
        value = getattr(space, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: [search] {key}={value!r}: expected an integer >= 0")
    return space


def default_direction(metric: str) -> str:
    return "minimize" if metric.endswith(("loss", "perplexity")) else "maximize"


def _param(name: str, table: Any, source: str) -> Param:
    where = f"{source}: [{name}]"
    section, key = _owner(name, where)
    if not isinstance(table, dict) or table.get("type") not in KINDS:
        raise ConfigError(f"{where}: expected a table with type = \"float\", \"int\" or \"categorical\"")
    kind = table["type"]
    unknown = set(table) - KINDS[kind] - {"type"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for type {kind!r} "
                          f"(expected {sorted(KINDS[kind])})")
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        for choice in choices:
            ok = choice is None or isinstance(choice, (bool, int, float, str)) or \
                (isinstance(choice, list) and all(isinstance(c, str) for c in choice))
            if not ok:
                raise ConfigError(f"{where}: choice {choice!r} must be a number, a string, a boolean "
                                  "or a list of strings")
        labels = [label(c) for c in choices]
        if len(set(map(repr, labels))) < len(labels):
            raise ConfigError(f"{where}: two choices are the same: {labels}")
        return Param(key, section, kind, choices=tuple(choices))
    low, high, number = table.get("low"), table.get("high"), (int,) if kind == "int" else (int, float)
    for end, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            raise ConfigError(f"{where}: {end} must be {'an integer' if kind == 'int' else 'a number'}, "
                              f"got {value!r}")
    if low > high:
        raise ConfigError(f"{where}: low={low} is above high={high}")
    log, step = table.get("log", False), table.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise ConfigError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, "
                          f"got {step!r}")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}: log = true needs low > 0 and no step")
    return Param(key, section, kind, low=low, high=high, log=log, step=step)


def _owner(name: str, where: str) -> tuple[str, str]:
    """(section, field) of a space table's name: "r", or "lora.r" when the name is in two sections."""
    section, _, key = name.rpartition(".")
    fields = {s: {f.name for f in dataclasses.fields(SCHEMA[s])} for s in SEARCHABLE}
    owners = [s for s in SEARCHABLE if key in fields[s] and section in ("", s)]
    if key in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: {key} is set by the search itself")
    if not owners:
        hint = difflib.get_close_matches(key, sorted(fields["train"] | fields["lora"]), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}: not a [train] or [lora] setting{suggestion}")
    if len(owners) > 1:
        raise ConfigError(f"{where}: the name is in [train] and [lora]: "
                          f"write [\"train.{key}\"] or [\"lora.{key}\"]")
    return owners[0], key


def trial_sections(sections: dict[str, dict], space: Space, values: dict[str, Any]) -> dict[str, dict]:
    """The base sections with a trial's values (by setting name) in their sections."""
    out = {name: dict(body) for name, body in sections.items()}
    for p in space.params:
        out[p.section][p.name] = values[p.name]
    return out


def check_space(space: Space, sections: dict[str, dict], source: str) -> None:
    """Every value the space can give makes valid configs with the base: fail now, not at trial 5."""
    for p in space.params:
        for value in p.candidates():
            section = {**sections[p.section], p.name: value}
            try:
                build(SCHEMA[p.section], section, p.section, source)
            except ConfigError as e:
                raise ConfigError(f"{source}: [{p.name}] value {value!r}: {e}") from None


def check_groups(space: Space, sections: dict[str, dict], source: str) -> None:
    """--parallel K trains trials together with train_many, which holds plain LoRA and rsLoRA adapters
    and evaluates the loss only: refuse now what no group could train, for the base and for every
    value the space can give (values that only need equal partners, like target_modules, are the
    driver's to group)."""
    if space.metric not in GROUP_METRICS:
        raise ConfigError(f"{source}: --parallel: metric {space.metric!r} is not logged by trials trained "
                          f"together (only {', '.join(GROUP_METRICS)}): use --parallel 1")
    settings = [("the base config", sections)]
    settings += [(f"[{p.name}] value {value!r}",
                  {**sections, p.section: {**sections[p.section], p.name: value}})
                 for p in space.params for value in p.candidates()]
    for where, body in settings:
        why = group_refusal(build(TrainConfig, body["train"], "train", source),
                            build(LoraConfig, body["lora"], "lora", source))
        if why:
            raise ConfigError(f"{source}: {where}: --parallel: {why}; use --parallel 1")


def group_refusal(train: TrainConfig, lora: LoraConfig) -> str | None:
    """Why a trial with these configs cannot train in a group (train_many, inject_many), or None."""
    if lora.use_dora:
        return "DoRA (use_dora) cannot share a base with other adapters"
    if lora.mutates_base:
        return f"init_lora_weights={lora.init_lora_weights!r} changes the base, which a group shares"
    if lora.modules_to_save:
        return "modules_to_save trains copies of base modules, which a group shares"
    if train.eval_generate_max_new_tokens:
        return "evaluation by generation (eval_generate_max_new_tokens) is not done in a group"
    return None
