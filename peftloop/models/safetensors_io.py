"""Reading safetensors files tensor by tensor, straight into the target dtype.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {"dtype",
"shape", "data_offsets": [begin, end]}} and the raw little-endian data. Reading it with plain
file reads (not a memory map) keeps the peak at the loaded weights plus one small buffer: a
memory-mapped fp32 file would stay resident, whole, while it is converted to bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CheckpointFormatError(ValueError):
    """A model folder is missing files or has tensors of the wrong name or shape."""


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}
CONVERSION_CHUNK_BYTES = 16 << 20  # a tensor of another dtype is converted through a buffer this size


def conversion_buffer() -> torch.Tensor:
    """The scratch buffer ``read_tensor`` converts through; one per load, reused for every tensor."""
    return torch.empty(CONVERSION_CHUNK_BYTES, dtype=torch.uint8)


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({tensor name: entry}, byte offset of the data) of a safetensors file, every entry checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 2 <= length <= size - 8:
            raise CheckpointFormatError(f"{path}: not a valid safetensors file (header length {length}, "
                                        f"file size {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: not a valid safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: not a valid safetensors file (the header is not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + length
    for key, entry in header.items():
        _check_entry(path, key, entry, size - data_start)
    return header, data_start


def _check_entry(path: Path, key: str, entry, data_size: int) -> None:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointFormatError(f"{path}: tensor {key!r} has a malformed header entry: "
                                    f"{entry!r}") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"{path}: tensor {key!r} has dtype {dtype}; peftloop loads "
                                    f"floating-point weights ({', '.join(SAFETENSORS_DTYPES)}), "
                                    "not quantized ones")
    nbytes = SAFETENSORS_DTYPES[dtype].itemsize
    for n in shape:
        nbytes *= n
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise CheckpointFormatError(f"{path}: tensor {key!r} ({dtype} {tuple(shape)}) has data offsets "
                                    f"[{begin}, {end}] that do not fit it or the file (truncated download?)")


def read_tensor(f, offset: int, entry: dict, dtype: torch.dtype,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of an open safetensors file, allocated once in ``dtype``. Another file dtype is
    converted chunk by chunk through ``buffer`` (bytes; one buffer serves every tensor, so no
    freed chunks pile up in the allocator), so no full-size copy in the file's dtype ever exists."""
    file_dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    out = torch.empty(entry["shape"], dtype=dtype)
    flat = out.view(-1)
    f.seek(offset + entry["data_offsets"][0])
    if file_dtype == dtype:
        _read_into(f, flat)
        return out
    if buffer is None:
        buffer = conversion_buffer()
    step = max(1, buffer.numel() // file_dtype.itemsize)
    for begin in range(0, flat.numel(), step):
        n = min(step, flat.numel() - begin)
        chunk = buffer[:n * file_dtype.itemsize].view(file_dtype)
        _read_into(f, chunk)
        flat[begin:begin + n].copy_(chunk)  # the same rounding as .to(dtype)
    return out


def _read_into(f, tensor: torch.Tensor) -> None:
    view = memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    while view.nbytes:
        n = f.readinto(view)
        if not n:
            raise CheckpointFormatError(f"{f.name}: ends before the data of a tensor (truncated file?)")
        view = view[n:]
