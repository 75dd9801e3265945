"""bf16 on a CPU without bf16 hardware: the torch path multiplies the bf16 values in fp32
(``_dispatch.matmul_dtype``). The results must be the native bf16 path's results, up to the
order of the fp32 sums, and no less accurate than it against the fp32 reference; the outputs
and gradients keep the dtypes the native path gives."""

import pytest
import torch
from kernel_utils import randn
from tolerances import assert_close, assert_no_less_accurate

import peftloop.kernels._dispatch as dispatch
from peftloop.kernels import linear_cross_entropy, lora_linear
from peftloop.kernels.linear_cross_entropy import linear_cross_entropy_reference
from peftloop.kernels.lora_linear import lora_linear_reference


@pytest.fixture
def force(force_cpu_low_precision):
    """force("native") / force("fp32"): the CPU's bf16 matmuls run natively, or in fp32, through the
    PEFTLOOP_CPU_LOW_PRECISION switch the library reads, whatever this host has."""
    return force_cpu_low_precision


def test_matmul_dtype_follows_the_cpu(force):
    x = torch.zeros(2, dtype=torch.bfloat16)
    force("fp32")
    assert dispatch.matmul_dtype(x) == torch.float32
    assert dispatch.matmul_dtype(x.float()) == torch.float32
    assert dispatch.matmul_dtype(x.half()) == torch.float32
    force("native")
    assert dispatch.matmul_dtype(x) == torch.bfloat16


def test_the_environment_switch_is_checked(monkeypatch):
    dispatch.native_low_precision_cpu.cache_clear()
    try:
        monkeypatch.setenv("PEFTLOOP_CPU_LOW_PRECISION", "fp32")
        assert dispatch.native_low_precision_cpu() is False
        dispatch.native_low_precision_cpu.cache_clear()
        monkeypatch.setenv("PEFTLOOP_CPU_LOW_PRECISION", "sometimes")
        with pytest.raises(ValueError, match="PEFTLOOP_CPU_LOW_PRECISION='sometimes'"):
            dispatch.native_low_precision_cpu()
    finally:
        monkeypatch.delenv("PEFTLOOP_CPU_LOW_PRECISION")
        dispatch.native_low_precision_cpu.cache_clear()


def _lora_grads(x, w, b, A, B, mask):
    x, A, B = (t.detach().requires_grad_() for t in (x, A, B))
    y = lora_linear(x, w, b, A, B, 2.0, dropout_p=0.25 if mask is not None else 0.0, dropout_mask=mask)
    g = torch.ones_like(y).mul_(torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype))
    y.backward(g)
    return y, x.grad, A.grad, B.grad


@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_in_fp32_equals_native_bf16(force, dropout):
    x, w, b = randn(3, 17, 48, seed=0), randn(40, 48, seed=1, scale=0.2), randn(40, seed=2)
    A, B = randn(8, 48, seed=3, scale=0.2), randn(40, 8, seed=4, scale=0.2)
    mask = torch.rand(3, 17, 48, generator=torch.Generator().manual_seed(5)) > 0.25 if dropout else None
    low = [t.bfloat16() for t in (x, w, b, A, B)]
    force("native")
    native = _lora_grads(*low, mask)
    force("fp32")
    upcast = _lora_grads(*low, mask)
    exact = _lora_grads(*(t.bfloat16().float() for t in (x, w, b, A, B)), mask)
    for name, a, n, e in zip(("y", "dx", "dA", "dB"), upcast, native, exact):
        assert a.dtype == n.dtype == torch.bfloat16, name
        assert_close(a, n, torch.bfloat16, name)
        assert_no_less_accurate(a, n, e, name)
    ref = lora_linear_reference(*(t.bfloat16().float() for t in (x, w, b, A, B)), 2.0,
                                0.25 if dropout else 0.0, mask)
    assert_close(upcast[0], ref, torch.bfloat16, "y vs reference")


def test_linear_cross_entropy_in_fp32_equals_native_bf16(force):
    hidden, head = randn(37, 32, seed=6), randn(300, 32, seed=7, scale=0.3)
    labels = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(8))
    labels[::5] = -100

    def run(h, w):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = linear_cross_entropy(h, w, labels, label_smoothing=0.1)
        loss.backward()
        return loss, h.grad, w.grad

    force("native")
    native = run(hidden.bfloat16(), head.bfloat16())
    force("fp32")
    upcast = run(hidden.bfloat16(), head.bfloat16())
    exact = run(hidden.bfloat16().float(), head.bfloat16().float())
    for name, a, n, e in zip(("loss", "dh", "dW"), upcast, native, exact):
        assert a.dtype == n.dtype, name
        assert_close(a, n, torch.bfloat16, name)
        assert_no_less_accurate(a, n, e, name)
    ref = linear_cross_entropy_reference(hidden.bfloat16(), head.bfloat16(), labels, label_smoothing=0.1)
    assert_close(upcast[0], ref, torch.bfloat16, "loss vs reference")


def test_model_attention_in_fp32_equals_native_bf16(force):
    """The attention of peftloop's Llama: same output and gradients either way, in bf16."""
    from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.bfloat16()
    attention = model.model.layers[0].self_attn
    cos, sin = model.model.rotary_emb(torch.arange(16)[None], torch.bfloat16)
    x = randn(2, 16, 32, seed=9, dtype=torch.bfloat16)

    def run():
        xi = x.clone().requires_grad_()
        y = attention(xi, cos, sin, None)
        y.float().square().sum().backward()
        return y, xi.grad

    force("native")
    native = run()
    force("fp32")
    upcast = run()
    for name, a, n in zip(("y", "dx"), upcast, native):
        assert a.dtype == n.dtype == torch.bfloat16, name
        assert_close(a, n, torch.bfloat16, name)
