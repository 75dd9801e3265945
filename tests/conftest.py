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
