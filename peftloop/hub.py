"""Where a model's files are: a local folder, or a Hugging Face Hub id resolved through the hub cache.

    folder = resolve_model("HuggingFaceTB/SmolLM2-135M")          # downloads once, then the cache
    folder = resolve_model("runs/merged")                         # a local folder is used as it is

A hub id goes through ``huggingface_hub.snapshot_download``: its cache (``HF_HUB_CACHE`` /
``HF_HOME``, or ``cache_dir``), ``revision`` (a branch, tag or commit) and offline mode
(``HF_HUB_OFFLINE=1``: the cache only, no network). Only the files peftloop reads are fetched:
the config and tokenizer files first, then exactly the safetensors files the checkpoint uses
(``model.safetensors``, or the shards its index names), never ``pytorch_model.bin``, a
``consolidated.safetensors`` duplicate or an ``original/`` folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

METADATA_FILES = [
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor a hub id that can be resolved; the message says what was tried."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) read now, not when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE") or huggingface_hub.constants.HF_HUB_OFFLINE


def resolve_model(name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                  weights: bool = True) -> Path:
    """The local folder holding a model's files. ``weights=False`` fetches only the config and
    tokenizer files (enough for a tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision:
            raise ModelNotFoundError(f"{name_or_path}: revision={revision!r} applies to hub ids, "
                                     "but this is a local folder")
        return path
    repo_id = str(name_or_path)
    if not _looks_like_repo_id(repo_id):
        raise ModelNotFoundError(f"{name_or_path}: no such folder (and not a Hugging Face Hub id)")
    folder = _snapshot(repo_id, revision, cache_dir, METADATA_FILES)
    if weights:
        folder = _snapshot(repo_id, revision, cache_dir, _weight_files(folder))
    return folder


def _looks_like_repo_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files the checkpoint in ``folder`` uses (from its index when sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelNotFoundError(f"{index}: not a safetensors index ({e})") from None
    return ["model.safetensors"]


def _snapshot(repo_id: str, revision: str | None, cache_dir, patterns: list[str]) -> Path:
    offline = hub_offline()
    where = f"{repo_id} (revision {revision or 'main'})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=patterns, local_files_only=offline))
    except GatedRepoError:
        raise ModelNotFoundError(f"{where}: a gated repository; accept its terms on huggingface.co "
                                 "and log in (`hf auth login`) first") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such local folder, and no such repository on the Hub "
                                 "(or it is private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{where}: the repository has no such revision") from None
    except LocalEntryNotFoundError as e:
        cache = cache_dir or os.environ.get("HF_HUB_CACHE") or "the default Hugging Face cache"
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelNotFoundError(f"{where}: not in {cache} and {reason} ({e})") from None
