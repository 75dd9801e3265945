"""The ``peftloop`` command.

    peftloop train --model NAME_OR_DIR --data TRAIN.jsonl [--config FILE.toml] [--output_dir DIR]
                   [--key value ...]
        Fine-tunes a Hugging Face checkpoint (hub id or folder) with LoRA on a JSONL file, evaluates,
        and writes the adapter in PEFT's format to OUTPUT/adapter. With no model: the offline demo.
        ``peftloop train --help`` lists every setting, generated from the config dataclasses.
    peftloop generate [--model NAME_OR_DIR] [--adapter DIR] (--prompt TEXT ... | --prompts FILE.jsonl)
                      [--out FILE.jsonl] [--chat] [--compare] [...]
        Greedy or sampled (--temperature, --top_p) continuation of each prompt, with a KV cache,
        --batch_size prompts at a time. --prompts reads {"prompt": ...} or {"messages": [...]}
        records; --out writes one {"prompt"/"messages", "completion"} line per record, atomically.
    peftloop merge [--base NAME_OR_DIR] --adapter DIR --out DIR [--dtype bf16] [--quantization nf4]
        Folds an adapter into its base model and writes a full Hugging Face checkpoint. With
        --quantization nf4 (an adapter trained with QLoRA): onto the dequantised 4-bit base.

Without --model / --base, generate and merge load the base the adapter names
(``base_model_name_or_path`` in its adapter_config.json: the hub id, or the absolute folder).

The LoRA variants are settings: QLoRA ``--quantization nf4`` (4-bit base, [model]), gradient
checkpointing ``--gradient_checkpointing true [--offload_activations true]`` ([model]), DoRA
``--use_dora true``, PiSSA/OLoRA ``--init_lora_weights pissa|pissa_niter_4|olora``, rsLoRA
``--use_rslora true`` ([lora]), LoRA+ ``--loraplus_lr_ratio 16`` ([train]).

Flags follow one rule everywhere: ``-`` and ``_`` are the same in a flag's name (``--max-steps``
is ``--max_steps``). ``--key value`` sets any field of the [train], [lora], [model] or [data]
sections (``--lora.r 16`` when a name is in two sections); the TOML file has the same sections.
The Trainer's names for the same settings are accepted (``--lr``, ``--num_train_epochs``, ...),
and its flags without one (``--bf16``) are refused with the setting to use (``config_io``).
Unknown keys are an error that names the key. Everything is validated before any file is read
or written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from peftloop.checkpoint import ADAPTER_CONFIG, load_adapter, read_adapter_config
from peftloop.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig
from peftloop.config_io import SCHEMA, build, canonical_flag, read_sections
from peftloop.demo import run_demo
from peftloop.generate import generate, generate_text
from peftloop.hub import ModelNotFoundError, resolve_model
from peftloop.inject import describe_trainable, disable_adapters, inject_lora, merge_and_unload
from peftloop.models import (
    load_pretrained,
    parse_dtype,
    read_config_json,
    save_pretrained,
)
from peftloop.models.loading import source_name
from peftloop.pretrained import load_base_model, load_data
from peftloop.records import DataError, parse_record, read_jsonl
from peftloop.search import add_search_parser, run_search
from peftloop.settings_help import settings_help
from peftloop.tokenizer import Tokenizer
from peftloop.train import seed_everything, train

# The command's own flags that set a field (shown beside the field in --help).
COMMAND_FLAGS = {"model.name_or_path": ("--model",), "data.train_file": ("--data",)}
# Where `peftloop train` differs from the dataclass defaults (QLoRA's finding: all-linear adapters
# match full fine-tuning far better than q/v only).
COMMAND_DEFAULTS = {"lora.target_modules": "all-linear"}
SPELLING = "Flags are written with - or _ alike: --max-new-tokens and --max_new_tokens are one flag."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftloop", description="PEFT-aware fine-tuning for PyTorch. "
                                     + SPELLING)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser(
        "train", allow_abbrev=False, help="fine-tune with LoRA (no model: the offline demo)",
        usage="%(prog)s [--model NAME_OR_DIR] [--data FILE.jsonl] [--config FILE.toml] [--output_dir DIR] "
              "[--key value ...]",
        description="Fine-tune a Hugging Face checkpoint with LoRA on a JSONL file, evaluate, and write the\n"
                    "adapter in PEFT's format to OUTPUT/adapter. With no model: the offline demo.",
        epilog=settings_help(SCHEMA, COMMAND_FLAGS, COMMAND_DEFAULTS),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("--model", metavar="NAME_OR_DIR",
                         help="base model: a Hugging Face Hub id or a local folder (model.name_or_path)")
    p_train.add_argument("--data", metavar="FILE.jsonl", help="training data: a JSONL file (data.train_file)")
    p_train.add_argument("--config", metavar="FILE.toml",
                         help="a TOML file with [train], [lora], [model] and [data] sections")
    p_train.add_argument("--output_dir", metavar="DIR",
                         help="where checkpoints, logs and the adapter go (train.output_dir)")

    p_gen = sub.add_parser("generate", allow_abbrev=False, description=SPELLING,
                           help="continue prompts with a model (and an adapter)")
    p_gen.add_argument("--model", metavar="NAME_OR_DIR", help="a Hugging Face Hub id or a local folder "
                                       "(default: the --adapter's base_model_name_or_path)")
    p_gen.add_argument("--adapter", metavar="DIR", help="a PEFT-format adapter folder to apply")
    p_gen.add_argument("--prompt", metavar="TEXT", action="append", help="the text to continue (repeatable)")
    p_gen.add_argument("--prompts", metavar="FILE.jsonl",
                       help='a JSONL file of {"prompt": "..."} or {"messages": [...]} records '
                            "(messages are formatted with the chat template)")
    p_gen.add_argument("--out", metavar="FILE.jsonl",
                       help="write one JSON line per prompt: the prompt (or messages) and its completion")
    p_gen.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default 8)")
    p_gen.add_argument("--chat", action="store_true",
                       help="format each prompt as a user turn with the chat template")
    p_gen.add_argument("--system", help="with --chat: a system message first")
    p_gen.add_argument("--compare", action="store_true",
                       help="with --adapter: also print the base model's output")
    p_gen.add_argument("--max_new_tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p_gen.add_argument("--top_p", type=float, default=1.0,
                       help="nucleus sampling mass (with --temperature > 0)")
    p_gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    p_gen.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p_gen.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p_gen.add_argument("--quantization", choices=["nf4"],
                       help="load the base in 4 bits (as QLoRA trained it)")

    p_merge = sub.add_parser("merge", allow_abbrev=False, description=SPELLING,
                             help="merge an adapter into its base model")
    p_merge.add_argument("--base", metavar="NAME_OR_DIR",
                         help="the base model: a Hugging Face Hub id or a local folder "
                              "(default: the adapter's base_model_name_or_path)")
    p_merge.add_argument("--adapter", metavar="DIR", required=True, help="the adapter folder (PEFT format)")
    p_merge.add_argument("--out", metavar="DIR", required=True, help="where to write the merged model")
    p_merge.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the base's dtype)")
    p_merge.add_argument("--revision", help="hub revision (branch, tag or commit) of --base")
    p_merge.add_argument("--quantization", choices=["nf4"],
                         help="merge onto the 4-bit base the adapter was trained on (QLoRA): dequantised, "
                              "merged in fp32, saved in --dtype (default bf16)")
    add_search_parser(sub)
    return parser


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None):
    """(the command's own arguments, the --key value settings left over), every flag spelled with _."""
    parser = parser or build_parser()
    return parser.parse_known_args([canonical_flag(arg) for arg in argv])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parse_args(sys.argv[1:] if argv is None else argv, parser)
    try:
        if args.command == "train":
            return _train(args, rest)
        if args.command == "search":
            return run_search(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _generate(args) if args.command == "generate" else _merge(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"peftloop: error: {e}", file=sys.stderr)
        return 2


def train_sections(args, rest: list[str]) -> dict[str, dict]:
    """The settings of ``peftloop train``: --config, the --key value flags, --model, --data and
    --output-dir, in that order of precedence (the last wins)."""
    sections = read_sections(args.config, rest, model=args.model, data=args.data)
    if args.output_dir:
        sections["train"]["output_dir"] = args.output_dir
    return sections


def _train(args, rest) -> int:
    sections = train_sections(args, rest)
    source = args.config or "command line"
    # validate everything before any work starts
    build(TrainConfig, sections["train"], "train", source)
    build(LoraConfig, sections["lora"], "lora", source)
    model_config = build(ModelConfig, sections["model"], "model", source)
    data_config = build(DataConfig, sections["data"], "data", source)
    if model_config.name_or_path is None:
        if sections["model"] or sections["data"]:
            given = [f"{s}.{k}" for s in ("model", "data") for k in sections[s]]
            raise ConfigError(f"{source}: {', '.join(given)} given without a model: "
                              "set --model (model.name_or_path)")
        sections["train"].setdefault("output_dir", "peftloop-demo")
        run_demo(sections["train"]["output_dir"], train_overrides=sections["train"],
                 lora_overrides=sections["lora"])
        return 0
    return train_model(model_config, data_config, sections["train"], sections["lora"], source)


def train_model(model_config: ModelConfig, data_config: DataConfig, train_values: dict, lora_values: dict,
                source: str = "config") -> int:
    """Load the model, tokenizer and data, inject LoRA, run the loop, report. Data problems are
    found before the model is loaded, and nothing is written before the loop starts."""
    train_config = build(TrainConfig, train_values, "train", source)
    # The adapter names its base as load_pretrained records it: the hub id, or the absolute folder.
    command_lora = {key.split(".", 1)[1]: v for key, v in COMMAND_DEFAULTS.items() if key.startswith("lora.")}
    lora_values = {**command_lora, "base_model_name_or_path": source_name(model_config.name_or_path),
                   **lora_values}
    lora_config = build(LoraConfig, lora_values, "lora", source)
    if not data_config.train_file:
        raise ConfigError(f"{source}: no training data: set --data (data.train_file)")
    if data_config.streaming and train_config.max_steps <= 0:
        raise ConfigError(f"{source}: data.streaming reads the file lazily and has no length: "
                          "set train.max_steps")

    loaded = load_data(model_config, data_config, seed=train_config.seed)
    train_data, eval_data = loaded.train_data, loaded.eval_data
    if not data_config.streaming:
        print(f"peftloop: train data {data_config.train_file}: {train_data.stats.summary()}")
    if eval_data is not None:
        print(f"peftloop: eval data "
              f"{data_config.eval_file or f'{data_config.eval_split:.0%} of the train file'}: "
              f"{eval_data.stats.summary()}")

    # Seed before anything random: torch seeds itself differently in every process, and
    # inject_lora draws lora_A's init from it (every torchrun rank draws the same one).
    seed_everything(train_config.seed)
    model = inject_lora(load_base_model(loaded.folder, model_config), lora_config)
    held = f"{model_config.dtype}" + (f", {model_config.quantization} base"
                                      if model_config.quantization else "")
    print(f"peftloop: {model_config.name_or_path} ({model.config.model_type}, {held}): "
          f"{describe_trainable(model)}")
    result = train(model, train_data, eval_data, train_config, collate_fn=loaded.collate_fn,
                   tokenizer=loaded.tokenizer)

    if data_config.streaming:
        print(f"peftloop: train data {data_config.train_file} (streamed, last pass): "
              f"{train_data.stats.summary()}")
    eval_loss = result.metrics.get("eval_loss")
    print(f"peftloop: {result.global_step} steps, train loss {result.train_loss:.4f}"
          + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
          + f"; adapter (PEFT format) -> {Path(train_config.output_dir) / 'adapter'}")
    return 0


# --------------------------------------------------------------------------------------------
# generate and merge


def _base_model(given: str | None, flag: str, adapter: str | None, revision: str | None) -> tuple[str, Path]:
    """(name, folder) of the base: ``given``, else the adapter's base_model_name_or_path."""
    if given:
        return given, resolve_model(given, revision=revision)
    if not adapter:
        raise ConfigError(f"{flag} is required (or --adapter DIR, whose {ADAPTER_CONFIG} names its base)")
    name = read_adapter_config(adapter).base_model_name_or_path
    where = Path(adapter) / ADAPTER_CONFIG
    if not name:
        raise ConfigError(f"{where}: base_model_name_or_path is not set, so the base model is unknown: "
                          f"pass {flag} NAME_OR_DIR")
    try:
        folder = resolve_model(name, revision=revision)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e} (the base_model_name_or_path of {where}; pass {flag} NAME_OR_DIR "
                                 "to load the base from elsewhere)") from None
    print(f"peftloop: base model {name} (from {where})", file=sys.stderr)
    return name, folder


def read_prompts(path: str | Path) -> list[dict]:
    """The records of a --prompts file: {"prompt": text} or {"messages": [...]} (or a prompt that is
    a list of messages); other fields are ignored. A bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    records = []
    for line, raw in read_jsonl(path):
        where = f"{path}:{line}"
        record = parse_record(raw, where)
        key = "prompt" if "prompt" in record else "messages"
        value = record.get(key)
        if isinstance(value, str) and key == "prompt" and value:
            records.append({key: value})
            continue
        if not (isinstance(value, list) and value):
            raise DataError(f'{where}: expected a non-empty "prompt" string or "messages" list '
                            f"(the record has {', '.join(map(repr, record)) or 'no fields'})", "no prompt")
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f'{where}: {key}[{i}] is not a {{"role": str, "content": str}} message',
                                "bad message")
        records.append({key: value})
    if not records:
        raise DataError(f"{path}: no records", "empty")
    return records


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write every row, then rename into place: a crash leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def complete(model, tokenizer, records: list[dict], args) -> list[str]:
    """The completion of each record, --batch_size records at a time: prompts through
    generate_text (the chat template when --chat), conversations through the chat template."""
    completions = [""] * len(records)
    text = [i for i, r in enumerate(records) if isinstance(r.get("prompt"), str)]
    chats = [i for i, r in enumerate(records) if not isinstance(r.get("prompt"), str)]
    size = args.batch_size
    for start in range(0, len(text), size):
        batch = text[start:start + size]
        outputs = generate_text(model, tokenizer, [records[i]["prompt"] for i in batch], args.max_new_tokens,
                                chat=args.chat, system=args.system, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        for i, output in zip(batch, outputs):
            completions[i] = output
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in range(0, len(chats), size):
        batch = chats[start:start + size]
        ids = [tokenizer.apply_chat_template(records[i].get("messages") or records[i]["prompt"],
                                             add_generation_prompt=True) for i in batch]
        outputs = generate(model, ids, args.max_new_tokens, eos_token_id=tokenizer.stop_token_ids,
                           pad_token_id=pad, temperature=args.temperature, top_p=args.top_p,
                           generator=torch.Generator().manual_seed(args.seed))
        for i, output in zip(batch, outputs):
            completions[i] = tokenizer.decode(output)
    return completions


def _generate(args) -> int:
    parse_dtype(args.dtype)
    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("give the prompts with --prompt TEXT (repeatable) or --prompts FILE.jsonl: "
                          "one of them")
    if args.compare and not args.adapter:
        raise ConfigError("--compare needs --adapter "
                          "(it prints the base model's output beside the adapter's)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder: give the JSONL file to write")
    records = read_prompts(args.prompts) if args.prompts else [{"prompt": p} for p in args.prompt]
    _, folder = _base_model(args.model, "--model", args.adapter, args.revision)
    tokenizer = Tokenizer.from_pretrained(folder)
    model = load_pretrained(folder, dtype=args.dtype, quantization=args.quantization)
    if args.adapter:
        load_adapter(model, args.adapter)

    base = None
    if args.compare:
        with disable_adapters(model):
            base = complete(model, tokenizer, records, args)
    outputs = complete(model, tokenizer, records, args)
    rows = [{**record, "completion": output} for record, output in zip(records, outputs)]
    if base is not None:
        rows = [{**row, "base_completion": before} for row, before in zip(rows, base)]
    if args.out:
        write_jsonl_atomic(args.out, rows)
        print(f"peftloop: {len(rows)} completions -> {args.out}")
    elif args.prompts:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    elif base is not None:
        for prompt, before, after in zip(args.prompt, base, outputs):
            print(f"### {prompt}\n[base]    {before}\n[adapter] {after}")
    else:
        for prompt, text in zip(args.prompt, outputs):
            print(f"### {prompt}\n{text}" if len(args.prompt) > 1 else text)
    return 0


def _merge(args) -> int:
    dtype = parse_dtype(args.dtype) if args.dtype else None
    name, folder = _base_model(args.base, "--base", args.adapter, args.revision)
    if args.quantization:
        # The adapter learned against dequant(W4), not W: merge onto that, in fp32, then round.
        dtype = dtype or torch.bfloat16
        model = load_pretrained(folder, dtype=dtype, quantization=args.quantization)
        load_adapter(model, args.adapter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge_and_unload(model, dtype=dtype)
        for warning in caught:
            print(f"peftloop: warning: {warning.message}", file=sys.stderr)
    else:
        model = load_pretrained(folder, dtype="fp32")  # merge in fp32, then cast
        load_adapter(model, args.adapter)
        merge_and_unload(model)
    if dtype is None:
        config = read_config_json(folder)
        saved = config.get("torch_dtype") or config.get("dtype") or "float32"
        dtype = parse_dtype(saved if saved in ("float32", "bfloat16", "float16") else "float32")
    model.to(dtype)
    save_pretrained(model, args.out, copy_from=folder)
    print(f"peftloop: merged {args.adapter} into {name} -> {args.out} "
          f"({str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
