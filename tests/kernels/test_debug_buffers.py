"""The kernel tests' debug mode: the buffers kernels write are poisoned, and every launcher
allocates them through the one helper that does it."""

import ast
import pathlib

import pytest
import torch
from kernel_utils import DEVICE

from peftloop.kernels import _triton_utils
from peftloop.kernels._triton_utils import DEBUG_ENV, debug_buffers, new_output

KERNELS = pathlib.Path(_triton_utils.__file__).parent


def test_the_kernel_tests_poison_new_buffers():
    """The autouse fixture of tests/kernels/conftest.py is active here."""
    assert debug_buffers()
    assert new_output((3, 5), torch.float32, DEVICE).isnan().all()
    assert new_output((4,), torch.bfloat16, DEVICE).isnan().all()
    assert (new_output((7,), torch.uint8, DEVICE) == 255).all()  # not a 0/1 mask byte
    assert (new_output((2,), torch.int32, DEVICE) == 2**31 - 1).all()
    t = torch.empty(4, 6, device=DEVICE).t()  # a transposed layout is kept
    out = new_output(t.shape, torch.float32, DEVICE, like=t)
    assert out.stride() == t.stride() and out.isnan().all()


def test_outside_debug_mode_nothing_is_filled(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV)
    assert not debug_buffers()
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert not debug_buffers()


# Allocations that are not buffers a kernel writes: (file, source text).
NOT_KERNEL_OUTPUTS = {
    # stands for an argument's dtype and alignment, never launched
    ("_aot.py", "torch.empty(64, dtype=dtype)"),
    ("_triton_utils.py", "torch.empty(shape, dtype=dtype, device=device)"),  # new_output itself
    ("_triton_utils.py", "torch.empty_like(like, dtype=dtype)"),  # new_output itself
    # a CUDA dropout mask, every element written by bernoulli_
    ("lora_linear.py", "torch.empty(x.shape, dtype=torch.bool, device=x.device)"),
}


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_every_uninitialised_buffer_comes_from_new_output(path):
    """No ``torch.empty``/``empty_like``/``new_empty``/``empty_strided`` in the kernels package
    but new_output's own and the listed exceptions: a launcher that allocates its output
    another way would escape the poisoning."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("empty", "empty_like", "new_empty", "empty_strided"):
            text = ast.get_source_segment(source, node)
            if (path.name, text) not in NOT_KERNEL_OUTPUTS:
                found.append(f"line {node.lineno}: {text}")
    assert not found, f"{path.name} allocates outside new_output: {found}"
