"""The ``peftloop`` command.

    peftloop train --model NAME_OR_DIR --data TRAIN.jsonl [--config FILE.toml] [--output-dir DIR]
                   [--key value ...]
        Fine-tunes a Hugging Face checkpoint (hub id or folder) with LoRA on a JSONL file, evaluates,
        and writes the adapter in PEFT's format to OUTPUT/adapter. With no model: the offline demo.
    peftloop generate --model NAME_OR_DIR [--adapter DIR] --prompt TEXT [--chat] [--compare] [...]
        Greedy or sampled (--temperature, --top-p) continuation of each prompt, with a KV cache.
    peftloop merge --base NAME_OR_DIR --adapter DIR --out DIR [--dtype bf16] [--quantization nf4]
        Folds an adapter into its base model and writes a full Hugging Face checkpoint. With
        --quantization nf4 (an adapter trained with QLoRA): onto the dequantised 4-bit base.

The LoRA variants are settings: QLoRA ``--quantization nf4`` (4-bit base, [model]), gradient
checkpointing ``--gradient_checkpointing true [--offload_activations true]`` ([model]), DoRA
``--use_dora true``, PiSSA/OLoRA ``--init_lora_weights pissa|pissa_niter_4|olora``, rsLoRA
``--use_rslora true`` ([lora]), LoRA+ ``--loraplus_lr_ratio 16`` ([train]).

``--key value`` sets any field of the [train], [lora], [model] or [data] sections (``--lora.r 16``
when a name is in two sections); the TOML file has the same sections. Unknown keys are an error
that names the key. Everything is validated before any file is read or written.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import torch

from peftloop.checkpoint import load_adapter
from peftloop.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig
from peftloop.config_io import build, load_toml, parse_overrides
from peftloop.data import collate, load_datasets
from peftloop.demo import run_demo
from peftloop.generate import generate_text
from peftloop.hub import resolve_model
from peftloop.inject import describe_trainable, disable_adapters, inject_lora, merge_and_unload
from peftloop.models import (
    enable_gradient_checkpointing,
    load_pretrained,
    parse_dtype,
    read_config_json,
    save_pretrained,
)
from peftloop.tokenizer import Tokenizer
from peftloop.train import seed_everything, train

SCHEMA = {"train": TrainConfig, "lora": LoraConfig, "model": ModelConfig, "data": DataConfig}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftloop", description="PEFT-aware fine-tuning for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", allow_abbrev=False,
                             help="fine-tune with LoRA (no model: the offline demo)")
    p_train.add_argument("--model",
                         help="base model: a Hugging Face Hub id or a local folder (model.name_or_path)")
    p_train.add_argument("--data", help="training data: a JSONL file (data.train_file)")
    p_train.add_argument("--config", help="a TOML file with [train], [lora], [model] and [data] sections")
    p_train.add_argument("--output-dir", help="where checkpoints, logs and the adapter go")

    p_gen = sub.add_parser("generate", allow_abbrev=False,
                           help="continue prompts with a model (and an adapter)")
    p_gen.add_argument("--model", required=True, help="a Hugging Face Hub id or a local folder")
    p_gen.add_argument("--adapter", help="a PEFT-format adapter folder to apply")
    p_gen.add_argument("--prompt", required=True, action="append", help="the text to continue (repeatable)")
    p_gen.add_argument("--chat", action="store_true",
                       help="format each prompt as a user turn with the chat template")
    p_gen.add_argument("--system", help="with --chat: a system message first")
    p_gen.add_argument("--compare", action="store_true",
                       help="with --adapter: also print the base model's output")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p_gen.add_argument("--top-p", type=float, default=1.0,
                       help="nucleus sampling mass (with --temperature > 0)")
    p_gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    p_gen.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p_gen.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p_gen.add_argument("--quantization", choices=["nf4"],
                       help="load the base in 4 bits (as QLoRA trained it)")

    p_merge = sub.add_parser("merge", allow_abbrev=False, help="merge an adapter into its base model")
    p_merge.add_argument("--base", required=True,
                         help="the base model: a Hugging Face Hub id or a local folder")
    p_merge.add_argument("--adapter", required=True, help="the adapter folder (PEFT format)")
    p_merge.add_argument("--out", required=True, help="where to write the merged model")
    p_merge.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the base's dtype)")
    p_merge.add_argument("--revision", help="hub revision (branch, tag or commit) of --base")
    p_merge.add_argument("--quantization", choices=["nf4"],
                         help="merge onto the 4-bit base the adapter was trained on (QLoRA): dequantised, "
                              "merged in fp32, saved in --dtype (default bf16)")

    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _generate(args) if args.command == "generate" else _merge(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"peftloop: error: {e}", file=sys.stderr)
        return 2


def _sections(args, rest) -> dict[str, dict]:
    sections: dict[str, dict] = {s: {} for s in SCHEMA}
    if args.config:
        for section, values in load_toml(args.config).items():
            if section not in SCHEMA:
                raise ConfigError(f"{args.config}: section [{section}] is not used by this command")
            sections[section].update(values)
    for section, values in parse_overrides(rest, SCHEMA).items():
        sections[section].update(values)
    if args.output_dir:
        sections["train"]["output_dir"] = args.output_dir
    if args.model:
        sections["model"]["name_or_path"] = args.model
    if args.data:
        sections["data"]["train_file"] = args.data
    return sections


def _train(args, rest) -> int:
    sections = _sections(args, rest)
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
    # LoRA on every linear layer but the head unless told otherwise (QLoRA's finding: all-linear
    # adapters match full fine-tuning far better than q/v only).
    lora_values = {"target_modules": "all-linear", "base_model_name_or_path": model_config.name_or_path,
                   **lora_values}
    lora_config = build(LoraConfig, lora_values, "lora", source)
    if not data_config.train_file:
        raise ConfigError(f"{source}: no training data: set --data (data.train_file)")
    if data_config.streaming and train_config.max_steps <= 0:
        raise ConfigError(f"{source}: data.streaming reads the file lazily and has no length: "
                          "set train.max_steps")

    folder = resolve_model(model_config.name_or_path, model_config.revision, model_config.cache_dir)
    tokenizer = Tokenizer.from_pretrained(folder)
    train_data, eval_data = load_datasets(data_config, tokenizer, seed=train_config.seed)
    if not data_config.streaming:
        print(f"peftloop: train data {data_config.train_file}: {train_data.stats.summary()}")
    if eval_data is not None:
        print(f"peftloop: eval data "
              f"{data_config.eval_file or f'{data_config.eval_split:.0%} of the train file'}: "
              f"{eval_data.stats.summary()}")

    # Seed before anything random: torch seeds itself differently in every process, and
    # inject_lora draws lora_A's init from it (every torchrun rank draws the same one).
    seed_everything(train_config.seed)
    model = load_pretrained(folder, dtype=model_config.dtype, quantization=model_config.quantization,
                            quant_blocksize=model_config.quant_blocksize,
                            double_quant=model_config.double_quant)
    if model_config.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=model_config.offload_activations)
    inject_lora(model, lora_config)
    held = f"{model_config.dtype}" + (f", {model_config.quantization} base"
                                      if model_config.quantization else "")
    print(f"peftloop: {model_config.name_or_path} ({model.config.model_type}, {held}): "
          f"{describe_trainable(model)}")
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    result = train(model, train_data, eval_data, train_config,
                   collate_fn=functools.partial(collate, pad_id=pad))

    if data_config.streaming:
        print(f"peftloop: train data {data_config.train_file} (streamed, last pass): "
              f"{train_data.stats.summary()}")
    eval_loss = result.metrics.get("eval_loss")
    print(f"peftloop: {result.global_step} steps, train loss {result.train_loss:.4f}"
          + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
          + f"; adapter (PEFT format) -> {Path(train_config.output_dir) / 'adapter'}")
    return 0


def _generate(args) -> int:
    parse_dtype(args.dtype)
    if args.compare and not args.adapter:
        raise ConfigError("--compare needs --adapter "
                          "(it prints the base model's output beside the adapter's)")
    folder = resolve_model(args.model, revision=args.revision)
    tokenizer = Tokenizer.from_pretrained(folder)
    model = load_pretrained(folder, dtype=args.dtype, quantization=args.quantization)
    if args.adapter:
        load_adapter(model, args.adapter)

    def run() -> list[str]:
        return generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                             system=args.system, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed)

    if args.compare:
        with disable_adapters(model):
            base = run()
        for prompt, before, after in zip(args.prompt, base, run()):
            print(f"### {prompt}\n[base]    {before}\n[adapter] {after}")
        return 0
    outputs = run()
    for prompt, text in zip(args.prompt, outputs):
        print(f"### {prompt}\n{text}" if len(args.prompt) > 1 else text)
    return 0


def _merge(args) -> int:
    dtype = parse_dtype(args.dtype) if args.dtype else None
    folder = resolve_model(args.base, revision=args.revision)
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
    print(f"peftloop: merged {args.adapter} into {args.base} -> {args.out} "
          f"({str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
