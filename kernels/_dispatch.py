"""Which implementation an op runs: Triton, the fast torch path, or the plain-torch reference.

Every op in this package has three implementations with one meaning:

- ``reference``: plain torch, written for clarity; the definition of correct.
- ``torch``: the fast CPU path (hand-written autograd where it saves work, no Triton).
- ``triton``: the fused kernels. Real speed only on a GPU; on a CPU only under
  ``TRITON_INTERPRET=1``, which the tests use to check the kernels without a GPU.

``backend_for(tensor)`` picks one. The default (``auto``) is Triton for CUDA tensors when
Triton imports, and the torch path otherwise. ``PEFTLOOP_KERNELS=reference|torch|triton``
in the environment, or ``set_backend(...)`` / ``with backend(...)`` in code, forces one
everywhere, so a test can run the same model step with the kernels and with the references.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "reference", "torch", "triton")
_forced = os.environ.get("PEFTLOOP_KERNELS", "auto")
if _forced not in BACKENDS:
    raise ValueError(f"PEFTLOOP_KERNELS={_forced!r}: expected one of {', '.join(BACKENDS)}")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it does on Linux; it only runs on a GPU or under the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests only, never for speed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Force one implementation for every op ('auto' restores the default choice)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _forced = name


def get_backend() -> str:
    return _forced


@contextlib.contextmanager
def backend(name: str):
    """``with backend("reference"):`` runs every op on its plain-torch reference inside the block."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this tensor's device, or None when it is off.

    The ops cast their inputs to it themselves and run their Function with autocast
    disabled, so the kernels, the torch path and the reference all see the same dtypes as
    the plain torch op would under autocast.
    """
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def backend_for(tensor: torch.Tensor) -> str:
    """The implementation an op should run for this input: 'triton', 'torch' or 'reference'."""
    if _forced == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if _forced == "triton" and not (tensor.is_cuda or interpreting()):
        raise RuntimeError(
            "PEFTLOOP_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported"
        )
    return _forced
