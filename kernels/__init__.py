"""peftloop.kernels: fused ops, each beside its plain-torch reference.

One file per op. Each file holds ``<op>_reference`` (plain torch, the definition of
correct), the Triton kernel(s) with their launchers, an ``autograd.Function`` whose
docstring derives the backward pass, and one public function that dispatches
(see ``_dispatch``): Triton on CUDA tensors, a fast torch path on the CPU.
"""

from ._dispatch import backend, backend_for, get_backend, set_backend, triton_available
from .lora_linear import lora_linear, lora_linear_reference

__all__ = [
    "backend",
    "backend_for",
    "get_backend",
    "set_backend",
    "triton_available",
    "lora_linear",
    "lora_linear_reference",
]
