"""The ``peftloop`` command.

    peftloop train [--config FILE.toml] [--output-dir DIR] [--key value ...]
        With no model given, runs the built-in offline demo (see peftloop/demo.py).
    peftloop merge --base DIR --adapter DIR --out DIR [--dtype bf16]
        Folds an adapter into its base model and writes a full Hugging Face checkpoint.

``--key value`` sets any field of the [train] or [lora] sections (``--lora.r 16`` when a name is
in both); the TOML file has the same sections. Unknown keys are an error that names the key.
"""

from __future__ import annotations

import argparse
import sys

from peftloop.config import ConfigError, LoraConfig, TrainConfig, build, load_toml, parse_overrides

SCHEMA = {"train": TrainConfig, "lora": LoraConfig}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftloop", description="PEFT-aware fine-tuning for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="fine-tune with LoRA (no arguments: the offline demo)")
    p_train.add_argument("--config", help="a TOML file with [train] and [lora] sections")
    p_train.add_argument("--output-dir", help="where checkpoints, logs and the adapter go")

    p_merge = sub.add_parser("merge", help="merge an adapter into its base model")
    p_merge.add_argument("--base", required=True, help="the base model folder (Hugging Face format)")
    p_merge.add_argument("--adapter", required=True, help="the adapter folder (PEFT format)")
    p_merge.add_argument("--out", required=True, help="where to write the merged model")
    p_merge.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the base's dtype)")

    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _merge(args)
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
    return sections


def _train(args, rest) -> int:
    from peftloop.demo import run_demo

    sections = _sections(args, rest)
    source = args.config or "command line"
    # validate everything before any work starts
    build(TrainConfig, sections["train"], "train", source)
    build(LoraConfig, sections["lora"], "lora", source)
    sections["train"].setdefault("output_dir", "peftloop-demo")
    run_demo(sections["train"]["output_dir"], train_overrides=sections["train"], lora_overrides=sections["lora"])
    return 0


def _merge(args) -> int:
    from peftloop.checkpoint import load_adapter
    from peftloop.inject import merge_and_unload
    from peftloop.models import load_pretrained, parse_dtype, save_pretrained

    model = load_pretrained(args.base, dtype="fp32")  # merge in fp32, then cast
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if dtype is None:
        import json
        from pathlib import Path

        saved = json.loads((Path(args.base) / "config.json").read_text()).get("torch_dtype", "float32")
        dtype = parse_dtype(saved if saved in ("float32", "bfloat16", "float16") else "float32")
    model.to(dtype)
    save_pretrained(model, args.out, copy_from=args.base)
    print(f"peftloop: merged {args.adapter} into {args.base} -> {args.out} ({str(dtype).removeprefix('torch.')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
