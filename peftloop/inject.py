"""Put LoRA layers into any ``nn.Module``, take them out again, and name their tensors as PEFT does.

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
import re
import warnings

import torch
import torch.nn as nn

from peftloop.config import LoraConfig
from peftloop.lora import BASE_LAYERS, LoRALinear, TrainableCopy
from peftloop.nf4 import NF4Linear

PREFIX = "base_model.model."  # PEFT's on-disk prefix: PeftModel.base_model (LoraModel).model


def matches(name: str, targets: list[str] | str | None) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exactly or as a '.'-suffix."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s), which "all-linear" leaves alone (as PEFT does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}


def _adapter_internals(model: nn.Module) -> set[str]:
    """Names of modules that live inside an adapter wrapper and must never be targeted again."""
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, TrainableCopy)):
            inside.update(f"{name}.{sub}" if sub else name for sub, _ in module.named_modules())
            inside.discard(name)
    return inside


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names of the Linear modules that get adapters under this config, in model order."""
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is not set: give a list of names, a regex or 'all-linear'")
    skip = _adapter_internals(model)
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
                f"target {name!r} is a {type(module).__name__}; peftloop adapts nn.Linear (and 4-bit NF4Linear) "
                "modules only"
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
    ``target_modules`` becomes the list of matched layer names (PEFT writes the same).
    ``use_dora`` adds DoRA magnitudes; ``init_lora_weights="pissa"``/``"olora"`` changes the base
    weights (see ``peftloop.lora``).
    """
    targets = resolve_targets(model, config)
    model.requires_grad_(False)
    for name in targets:
        r, scaling = config.scaling_for(name)
        layer = LoRALinear(
            model.get_submodule(name), r=r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights, scaling=scaling, use_dora=config.use_dora,
        )
        _replace(model, name, layer)
    for name in _modules_to_save(model, config):
        _replace(model, name, TrainableCopy(model.get_submodule(name)))
    if config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=sorted({n.split(".")[-1] for n in targets}))
    model.lora_config = config
    return model


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules() if n and matches(n, config.modules_to_save)
             and not isinstance(m, (LoRALinear, TrainableCopy)) and n not in _adapter_internals(model)]
    if not names:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module in {type(model).__name__}")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


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
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


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
            _replace(model, name, merged)
        else:
            layer.merge()
            _replace(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = module.to_linear(dtype)
            quantized += 1
            _replace(model, name, linear)
    for name, wrapper in trainable_copies(model).items():
        original = wrapper.original_module
        trained = wrapper.modules_to_save.to(next(original.parameters()).dtype)
        _replace(model, name, trained)
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
        _replace(model, name, layer.base_layer)
    for name, wrapper in trainable_copies(model).items():
        _replace(model, name, wrapper.original_module)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# --------------------------------------------------------------------------------------------
# PEFT's on-disk names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk keys (``base_model.model.<module>.lora_A.weight``,
    ``...lora_B.weight``, DoRA's ``...lora_magnitude_vector``, modules_to_save's ``...weight``).

    A layer whose base PiSSA/OLoRA turned into a residual is written as a plain LoRA of rank 2r
    on the *original* weight: ``[A; A₀]`` and ``[B, −B₀]``, since W_res + s·B·A = W + s·(B·A − B₀·A₀)
    (PEFT's ``path_initial_model_for_weight_conversion``; ``LoraConfig.to_adapter_config``
    doubles r and lora_alpha to match). Those two entries are new tensors; every other entry is
    the parameter itself."""
    out = {}
    for name, layer in lora_layers(model).items():
        A, B = layer.lora_A.weight, layer.lora_B.weight
        if layer.initial_lora_A is not None:
            # whole tensors first: under FSDP2 A and B are shards (a collective on every rank)
            A, B = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (A, B))
            A = torch.cat([A, layer.initial_lora_A.to(A)], dim=0)
            B = torch.cat([B, -layer.initial_lora_B.to(B)], dim=1)
        out[f"{PREFIX}{name}.lora_A.weight"] = A
        out[f"{PREFIX}{name}.lora_B.weight"] = B
        if layer.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    for name, wrapper in trainable_copies(model).items():
        for pname, p in wrapper.modules_to_save.named_parameters():
            out[f"{PREFIX}{name}.{pname}"] = p
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters themselves (A, B, DoRA magnitudes, trained copies)."""
    params = []
    for layer in lora_layers(model).values():
        params += [layer.lora_A.weight, layer.lora_B.weight]
        if layer.use_dora:
            params.append(layer.lora_magnitude_vector)
    for wrapper in trainable_copies(model).values():
        params += list(wrapper.modules_to_save.parameters())
    return params


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True,
                            source: str = "adapter") -> None:
    """Copy PEFT-keyed tensors into the model's adapters.

    Every key must name an adapter tensor of the same shape; with ``strict`` every adapter
    tensor must be present too. Nothing is copied unless all keys check out. DoRA magnitudes are
    accepted as PEFT writes them (``lora_magnitude_vector``) and as its in-memory name
    (``lora_magnitude_vector.weight``). For a PiSSA/OLoRA layer the rank-2r tensors that
    ``adapter_state_dict`` writes are split back into (A, A₀) and (B, B₀); if A₀, B₀ are not
    this model's own initial factors, its residual base is moved to match them (``rebase``).
    """
    expected = adapter_state_dict(model)
    # PEFT also accepts keys without the prefix (adapters saved from injected-only models).
    renamed = {}
    for k, v in tensors.items():
        k = k if k.startswith(PREFIX) else PREFIX + k
        renamed[k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k] = v
    unknown = sorted(set(renamed) - set(expected))
    if unknown:
        raise KeyError(
            f"{source}: {len(unknown)} key(s) match no adapter tensor in {type(model).__name__}, "
            f"first: {unknown[0]!r}" + _nearest(unknown[0], expected)
        )
    for key, value in renamed.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model's adapter expects "
                f"{tuple(expected[key].shape)} (different r or a different base model?)"
            )
    missing = sorted(set(expected) - set(renamed))
    if strict and missing:
        raise KeyError(f"{source}: {len(missing)} adapter tensor(s) missing, first: {missing[0]!r}")
    residual = {name: layer for name, layer in lora_layers(model).items() if layer.initial_lora_A is not None}
    with torch.no_grad():
        for name, layer in residual.items():
            A, B = renamed.pop(f"{PREFIX}{name}.lora_A.weight", None), renamed.pop(f"{PREFIX}{name}.lora_B.weight", None)
            if A is None or B is None:  # strict=False and missing: both halves or nothing
                continue
            r = layer.r
            A0, B0 = A[r:].to(layer.initial_lora_A), -B[:, r:].to(layer.initial_lora_B)
            if not (torch.equal(A0, layer.initial_lora_A) and torch.equal(B0, layer.initial_lora_B)):
                layer.rebase(A0, B0)
            layer.lora_A.weight.copy_(A[:r])
            layer.lora_B.weight.copy_(B[:, :r])
        for key, value in renamed.items():
            expected[key].copy_(value)


def _nearest(key: str, expected) -> str:
    import difflib

    hint = difflib.get_close_matches(key, list(expected), n=1, cutoff=0.6)
    return f" (nearest expected key: {hint[0]!r})" if hint else ""
