"""LoRALinear: forward and gradients against the dense formula, merge/unmerge, scaling, dtypes."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peftloop.kernels import backend
from peftloop.kernels.lora_linear import lora_linear
from peftloop.lora import LoRALinear


def make_layer(in_f=13, out_f=7, r=4, alpha=8, dropout=0.0, bias=True, rslora=False, dtype=torch.float32):
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = LoRALinear(base, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
    with torch.no_grad():  # a non-zero B, so the LoRA path is exercised
        layer.lora_B.weight.normal_()
    return layer


def dense(layer, x, mask=None, p=0.0):
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ written out with plain ops."""
    x_lora = x if mask is None else x * mask / (1 - p)
    W, b = layer.base_layer.weight.float(), layer.base_layer.bias
    b = None if b is None else b.float()
    lora = layer.scaling * (x_lora @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    return x @ W.t() + (b if b is not None else 0) + lora


@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_dense_formula(shape, bias):
    layer = make_layer(bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    A_ref = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B_ref = layer.lora_B.weight.detach().clone().requires_grad_(True)

    y = layer(x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    y_ref = F.linear(x_ref, W, b) + layer.scaling * (x_ref @ A_ref.t()) @ B_ref.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.weight.grad, A_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, B_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.base_layer.weight.grad is None
    assert bias is False or layer.base_layer.bias.grad is None


def test_dropout_uses_one_mask_for_forward_and_backward():
    layer = make_layer(dropout=0.3)
    x = torch.randn(6, 13, requires_grad=True)
    mask = torch.rand(6, 13) > 0.3
    A = layer.lora_A.weight
    B = layer.lora_B.weight
    y = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, A, B, layer.scaling, 0.3, mask)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = dense(layer, x_ref, mask, 0.3)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), g)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, A, B), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dropout_is_on_the_lora_branch_only():
    layer = make_layer(dropout=0.5)
    x = torch.randn(64, 13)
    with torch.no_grad():
        layer.lora_B.weight.zero_()  # LoRA branch contributes nothing -> output must be the base output
    layer.train()
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.eval()  # no dropout in eval mode: deterministic
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer(x), dense(layer, x))


def test_dropout_rate_in_training():
    layer = make_layer(in_f=200, dropout=0.25)
    layer.train()
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    # with W = 0 the output is s·dropout(x)AᵀBᵀ: compare E[y] to the dense value over many draws
    x = torch.randn(1, 200)
    mean = torch.stack([layer(x) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, dense(layer, x), rtol=0.1, atol=0.15)


def test_fast_path_equals_reference_backend():
    layer = make_layer()
    x = torch.randn(4, 5, 13, requires_grad=True)
    y_fast = layer(x)
    (gx_fast,) = torch.autograd.grad(y_fast.sum(), x)
    with backend("reference"):
        y_ref = layer(x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-6, atol=1e-6)


def test_init_starts_as_identity_and_follows_peft():
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), base(x))
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=√5) on [r, in] = U(-1/√in, 1/√in)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.5 * bound
    gaussian = LoRALinear(nn.Linear(512, 16), r=8, lora_alpha=16, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A.weight.std().item() - 1 / 8) < 0.01


def test_scaling_plain_and_rslora():
    assert make_layer(r=4, alpha=8).scaling == 2.0
    assert make_layer(r=4, alpha=8, rslora=True).scaling == 4.0
    assert make_layer(r=16, alpha=8, rslora=True).scaling == 2.0


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(4, 13)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)  # W itself now holds the update
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)


def test_merge_of_bf16_base_is_computed_in_fp32():
    layer = make_layer(dtype=torch.bfloat16)
    expected = (layer.base_layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, expected)


def test_adapter_stays_fp32_on_bf16_base_and_autocast_computes_in_bf16(cpu_low_precision):
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(4, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.base_layer.weight.grad is None
    ref = dense(layer, x.bfloat16().float())  # fp32 math on the bf16-rounded input
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_disabled_layer_is_the_base_layer():
    layer = make_layer()
    x = torch.randn(2, 13)
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_refuses_a_trainable_base():
    base = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(torch.randn(2, 4), base.weight, None, torch.randn(2, 4), torch.randn(4, 2), 1.0)
