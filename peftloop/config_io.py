"""Reading configs from a TOML file and from ``--key value`` command-line flags, and describing them.

    [train]                          peftloop train --learning_rate 1e-4 --lora.r 16
    learning_rate = 1e-4
    [lora]
    r = 16

Sections are the dataclasses of ``config``: [train], [lora], [model], [data]. Unknown sections
and keys are errors that name the key and suggest the nearest known one.

The flag rules, in one place (``peftloop train --help`` prints them):

- ``-`` and ``_`` are the same in a flag's name: ``--max-steps`` is ``--max_steps``.
- A field is ``--key`` when its name is in one section, and ``--section.key`` always.
- The Trainer's (and TRL's) names for the same setting are accepted (``ALIASES``:
  ``--lr``, ``--per_device_train_batch_size``, ...); those without a 1:1 setting are an error that
  names the setting to use instead (``POINTERS``: ``--bf16 true`` -> ``--precision bf16``).

``settings()`` lists every field with its type, default and docstring (the string under the
field in ``config.py``), grouped as ``--help`` and docs/cli.md show them, so neither can drift
from the dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

from peftloop.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig, type_name

SCHEMA = {"train": TrainConfig, "lora": LoraConfig, "model": ModelConfig, "data": DataConfig}
SECTIONS = tuple(SCHEMA)

# The [train] fields by the group --help lists them under. A field missing here is still listed
# (under "training"), and tests/test_cli_help.py fails until it is given its group.
TRAIN_GROUPS = {
    "training": ("seed", "num_epochs", "max_steps", "micro_batch_size", "grad_accum", "learning_rate",
                 "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "loraplus_lr_ratio", "lr_scheduler",
                 "warmup_steps", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "precision",
                 "label_smoothing", "shuffle", "device", "nan_policy", "strategy"),
    "evaluation": ("eval_every", "eval_batch_size", "eval_generate_max_new_tokens", "early_stopping_patience",
                   "early_stopping_metric", "early_stopping_mode"),
    "saving": ("output_dir", "save_every", "save_each_epoch", "save_total_limit", "resume_from_checkpoint",
               "on_save_error"),
    "logging": ("log_every", "progress_bar", "report_to"),
}
# (title, section) in the order --help shows them; a [train] group title is a TRAIN_GROUPS key.
GROUPS = (("model", "model"), ("LoRA", "lora"), ("data", "data"), ("training", "train"),
          ("evaluation", "train"), ("saving", "train"), ("logging", "train"))

# Names from transformers' TrainingArguments / from_pretrained, TRL's SFTConfig / ModelConfig and
# bitsandbytes that mean exactly one peftloop setting: accepted as they are.
ALIASES = {
    "lr": "train.learning_rate",
    "per_device_train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.num_epochs",
    "lr_scheduler_type": "train.lr_scheduler",
    "adam_epsilon": "train.adam_eps",
    "label_smoothing_factor": "train.label_smoothing",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "bnb_4bit_use_double_quant": "model.double_quant",
    "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len",
    "dataset_text_field": "data.text_field",
    "lora_r": "lora.r",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
}

# Names with no 1:1 peftloop setting: refused, with what to write instead. A name that becomes a
# field of the config is the field from then on (report_to did).
POINTERS = {
    "bf16": "mixed precision is one setting in peftloop: --precision bf16 (train.precision: fp32, bf16 or "
            "fp16); the dtype the frozen base is held in is --dtype bf16 (model.dtype)",
    "fp16": "mixed precision is one setting in peftloop: --precision fp16 (train.precision: fp32, bf16 or "
            "fp16); the dtype the frozen base is held in is --dtype fp16 (model.dtype)",
    "eval_strategy": "peftloop evaluates every N optimizer steps with --eval_every N (train.eval_every; "
                     "0: only at the end, when there is eval data)",
    "evaluation_strategy": "peftloop evaluates every N optimizer steps with --eval_every N "
                           "(train.eval_every; 0: only at the end, when there is eval data)",
    "save_strategy": "\"steps\" is --save_every N (train.save_every), \"epoch\" is --save_each_epoch true, "
                     "\"no\" is --save_every 0 (the default)",
    "optim": "peftloop always uses torch's fused AdamW with fp32 state; its settings are --weight_decay, "
             "--adam_beta1, --adam_beta2 and --adam_eps, and LoRA+ is --loraplus_lr_ratio",
    "lr_scheduler_kwargs": "cosine_with_min_lr's {\"min_lr_rate\": x} is --lr_scheduler cosine "
                           "--min_lr_ratio x",
    "disable_tqdm": "use --progress_bar false (train.progress_bar: the inverse)",
    "use_cpu": "use --device cpu (train.device)",
    "logging_dir": "logs go to OUTPUT/log.jsonl: set --output_dir",
    "data_seed": "the data order follows --seed (train.seed)",
    "fsdp": "use --strategy fsdp (train.strategy) under torchrun",
    "gradient_checkpointing_kwargs": "nothing to pass: --gradient_checkpointing true is always "
                                     "non-reentrant",
    "load_best_model_at_end": "no counterpart: --early_stopping_patience N stops on "
                              "--early_stopping_metric (eval_loss by default); pick a checkpoint-N yourself",
    "load_in_4bit": "use --quantization nf4 (model.quantization: NF4 with --double_quant, QLoRA's recipe)",
    "bnb_4bit_quant_type": "use --quantization nf4 (model.quantization; nf4 is the only 4-bit type)",
    "bnb_4bit_compute_dtype": "use --dtype bf16 (model.dtype: the dtype of everything that is not 4-bit, "
                              "and of the 4-bit layers' computation)",
}

# Values of other libraries that mean exactly one of ours, per field (the CLI translates them).
VALUE_SYNONYMS = {
    "train.lr_scheduler": {"constant_with_warmup": "constant"},
    "train.precision": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"},
    "model.dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"},
}

FLAG_RULES = """\
--key value (or --key=value) sets one field of the sections below; a --config TOML file holds the
same keys under [model], [lora], [data] and [train], and flags override it.
  - A flag's - and _ are the same: --max_steps and --max-steps are one flag (this list uses _).
  - Every field is also --section.key (--lora.r 8). A name that is in two sections must be written
    so; under torchrun write it so too (torchrun reads a bare --r as an abbreviation of its own flags).
  - Values: true/false (a boolean flag alone means true), none, comma-separated lists
    (q_proj,v_proj), JSON objects ('{"q_proj": 16}').
  - The Trainer's names listed as "also" are accepted as they are; the Trainer flags at the end have
    no 1:1 setting and are refused with the setting to use."""


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config into {section: {key: value}}; unknown sections are an error."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for section, body in raw.items():
        if section not in SECTIONS or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (expected one of {', '.join(SECTIONS)})")
    return raw


def read_sections(config_file: str | Path | None, flags: list[str], model: str | None = None,
                  data: str | None = None) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} for a command: the TOML file's values, overridden by the
    ``--key value`` flags, then by ``--model`` (model.name_or_path) and ``--data`` (data.train_file)."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    if config_file:
        for section, values in load_toml(config_file).items():
            sections[section].update(values)
    for section, values in parse_overrides(flags, SCHEMA).items():
        sections[section].update(values)
    if model:
        sections["model"]["name_or_path"] = model
    if data:
        sections["data"]["train_file"] = data
    return sections


def build(cls, values: dict[str, Any], section: str, source: str = "config"):
    """cls(**values), with unknown keys named (a Trainer name gets the key to write instead, any
    other the nearest known key)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key in names:
            continue
        if ALIASES.get(key, "").startswith(f"{section}."):
            raise ConfigError(f"{source}: unknown key {section}.{key}: peftloop's name for it is "
                              f"{ALIASES[key].split('.', 1)[1]}")
        if key in POINTERS:
            raise ConfigError(f"{source}: unknown key {section}.{key}: {POINTERS[key]}")
        hint = difflib.get_close_matches(key, names, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{source}: unknown key {section}.{key}{suggestion}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def canonical_flag(arg: str) -> str:
    """``--max-steps=3`` -> ``--max_steps=3``: the one spelling of a flag's name (the value is kept)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{eq}{value}"


def field_owners(schema: dict[str, type]) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for section, cls in schema.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    return owners


def resolve_flag(name: str, schema: dict[str, type] = SCHEMA) -> tuple[str, str]:
    """(section, field) of a flag name (without ``--``, ``_`` spelling): a field, ``section.field``,
    or a Trainer alias. A Trainer name without a 1:1 setting is a ConfigError saying what to use."""
    owners = field_owners(schema)
    if "." in name:
        section, key = name.split(".", 1)
        if section not in schema:
            raise ConfigError(f"--{name}: unknown section {section!r} (expected one of {', '.join(schema)})")
        if section in owners.get(key, []):
            return section, key
        if ALIASES.get(key, "").startswith(f"{section}."):
            return section, ALIASES[key].split(".", 1)[1]
        if key in POINTERS:
            raise ConfigError(f"--{name}: {POINTERS[key]}")
        hint = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(schema[section])], n=1)
        raise ConfigError(f"unknown option --{name}"
                          + (f"; did you mean --{section}.{hint[0]}?" if hint else ""))
    sections = owners.get(name, [])
    if len(sections) == 1:
        return sections[0], name
    if len(sections) > 1:
        raise ConfigError(f"--{name} is ambiguous: use one of "
                          + ", ".join(f"--{s}.{name}" for s in sections))
    if name in ALIASES and ALIASES[name].split(".")[0] in schema:
        section, key = ALIASES[name].split(".", 1)
        return section, key
    if name in POINTERS:
        raise ConfigError(f"--{name}: {POINTERS[name]}")
    known = list(owners) + [a for a, target in ALIASES.items() if target.split(".")[0] in schema]
    hint = difflib.get_close_matches(name, known, n=1)
    raise ConfigError(f"unknown option --{name}" + (f"; did you mean --{hint[0]}?" if hint else ""))


def parse_overrides(pairs: list[str], schema: dict[str, type] = SCHEMA) -> dict[str, dict[str, Any]]:
    """Turn ``["--learning_rate", "1e-4", "--lora.r", "16"]`` into {section: {key: value}}.

    A key may be given bare when it is unique across sections, or as ``section.key``; ``-`` and
    ``_`` are the same in it, and the Trainer's aliases are accepted (``resolve_flag``). Values are
    parsed by the declared type of the field (bool: true/false/1/0, or the flag alone; lists:
    comma-separated; dicts: JSON). The last of repeated flags wins.
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(pairs):
        flag = canonical_flag(pairs[i])
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"expected --key value, got {pairs[i]!r}")
        name, eq, inline = flag[2:].partition("=")
        section, key = resolve_flag(name, schema)
        tp = typing.get_type_hints(schema[section])[key]
        if eq:
            value, i = inline, i + 1
        elif tp is bool and (i + 1 >= len(pairs) or pairs[i + 1].startswith("--")):
            value, i = "true", i + 1  # a boolean flag alone: --packing
        elif i + 1 >= len(pairs):
            raise ConfigError(f"--{name} needs a value")
        else:
            value, i = pairs[i + 1], i + 2
        out.setdefault(section, {})[key] = parse_value(section, key, value, tp, f"--{name}")
    return out


def parse_value(section: str, key: str, text: str, tp, flag: str):
    """One flag's text as the field's value; the other libraries' spellings of a value that mean
    one of ours are translated, the ones that do not are answered with what to write."""
    text = VALUE_SYNONYMS.get(f"{section}.{key}", {}).get(text.strip().lower(), text)
    pointer = _value_pointer(f"{section}.{key}", text)
    if pointer:
        raise ConfigError(f"{flag} {text}: {pointer}")
    return _parse_value(text, tp, flag)


def _value_pointer(field: str, text: str) -> str | None:
    """What to write instead of a value that is valid for the Trainer and means something else here."""
    try:
        number = float(text)
    except ValueError:
        number = None
    if field == "train.warmup_steps" and number is not None and 0 < number < 1:
        return f"a fraction of the steps (transformers 5.x's reading) is --warmup_ratio {text} here"
    if field == "train.num_epochs" and number is not None and not number.is_integer():
        return "peftloop runs whole epochs: set --max_steps N for part of one"
    if field == "train.lr_scheduler" and text.strip().lower() == "cosine_with_min_lr":
        return "use --lr_scheduler cosine --min_lr_ratio x (the floor as a fraction of the peak)"
    return None


def _parse_value(text: str, tp, flag: str):
    """Parse one CLI string by the field's type; unions try the narrowest reading first."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    lowered = text.strip().lower()
    # "none" means None wherever the field allows it, before a list reads it as the name ["none"]
    if type(None) in candidates and lowered in ("none", "null"):
        return None
    for cand in candidates:
        if cand is bool and lowered in ("true", "false", "1", "0", "yes", "no"):
            return lowered in ("true", "1", "yes")
        if cand is int:
            try:
                return int(text)
            except ValueError:
                if re.fullmatch(r"\s*\d+\.0*\s*", text):  # "3.0", as num_train_epochs is often written
                    return int(float(text))
        if cand is float:
            try:
                return float(text)
            except ValueError:
                pass
        if typing.get_origin(cand) is list:
            # "q_proj,v_proj" or "q_proj" is a list of names; "all-linear" or ".*proj" stays a string
            # (a regex for target_modules), as in PEFT.
            if str not in candidates or re.fullmatch(r"[\w\s,]+", text):
                return [part.strip() for part in text.split(",") if part.strip()]
        if typing.get_origin(cand) is dict:
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{flag}: expected a JSON object, got {text!r} ({e})") from None
    if str in candidates:
        return text
    raise ConfigError(f"{flag}={text!r}: expected {type_name(tp)}")
