"""Reading configs from a TOML file and from ``--key value`` command-line flags.

    [train]                          peftloop train --learning_rate 1e-4 --lora.r 16
    learning_rate = 1e-4
    [lora]
    r = 16

Sections are the dataclasses of ``config``: [train], [lora], [model], [data]. Unknown sections
and keys are errors that name the key and suggest the nearest known one.
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

from peftloop.config import ConfigError, type_name

SECTIONS = ("train", "lora", "model", "data")


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


def build(cls, values: dict[str, Any], section: str, source: str = "config"):
    """cls(**values), with unknown keys named (and the nearest known key suggested)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{source}: unknown key {section}.{key}{suggestion}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(pairs: list[str], schema: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Turn ``["--learning_rate", "1e-4", "--lora.r", "16"]`` into {section: {key: value}}.

    A key may be given bare when it is unique across sections, or as ``section.key``.
    Values are parsed by the declared type of the field (bool: true/false/1/0; lists: comma-separated).
    """
    out: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[str]] = {}
    for section, cls in schema.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    i = 0
    while i < len(pairs):
        flag = pairs[i]
        if not flag.startswith("--"):
            raise ConfigError(f"expected --key value, got {flag!r}")
        key, _, inline = flag[2:].replace("-", "_").partition("=")
        if inline:
            value, i = inline, i + 1
        else:
            if i + 1 >= len(pairs):
                raise ConfigError(f"--{key} needs a value")
            value, i = pairs[i + 1], i + 2
        if "." in key:
            section, key = key.split(".", 1)
            if section not in schema:
                raise ConfigError(f"--{section}.{key}: unknown section {section!r}")
        else:
            sections = owners.get(key, [])
            if not sections:
                names = list(owners)
                hint = difflib.get_close_matches(key, names, n=1)
                raise ConfigError(f"unknown option --{key}"
                                  + (f"; did you mean --{hint[0]}?" if hint else ""))
            if len(sections) > 1:
                raise ConfigError(f"--{key} is ambiguous: use one of "
                                  + ", ".join(f"--{s}.{key}" for s in sections))
            section = sections[0]
        cls = schema[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(f"unknown option --{section}.{key}")
        out.setdefault(section, {})[key] = _parse_value(value, typing.get_type_hints(cls)[key], f"--{key}")
    return out


def _parse_value(text: str, tp, flag: str):
    """Parse one CLI string by the field's type; unions try the narrowest reading first."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    lowered = text.strip().lower()
    for cand in candidates:
        if cand is type(None) and lowered in ("none", "null"):
            return None
        if cand is bool and lowered in ("true", "false", "1", "0", "yes", "no"):
            return lowered in ("true", "1", "yes")
        if cand is int:
            try:
                return int(text)
            except ValueError:
                pass
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
