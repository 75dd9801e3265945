"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the
top of the root conftest, when no GPU is present: the kernel tests then run the Triton
kernels in the CPU interpreter. It changes nothing else: on CPU tensors the library's
default dispatch never calls Triton.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def force_cpu_low_precision(monkeypatch):
    """``force_cpu_low_precision("native" | "fp32")``: run the CPU's bf16/fp16 matmuls natively, or
    multiplied in fp32 and rounded once, whatever this host has (PEFTLOOP_CPU_LOW_PRECISION).

    Hosts differ (AVX2-only, AVX-512-BF16): a test that names a path forces it, so every host runs
    both paths and no outcome depends on the machine the suite happens to run on."""
    from peftloop.kernels import native_low_precision_cpu

    def force(mode: str) -> None:
        monkeypatch.setenv("PEFTLOOP_CPU_LOW_PRECISION", mode)
        native_low_precision_cpu.cache_clear()

    yield force
    monkeypatch.undo()
    native_low_precision_cpu.cache_clear()


@pytest.fixture(params=["native", "fp32"])
def cpu_low_precision(request, force_cpu_low_precision):
    """Parametrises a test over both CPU low-precision paths (see force_cpu_low_precision)."""
    force_cpu_low_precision(request.param)
    return request.param
