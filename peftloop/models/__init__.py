"""Model families and Hugging Face-format checkpoint I/O (``config.json`` + safetensors).

``load_pretrained(folder, dtype)`` builds the model on the meta device and then assigns the
checkpoint's tensors, converted once to ``dtype``: there is never a second (random-init or fp32)
copy of the weights in memory. ``save_pretrained`` writes what transformers' ``from_pretrained``
reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

ARCHITECTURES = {"LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM)}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointFormatError(ValueError):
    """A model folder is missing files or has tensors of the wrong name or shape."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16") from None


def config_from_folder(folder: str | Path):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: not found (is {folder} a Hugging Face model folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e})") from None
    arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointFormatError(
            f"{path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    config_cls, model_cls = ARCHITECTURES[arch]
    return config_cls.from_dict(raw), model_cls


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise CheckpointFormatError(f"{f}: not found (only safetensors checkpoints are read; no pickle)")
    return files


def load_pretrained(folder: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu"):
    """Load a HF-format causal LM from a local folder straight into ``dtype`` on ``device``."""
    folder = Path(folder)
    config, model_cls = config_from_folder(folder)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: v for k, v in model.state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False)
    loaded: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    if tied and key == "lm_head.weight":
                        continue  # some tied checkpoints still carry the head
                    if "rotary_emb.inv_freq" in key:
                        continue
                    raise CheckpointFormatError(f"{path}: unexpected tensor {key!r} for {model_cls.__name__}")
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointFormatError(
                        f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                        f"{tuple(expected[key].shape)}")
                loaded[key] = tensor.to(device=device, dtype=dtype)  # one tensor at a time
    missing = [k for k in expected if k not in loaded and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointFormatError(f"{folder}: {len(missing)} tensor(s) missing, first: {missing[0]!r}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers that are not in the checkpoint (RoPE frequencies) are rebuilt for real
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq"):
            from peftloop.models.llama import rope_inverse_frequencies

            module.inv_freq = rope_inverse_frequencies(config).to(device)
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def save_pretrained(model: nn.Module, folder: str | Path, max_shard_bytes: int = 5 << 30,
                    copy_from: str | Path | None = None) -> Path:
    """Write config.json and model.safetensors (sharded with an index above ``max_shard_bytes``),
    plus the tokenizer files found in ``copy_from``, all in one atomic folder."""
    import shutil

    from peftloop.checkpoint import atomic_directory

    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    config.tie_word_embeddings = tied
    if tied:
        state.pop("lm_head.weight", None)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config.torch_dtype = str(dtypes.pop()).removeprefix("torch.")
    with atomic_directory(folder) as tmp:
        config.save(tmp)
        for name in TOKENIZER_FILES if copy_from else ():
            if (Path(copy_from) / name).is_file():
                shutil.copy2(Path(copy_from) / name, tmp / name)
        shards, current, size = [], {}, 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = tensor
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
