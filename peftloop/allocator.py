"""Keep glibc's heap from holding on to memory that training has freed.

A training step allocates and frees the same few hundred activation-sized tensors (0.1-10 MB on
SmolLM2-135M's shape) every micro-batch. glibc serves blocks of this size from its heap, not from
their own mappings: its mmap threshold starts at 128 KiB but rises to the size of every mapped
block that is freed (up to 32 MiB on 64-bit), so after the first micro-batch nearly every tensor
comes from the heap. Freed heap blocks are kept for reuse and are returned to the system only when
they sit at the very top of the heap; the rest stays resident. On the 135M shape that was about
1.1 GB of a 3.2 GB peak (docs/memory.md).

``limit_heap_retention()`` sets the threshold once, through ``mallopt``: blocks at or above it get
their own mapping, which goes back to the system the moment the tensor is freed. It fixes the
threshold (no more rising), so what is retained stays below it. Its price is a page fault per new
page of every large tensor (the kernel hands out zeroed pages), measured with
``python -m benchmarks.memory`` (docs/memory.md has the figures).

``release_free_memory()`` is ``malloc_trim(0)``: it returns the free pages inside the heap too
(not only its top); it walks the whole heap, so call it once per optimizer step, not per tensor.

Both are glibc's (Linux). Elsewhere (macOS, Windows, musl) they do nothing and say why: those
allocators, and CUDA's caching allocator for GPU tensors, have their own policies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Tensors at or above this size get their own mapping (see the module docstring). Below every
# activation of SmolLM2-135M's shape at 1,024 tokens (>= 1.1 MiB in bf16), above the per-row and
# rank-r tensors, which stay on the heap. Measured (only this value so far) by benchmarks/memory.py:
# docs/memory.md has the figures.
DEFAULT_MMAP_THRESHOLD = 1 << 20


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the one these settings exist in), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def why_unavailable() -> str | None:
    """Why the allocator cannot be tuned in this process (None when it can)."""
    if glibc() is None:
        return (f"the C library is not glibc ({platform.system()}, {platform.libc_ver()[0] or 'unknown'}): "
                "its allocator has its own release policy, nothing to set")
    return None


_threshold_set: int | None = None  # what this process set: a later call without a size keeps it


def limit_heap_retention(mmap_threshold: int | None = None) -> bool:
    """Give every allocation of ``mmap_threshold`` bytes or more its own mapping, returned to the
    system when freed, and trim the heap's top past the same size. Process-wide, idempotent.

    ``None`` sets ``DEFAULT_MMAP_THRESHOLD`` unless this process has already set a threshold, which it
    keeps. Not applied by ``train()``: in bf16 it costs +19-47% step time (docs/memory.md).
    Returns True when set, False where the C library is not glibc (a no-op: ``why_unavailable``)."""
    global _threshold_set
    if mmap_threshold is None:
        mmap_threshold = _threshold_set or DEFAULT_MMAP_THRESHOLD
    if mmap_threshold <= 0:
        raise ValueError(f"limit_heap_retention: mmap_threshold={mmap_threshold} must be > 0")
    libc = glibc()
    if libc is None:
        return False
    for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        if libc.mallopt(parameter, mmap_threshold) != 1:  # mallopt returns 1 on success
            raise OSError(f"mallopt({parameter}, {mmap_threshold}) failed")
    _threshold_set = mmap_threshold
    return True


def release_free_memory() -> bool:
    """``malloc_trim(0)``: give the free pages of every heap back to the system. True when glibc
    released something, False when it did not or the C library is not glibc."""
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
