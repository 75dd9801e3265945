"""Walking and editing a module tree: PEFT's name matching, the output head, adapter wrappers.

A leaf: it imports no other peftloop module. Adapter wrappers (``LoRALinear``,
``TrainableCopy``) are recognised by a class marker, ``is_adapter_wrapper = True``, so the
4-bit layer, the model loader and the surgery in ``inject`` can all use these helpers without
importing the layers they look for.
"""

from __future__ import annotations

import re

import torch.nn as nn


def matches(name: str, targets: list[str] | tuple[str, ...] | str | None) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exactly or as a '.'-suffix
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``, never ``q_proj_norm``)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s), which "all-linear" and quantisation leave alone (as PEFT does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}


def is_adapter_wrapper(module: nn.Module) -> bool:
    return getattr(type(module), "is_adapter_wrapper", False)


def adapter_internals(model: nn.Module) -> set[str]:
    """Names of the modules inside an adapter wrapper (its base layer, lora_A, the trained copy):
    they must never be targeted again."""
    inside = set()
    for name, module in model.named_modules():
        if is_adapter_wrapper(module):
            inside.update(f"{name}.{sub}" if sub else name for sub, _ in module.named_modules())
            inside.discard(name)
    return inside


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is (``"model.layers.0.mlp.up_proj"``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
