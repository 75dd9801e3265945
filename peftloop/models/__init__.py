"""Model families and Hugging Face-format checkpoint I/O (``config.json`` + safetensors).

This package's ``__init__`` only re-exports: ``llama.py`` is the model, ``loading.py`` loads and
saves checkpoints, ``safetensors_io.py`` reads safetensors files tensor by tensor,
``checkpointing.py`` is per-layer activation checkpointing.

``load_pretrained(name_or_path, dtype)`` takes a local folder or a hub id (``peftloop.hub``),
builds the model on the meta device and then assigns the checkpoint's tensors, each converted
once to ``dtype`` as it is read: there is never a second (random-init or fp32) copy of the
weights in memory. With ``quantization="nf4"`` every Linear weight but the output head is
quantised to 4 bits as it is read (``peftloop.nf4``), so the peak is the 4-bit model plus one
weight in fp32. ``save_pretrained`` writes what transformers' ``from_pretrained`` reads.
``enable_gradient_checkpointing(model, offload=False)`` turns on per-layer checkpointing.

Supported architectures (``ARCHITECTURES``): Llama (Llama 2/3/3.1/3.2, with Llama 3 rope scaling;
SmolLM/SmolLM2 and TinyLlama are Llama checkpoints), Mistral, Qwen2/Qwen2.5, Qwen3. All of them
are ``peftloop.models.llama.LlamaForCausalLM`` with the family's switches (see ``FAMILIES``).
"""

from peftloop.models.llama import FAMILIES, LlamaConfig, LlamaForCausalLM
from peftloop.models.loading import (
    ARCHITECTURES,
    DTYPES,
    TOKENIZER_FILES,
    config_from_folder,
    enable_gradient_checkpointing,
    load_pretrained,
    parse_dtype,
    read_config_json,
    save_pretrained,
    weight_files,
)
from peftloop.models.safetensors_io import CheckpointFormatError

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "FAMILIES",
    "TOKENIZER_FILES",
    "CheckpointFormatError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "config_from_folder",
    "enable_gradient_checkpointing",
    "load_pretrained",
    "parse_dtype",
    "read_config_json",
    "save_pretrained",
    "weight_files",
]
