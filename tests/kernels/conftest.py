"""The kernel tests run in the kernels' debug mode: every buffer a kernel must write in full
(``peftloop.kernels._triton_utils.new_output``) starts as NaN (integers: their largest value),
so an element no program writes fails the comparison with the reference instead of passing
on whatever the memory held."""

import pytest

from peftloop.kernels._triton_utils import DEBUG_ENV


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
