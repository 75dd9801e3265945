"""Loading and saving Hugging Face-format checkpoints (``config.json`` + safetensors).

``load_pretrained(name_or_path, dtype)`` takes a local folder or a hub id (``peftloop.hub``),
builds the model on the meta device and then assigns the checkpoint's tensors, each converted
once to ``dtype`` as it is read: there is never a second (random-init or fp32) copy of the
weights in memory. With ``quantization="nf4"`` every Linear weight but the output head is
quantised to 4 bits as it is read (``peftloop.nf4``), so the peak is the 4-bit model plus one
weight in fp32. ``save_pretrained`` writes what transformers' ``from_pretrained`` reads.
``enable_gradient_checkpointing(model, offload=False)`` turns on per-layer checkpointing.

A loaded model records what it was loaded from as ``model.name_or_path`` (``source_name``: the
hub id, or the absolute folder), which ``save_adapter`` writes as the adapter's
``base_model_name_or_path`` so that the adapter finds its base from any working directory.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from peftloop.files import atomic_directory
from peftloop.hub import resolve_model
from peftloop.models.llama import FAMILIES, LlamaConfig, LlamaForCausalLM, rope_inverse_frequencies
from peftloop.models.safetensors_io import (
    CheckpointFormatError,
    conversion_buffer,
    read_tensor,
    safetensors_header,
)
from peftloop.modules import replace_module
from peftloop.nf4 import QUANTIZATION_METHODS, NF4Linear, nf4_layers, quantizable_linears, quantize_nf4

ARCHITECTURES = {architecture: (LlamaConfig, LlamaForCausalLM) for architecture in FAMILIES.values()}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16") from None


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: not found (is {folder} a Hugging Face model folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    return raw


def source_name(name_or_path: str | Path) -> str:
    """How a loaded model names its checkpoint: the absolute folder for a local folder (as
    ``resolve_model`` finds it), the hub id as given otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def config_from_folder(folder: str | Path):
    """(config, model class) for the checkpoint in ``folder``; refuses an architecture we do not run."""
    path = Path(folder) / "config.json"
    raw = read_config_json(folder)
    architectures = raw.get("architectures") or []
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown or (not architectures and raw.get("model_type") not in FAMILIES):
        found = unknown[0] if unknown else f"model_type={raw.get('model_type')!r}"
        raise CheckpointFormatError(
            f"{path}: architecture {found!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    config_cls, model_cls = (ARCHITECTURES[architectures[0]] if architectures
                             else (LlamaConfig, LlamaForCausalLM))
    try:
        return config_cls.from_dict(raw, source=str(path)), model_cls
    except ValueError as e:
        raise CheckpointFormatError(str(e)) from None


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index}: weight_map is not an object of tensor name -> file")
        for key, name in weight_map.items():
            # A shard is a plain file name beside the index: no "../", no absolute or nested path
            # that would make us read a file outside the checkpoint.
            if not isinstance(name, str) or not re.fullmatch(r"[\w][\w.-]*\.safetensors", name):
                raise CheckpointFormatError(f"{index}: weight_map[{key!r}] = {name!r} is not a shard "
                                            "file name in this folder "
                                            "(expected e.g. 'model-00001-of-00002.safetensors')")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            hint = (" (only safetensors checkpoints are read; no pickle)" if f.name == "model.safetensors"
                    else "")
            raise CheckpointFormatError(f"{f}: not found{hint}")
    return files


def _skipped_key(key: str, tied: bool) -> bool:
    """Tensors some checkpoints carry that the model rebuilds or shares: the tied head, RoPE tables."""
    return (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq")


def load_pretrained(name_or_path: str | Path, dtype: str | torch.dtype = "fp32",
                    device: str | torch.device = "cpu",
                    revision: str | None = None, cache_dir: str | Path | None = None,
                    quantization: str | None = None, quant_blocksize: int = 64, double_quant: bool = True):
    """Load a HF-format causal LM (a local folder or a hub id) straight into ``dtype`` on ``device``.

    The model is built on the meta device (no memory); each tensor is then checked against the
    shape the config implies, read from its file into a tensor of ``dtype`` and moved to
    ``device`` before the next one is read. The peak is the weights in ``dtype`` plus one
    conversion buffer (benchmarks/load_memory.py measures it).

    ``quantization="nf4"`` (QLoRA): every Linear but the output head becomes an ``NF4Linear``
    (blocks of ``quant_blocksize``, ``double_quant`` scales). Each such weight is read in fp32
    (the checkpoint's exact values), moved to ``device``, quantised there and dropped before the
    next tensor is read; embeddings, norms, biases and the head are loaded in ``dtype``, which
    is also the compute dtype of the 4-bit layers' inputs."""
    if sys.byteorder != "little":
        raise RuntimeError("peftloop reads safetensors (little-endian) on little-endian machines only")
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={quantization!r}: expected None or one of "
                         f"{', '.join(QUANTIZATION_METHODS)}")
    folder = resolve_model(name_or_path, revision=revision, cache_dir=cache_dir)
    config, model_cls = config_from_folder(folder)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    quantized = set(quantizable_linears(model)) if quantization else set()
    states = {}  # module name -> NF4State
    loaded: dict[str, torch.Tensor] = {}
    buffer = conversion_buffer()
    for path in weight_files(folder):
        header, data_start = safetensors_header(path)
        with open(path, "rb") as f:
            for key, entry in header.items():
                if key not in expected:
                    if _skipped_key(key, tied):
                        continue
                    raise CheckpointFormatError(f"{path}: unexpected tensor {key!r} for {model_cls.__name__} "
                                                f"(model_type {config.model_type!r})")
                if tuple(entry["shape"]) != tuple(expected[key].shape):
                    raise CheckpointFormatError(f"{path}: tensor {key!r} has shape "
                                                f"{tuple(entry['shape'])}, the config implies "
                                                f"{tuple(expected[key].shape)}")
                module_name, _, tensor_name = key.rpartition(".")
                if tensor_name == "weight" and module_name in quantized:
                    weight = read_tensor(f, data_start, entry, torch.float32, buffer).to(device)
                    states[module_name] = quantize_nf4(weight, quant_blocksize, double_quant,
                                                       name=f"{path}: {key}")
                    del weight
                    continue
                loaded[key] = read_tensor(f, data_start, entry, dtype, buffer).to(device)
    present = set(loaded) | {f"{name}.weight" for name in states}
    missing = [k for k in expected if k not in present and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointFormatError(f"{folder}: {len(missing)} tensor(s) missing for {model_cls.__name__}: "
                                    f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    for name, state in states.items():
        layer = NF4Linear(state, loaded.pop(f"{name}.bias", None), weight_dtype=dtype, name=name)
        replace_module(model, name, layer)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers that are not in the checkpoint (RoPE frequencies) are built for real, in fp32
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(config).to(device)
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    model.name_or_path = source_name(name_or_path)  # what save_adapter records as the adapter's base
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def save_pretrained(model: nn.Module, folder: str | Path, max_shard_bytes: int = 5 << 30,
                    copy_from: str | Path | None = None) -> Path:
    """Write config.json and model.safetensors (sharded with an index above ``max_shard_bytes``),
    plus the tokenizer files found in ``copy_from``, all in one atomic folder."""
    quantized = nf4_layers(model)
    if quantized:
        raise ValueError(f"save_pretrained: {len(quantized)} layer(s) are 4-bit (NF4), "
                         f"e.g. {next(iter(quantized))!r}; "
                         "transformers cannot read peftloop's 4-bit tensors. Dequantise first: "
                         "merge_and_unload(model, dtype=torch.bfloat16) or "
                         "peftloop.nf4.dequantize_model(model)")
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


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> nn.Module:
    """Checkpoint every decoder layer (non-reentrant; ``offload=True``: inputs kept in pinned CPU
    memory, see ``peftloop.models.checkpointing``). peftloop's models, and transformers models
    through their own ``gradient_checkpointing_enable`` (non-reentrant, no offload)."""
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    if isinstance(inner, LlamaForCausalLM):
        inner.gradient_checkpointing_enable(offload=offload)
    elif hasattr(inner, "gradient_checkpointing_enable"):
        if offload:
            raise ValueError(f"enable_gradient_checkpointing: offload=True needs a peftloop model, "
                             f"not {type(inner).__name__}")
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(f"enable_gradient_checkpointing: {type(inner).__name__} has no decoder layers "
                        "peftloop knows how to checkpoint")
    return model
