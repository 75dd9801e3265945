"""The optimizer: AdamW over the trainable parameters, in groups.

- Weight decay follows transformers' Trainer (``Trainer.get_decay_parameter_names``): every
  trainable parameter decays except biases and norm weights (names matching bias, layernorm,
  rmsnorm, ``norm`` or ``*_norm``, and parameters of ``nn.LayerNorm`` modules). LoRA's A and B
  and DoRA's magnitudes decay; a trained RMSNorm (modules_to_save) does not.
- LoRA+ (Hayou et al. 2024, arXiv 2402.12354): lora_B learns ``loraplus_lr_ratio`` times faster
  than lora_A. The groups are PEFT's ``create_loraplus_optimizer``'s: lora_B and every 1-D
  parameter (DoRA magnitudes, biases, norms) at lr x ratio, everything else at lr. PEFT decays
  every parameter outside nn.LayerNorm whose name lacks "bias"; the Trainer's rule above also
  spares norm weights named like Llama's RMSNorms (the only difference, tested). Each group
  carries ``lr_scale``; the loop sets ``lr = lr_at(step) * lr_scale``.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from peftloop.config import TrainConfig

# transformers' Trainer.get_decay_parameter_names (5.x): searched in the lower-cased full name.
NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                             r"_norm(?:$|\.)")]


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to (the Trainer's rule, see the module docstring)."""
    in_layernorm = {f"{module_name}.{name}" if module_name else name
                    for module_name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                    for name, _ in module.named_parameters(recurse=False)}
    return {name for name, _ in model.named_parameters()
            if name not in in_layernorm and not any(p.search(name.lower()) for p in NO_DECAY_PATTERNS)}


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    ratio = config.loraplus_lr_ratio
    decayed = decayed_parameter_names(model)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = config.weight_decay if name in decayed else 0.0
        fast = "lora_B" in name or p.ndim == 1  # PEFT's test, character for character
        scale = ratio if ratio and fast else 1.0
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
