"""DoRA: the layer's math and gradients, merge/unmerge, one base matmul with dropout, and parity
with PEFT's DoRA (logits and gradients) through adapter files in both directions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from peftloop.adapter_format import adapter_state_dict
from peftloop.checkpoint import load_adapter, save_adapter
from peftloop.config import LoraConfig, TrainConfig
from peftloop.inject import inject_lora, lora_layers, merge_and_unload
from peftloop.kernels.lora_linear import dropout_mask_like
from peftloop.lora import LoRALinear
from peftloop.nf4 import NF4Linear
from peftloop.optim import param_groups
from tests.helpers import TOKENS, our_name, tiny_model
from tests.helpers import base_dir as base_dir  # fixture
from tests.hf_builders import load_reference


def dora_layer(in_f=24, out_f=16, r=4, dropout=0.0, bias=True, quantized=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    if quantized:
        base = NF4Linear.from_linear(base)
    layer = LoRALinear(base, r=r, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(out_f))  # not just the initial norms
    return layer


def dora_formula(layer, x, A, B, m, mask=None, p=0.0):
    """Liu et al. eq. 5 with the norm detached (§4.3), dropout on the low-rank branch."""
    W = layer.base_layer.dequantize(torch.float32) if layer.quantized else layer.base_layer.weight
    s = layer.scaling
    norm = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    x_d = x if mask is None else x * mask / (1 - p)
    y = (m / norm) * (x @ W.t() + s * (x_d @ A.t()) @ B.t())
    return y if layer.bias is None else y + layer.bias


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32_base", "nf4_base"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_gradients_are_the_dora_formula(quantized, bias):
    layer = dora_layer(bias=bias, quantized=quantized)
    x = torch.randn(2, 5, 24, requires_grad=True)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]
    y = layer(x)
    refs = [t.detach().clone().requires_grad_() for t in (x, *params)]
    y_ref = dora_formula(layer, *refs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    expected = torch.autograd.grad(y_ref, refs, g)
    for name, a, b in zip(["x", "lora_A", "lora_B", "magnitude"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_magnitude_starts_at_the_row_norms():
    base = nn.Linear(24, 16)
    layer = LoRALinear(base, r=4, lora_alpha=8, use_dora=True)  # B = 0: m = ||W||_row
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1))
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-6)  # the identity at init
    assert layer.lora_magnitude_vector.dtype == torch.float32 and layer.lora_magnitude_vector.requires_grad


def test_dropout_stays_on_the_low_rank_branch_with_one_base_matmul():
    layer = dora_layer(in_f=64, out_f=64, dropout=0.3).train()
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    mask = dropout_mask_like(x, 0.3)  # the mask the layer drew
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    torch.testing.assert_close(y, dora_formula(layer, x, A, B, m, mask, 0.3), rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    base_flops = 2 * 64 * 64 * 64
    # x·Wᵀ once, the rank-4 terms (x·Aᵀ·Bᵀ and B·A for the norm): PEFT's dropout path adds a second x·Wᵀ
    assert counter.get_total_flops() < 1.5 * base_flops, counter.get_total_flops()


def test_merge_unmerge_and_merge_and_unload():
    layer = dora_layer()
    x = torch.randn(4, 24)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)

    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True))
    tokens = torch.randint(0, 61, (2, 9))
    expected = model(tokens)
    merge_and_unload(model)
    assert not lora_layers(model)
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_magnitude_is_saved_under_peft_key_and_is_a_fast_decayed_loraplus_parameter():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    keys = set(adapter_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    groups = param_groups(model, TrainConfig(weight_decay=0.1, loraplus_lr_ratio=16))
    magnitude = model.model.layers[0].self_attn.q_proj.lora_magnitude_vector
    group = next(g for g in groups if any(p is magnitude for p in g["params"]))
    assert group["lr_scale"] == 16 and group["weight_decay"] == 0.1  # as PEFT's LoRA+ and the Trainer


# ---------------------------------------------------------------------------------------------
# PEFT


def _perturb_magnitudes(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))


def _grads_by_our_name(model, logits, g):
    """{peftloop parameter name: gradient}; PEFT's names lose the prefix and the adapter name."""
    (logits * g).sum().backward()
    return {our_name(name): p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_peftloop_dora_loads_in_peft_with_equal_logits_and_gradients(tmp_path, base_dir):
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")

    from peftloop.models import load_pretrained

    ours = load_pretrained(base_dir)
    torch.manual_seed(1)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                 use_dora=True))
    _perturb_magnitudes(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "adapter", is_trainable=True)
    ours.train(), theirs.train()  # no dropout: train mode runs DoRA's training path on both sides
    logits = ours(TOKENS)
    their_logits = theirs(TOKENS).logits
    assert (logits - load_reference(base_dir)(TOKENS).logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(their_logits, logits, rtol=0, atol=1e-5)
    g = torch.randn_like(logits)
    ours_grads, their_grads = _grads_by_our_name(ours, logits, g), _grads_by_our_name(theirs, their_logits, g)
    assert ours_grads.keys() == their_grads.keys() and any("magnitude" in k for k in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=name)


def test_peft_dora_loads_in_peftloop_with_equal_logits(tmp_path, base_dir):
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")

    from peftloop.models import load_pretrained

    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, use_dora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load_reference(base_dir), config)
    _perturb_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in set(f.keys())
    ours = load_adapter(load_pretrained(base_dir), tmp_path / "adapter")
    assert all(layer.use_dora for layer in lora_layers(ours).values())
    torch.testing.assert_close(ours.eval()(TOKENS), theirs.eval()(TOKENS).logits, rtol=0, atol=1e-5)
    # and the magnitudes arrived: the default init (the row norms) would give other logits
    merged = merge_and_unload(ours)
    torch.testing.assert_close(merged(TOKENS), theirs(TOKENS).logits, rtol=0, atol=1e-4)
    assert F.mse_loss(merged(TOKENS), load_reference(base_dir)(TOKENS).logits) > 1e-4
