"""The dispatch switch: which implementation runs, forcing the reference everywhere, and a
package that still imports and works on CPU tensors when Triton is not installed."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_utils import randn

import peftloop.kernels as K
from peftloop.kernels import backend, backend_for, get_backend, set_backend


def test_auto_runs_the_torch_path_on_cpu_tensors():
    assert get_backend() == "auto"
    assert backend_for(torch.zeros(1)) == "torch"


def test_backend_context_forces_and_restores():
    with backend("reference"):
        assert backend_for(torch.zeros(1)) == "reference"
        with backend("torch"):
            assert backend_for(torch.zeros(1)) == "torch"
        assert get_backend() == "reference"
    assert get_backend() == "auto"
    with pytest.raises(ValueError, match="expected one of"):
        set_backend("cuda")


def test_reference_backend_runs_exactly_the_references():
    x = randn(3, 5, 16, seed=1)
    w = randn(16, seed=2)
    gate, up = randn(4, 9, seed=3), randn(4, 9, seed=4)
    q, k = randn(1, 2, 5, 8, seed=5), randn(1, 1, 5, 8, seed=6)
    cos, sin = randn(1, 5, 8, seed=7), randn(1, 5, 8, seed=8)
    hidden, head, labels = randn(6, 16, seed=9), randn(11, 16, seed=10), torch.tensor([1, 2, -100, 4, 5, 10])
    with backend("reference"):
        assert torch.equal(K.rms_norm(x, w), K.rms_norm_reference(x, w))
        assert torch.equal(K.swiglu(gate, up), K.swiglu_reference(gate, up))
        for a, b in zip(K.apply_rope(q, k, cos, sin), K.apply_rope_reference(q, k, cos, sin)):
            assert torch.equal(a, b)
        assert torch.equal(K.linear_cross_entropy(hidden, head, labels),
                           K.linear_cross_entropy_reference(hidden, head, labels))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_environment_variable_selects_the_backend():
    out = _python("import peftloop.kernels as K; print(K.get_backend())", PEFTLOOP_KERNELS="reference")
    assert out.stdout.strip() == "reference", out.stderr
    out = _python("import peftloop.kernels", PEFTLOOP_KERNELS="fast")
    assert out.returncode != 0 and "PEFTLOOP_KERNELS='fast'" in out.stderr


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error():
    out = _python("""
        import torch, peftloop.kernels as K
        try:
            K.swiglu(torch.zeros(2, 3), torch.zeros(2, 3))
        except RuntimeError as e:
            print("refused:", e)
        """, PEFTLOOP_KERNELS="triton")
    assert "refused: PEFTLOOP_KERNELS=triton needs CUDA tensors" in out.stdout, out.stderr


def test_package_works_without_triton():
    """Triton is optional: with it unimportable, every op still runs its torch path on the CPU."""
    out = _python("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("no triton here")
        sys.meta_path.insert(0, NoTriton())
        import torch
        import peftloop.kernels as K
        assert not K.triton_available()
        x = torch.randn(3, 8, requires_grad=True)
        w = torch.ones(8, requires_grad=True)
        K.rms_norm(x, w).sum().backward()
        K.swiglu(x, x).sum().backward()
        q = torch.randn(1, 2, 3, 8, requires_grad=True)
        K.apply_rope(q, q, torch.ones(1, 3, 8), torch.zeros(1, 3, 8))[0].sum().backward()
        K.linear_cross_entropy(x, torch.randn(5, 8), torch.tensor([0, 4, -100])).backward()
        A, B = torch.randn(2, 8, requires_grad=True), torch.randn(4, 2, requires_grad=True)
        K.lora_linear(x, torch.randn(4, 8), None, A, B, 2.0, dropout_p=0.1).sum().backward()
        print("ok", "triton" in sys.modules)
        """)
    assert out.stdout.strip() == "ok False", out.stderr[-3000:]
