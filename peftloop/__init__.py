"""peftloop: a from-scratch, PEFT-aware fine-tuning loop for PyTorch.

    from peftloop import LoraConfig, TrainConfig, inject_lora, train, save_adapter, load_adapter
"""

from peftloop.checkpoint import load_adapter, save_adapter
from peftloop.config import LoraConfig, TrainConfig
from peftloop.inject import count_parameters, disable_adapters, inject_lora, merge_and_unload, unload
from peftloop.lora import LoRALinear
from peftloop.train import TrainResult, seed_everything, train

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
    "save_adapter",
    "load_adapter",
]
