"""Files that are never half-written, and readers whose every failure names the file.

``atomic_directory`` builds a folder under a temporary name and renames it into place, so a
crash leaves either the old folder or the new one; ``recover_interrupted_writes`` tidies up
after a crash inside it. A leaf: the model loader and the checkpoint code both use it, and it
imports no other peftloop module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint or adapter on disk is missing, incomplete or corrupt; the message names the file."""


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_writes(parent: str | Path) -> None:
    """Clean up after a crash inside ``atomic_directory``: temporary folders are deleted, and a
    folder caught between "old moved aside" and "new moved in" gets its old version back."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        m = re.match(r"^\.(tmp|old)-(.+)-[0-9a-f]{8}$", path.name)
        if not m or not path.is_dir():
            continue
        original = parent / m.group(2)
        if m.group(1) == "old" and not original.exists():
            os.rename(path, original)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


MAX_JSON_BYTES = 64 << 20  # configs and states are kilobytes; a bigger "config" is not one


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a JSON config")
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU, turning every failure into an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as OSError like every
    other write."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{path}: {e}") from None
