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


# Triton is optional (Linux only). Imported once, here, when the package is imported: so
# TRITON_INTERPRET must be set before ``import peftloop.kernels`` to take effect.
try:
    import triton
except ImportError:
    triton = None


def triton_available() -> bool:
    """True when Triton imports (it does on Linux; it only runs on a GPU or under the interpreter)."""
    return triton is not None


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


# ---------------------------------------------------------------------------------------
# bf16/fp16 matmuls on CPUs without the hardware for them.
#
# A CPU without AVX512-BF16 or AMX has no bf16/fp16 dot-product instruction: oneDNN then
# converts each tile to fp32 inside the GEMM, at 8x (x·Wᵀ) to 80x (x·W) the cost of the fp32
# GEMM of the same shape (measured on an AVX2 EPYC). The fast torch path therefore multiplies
# such tensors in fp32 and rounds the result once to the low precision. That is the same
# arithmetic the hardware does: a product of two bf16 (or fp16) values is exact in fp32, and
# bf16 GEMMs accumulate in fp32; only the order of the sums differs.
# ---------------------------------------------------------------------------------------

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.cache
def native_low_precision_cpu() -> bool:
    """True when this CPU multiplies bf16/fp16 in hardware (AVX512-BF16 or AMX).
    ``PEFTLOOP_CPU_LOW_PRECISION=native|fp32`` overrides the detection."""
    forced = os.environ.get("PEFTLOOP_CPU_LOW_PRECISION", "auto")
    if forced not in ("auto", "native", "fp32"):
        raise ValueError(f"PEFTLOOP_CPU_LOW_PRECISION={forced!r}: expected auto, native or fp32")
    if forced != "auto":
        return forced == "native"
    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)


def matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the torch path multiplies ``tensor`` in: its own, or fp32 for a bf16/fp16 CPU
    tensor on a CPU that would emulate the low-precision GEMM (see above)."""
    if tensor.dtype in LOW_PRECISION and tensor.device.type == "cpu" and not native_low_precision_cpu():
        return torch.float32
    return tensor.dtype
