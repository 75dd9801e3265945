"""The optimizer: AdamW over the trainable parameters, in groups.

- Weight decay applies to matrices only: never to biases, norm weights or DoRA magnitudes
  (1-D tensors), as transformers' Trainer and PEFT's LoRA+ do.
- LoRA+ (Hayou et al. 2024, arXiv 2402.12354): lora_B learns ``loraplus_lr_ratio`` times faster
  than lora_A. Each group carries ``lr_scale``; the loop sets ``lr = lr_at(step) * lr_scale``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peftloop.config import TrainConfig


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    ratio = config.loraplus_lr_ratio or 1.0
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = config.weight_decay if p.ndim >= 2 else 0.0
        scale = ratio if (".lora_B." in f".{name}" or p.ndim == 1) and config.loraplus_lr_ratio else 1.0
        groups.setdefault((decay, scale), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters: inject adapters (inject_lora) first")
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in groups.items()]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    device_type = next(p for g in groups for p in g["params"]).device.type
    # The fused kernel updates every tensor in one pass (CPU and CUDA); trainable params are fp32.
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, fused=fused)
