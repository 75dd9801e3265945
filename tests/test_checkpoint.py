"""Adapter and checkpoint files: atomic writes, manifests, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from peftloop.adapter_format import adapter_state_dict
from peftloop.checkpoint import (
    CheckpointError,
    atomic_directory,
    latest_checkpoint,
    load_adapter,
    read_adapter_config,
    save_adapter,
    verify_manifest,
)
from peftloop.inject import lora_layers
from tests.helpers import lora_model, tiny_model


def adapted(seed=0, **lora):
    """tiny_model() with a random LoRA (drawn from ``seed``) on q_proj and v_proj."""
    return lora_model(adapter_seed=seed, **{"target_modules": ["q_proj", "v_proj"], **lora})


def test_round_trip_into_a_fresh_model(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_model(), tmp_path / "a")
    x = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default, as PEFT
    trainable = load_adapter(tiny_model(), tmp_path / "a", is_trainable=True)
    assert all(p.requires_grad for p in adapter_state_dict(trainable).values())


def test_save_is_atomic_and_replaces(tmp_path):
    save_adapter(adapted(0), tmp_path / "a")
    save_adapter(adapted(1), tmp_path / "a")  # overwrite in one rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "b") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing half-written is left


def test_saving_without_adapters_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no LoRA config"):
        save_adapter(tiny_model(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_corrupted_safetensors_is_a_clear_error_and_leaves_the_model_alone(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    model = tiny_model()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*not a valid safetensors"):
        load_adapter(model, tmp_path / "a")
    assert not lora_layers(model)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_adapter(model, tmp_path / "a")


def test_mismatched_and_missing_keys_name_the_key(tmp_path):
    save_adapter(adapted(r=4), tmp_path / "a")
    wrong_r = tmp_path / "a" / "adapter_config.json"
    config = json.loads(wrong_r.read_text())
    config["r"] = 8  # the tensors say r=4
    wrong_r.write_text(json.dumps(config))
    model = tiny_model()
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\).*\(8, 32\)"):
        load_adapter(model, tmp_path / "a")
    assert not lora_layers(model)  # the injected-for-loading layers were taken out again

    config["r"] = 4
    config["target_modules"] = ["q_proj", "v_proj", "k_proj"]  # k_proj tensors are missing
    wrong_r.write_text(json.dumps(config))
    with pytest.raises(KeyError, match="k_proj"):
        load_adapter(tiny_model(), tmp_path / "a")

    config["target_modules"] = ["q_proj"]  # v_proj tensors map to nothing
    wrong_r.write_text(json.dumps(config))
    with pytest.raises(KeyError, match="v_proj"):
        load_adapter(tiny_model(), tmp_path / "a")


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"peft_type": None}, "peft_type=None"),
    ({"r": "eight"}, "lora.r='eight'"),
    ({"lora_dropout": 2.0}, "lora_dropout"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_bad_adapter_config(tmp_path, change, message):
    save_adapter(adapted(), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_adapter_config(tmp_path / "a")


def test_adapter_config_that_is_not_json(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json: not valid JSON"):
        read_adapter_config(tmp_path / "a")


def test_minimal_peft_config_loads(tmp_path):
    """torchtune writes only r, lora_alpha, target_modules, peft_type; PEFT accepts it, so do we: the
    tensors written arrive, exactly, in the modules the keys name, and every other setting is PEFT's
    default (so the adapter computes W + alpha/r · B·A, no dropout, no DoRA, no rsLoRA)."""
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    base = tiny_model()
    modules = [f"model.layers.{i}.self_attn.{proj}" for i in range(2) for proj in ("q_proj", "v_proj")]
    written = {}
    for k, module in enumerate(modules):
        out_features, in_features = base.get_submodule(module).weight.shape
        written[module] = (torch.arange(4 * in_features).reshape(4, in_features) / 64 - k,  # A: [r, in]
                           torch.arange(out_features * 4).reshape(out_features, 4) / 32 + k)  # B: [out, r]
    tensors = {f"base_model.model.{m}.lora_{ab}.weight": t
               for m, pair in written.items() for ab, t in zip("AB", pair)}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})

    model = load_adapter(tiny_model(), folder)

    assert sorted(lora_layers(model)) == sorted(modules)
    for module, (A, B) in written.items():
        layer = lora_layers(model)[module]
        assert torch.equal(layer.lora_A.weight, A) and torch.equal(layer.lora_B.weight, B), module
        assert (layer.r, layer.scaling, layer.use_dora) == (4, 2.0, False), module
    defaults = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                    use_rslora=False, use_dora=False, modules_to_save=None, fan_in_fan_out=False,
                    init_lora_weights=True, rank_pattern={}, alpha_pattern={})
    for config in (read_adapter_config(folder), model.lora_config):
        assert {k: getattr(config, k) for k in defaults} == defaults
    # and the model computes with them: the base weights plus alpha/r · B·A
    with torch.no_grad():
        for module, (A, B) in written.items():
            base.get_submodule(module).weight += 2.0 * B @ A
    x = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(model.eval()(x), base.eval()(x), rtol=1e-5, atol=1e-5)


def test_manifest_detects_damage_and_latest_skips_it(tmp_path):
    from peftloop.config import TrainConfig
    from peftloop.train import train
    from tests.helpers import toy_examples

    train(adapted(), toy_examples(8), config=TrainConfig(output_dir=str(tmp_path), micro_batch_size=2,
                                                         max_steps=4, save_every=2, progress_bar=False))
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    optimizer = tmp_path / "checkpoint-4" / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor
    optimizer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: checksum"):
        verify_manifest(tmp_path / "checkpoint-4")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    (tmp_path / "checkpoint-2" / "rng_state.safetensors").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_training_state_never_uses_pickle(tmp_path):
    from peftloop.config import TrainConfig
    from peftloop.train import train
    from tests.helpers import toy_examples

    train(adapted(), toy_examples(4), config=TrainConfig(output_dir=str(tmp_path), micro_batch_size=2,
                                                         max_steps=2, save_every=2, progress_bar=False))
    names = sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "manifest.json",
                     "optimizer.safetensors", "rng_state.safetensors", "trainer_state.json"]
