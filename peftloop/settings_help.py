"""Describing the settings: ``peftloop train --help`` and the tables of docs/cli.md and the
migration guide, generated from the config dataclasses (their fields, types, defaults and the
docstring under each field) and from ``config_io``'s groups, aliases and pointers, so the help
cannot drift from what the parser accepts."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any

from peftloop.config import type_name
from peftloop.config_io import ALIASES, FLAG_RULES, GROUPS, POINTERS, SCHEMA, TRAIN_GROUPS, field_owners


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field as the CLI shows it."""

    section: str
    name: str
    flag: str
    """``--name``, or ``--section.name`` when the name is in two sections."""
    type: str
    default: str
    doc: str
    also: tuple[str, ...]
    """Other flags that set it: the Trainer's aliases, the command's own (``--model``)."""


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after its annotation),
    as one paragraph. Empty when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_label(tp) -> str:
    """``list[str] | str | None`` -> ``list[str] or str or none``."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return " or ".join("none" if a is type(None) else type_name(a) for a in args)


def format_value(value) -> str:
    """A default as it is written on the command line or in TOML: none, true, 0.0002, "linear"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        return json.dumps(value)
    return repr(value)


def train_group(name: str) -> str:
    return next((group for group, names in TRAIN_GROUPS.items() if name in names), "training")


def settings(schema: dict[str, type] = SCHEMA, also: dict[str, tuple[str, ...]] | None = None,
             defaults: dict[str, Any] | None = None) -> list[tuple[str, str, list[Setting]]]:
    """(group title, section, settings) in the order --help lists them. ``also``: extra flags that
    set a field, by ``section.name`` (the command's ``--model``, ``--data``); ``defaults``: the
    command's own defaults where they differ from the dataclass's (shown with both)."""
    owners = field_owners(schema)
    grouped: dict[str, list[Setting]] = {title: [] for title, _ in GROUPS}
    for section, cls in schema.items():
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            flag = f"--{f.name}" if len(owners[f.name]) == 1 else f"--{section}.{f.name}"
            aliases = [f"--{a}" for a, target in ALIASES.items()
                       if target == f"{section}.{f.name}" and a not in owners]
            shown = format_value(default)
            if f"{section}.{f.name}" in (defaults or {}):
                shown = f"{format_value(defaults[f'{section}.{f.name}'])} ({cls.__name__}: {shown})"
            setting = Setting(section, f.name, flag, type_label(hints[f.name]), shown,
                              docs.get(f.name, ""), (*(also or {}).get(f"{section}.{f.name}", ()), *aliases))
            title = train_group(f.name) if section == "train" else next(t for t, s in GROUPS if s == section)
            grouped[title].append(setting)
    return [(title, section, grouped[title]) for title, section in GROUPS if grouped[title]]


def pointers(schema: dict[str, type] = SCHEMA) -> dict[str, str]:
    """The POINTERS that are in force (a name that has become a field is the field)."""
    owners = field_owners(schema)
    return {name: text for name, text in POINTERS.items() if name not in owners}


def settings_help(schema: dict[str, type] = SCHEMA, also: dict[str, tuple[str, ...]] | None = None,
                  defaults: dict[str, Any] | None = None, width: int = 100) -> str:
    """The settings part of ``peftloop train --help``: the rules, then every field by group."""
    lines = [FLAG_RULES]
    for title, section, group in settings(schema, also, defaults):
        lines += ["", f"{title} [{section}]:"]
        for s in group:
            extra = f"; also {', '.join(s.also)}" if s.also else ""
            lines.append(f"  {s.flag} ({s.type}, default {s.default}{extra})")
            if s.doc:
                lines += textwrap.wrap(s.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["", "Trainer flags with no 1:1 setting (refused with what to use instead):"]
    for name, text in pointers(schema).items():
        lines += textwrap.wrap(f"--{name}: {text}", width, initial_indent="  ", subsequent_indent=" " * 6)
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def settings_markdown(schema: dict[str, type] = SCHEMA, also: dict[str, tuple[str, ...]] | None = None,
                      defaults: dict[str, Any] | None = None) -> str:
    """Every setting as Markdown tables, one per group (docs/cli.md)."""
    lines: list[str] = []
    for title, section, group in settings(schema, also, defaults):
        lines += [f"### {title[0].upper()}{title[1:]} `[{section}]`", "",
                  "| flag | type | default | what it sets |", "|---|---|---|---|"]
        for s in group:
            flags = " ".join(f"`{flag}`" for flag in (s.flag, *s.also))
            lines.append(f"| {flags} | `{s.type}` | `{s.default}` | {_md(s.doc)} |")
        lines.append("")
    return "\n".join(lines)


def trainer_flags_markdown(schema: dict[str, type] = SCHEMA) -> str:
    """The Trainer's (and TRL's) flags and what peftloop does with each (docs/cli.md, docs/migration.md)."""
    owners = field_owners(schema)
    lines = ["| flag | peftloop |", "|---|---|"]
    for name, target in ALIASES.items():
        if name not in owners:
            key = target.split(".", 1)[1]
            flag = f"--{key}" if len(owners.get(key, [])) == 1 else f"--{target}"
            lines.append(f"| `--{name}` | accepted: `{flag}` (`{target}`) |")
    for name, text in pointers(schema).items():
        lines.append(f"| `--{name}` | refused: {_md(text)} |")
    return "\n".join(lines) + "\n"
