"""PiSSA and OLoRA (init from the base weight, saved as a plain LoRA for the original base), and
LoRA+ (the optimizer's groups against PEFT's create_loraplus_optimizer)."""

import json

import pytest
import torch
import torch.nn as nn

from peftloop.adapter_format import (
    adapter_state_dict,
    from_adapter_config,
    load_adapter_state_dict,
    to_adapter_config,
)
from peftloop.checkpoint import load_adapter, save_adapter
from peftloop.config import ConfigError, LoraConfig, TrainConfig
from peftloop.inject import disable_adapters, inject_lora, lora_layers, merge_and_unload, unload
from peftloop.lora import LoRALinear
from peftloop.nf4 import NF4Linear, quantize_model
from peftloop.optim import build_optimizer, param_groups
from tests.helpers import TOKENS, our_name, tiny_model
from tests.helpers import base_dir as base_dir  # fixture
from tests.hf_builders import load_reference

INITS = ["pissa", "pissa_niter_4", "olora"]


def _train_a_little(model, seed=0):
    """Stand-in for training: move every adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init", INITS)
def test_init_moves_the_top_of_w_into_the_adapter_and_keeps_the_model(init):
    base = nn.Linear(40, 24)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=init)
    A, B, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    torch.testing.assert_close(base.weight + s * B @ A, W, rtol=0, atol=1e-6)  # W_res + s·B·A = W
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, W, base.bias), rtol=1e-5, atol=1e-5)
    U, S, Vh = torch.linalg.svd(W)
    if init == "pissa":  # s·B·A is the best rank-4 approximation of W
        torch.testing.assert_close(s * B @ A, (U[:, :4] * S[:4]) @ Vh[:4], rtol=0, atol=1e-5)
    elif init.startswith("pissa"):  # randomized SVD: close to the best rank-4 approximation
        assert torch.linalg.matrix_norm(W - s * B @ A) < 1.05 * S[4:].square().sum().sqrt()
    else:  # OLoRA: B has orthonormal columns (Q of W's QR)
        torch.testing.assert_close(B.t() @ B, torch.eye(4), rtol=0, atol=1e-5)
    assert torch.equal(layer.initial_lora_A, A) and torch.equal(layer.initial_lora_B, B)


def test_pissa_on_a_4bit_base_requantises_the_residual():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 32))
    W4 = base.dequantize()
    layer = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights="pissa")
    assert isinstance(layer.base_layer, NF4Linear)
    sBA = layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    residual = W4 - sBA
    requantised = NF4Linear.from_linear(nn.Linear(64, 32).requires_grad_(False).float())
    requantised.requantize_(residual)
    torch.testing.assert_close(layer.base_layer.dequantize(), requantised.dequantize(), rtol=0, atol=0)


def test_qpissa_pissa_in_full_precision_then_quantise_the_residual():
    """PiSSA's QPiSSA recipe: init in full precision, then quantise the residual base
    (``quantize_model`` after ``inject_lora``): for a weight with a dominant low-rank part the
    4-bit error of the adapted layer is far below that of quantising W itself."""
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g)
    W = low_rank + 0.01 * torch.randn(64, 128, generator=g)
    plain = nn.Linear(128, 64, bias=False)
    plain.weight.data.copy_(W)
    direct_error = (NF4Linear.from_linear(plain).dequantize() - W).abs().max()
    model = nn.Sequential(nn.Linear(128, 64, bias=False))
    model[0].weight.data.copy_(W)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="pissa"))
    quantize_model(model)
    layer = model[0]
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, NF4Linear)
    rebuilt = layer.base_layer.dequantize() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    assert (rebuilt - W).abs().max() < 0.1 * direct_error


def test_saved_as_a_rank_2r_lora_that_loads_onto_the_original_model():
    model = tiny_model(seed=7)
    original = tiny_model(seed=7)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa",
                                  rank_pattern={"v_proj": 2}))
    _train_a_little(model)
    tensors = adapter_state_dict(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (8, 32)
    assert tensors[f"{key}.lora_B.weight"].shape == (32, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 4
    config = to_adapter_config(model.lora_config)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"], config["rank_pattern"]) == \
        (8, 16, True, {"v_proj": 4})
    plain = inject_lora(original, from_adapter_config(config))
    load_adapter_state_dict(plain, tensors)
    torch.testing.assert_close(plain(TOKENS), model(TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_the_converted_adapter_loads_back_into_a_residual_model_exactly(tmp_path, init):
    """Resuming: a fresh model with the same init gets the saved A, B and its own base back bit for bit."""
    torch.manual_seed(0)
    model = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights=init))
    _train_a_little(model)
    expected = model(TOKENS)
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)  # pissa_niter_K starts from a random matrix
    fresh = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights=init))
    bases = {n: m.base_layer.weight.clone() for n, m in lora_layers(fresh).items()}
    load_adapter(fresh, tmp_path / "adapter", is_trainable=True)
    assert torch.equal(fresh(TOKENS), expected)
    for name, layer in lora_layers(fresh).items():
        assert torch.equal(layer.base_layer.weight, bases[name]), name  # same init: the base is untouched
        assert layer.lora_A.weight.requires_grad


def test_a_residual_model_with_other_initial_factors_is_rebased():
    torch.manual_seed(0)
    model = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights="pissa_niter_1"))
    _train_a_little(model)
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    torch.manual_seed(1)  # another random start: other initial factors, another residual
    other = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights="pissa_niter_1"))
    assert not torch.equal(other(TOKENS), model(TOKENS))
    load_adapter_state_dict(other, tensors)
    torch.testing.assert_close(other(TOKENS), model(TOKENS), rtol=0, atol=1e-5)


def test_disable_and_unload_give_back_the_original_model():
    original = tiny_model(seed=7)
    expected = original(TOKENS)
    model = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights="olora"))
    _train_a_little(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)
    unload(model)
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_merge_and_unload_of_a_residual_model():
    model = inject_lora(tiny_model(seed=7), LoraConfig(r=4, target_modules="all-linear",
                                                       init_lora_weights="pissa", use_dora=True))
    _train_a_little(model)
    expected = model(TOKENS)
    merge_and_unload(model)
    torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)


def test_config_validation():
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        LoraConfig(init_lora_weights="pissa_niter_0")
    assert LoraConfig(init_lora_weights="pissa_niter_16").mutates_base
    assert not LoraConfig(init_lora_weights="gaussian").mutates_base
    rs = LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights="olora",
                    alpha_pattern={"q_proj": 4.0})
    written = to_adapter_config(rs)
    assert written["r"] == 16 and written["lora_alpha"] == pytest.approx(16 * 2**0.5)
    assert written["lora_alpha"] / written["r"] ** 0.5 == pytest.approx(16 / 8**0.5)  # the same scaling
    assert written["alpha_pattern"]["q_proj"] == pytest.approx(4 * 2**0.5)


# ---------------------------------------------------------------------------------------------
# PEFT: the same init on the same weights, and the converted adapter on the original model


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("extra", [
    {},
    {"use_dora": True},
    {"use_rslora": True, "rank_pattern": {"v_proj": 2}},
], ids=["lora", "dora", "rslora_patterns"])
def test_peft_inits_the_same_and_loads_our_saved_adapter_onto_the_original_base(
        tmp_path, base_dir, init, extra):
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")

    from peftloop.models import load_pretrained

    torch.manual_seed(0)
    ours = inject_lora(load_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              init_lora_weights=init, **extra))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load_reference(base_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=init, task_type="CAUSAL_LM", **extra))
    our_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():  # PEFT's A, B (and magnitudes) from the same SVD/QR
        if p.requires_grad:
            torch.testing.assert_close(our_params[our_name(name)], p, rtol=0, atol=1e-6, msg=name)
    _train_a_little(ours)
    save_adapter(ours, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "adapter").eval()
    expected = ours.eval()(TOKENS)
    assert (expected - load_reference(base_dir)(TOKENS).logits).abs().max() > 1e-2  # training moved it
    torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# LoRA+


def _peft_groups(model, lr, ratio, weight_decay):
    """{parameter name: (lr, weight decay)} of PEFT's LoRA+ optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=weight_decay)
    names = {id(p): our_name(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def _our_groups(model, lr, ratio, weight_decay):
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, TrainConfig(learning_rate=lr, loraplus_lr_ratio=ratio,
                                                weight_decay=weight_decay)).param_groups
    return {names[id(p)]: (lr * g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_loraplus_groups_are_peft_create_loraplus_optimizer_groups(base_dir):
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")

    from peftloop.models import load_pretrained

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                  modules_to_save=["lm_head"])
    ours = inject_lora(load_pretrained(base_dir), LoraConfig(**config))
    theirs = peft.get_peft_model(load_reference(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    theirs_groups = _peft_groups(theirs, 2e-4, 16.0, 0.05)
    assert _our_groups(ours, 2e-4, 16.0, 0.05) == theirs_groups
    kinds = {name.split(".")[-2] if "magnitude" not in name else "m": lr
             for name, (lr, _) in theirs_groups.items()}
    assert kinds["lora_B"] == pytest.approx(16 * kinds["lora_A"]) and kinds["m"] == kinds["lora_B"]


def test_norm_weights_follow_the_trainers_decay_rule():
    """The one documented difference from PEFT's LoRA+: a trained RMSNorm weight (1-D, fast under
    LoRA+ in both) is not decayed here, as transformers' Trainer does not decay norm weights; PEFT
    spares only nn.LayerNorm parameters and biases."""
    transformers = pytest.importorskip("transformers",
                                       reason="the 'ref' extra (transformers) is not installed")
    model = inject_lora(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"],
                                                 modules_to_save=["norm", "lm_head"]))
    groups = {n: v for n, v in _our_groups(model, 1e-3, 4.0, 0.1).items()}
    assert groups["model.norm.modules_to_save.weight"] == (4e-3, 0.0)
    assert groups["lm_head.modules_to_save.weight"] == (1e-3, 0.1)
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    for name, (_, wd) in groups.items():
        assert (wd > 0) == (name in decayed), name


def test_without_loraplus_every_group_has_the_base_rate():
    model = inject_lora(tiny_model(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert {g["lr_scale"] for g in param_groups(model, TrainConfig(weight_decay=0.1))} == {1.0}
