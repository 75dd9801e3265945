"""What every Triton kernel here shares: the import guard, the ``dot`` helper, autotuning.

Triton is optional. Without it (macOS, Windows, a minimal install) this module still imports:
``triton.jit`` becomes the identity, so the kernel definitions parse, and the dispatcher
(``_dispatch.backend_for``) never routes a call to them.

Interpreter rules (``TRITON_INTERPRET=1``, the CPU test mode; see docs/kernels.md):

- bf16 is held as raw uint16 by the interpreter: loads, stores and ``.to()`` are right, but
  arithmetic on bf16 values is not. Every kernel loads, converts to fp32, computes, and
  converts back only to store.
- ``tl.dot`` on bf16 operands multiplies bit patterns under the interpreter
  (triton-lang/triton#11584), so every product goes through ``dot`` below, which upcasts
  the operands under the interpreter. On a GPU bf16 operands go to the tensor cores as they are.
- The interpreter's fp32 -> bf16 conversion truncates (and with ``fp_downcast_rounding="rtne"``
  it drops the carry into the exponent), where a GPU rounds to nearest even. Every rounding
  to the storage dtype goes through ``cast`` below, which rounds bf16 by integer arithmetic
  under the interpreter, so interpreted results round exactly as the GPU's (and torch's) do.
- ``triton.autotune`` with more than one config needs a GPU to time them; ``autotune`` below
  gives the interpreter a single small config instead.
- ``tl.extra.libdevice`` does not exist in the interpreter: only ``tl.exp``, ``tl.log``,
  ``tl.sigmoid``, ``tl.rsqrt``... are used.

Every buffer a kernel (or a chunk loop) must write in full is allocated by ``new_output``, not
``torch.empty``. With ``PEFTLOOP_KERNEL_DEBUG=1`` (the kernel tests set it) it is filled with a
poison value first, so an element that no program writes fails the comparison with the
reference instead of passing on whatever the memory held.
"""

from __future__ import annotations

import functools
import os
import types

import torch

from ._dispatch import interpreting, triton_available

HAS_TRITON = triton_available()

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # a stand-in that lets the kernel definitions below and in each op file parse
    triton = types.SimpleNamespace(
        jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f),
        Config=lambda *a, **kw: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, (int(n) - 1).bit_length()),
    )
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

# Read by the jit helpers below as a compile-time constant (False on a GPU, so the
# interpreter-only branches vanish from the compiled kernels).
INTERPRETER = tl.constexpr(interpreting())


# Usable shared memory per block (the opt-in maximum of the CUDA programming guide, table
# "Technical Specifications per Compute Capability"): sm_80 (A100) 163 KiB, sm_86/sm_89 99 KiB,
# sm_90 (H100/H200) 227 KiB. Used when no device can be asked (the AOT compile check).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    Under the interpreter both operands are upcast first (it multiplies bf16 bit patterns).
    PRECISION applies to fp32 operands on a GPU: "ieee" (exact fp32, what torch does by
    default) or "tf32" (what torch does when ``allow_tf32`` is on).
    """
    if INTERPRETER:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding fp32 -> bf16 to nearest even under the interpreter too."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


DEBUG_ENV = "PEFTLOOP_KERNEL_DEBUG"


def debug_buffers() -> bool:
    """True when ``new_output`` poisons the buffers it returns (``PEFTLOOP_KERNEL_DEBUG=1``,
    read at every call, so a test can switch it on and off)."""
    return os.environ.get(DEBUG_ENV, "0") == "1"


def poison_value(dtype: torch.dtype) -> float | int | bool:
    """What an unwritten element of a ``dtype`` buffer holds in debug mode: NaN for floats; for
    integers the dtype's largest value (255 for the uint8 0/1 dropout masks: not a valid
    mask byte). A bool buffer has no invalid value (True is used); none is allocated here."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def new_output(shape, dtype: torch.dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.empty(shape, dtype, device)``, or ``torch.empty_like(like, dtype=dtype)`` (keeping
    ``like``'s layout, shape and device), for a buffer the caller
    writes in full: outputs and the intermediates a second kernel reads. Poisoned in debug mode."""
    if like is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        out = torch.empty_like(like, dtype=dtype)
        assert out.shape == torch.Size(shape), f"new_output: {tuple(shape)} is not like's {tuple(out.shape)}"
    if debug_buffers():
        out.fill_(poison_value(dtype))
    return out


def dot_options(device: torch.device) -> dict:
    """The ``PRECISION`` constexpr of ``dot`` for a launch on ``device``."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return {"PRECISION": "tf32" if tf32 else "ieee"}


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one block may use on this CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", None)  # absent on ROCm builds
    return limit or SHARED_MEMORY_LIMIT.get(props.major * 10 + props.minor, 48 * 1024)


def autotune(configs, key, interpreter_config, shared_bytes=None):
    """``triton.autotune`` over ``configs`` on a GPU, and over ``[interpreter_config]`` under
    the interpreter (one config: there is nothing to time, and a small tile exercises the
    ragged edges of the small test shapes).

    ``shared_bytes(config, named_args)`` is an upper bound of a config's shared memory for
    these arguments; configs over the device's limit are dropped before timing. The AOT
    compile check (``_aot.py``) asserts that every config the bound keeps compiles within
    the limit of sm_80 and sm_90, so the bound is tested, not trusted.
    """
    if not HAS_TRITON:
        return lambda fn: fn
    if interpreting():
        return triton.autotune(configs=[interpreter_config], key=key)
    prune = None
    if shared_bytes is not None:

        def early_config_prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}  # positional arguments and constexpr keywords
            tensor = next(v for v in args.values() if isinstance(v, torch.Tensor))
            limit = shared_memory_limit(tensor.device.index or 0)
            return prune_configs(configs, args, shared_bytes, limit)

        prune = {"early_config_prune": early_config_prune}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune)


def prune_configs(configs, args, shared_bytes, limit):
    """The configs whose shared-memory bound fits ``limit`` (the smallest one if none does)."""
    kept = [c for c in configs if shared_bytes(c, args) <= limit]
    return kept or [min(configs, key=lambda c: shared_bytes(c, args))]
