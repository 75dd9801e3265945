"""peftloop.kernels: fused ops, each beside its plain-torch reference.

One file per op. Each file holds ``<op>_reference`` (plain torch, the definition of
correct), the Triton kernel(s) with their launchers, an ``autograd.Function`` whose
docstring derives the backward pass, and one public function that dispatches
(see ``_dispatch``): Triton on CUDA tensors, a fast torch path on the CPU, and the
reference everywhere under ``PEFTLOOP_KERNELS=reference`` / ``with backend("reference")``.

The model and the LoRA layers call the public functions, so a GPU run uses the kernels
with no change to user code. See docs/kernels.md for the design of each fusion.

Note: the public functions share their names with their modules (``lora_linear``,
``rms_norm``, ``swiglu``...), so ``peftloop.kernels.rms_norm`` is the function; import a
module's other names with ``from peftloop.kernels.rms_norm import rms_norm_reference``.
"""

from ._dispatch import (
    backend,
    backend_for,
    get_backend,
    matmul_dtype,
    native_low_precision_cpu,
    set_backend,
    triton_available,
)
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .lora_linear import lora_dropout_mask, lora_linear, lora_linear_reference
from .multi_lora import multi_lora_linear, multi_lora_linear_reference
from .nf4 import (
    NF4State,
    nf4_dequantize,
    nf4_dequantize_reference,
    nf4_lora_linear,
    nf4_lora_linear_reference,
)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "NF4State",
    "apply_rope",
    "apply_rope_reference",
    "backend",
    "backend_for",
    "get_backend",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_dropout_mask",
    "lora_linear",
    "lora_linear_reference",
    "matmul_dtype",
    "multi_lora_linear",
    "multi_lora_linear_reference",
    "native_low_precision_cpu",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_lora_linear",
    "nf4_lora_linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_backend",
    "swiglu",
    "swiglu_reference",
    "triton_available",
]
