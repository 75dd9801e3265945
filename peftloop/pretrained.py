"""A Hugging Face checkpoint and JSONL data, loaded the way ``peftloop train`` and
``peftloop search`` both load them: the data first (its problems are found before the model is
read), then the base model as [model] asks (dtype, 4-bit, gradient checkpointing)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftloop.config import DataConfig, ModelConfig
from peftloop.data import collate, load_datasets
from peftloop.hub import resolve_model
from peftloop.models import enable_gradient_checkpointing, load_pretrained
from peftloop.tokenizer import Tokenizer


@dataclass
class PretrainedData:
    folder: Path
    """The base model's local folder (a hub id resolved through the cache)."""
    tokenizer: Tokenizer
    train_data: Any
    eval_data: Any
    collate_fn: Callable


def load_data(model_config: ModelConfig, data_config: DataConfig, seed: int) -> PretrainedData:
    """The model's folder and tokenizer, and the train/eval data read with that tokenizer."""
    folder = resolve_model(model_config.name_or_path, model_config.revision, model_config.cache_dir)
    tokenizer = Tokenizer.from_pretrained(folder)
    train_data, eval_data = load_datasets(data_config, tokenizer, seed=seed)
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    return PretrainedData(folder, tokenizer, train_data, eval_data, functools.partial(collate, pad_id=pad))


def load_base_model(folder: Path, model_config: ModelConfig) -> nn.Module:
    """The base model from ``folder`` in [model]'s dtype and quantisation, with gradient
    checkpointing when asked."""
    model = load_pretrained(folder, dtype=model_config.dtype, quantization=model_config.quantization,
                            quant_blocksize=model_config.quant_blocksize,
                            double_quant=model_config.double_quant)
    if model_config.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=model_config.offload_activations)
    return model
