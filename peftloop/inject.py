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
from collections.abc import Sequence

import torch
import torch.nn as nn

from peftloop.config import LoraConfig, mutates_base
from peftloop.lora import BASE_LAYERS, LoRALinear, TrainableCopy
from peftloop.modules import adapter_internals, matches, output_head_names, replace_module
from peftloop.multi_lora import AdapterSpec, LoRAAdapter, MultiLoRALinear, multi_lora_layers
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


def inject_many(model: nn.Module, configs: Sequence[LoraConfig], seeds: Sequence[int]) -> list[torch.Tensor]:
    """Freeze ``model`` and wrap every target of the configs in one ``MultiLoRALinear`` holding
    K = len(configs) adapters; works in place. All configs must target the same modules.

    Adapter k's initial A and B equal, tensor for tensor, what ``seed_everything(seeds[k]);
    inject_lora(model, configs[k])`` gives on the same base: its adapters are drawn layer after
    layer, in model order, from torch's generator seeded with ``seeds[k]`` (``seed_everything``
    seeds python and numpy too, but the init draws from torch's generators only). The caller's
    RNG states are restored afterwards. Returns, per adapter, the torch CPU RNG state right after
    its initialisation: where ``seed_everything(seeds[k]); inject_lora(model, configs[k])`` leaves
    torch's CPU generator, so the stream a model injected that way draws dropout from when nothing
    reseeds it (as ``RowRouting.rng_states``, a fused forward pass then draws each adapter's masks as
    its single-adapter model does: the tests compare them so). ``train()`` does reseed
    (``seed_everything(config.seed)``) after injection: ``train_many`` does not use these states but
    gives job k the state of ``torch.manual_seed(config.seed)``. The resolved configs are stored as
    ``model.lora_configs`` ("all-linear" becomes the matched names, as ``inject_lora`` stores
    ``model.lora_config``).

    Plain LoRA and rsLoRA only, per config its own r, lora_alpha, rank/alpha patterns and dropout:
    DoRA, PiSSA/OLoRA init, modules_to_save and the output head as a target are refused.
    """
    configs, seeds = list(configs), list(seeds)
    if not configs or len(configs) != len(seeds):
        raise ValueError(f"inject_many: {len(configs)} configs and {len(seeds)} seeds; give one seed per "
                         "config, and at least one")
    if multi_lora_layers(model) or lora_layers(model):
        raise ValueError("inject_many: the model already has LoRA layers (inject_lora or inject_many); "
                         "a single-adapter layer would apply to every adapter's rows")
    for i, config in enumerate(configs):
        _check_multi_config(i, config)
    targets = _targets_of(model, 0, configs[0])
    for i, config in enumerate(configs[1:], start=1):
        _check_same_targets(model, i, config, configs[0], targets)
    heads = sorted(output_head_names(model) & set(targets))
    if heads:
        # The loss runs the head on the labelled tokens only, flattened: its rows are not the batch's.
        raise ValueError(f"inject_many: the configs target the output head {heads[0]!r}; the multi-adapter "
                         "layer routes batch rows, which the head does not see (leave it out of "
                         "target_modules)")
    model.requires_grad_(False)
    bases = {name: model.get_submodule(name) for name in targets}
    adapters: dict[str, list[LoRAAdapter]] = {name: [] for name in targets}
    states = []
    cuda = sorted({p.device.index or 0 for p in [*model.parameters(), *model.buffers()] if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        for seed, config in zip(seeds, configs):
            torch.manual_seed(seed)
            for name, base in bases.items():
                r, alpha = config.rank_and_alpha_for(name)
                spec = AdapterSpec(r, alpha, config.lora_dropout, config.use_rslora)
                device = (base.packed_weight if isinstance(base, NF4Linear) else base.weight).device
                adapters[name].append(LoRAAdapter(base.in_features, base.out_features, spec, device,
                                                  config.init_lora_weights))
            states.append(torch.get_rng_state())
    for name, base in bases.items():
        replace_module(model, name, MultiLoRALinear(base, adapters[name]))
    model.lora_configs = [_resolved_config(model, config, targets) for config in configs]
    return states


def _check_multi_config(i: int, config: LoraConfig) -> None:
    unsupported = {
        "use_dora": (config.use_dora, "DoRA (use_dora=True)"),
        "init_lora_weights": (mutates_base(config.init_lora_weights),
                              f"init_lora_weights={config.init_lora_weights!r} (PiSSA/OLoRA change the base "
                              "weight, which the adapters share)"),
        "modules_to_save": (bool(config.modules_to_save), f"modules_to_save={config.modules_to_save!r}"),
    }
    for key, (used, what) in unsupported.items():
        if used:
            raise ValueError(f"inject_many: configs[{i}] uses {what}; the multi-adapter layer supports plain "
                             f"LoRA and rsLoRA only ({key} must be left at its default)")


def _check_same_targets(model: nn.Module, i: int, config: LoraConfig, first: LoraConfig,
                        targets: list[str]) -> None:
    """All adapters live in the same layers: config i must resolve to config 0's modules."""
    theirs = _targets_of(model, i, config)
    if theirs == targets:
        return
    key = next((k for k in ("target_modules", "exclude_modules") if getattr(config, k) != getattr(first, k)),
               "target_modules")
    only_theirs, only_first = sorted(set(theirs) - set(targets)), sorted(set(targets) - set(theirs))
    raise ValueError(
        f"inject_many: configs[{i}] targets other modules than configs[0] ({key}: "
        f"{getattr(config, key)!r} vs {getattr(first, key)!r}); only in configs[{i}]: "
        f"{only_theirs[:3] or '-'}, only in configs[0]: {only_first[:3] or '-'}. Every adapter of a "
        "multi-adapter model must adapt the same layers")


def _targets_of(model: nn.Module, i: int, config: LoraConfig) -> list[str]:
    try:
        return resolve_targets(model, config)
    except ValueError as e:
        raise ValueError(f"inject_many: configs[{i}]: {e}") from None


def _resolved_config(model: nn.Module, config: LoraConfig, targets: list[str]) -> LoraConfig:
    """The config as ``inject_lora`` stores it: "all-linear" resolved, the base's name filled in."""
    if config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=sorted({n.split(".")[-1] for n in targets}))
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        config = dataclasses.replace(config, base_model_name_or_path=model.name_or_path)
    return config


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
