"""Injection: PEFT's matching rules, freezing, modules_to_save, counts, merge_and_unload."""

import pytest
import torch
import torch.nn as nn

from peftloop.adapter_format import adapter_state_dict, load_adapter_state_dict
from peftloop.config import LoraConfig
from peftloop.inject import (
    count_parameters,
    disable_adapters,
    inject_lora,
    lora_layers,
    merge_and_unload,
    unload,
)
from peftloop.lora import LoRALinear, TrainableCopy
from peftloop.modules import matches
from tests.helpers import tiny_model


def test_matching_rules_are_peft_rules():
    name = "model.layers.0.self_attn.q_proj"
    assert matches(name, ["q_proj"])  # suffix after a dot
    assert matches(name, [name])  # exact
    assert not matches("model.layers.0.self_attn.q_proj_norm", ["q_proj"])  # no substring matching
    assert not matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert matches(name, r".*\.(q|v)_proj")  # a string is a full-match regex
    assert not matches(name, r"q_proj")  # ... so a bare name as a string matches only that exact name
    assert not matches(name, None)


def test_list_targets_and_freezing():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = lora_layers(model)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}"
                              for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}


def test_all_linear_skips_the_head_and_records_suffixes():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    assert len(lora_layers(model)) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert model.lora_config.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_regex_and_exclude():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules=r"model\.layers\.1\..*_proj",
                                  exclude_modules=["down_proj"]))
    assert sorted(lora_layers(model)) == sorted(
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_no_match_names_the_linear_layers():
    model = tiny_model()
    with pytest.raises(ValueError, match="matched no nn.Linear.*q_proj"):
        inject_lora(model, LoraConfig(r=4, target_modules=["query"]))


def test_targeting_a_non_linear_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="RMSNorm"):
        inject_lora(model, LoraConfig(r=4, target_modules=["input_layernorm"]))


def test_modules_to_save_is_a_trainable_copy():
    model = tiny_model()
    head = model.lm_head.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, TrainableCopy)
    assert model.lm_head.modules_to_save.weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad
    keys = adapter_state_dict(model)
    assert "base_model.model.lm_head.weight" in keys
    with torch.no_grad():
        model.lm_head.modules_to_save.weight.add_(1.0)
    with disable_adapters(model):
        assert torch.equal(model.lm_head.weight, head)  # disabled: the original head


def test_counts():
    model = tiny_model()
    total_before = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = count_parameters(model)
    q = model.model.layers[0].self_attn.q_proj
    assert trainable == 2 * 4 * (q.in_features + q.out_features)
    assert total == total_before + trainable


def test_rank_and_alpha_patterns():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  rank_pattern={"v_proj": 2},
                                  alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}))
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling == 4.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 0.5
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 2.0


def test_merge_and_unload_equals_adapted_model():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                  modules_to_save=["lm_head"]))
    x = torch.randint(0, 61, (2, 9))
    expected = model(x)
    merge_and_unload(model)
    assert not lora_layers(model) and not any(isinstance(m, TrainableCopy) for m in model.modules())
    assert not hasattr(model, "lora_config")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_disable_and_unload_restore_the_base():
    model = tiny_model()
    x = torch.randint(0, 61, (2, 9))
    base_logits = model(x)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert not torch.allclose(model(x), base_logits)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base_logits)
    unload(model)
    torch.testing.assert_close(model(x), base_logits)


def test_load_state_dict_checks_keys_and_shapes_before_copying():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    good = {k: torch.randn_like(v) for k, v in adapter_state_dict(model).items()}
    before = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}

    bad_shape = dict(good)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad_shape[key] = torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(8, 32\).*\(4, 32\)"):
        load_adapter_state_dict(model, bad_shape)

    unknown = dict(good)
    unknown["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.randn(4, 32)
    with pytest.raises(KeyError, match="nope"):
        load_adapter_state_dict(model, unknown)

    missing = dict(good)
    missing.pop(key)
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(model, missing)
    for k, v in adapter_state_dict(model).items():  # nothing was copied by the failed loads
        assert torch.equal(v, before[k])

    load_adapter_state_dict(model, missing, strict=False)  # a partial load when asked for
    load_adapter_state_dict(model, good)
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(v, good[k])


def test_works_on_any_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.head = nn.Linear(8, 2)

    net = Net()
    inject_lora(net, LoraConfig(r=2, target_modules=["encoder.0", "head"]))
    assert isinstance(net.encoder[0], LoRALinear) and isinstance(net.head, LoRALinear)
    out = net.head(net.encoder(torch.randn(3, 8)))
    out.sum().backward()
    assert net.head.lora_A.weight.grad is not None
