"""Files on disk: PEFT-format adapters and the training state for exact resume.

Adapter folder (PEFT's format, loadable by ``peft.PeftModel.from_pretrained``)::

    adapter_config.json          adapter_format.to_adapter_config()
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight (DoRA: also
                                 .lora_magnitude_vector), metadata {"format": "pt"}

An adapter trained from a PiSSA/OLoRA init is written as the plain LoRA of rank 2r that gives
the same model on the *original* base weights (``adapter_format.adapter_state_dict``), so it loads
onto the checkpoint the user started from, in PEFT or here, with no residual model to ship.

A training checkpoint ``checkpoint-N/`` is an adapter folder plus::

    optimizer.safetensors        every optimizer state tensor, keyed "<parameter name>/<state name>"
    rng_state.safetensors        per rank: torch CPU (and CUDA) generator states, numpy's MT19937 key
    trainer_state.json           step, epoch, data position, loss sums, scaler, python RNG, param groups
    manifest.json                size and sha256 of every file above, written last

Nothing goes through pickle. Every folder is written under a temporary name in the same
parent and renamed into place, so a crash leaves either the old folder or the new one, never
half of one; a folder without a valid manifest is not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from peftloop.adapter_format import (
    adapter_parameters,
    adapter_state_dict,
    from_adapter_config,
    load_adapter_state_dict,
    to_adapter_config,
)
from peftloop.config import ConfigError, LoraConfig
from peftloop.files import (
    CheckpointError,
    atomic_directory,
    read_json,
    read_safetensors,
    save_tensors,
    write_json,
)
from peftloop.inject import inject_lora, lora_layers, unload

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------------------------
# Adapters (PEFT's format)


def save_adapter(model: nn.Module, directory: str | Path, config: LoraConfig | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``directory``.

    ``base_model_name_or_path``, when the config has none, is what ``load_pretrained`` loaded
    (``model.name_or_path``: the hub id, or the absolute folder); a relative folder is made
    absolute, so the adapter finds its base from any working directory."""
    config = config or getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no LoRA config (inject_lora first, or pass config=)")
    base = _recorded_base(config.base_model_name_or_path, getattr(model, "name_or_path", None))
    if base != config.base_model_name_or_path:
        config = dataclasses.replace(config, base_model_name_or_path=base)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    if not tensors:
        raise ValueError("save_adapter: the model has no adapter tensors")
    return write_adapter(directory, tensors, config)


def _recorded_base(given: str | None, loaded: str | None) -> str | None:
    if given is None:
        return loaded
    path = Path(given).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.is_dir() else given


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: LoraConfig) -> Path:
    """Write already-gathered adapter tensors (PEFT keys, CPU) and their config, atomically."""
    with atomic_directory(directory) as tmp:
        _write_adapter_files(tmp, tensors, config)
    return Path(directory)


def _write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], config: LoraConfig) -> None:
    save_tensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, to_adapter_config(config))


def read_adapter_config(directory: str | Path) -> LoraConfig:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        return from_adapter_config(read_json(path), source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool = False,
                 strict: bool = True) -> nn.Module:
    """Load a PEFT-format adapter (ours or PEFT's) into ``model``.

    A model without adapters gets them injected from the adapter's config first. Every tensor
    is checked (key and shape) before anything is copied. ``is_trainable=False`` leaves the
    adapter frozen, as PEFT does for inference.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_safetensors(directory / ADAPTER_WEIGHTS)
    injected_here = False
    if not lora_layers(model):
        inject_lora(model, config)
        injected_here = True
    try:
        load_adapter_state_dict(model, tensors, strict=strict, source=str(directory / ADAPTER_WEIGHTS))
    except Exception:
        if injected_here:  # leave the model as it was given to us
            unload(model)
        raise
    for p in adapter_parameters(model):
        p.requires_grad_(is_trainable)
    return model


# --------------------------------------------------------------------------------------------
# Training checkpoints


def save_checkpoint(path: str | Path, *, adapter: dict[str, torch.Tensor], lora_config: LoraConfig,
                    optimizer_state: dict[str, Any], rng_states: list[tuple[dict, dict]],
                    trainer_state: dict[str, Any]) -> Path:
    """Write a complete ``checkpoint-N`` folder atomically.

    ``adapter``: full CPU tensors under PEFT's keys. ``optimizer_state``: a full optimizer state
    dict keyed by parameter name (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
    with ``full_state_dict=True``), so it loads under any world size. ``rng_states``: one
    ``rng_state()`` per rank.
    """
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    rng_tensors, rng_meta = {}, []
    for rank, (tensors, meta) in enumerate(rng_states):
        rng_tensors.update({f"rank{rank}/{k}": v for k, v in tensors.items()})
        rng_meta.append(meta)
    trainer_state = {**trainer_state, "optimizer": opt_meta, "rng": rng_meta}
    with atomic_directory(path) as tmp:
        _write_adapter_files(tmp, adapter, lora_config)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        save_tensors(rng_tensors, tmp / "rng_state.safetensors")
        write_json(tmp / "trainer_state.json", trainer_state)
        _write_manifest(tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read what ``save_checkpoint`` wrote, after verifying the manifest. Returns a dict with
    ``adapter``, ``optimizer_state``, ``rng_states`` (one per saved rank) and ``trainer_state``."""
    path = Path(path)
    verify_manifest(path)
    trainer_state = read_json(path / "trainer_state.json")
    try:
        opt_meta, rng_meta = trainer_state.pop("optimizer"), trainer_state.pop("rng")
        optimizer_state = _unflatten_optimizer(read_safetensors(path / "optimizer.safetensors"), opt_meta)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/trainer_state.json: malformed optimizer or RNG record "
                              f"({e!r})") from None
    rng_tensors = read_safetensors(path / "rng_state.safetensors")
    rng_states = []
    for rank, meta in enumerate(rng_meta):
        prefix = f"rank{rank}/"
        rng_states.append(({k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)},
                           meta))
    return {"adapter": read_safetensors(path / ADAPTER_WEIGHTS), "optimizer_state": optimizer_state,
            "rng_states": rng_states, "trainer_state": trainer_state}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to safetensors ("<param name>/<state name>"), everything else to JSON."""
    tensors, scalars = {}, {}
    for param, per_param in sd.get("state", {}).items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{param}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param}/{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in {**tensors, **meta["scalars"]}.items():
        param, name = key.rsplit("/", 1)
        state.setdefault(param, {})[name] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: tensors for safetensors, the rest JSON-able."""
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "numpy_key": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------
# Manifests, finding and rotating checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(directory / MANIFEST, {"files": files})


def verify_manifest(directory: str | Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present with its size
    and checksum."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{directory / MANIFEST}: no 'files' table")
    for name, expected in files.items():
        # a manifest names files *in* its folder: never a path that could point elsewhere
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{directory / MANIFEST}: refusing file name {name!r} "
                                  "(not a plain file name)")
        if not isinstance(expected, dict) or not {"size", "sha256"} <= set(expected):
            raise CheckpointError(f"{directory / MANIFEST}: entry {name!r} has no size and sha256")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected['size']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum does not match the manifest (corrupted?)")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders in ``output_dir`` that have a manifest, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest (a damaged newer one is skipped)."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_manifest(path)
            return path
        except CheckpointError:
            continue
    return None


def rotate_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called only after a new one is complete)."""
    if keep <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
