"""``peftloop train --help`` against the config dataclasses; the flag spelling rule; the Trainer's
names (accepted, or refused with the setting to use); docs/cli.md and the migration guide's flag
table against the same tables.

The generated parts of the pages are between ``<!-- generated: NAME ... -->`` and
``<!-- generated: end -->``; ``UPDATE_DOCS=1 python -m pytest tests/test_cli_help.py -k pages``
rewrites them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import typing
from pathlib import Path

import pytest

from peftloop import cli
from peftloop.config import ConfigError, LoraConfig, TrainConfig
from peftloop.config_io import ALIASES, POINTERS, SCHEMA, TRAIN_GROUPS, build, parse_overrides
from peftloop.settings_help import (
    field_docs,
    format_value,
    pointers,
    settings,
    settings_markdown,
    trainer_flags_markdown,
    type_label,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def fields():
    for section, cls in SCHEMA.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield section, cls, f.name, hints[f.name], default


def entry(help_text: str, flag: str) -> str:
    """The lines of one setting in the help: its line and the indented docstring under it."""
    lines = help_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"  {flag} (")]
    assert len(starts) == 1, f"{flag}: {len(starts)} entries in --help"
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("      "):
            break
        block.append(line)
    return "\n".join(block)


# --------------------------------------------------------------------------------------------
# --help shows every field


def test_help_shows_every_field_with_its_type_default_and_docstring(train_help):
    names = [name for section, cls in SCHEMA.items() for name in (f.name for f in dataclasses.fields(cls))]
    for section, cls, name, tp, default in fields():
        flag = f"--{name}" if names.count(name) == 1 else f"--{section}.{name}"
        block = entry(train_help, flag)
        head = block.splitlines()[0]
        shown = format_value(default)
        if f"{section}.{name}" in cli.COMMAND_DEFAULTS:
            shown = f"{format_value(cli.COMMAND_DEFAULTS[f'{section}.{name}'])} ({cls.__name__}: {shown})"
        assert head.startswith(f"  {flag} ({type_label(tp)}, default {shown}"), head
        doc = field_docs(cls)[name]
        assert doc in " ".join(block.split()[1:]), f"{flag}: the docstring is not in --help"


def test_help_spells_out_types_and_defaults(train_help):
    """A few entries written out, so that a change in the formatting is seen here."""
    assert "  --learning_rate (float, default 0.0002; also --lr)\n" in train_help
    assert "  --micro_batch_size (int, default 4; also --per_device_train_batch_size)\n" in train_help
    assert "  --resume_from_checkpoint (str or bool or none, default none)\n" in train_help
    assert ('  --target_modules (list[str] or str or none, default "all-linear" (LoraConfig: none); '
            in train_help)
    assert '  --name_or_path (str or none, default none; also --model, --model_name_or_path)\n' in train_help
    assert "  --rank_pattern (dict[str, int], default {})\n" in train_help
    assert "--max_steps and --max-steps are one flag" in train_help
    assert "torchrun" in train_help and "--lora.r" in train_help


def test_help_groups_the_settings_in_order(train_help):
    titles = ["model [model]:", "LoRA [lora]:", "data [data]:", "training [train]:", "evaluation [train]:",
              "saving [train]:", "logging [train]:"]
    at = [train_help.index(f"\n{title}\n") for title in titles]
    assert at == sorted(at)
    assert train_help.index("  --eval_every (") > train_help.index("\nevaluation [train]:")
    assert train_help.index("  --save_every (") > train_help.index("\nsaving [train]:")
    assert train_help.index("  --log_every (") > train_help.index("\nlogging [train]:")


def test_every_train_field_has_one_group_and_every_field_a_docstring():
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    grouped = [name for names in TRAIN_GROUPS.values() for name in names]
    missing = [name for name in train_fields if name not in grouped]
    assert not missing, (f"TrainConfig fields without a --help group: {missing}; add each to "
                         "peftloop/config_io.py TRAIN_GROUPS (training, evaluation, saving or logging)")
    assert sorted(grouped) == sorted(set(grouped)), "a field is in two groups"
    stale = sorted(set(grouped) - set(train_fields))
    assert not stale, f"TRAIN_GROUPS names fields TrainConfig does not have: {stale}"
    for _, cls, name, _, _ in fields():
        assert field_docs(cls).get(name), f"{cls.__name__}.{name} has no docstring (the string under it)"


def test_a_name_in_two_sections_is_shown_with_its_section():
    @dataclasses.dataclass
    class A:
        seed: int = 1
        """A's seed."""

    @dataclasses.dataclass
    class B:
        seed: int = 2
        """B's seed."""
        other: str = "x"
        """Only here."""

    shown = {s.flag for _, _, group in settings({"model": A, "data": B}) for s in group}
    assert shown == {"--model.seed", "--data.seed", "--other"}
    with pytest.raises(ConfigError, match=r"--seed is ambiguous: use one of --model.seed, --data.seed"):
        parse_overrides(["--seed", "3"], {"model": A, "data": B})


# --------------------------------------------------------------------------------------------
# One spelling rule


def test_dashes_and_underscores_are_the_same_flag_everywhere():
    assert parse_overrides(["--max-steps", "3", "--lora.lora-alpha", "4", "--per-device-train-batch-size",
                            "2"]) == parse_overrides(["--max_steps", "3", "--lora.lora_alpha", "4",
                                                      "--per_device_train_batch_size", "2"])
    for spelled in (["--output-dir", "o", "--max-steps=3"], ["--output_dir", "o", "--max_steps=3"]):
        args, rest = cli.parse_args(["train", *spelled])
        assert cli.train_sections(args, rest)["train"] == {"output_dir": "o", "max_steps": 3}
    for spelled in ("--max-new-tokens", "--max_new_tokens"), ("--top-p", "--top_p"), ("--batch-size",
                                                                                      "--batch_size"):
        parsed = [cli.parse_args(["generate", "--prompt", "x", flag, "5"])[0] for flag in spelled]
        assert vars(parsed[0]) == vars(parsed[1])


def test_a_value_keeps_its_dashes():
    assert parse_overrides(["--target-modules=all-linear"])["lora"]["target_modules"] == "all-linear"
    args, rest = cli.parse_args(["generate", "--prompt=--a-b", "--system", "x-y"])
    assert args.prompt == ["--a-b"] and args.system == "x-y"


def test_a_boolean_flag_alone_means_true():
    assert parse_overrides(["--packing", "--max_steps", "3", "--gradient-checkpointing"]) == {
        "data": {"packing": True}, "train": {"max_steps": 3}, "model": {"gradient_checkpointing": True}}


# --------------------------------------------------------------------------------------------
# The Trainer's names


SAMPLE = {int: "3", float: "0.5", bool: "true", str: "x"}


def sample_value(tp) -> str:
    args = typing.get_args(tp) or (tp,)
    for arg in args:
        if arg in SAMPLE:
            return SAMPLE[arg]
        if typing.get_origin(arg) is list:
            return "q_proj,v_proj"
    raise AssertionError(tp)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_sets_its_field(alias):
    section, key = ALIASES[alias].split(".")
    tp = typing.get_type_hints(SCHEMA[section])[key]
    value = sample_value(tp)
    expected = parse_overrides([f"--{section}.{key}", value])
    assert parse_overrides([f"--{alias}", value]) == expected
    assert parse_overrides([f"--{alias.replace('_', '-')}={value}"]) == expected
    assert parse_overrides([f"--{section}.{alias}", value]) == expected


def test_the_usual_trainer_flags_make_the_same_config():
    argv = ["train", "--model", "org/base", "--data", "train.jsonl", "--lr", "1e-4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
            "--num_train_epochs", "3.0", "--logging_steps", "10", "--eval_steps", "50", "--save_steps", "100",
            "--warmup_ratio", "0.03", "--lr_scheduler_type", "constant_with_warmup", "--max_length", "512",
            "--torch_dtype", "bfloat16", "--lora_r", "16", "--lora_alpha", "32"]
    args, rest = cli.parse_args(argv)
    sections = cli.train_sections(args, rest)
    train = build(TrainConfig, sections["train"], "train")
    assert (train.learning_rate, train.micro_batch_size, train.grad_accum) == (1e-4, 2, 8)
    assert train.num_epochs == 3
    assert (train.log_every, train.eval_every, train.save_every) == (10, 50, 100)
    assert (train.warmup_ratio, train.lr_scheduler) == (0.03, "constant")
    assert sections["data"] == {"max_seq_len": 512, "train_file": "train.jsonl"}
    assert sections["model"] == {"dtype": "bf16", "name_or_path": "org/base"}
    assert build(LoraConfig, sections["lora"], "lora").r == 16


@pytest.mark.parametrize("argv, message", [
    (["--bf16", "true"], "--bf16: mixed precision is one setting in peftloop: --precision bf16"),
    (["--fp16", "true"], "--fp16: mixed precision is one setting in peftloop: --precision fp16"),
    (["--bf16"], "--precision bf16"),
    (["--train.bf16", "true"], "--precision bf16"),
    (["--save_strategy", "epoch"], "\"epoch\" is --save_each_epoch true"),
    (["--optim", "paged_adamw_32bit"], "torch's fused AdamW"),
    (["--load_in_4bit", "true"], "--quantization nf4"),
    (["--warmup_steps", "0.03"], "--warmup_steps 0.03: a fraction of the steps (transformers 5.x's reading) "
                                 "is --warmup_ratio 0.03 here"),
    (["--num_train_epochs", "2.5"], "--num_train_epochs 2.5: peftloop runs whole epochs: set --max_steps"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler cosine --min_lr_ratio x"),
    (["--lr", "fast"], "--lr='fast': expected float"),
])
def test_trainer_flags_without_a_match_name_the_setting_to_use(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_overrides(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("name", sorted(POINTERS))
def test_every_pointer_is_an_error_with_its_text(name):
    with pytest.raises(ConfigError) as e:
        parse_overrides([f"--{name}", "true"])
    assert str(e.value) == f"--{name}: {POINTERS[name]}"


def test_report_to_is_the_setting():
    assert parse_overrides(["--report_to", "tensorboard"]) == {"train": {"report_to": ["tensorboard"]}}
    assert build(TrainConfig, {"report_to": ["tensorboard"]}, "train").report_to == ["tensorboard"]
    message = "train.report_to=['wandb']: expected 'none' or 'tensorboard'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(TrainConfig, parse_overrides(["--report-to=wandb"])["train"], "train")


def test_aliases_and_pointers_are_not_fields_and_point_at_fields():
    ours = {f"{section}.{f.name}" for section, cls in SCHEMA.items() for f in dataclasses.fields(cls)}
    names = {f.name for cls in SCHEMA.values() for f in dataclasses.fields(cls)}
    for alias, target in ALIASES.items():
        assert target in ours, f"ALIASES[{alias!r}] = {target!r} is not a field"
        assert alias not in names, f"{alias} is a field now: take it out of ALIASES"
    assert not set(ALIASES) & set(POINTERS)
    assert pointers() == POINTERS, "a POINTERS name is a field now: take it out of POINTERS"
    for name, text in POINTERS.items():
        for flag in re.findall(r"--(\w+)", text):
            assert flag in names, f"POINTERS[{name!r}] names --{flag}, which is not a setting"


def test_the_command_refuses_a_pointer_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--bf16", "true", "--output-dir", str(out)]) == 2
    assert "--bf16: mixed precision is one setting in peftloop: --precision bf16" in capsys.readouterr().err
    assert not out.exists()


def test_a_toml_file_with_a_trainer_name_gets_the_key_to_write():
    with pytest.raises(ConfigError, match=r"unknown key train.lr: peftloop's name for it is learning_rate"):
        build(TrainConfig, {"lr": 1e-4}, "train", "run.toml")
    with pytest.raises(ConfigError, match=r"unknown key train.bf16: mixed precision .* --precision bf16"):
        build(TrainConfig, {"bf16": True}, "train", "run.toml")
    with pytest.raises(ConfigError, match=r"unknown key train.max_step; did you mean 'max_steps'"):
        build(TrainConfig, {"max_step": 1}, "train", "run.toml")


# --------------------------------------------------------------------------------------------
# The pages


GENERATED = re.compile(r"(<!-- generated: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)(<!-- generated: end -->)",
                       re.DOTALL)


def generated() -> dict[str, str]:
    return {"settings": settings_markdown(SCHEMA, cli.COMMAND_FLAGS, cli.COMMAND_DEFAULTS),
            "trainer-flags": trainer_flags_markdown(SCHEMA)}


@pytest.mark.parametrize("page, names", [("docs/cli.md", {"settings", "trainer-flags"}),
                                         ("docs/migration.md", {"trainer-flags"})])
def test_the_pages_show_the_settings_as_the_dataclasses_have_them(page, names):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    found = {m["name"] for m in GENERATED.finditer(text)}
    assert found == names, f"{page}: generated sections {sorted(found)}, expected {sorted(names)}"
    fresh = GENERATED.sub(lambda m: m.group(1) + "\n" + generated()[m["name"]] + "\n" + m.group(4), text)
    if os.environ.get("UPDATE_DOCS") and fresh != text:
        path.write_text(fresh, encoding="utf-8")
        text = fresh
    assert text == fresh, (f"{page} is out of date with the config dataclasses: run "
                           "`UPDATE_DOCS=1 python -m pytest tests/test_cli_help.py -k pages`")


def test_the_cli_page_lists_every_field_and_the_torchrun_form():
    text = (ROOT / "docs/cli.md").read_text(encoding="utf-8")
    for section, _, name, _, _ in fields():
        assert f"`--{name}`" in text or f"`--{section}.{name}`" in text, name
    assert "torchrun" in text and "--lora.r" in text
