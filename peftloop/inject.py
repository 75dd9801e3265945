"""Put LoRA layers into any ``nn.Module`` and take them out again (merged or not).

Target matching is PEFT's (``check_target_module_exists``):
- a list: each entry matches a module name exactly or as a suffix after a dot
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``, never ``q_proj_norm``);
- a string: a regex that must ``fullmatch`` the whole module name;
- ``"all-linear"``: every ``nn.Linear`` except the output head.
``exclude_modules`` uses the same rules. Everything that is not an adapter or in
``modules_to_save`` is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch.nn as nn

from peftloop.config import LoraConfig
from peftloop.lora import BASE_LAYERS, LoRALinear, TrainableCopy
from peftloop.modules import adapter_internals, matches, output_head_names, replace_module
from peftloop.nf4 import NF4Linear


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the Linear modules that get adapters under this config, in model order."""
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is not set: "
                         "give a list of names, a regex or 'all-linear'")
    skip = adapter_internals(model)
    if config.target_modules == "all-linear":
        heads = output_head_names(model)
        candidates = [n for n, m in model.named_modules() if isinstance(m, BASE_LAYERS) and n not in heads]
    else:
        candidates = [n for n, m in model.named_modules() if matches(n, config.target_modules)]
    found = []
    for name in candidates:
        if name in skip or matches(name, config.exclude_modules) or matches(name, config.modules_to_save):
            continue
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already has a LoRA adapter")
        if not isinstance(module, BASE_LAYERS):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; "
                "peftloop adapts nn.Linear (and 4-bit NF4Linear) modules only"
            )
        found.append(name)
    if not found:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, BASE_LAYERS)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no nn.Linear in {type(model).__name__}; "
            f"its Linear layers are named: {', '.join(linear) or '(none)'}"
        )
    return found


def inject_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze ``model``, swap every targeted ``nn.Linear`` for a ``LoRALinear`` and wrap
    ``modules_to_save`` in trainable copies. Works in place and returns the model.

    The resolved config is stored as ``model.lora_config``: with "all-linear" its
    ``target_modules`` becomes the list of matched layer names (PEFT writes the same), and an unset
    ``base_model_name_or_path`` becomes what ``load_pretrained`` loaded (``model.name_or_path``).
    ``use_dora`` adds DoRA magnitudes; ``init_lora_weights="pissa"``/``"olora"`` changes the base
    weights (see ``peftloop.lora``).
    """
    targets = resolve_targets(model, config)
    model.requires_grad_(False)
    for name in targets:
        r, alpha = config.rank_and_alpha_for(name)
        layer = LoRALinear(
            model.get_submodule(name), r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
            use_dora=config.use_dora,
        )
        replace_module(model, name, layer)
    for name in _modules_to_save(model, config):
        replace_module(model, name, TrainableCopy(model.get_submodule(name)))
    if config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=sorted({n.split(".")[-1] for n in targets}))
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        # what load_pretrained loaded (a hub id or an absolute folder), so the adapter finds its base
        config = dataclasses.replace(config, base_model_name_or_path=model.name_or_path)
    model.lora_config = config
    return model


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules() if n and matches(n, config.modules_to_save)
             and not isinstance(m, (LoRALinear, TrainableCopy)) and n not in adapter_internals(model)]
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module in "
                         f"{type(model).__name__}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_copies(model: nn.Module) -> dict[str, TrainableCopy]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableCopy)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once, and a 4-bit layer counts
    its weight's elements (out x in), not the bytes that hold them."""
    params = {id(p): p for p in model.parameters()}
    total = 0
    for layer in model.modules():
        if isinstance(layer, NF4Linear):
            for t in (layer.packed_weight, layer.absmax, layer.nested_absmax, layer.nested_offset):
                if t is not None:
                    params.pop(id(t), None)
            total += layer.in_features * layer.out_features
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return trainable, total + sum(p.numel() for p in params.values())


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}")


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes as the base model (merged layers are unmerged first)."""
    wrappers = [*lora_layers(model).values(), *trainable_copies(model).values()]
    for m in wrappers:
        if isinstance(m, LoRALinear):
            m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m in wrappers:
            m.disabled = False


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight and put plain modules back: the result has no
    trace of peftloop and saves as an ordinary checkpoint. Trained copies replace their originals.

    Merging is done in fp32 and cast to the base's dtype. A 4-bit (NF4) base is dequantised
    first: the merged weight is dequant(W4) + ΔW (what the adapter was trained against), stored
    as a plain Linear in ``dtype`` (default: the dtype the weight had before quantisation). That
    rounding is reported in a warning with its size (the largest change of any weight); 4-bit
    layers without an adapter are dequantised the same way."""
    rounding, quantized = 0.0, 0
    for name, layer in lora_layers(model).items():
        if layer.quantized:
            merged, error = layer.merged_linear(dtype)
            rounding, quantized = max(rounding, error), quantized + 1
            replace_module(model, name, merged)
        else:
            layer.merge()
            replace_module(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = module.to_linear(dtype)
            quantized += 1
            replace_module(model, name, linear)
    for name, wrapper in trainable_copies(model).items():
        original = wrapper.original_module
        trained = wrapper.modules_to_save.to(next(original.parameters()).dtype)
        replace_module(model, name, trained)
    model.requires_grad_(False)
    if hasattr(model, "lora_config"):
        del model.lora_config
    if quantized:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        warnings.warn(
            f"merge_and_unload: {quantized} layer(s) had a 4-bit (NF4) base: each merged weight is "
            f"dequant(W4) + ΔW computed in fp32, then rounded to {'/'.join(dtypes)}; that rounding changed "
            f"weights by up to {rounding:.3g} (max abs diff against the fp32 merge), so the merged model's "
            "outputs differ slightly from the adapter model's. The base values are the dequantised 4-bit "
            "weights the adapter was trained on, not the original full-precision checkpoint.",
            stacklevel=2)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original modules go back in place (a base that
    PiSSA/OLoRA turned into a residual gets its original weight back, up to one rounding)."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        layer.restore_base()
        replace_module(model, name, layer.base_layer)
    for name, wrapper in trainable_copies(model).items():
        replace_module(model, name, wrapper.original_module)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
