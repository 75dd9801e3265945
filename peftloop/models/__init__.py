"""Model families and Hugging Face-format checkpoint I/O (``config.json`` + safetensors).

This package's ``__init__`` only re-exports: ``llama.py`` is the model, ``loading.py`` loads and
saves checkpoints, ``safetensors_io.py`` reads safetensors files tensor by tensor,
``checkpointing.py`` is per-layer activation checkpointing.

    model = load_pretrained("HuggingFaceTB/SmolLM2-135M", dtype="bf16")   # a hub id or a folder
    save_pretrained(model, "out")                                          # what transformers reads

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
