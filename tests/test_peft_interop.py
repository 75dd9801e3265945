"""Round trips against the real peft and transformers packages (the 'ref' extra)."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")
peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")

from peftloop.checkpoint import load_adapter, save_adapter  # noqa: E402
from peftloop.cli import main as cli_main  # noqa: E402
from peftloop.config import LoraConfig  # noqa: E402
from peftloop.inject import inject_lora  # noqa: E402
from peftloop.models import load_pretrained  # noqa: E402
from tests.helpers import assert_merged_logits_close, logits_of  # noqa: E402
from tests.helpers import base_dir as base_dir  # noqa: E402  (fixture)
from tests.hf_builders import load_reference  # noqa: E402


def test_base_checkpoint_loads_in_transformers_with_equal_logits(base_dir):
    torch.testing.assert_close(logits_of(load_reference(base_dir)), logits_of(load_pretrained(base_dir)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [
    {},
    {"use_rslora": True},
    {"modules_to_save": ["lm_head"]},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
], ids=["plain", "rslora", "modules_to_save", "patterns"])
def test_peftloop_adapter_loads_in_peft(tmp_path, base_dir, extra):
    ours = load_pretrained(base_dir)
    torch.manual_seed(1)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                 **extra))
    if "modules_to_save" in extra:
        with torch.no_grad():
            ours.lm_head.modules_to_save.weight.add_(0.05)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "adapter").eval()
    expected = logits_of(ours.eval())
    # the adapter does something
    assert not torch.allclose(expected, logits_of(load_reference(base_dir)), atol=1e-3)
    torch.testing.assert_close(logits_of(theirs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [
    {},
    {"use_rslora": True, "lora_dropout": 0.1},
    {"modules_to_save": ["lm_head"]},
], ids=["plain", "rslora", "modules_to_save"])
def test_peft_adapter_loads_in_peftloop(tmp_path, base_dir, extra):
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM", **extra)
    theirs = peft.get_peft_model(load_reference(base_dir), config)
    if "modules_to_save" in extra:
        with torch.no_grad():
            theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(ours.eval()), logits_of(theirs.eval()), rtol=0, atol=1e-5)


def test_adapter_config_is_peft_shaped(tmp_path, base_dir):
    ours = load_pretrained(base_dir)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                "use_rslora", "use_dora", "modules_to_save", "fan_in_fan_out", "init_lora_weights",
                "base_model_name_or_path"):
        assert key in config, key
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()


def test_merge_cli_output_loads_in_transformers(tmp_path, base_dir):
    ours = load_pretrained(base_dir)
    torch.manual_seed(3)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_adapter(ours, tmp_path / "adapter")
    expected = logits_of(ours.eval())
    assert cli_main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = load_reference(tmp_path / "merged")
    assert_merged_logits_close(logits_of(merged), expected)
    assert_merged_logits_close(logits_of(load_pretrained(tmp_path / "merged")), expected)


def test_peftloop_adapter_on_a_transformers_model(tmp_path, base_dir):
    """inject_lora works on a model the user built with transformers, and PEFT reads what it saves."""
    model = load_reference(base_dir)
    torch.manual_seed(4)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert model.lm_head.__class__.__name__ == "Linear"  # all-linear leaves the head alone
    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(theirs), logits_of(model.eval()), rtol=0, atol=1e-5)
