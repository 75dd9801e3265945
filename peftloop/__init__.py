"""peftloop: a from-scratch, PEFT-aware fine-tuning loop for PyTorch.

    from peftloop import LoraConfig, TrainConfig, inject_lora, train, save_adapter, load_adapter
    from peftloop import Job, train_many      # K adapters trained at once over one frozen base
"""

from peftloop.checkpoint import load_adapter, save_adapter
from peftloop.config import LoraConfig, TrainConfig
from peftloop.inject import (
    count_parameters,
    disable_adapters,
    inject_lora,
    inject_many,
    merge_and_unload,
    unload,
)
from peftloop.lora import LoRALinear
from peftloop.multi_lora import AdapterSpec, MultiLoRALinear, RowRouting, set_routing
from peftloop.train import TrainResult, seed_everything, train
from peftloop.train_many import Job, train_many

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "TrainConfig",
    "LoRALinear",
    "inject_lora",
    "merge_and_unload",
    "unload",
    "disable_adapters",
    "count_parameters",
    "train",
    "seed_everything",
    "TrainResult",
    "train_many",
    "Job",
    "inject_many",
    "MultiLoRALinear",
    "AdapterSpec",
    "RowRouting",
    "set_routing",
    "save_adapter",
    "load_adapter",
]
