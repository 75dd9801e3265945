"""PEFT's adapter format: tensor names, ``adapter_config.json``, and PiSSA/OLoRA's rank-2r form.

Everything that decides what an adapter looks like on disk lives here, so that what we save,
``peft.PeftModel.from_pretrained`` loads, and what PEFT saves, we load:

- tensor keys: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, DoRA's
  ``.lora_magnitude_vector`` (no ``.weight``), modules_to_save as ``base_model.model.<module>.<param>``;
- ``adapter_config.json``: PEFT's keys and defaults (``to_adapter_config``), and the reverse,
  refusing what would change the math in ways peftloop does not implement
  (``from_adapter_config``);
- a layer whose base PiSSA/OLoRA turned into a residual ``W_res = W − s·B₀·A₀`` is written as a
  plain LoRA of rank 2r on the *original* W, ``[A; A₀]`` and ``[B, −B₀]``, since
  ``W_res + s·B·A = W + s·(B·A − B₀·A₀)`` (PEFT's ``path_initial_model_for_weight_conversion``),
  with r doubled and lora_alpha scaled so the scaling is unchanged. Reading it back splits the
  halves again and, if A₀, B₀ are not this model's own, moves its residual base to match them.

The files themselves (atomic writes, manifests) are ``checkpoint``'s job.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any

import torch
import torch.nn as nn

from peftloop.config import ConfigError, LoraConfig
from peftloop.inject import lora_layers, trainable_copies
from peftloop.lora import LoRALinear, mutates_base
from peftloop.multi_lora import LoRAAdapter, multi_lora_layers

PREFIX = "base_model.model."  # PEFT's on-disk prefix: PeftModel.base_model (LoraModel).model


# --------------------------------------------------------------------------------------------
# Tensors


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk keys. A PiSSA/OLoRA layer is written in its
    rank-2r form (two new tensors); every other entry is the parameter itself."""
    out = {}
    for name, layer in lora_layers(model).items():
        A, B = layer.lora_A.weight, layer.lora_B.weight
        if layer.initial_lora_A is not None:
            A, B = _rank_2r_factors(layer)
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
    (``lora_magnitude_vector.weight``). PiSSA/OLoRA layers read the rank-2r form.
    """
    expected = adapter_state_dict(model)
    renamed = _checked_tensors(model, expected, tensors, strict, source)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if layer.initial_lora_A is None:
                continue
            A = renamed.pop(f"{PREFIX}{name}.lora_A.weight", None)
            B = renamed.pop(f"{PREFIX}{name}.lora_B.weight", None)
            if A is not None and B is not None:  # strict=False and missing: both halves or nothing
                _load_rank_2r_factors(layer, A, B)
        for key, value in renamed.items():
            expected[key].copy_(value)


def _checked_tensors(model: nn.Module, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                     strict: bool, source: str) -> dict[str, torch.Tensor]:
    """``tensors`` under the prefixed keys of ``expected``, refused (naming the key and both
    shapes) unless every key names an expected tensor of the same shape and, with ``strict``,
    every expected tensor is there."""
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
    return renamed


def _nearest(key: str, expected) -> str:
    hint = difflib.get_close_matches(key, list(expected), n=1, cutoff=0.6)
    return f" (nearest expected key: {hint[0]!r})" if hint else ""


# --------------------------------------------------------------------------------------------
# One adapter of a multi-adapter model (peftloop.multi_lora): the same keys as a single adapter


def _adapters_of(model: nn.Module, k: int) -> dict[str, LoRAAdapter]:
    """Adapter k of every ``MultiLoRALinear`` in ``model``, by module name, in model order."""
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no multi-adapter layers (see inject_many)")
    count = len(next(iter(layers.values())).adapters)
    if not 0 <= k < count:
        raise IndexError(f"adapter {k}: the model's multi-adapter layers hold adapters 0..{count - 1}")
    return {name: layer.adapters[k] for name, layer in layers.items()}


def adapter_state_dict_of(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Adapter k's tensors under PEFT's on-disk keys: what ``adapter_state_dict`` gives for a
    single-adapter model holding adapter k (the parameters themselves), so
    ``checkpoint.write_adapter(directory, tensors, model.lora_configs[k])`` writes an adapter
    that ``load_adapter`` and ``peft.PeftModel.from_pretrained`` load."""
    out = {}
    for name, adapter in _adapters_of(model, k).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = adapter.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = adapter.lora_B.weight
    return out


def adapter_parameters_of(model: nn.Module, k: int) -> list[nn.Parameter]:
    """Adapter k's trainable parameters (its A and B in every layer)."""
    params = []
    for adapter in _adapters_of(model, k).values():
        params += [adapter.lora_A.weight, adapter.lora_B.weight]
    return params


def load_adapter_state_dict_of(model: nn.Module, k: int, tensors: dict[str, torch.Tensor],
                               strict: bool = True, source: str = "adapter") -> None:
    """Copy PEFT-keyed tensors (one single adapter's) into adapter k, checked as
    ``load_adapter_state_dict`` checks them: nothing is copied unless every key names one of
    adapter k's tensors with the same shape (and, with ``strict``, none is missing)."""
    expected = adapter_state_dict_of(model, k)
    renamed = _checked_tensors(model, expected, tensors, strict, f"{source} (adapter {k})")
    with torch.no_grad():
        for key, value in renamed.items():
            expected[key].copy_(value)


# --------------------------------------------------------------------------------------------
# PiSSA / OLoRA: residual base <-> plain LoRA of rank 2r on the original weight


def _rank_2r_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A; A₀]`` and ``[B, −B₀]``: with them a plain LoRA on the original W computes what
    this layer computes on its residual base."""
    # whole tensors first: under FSDP2 A and B are shards (a collective on every rank)
    A, B = (t.full_tensor() if hasattr(t, "full_tensor") else t
            for t in (layer.lora_A.weight, layer.lora_B.weight))
    return (torch.cat([A, layer.initial_lora_A.to(A)], dim=0),
            torch.cat([B, -layer.initial_lora_B.to(B)], dim=1))


@torch.no_grad()
def _load_rank_2r_factors(layer: LoRALinear, A: torch.Tensor, B: torch.Tensor) -> None:
    """Split the rank-2r tensors into (A, A₀), (B, B₀). When A₀, B₀ are not this layer's own
    initial factors (pissa_niter_K draws a random start), the residual base is moved to the one
    they were split from: W_res ← W_res + s·(B₀·A₀ − B₀'·A₀')."""
    r = layer.r
    initial_A, initial_B = A[r:].to(layer.initial_lora_A), -B[:, r:].to(layer.initial_lora_B)
    if not (torch.equal(initial_A, layer.initial_lora_A) and torch.equal(initial_B, layer.initial_lora_B)):
        s = layer.scaling
        weight = layer.base_weight(torch.float32)
        weight += s * (layer.initial_lora_B.float() @ layer.initial_lora_A.float())
        weight -= s * (initial_B.float() @ initial_A.float())
        layer.set_base_weight(weight)
        layer.initial_lora_A, layer.initial_lora_B = initial_A.clone(), initial_B.clone()
    layer.lora_A.weight.copy_(A[:r])
    layer.lora_B.weight.copy_(B[:, :r])


# --------------------------------------------------------------------------------------------
# adapter_config.json


def to_adapter_config(config: LoraConfig) -> dict[str, Any]:
    """The dict written as adapter_config.json: PEFT's keys, loadable by peft.PeftModel.

    PiSSA/OLoRA adapters are saved in the rank-2r form: r (and rank_pattern) doubled, lora_alpha
    (and alpha_pattern) scaled so that the scaling is unchanged (x2; x√2 with rsLoRA),
    init_lora_weights True."""
    d = dataclasses.asdict(config)
    if mutates_base(config.init_lora_weights):
        alpha_factor = 2**0.5 if config.use_rslora else 2
        d.update(r=2 * config.r, lora_alpha=config.lora_alpha * alpha_factor, init_lora_weights=True,
                 rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                 alpha_pattern={k: v * alpha_factor for k, v in config.alpha_pattern.items()})
    if isinstance(d["target_modules"], (list, tuple)):
        d["target_modules"] = sorted(d["target_modules"])
    d.update(peft_type="LORA", inference_mode=True, revision=None, layers_to_transform=None,
             layers_pattern=None, lora_bias=False)
    return dict(sorted(d.items()))


def from_adapter_config(d: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """Read a PEFT adapter_config.json dict. Refuses what would change the math and peftloop
    does not implement; ignores PEFT bookkeeping keys; warns on keys it has never heard of."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if d.get("peft_type") != "LORA":
        raise ConfigError(f"{source}: peft_type={d.get('peft_type')!r}; peftloop loads only 'LORA' adapters")
    for key, harmless in PEFT_KEYS_THAT_MUST_BE_DEFAULT.items():
        if key in d and d[key] not in harmless:
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported by peftloop "
                              f"(supported: {', '.join(map(repr, harmless))})")
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = set(d) - ours - set(PEFT_KEYS_THAT_MUST_BE_DEFAULT) - PEFT_BOOKKEEPING_KEYS
    unknown = {k for k in unknown if d[k] not in (None, False, {}, [], "")}  # unset options of newer PEFTs
    if unknown:
        warnings.warn(f"{source}: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
    kwargs = {k: v for k, v in d.items() if k in ours}
    for k in ("rank_pattern", "alpha_pattern"):
        if kwargs.get(k) is None:
            kwargs.pop(k, None)
    try:
        return LoraConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# Keys PEFT writes whose non-default values change the forward pass in ways peftloop does not
# implement: refusing them is better than loading an adapter that silently computes something else.
PEFT_KEYS_THAT_MUST_BE_DEFAULT = {
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None,),
}
PEFT_BOOKKEEPING_KEYS = {
    "peft_type", "inference_mode", "revision", "auto_mapping", "peft_version", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "qalora_group_size", "ensure_weight_tying",
    "runtime_config", "arrow_config", "use_bdlora", "lora_ga_config",
}
