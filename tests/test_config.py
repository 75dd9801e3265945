"""Configs: types, TOML files, CLI overrides, and errors that name the key."""

import pytest

from peftloop.cli import SCHEMA
from peftloop.config import ConfigError, LoraConfig, TrainConfig
from peftloop.config_io import build, load_toml, parse_overrides


def test_overrides_are_typed_by_the_field():
    out = parse_overrides(["--learning_rate", "1e-4", "--max-steps", "7", "--shuffle", "false",
                           "--target_modules", "q_proj,v_proj", "--lora.r", "16",
                           "--resume_from_checkpoint", "true", "--precision=bf16"], SCHEMA)
    assert out == {"train": {"learning_rate": 1e-4, "max_steps": 7, "shuffle": False,
                             "resume_from_checkpoint": True, "precision": "bf16"},
                   "lora": {"target_modules": ["q_proj", "v_proj"], "r": 16}}
    targets = lambda value: parse_overrides(["--target_modules", value], SCHEMA)["lora"]["target_modules"]
    assert targets("all-linear") == "all-linear"
    assert targets("q_proj") == ["q_proj"]
    assert targets(r".*\.q_proj") == r".*\.q_proj"
    assert parse_overrides(["--resume_from_checkpoint", "out/checkpoint-5"], SCHEMA)["train"] == {
        "resume_from_checkpoint": "out/checkpoint-5"}
    # "none" is None wherever the field allows None, not a list holding the name "none"
    assert parse_overrides(["--modules_to_save", "none"], SCHEMA)["lora"] == {"modules_to_save": None}
    saved = parse_overrides(["--modules_to_save", "lm_head"], SCHEMA)["lora"]
    assert saved == {"modules_to_save": ["lm_head"]}


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1"], "unknown option --learning_rat; did you mean --learning_rate"),
    (["--max_steps", "ten"], "--max_steps='ten': expected int"),
    (["--max_steps"], "--max_steps needs a value"),
    (["--nope.r", "1"], "unknown section 'nope'"),
    (["r", "1"], "expected --key value"),
])
def test_override_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_overrides(argv, SCHEMA)


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp8"}, "train.precision='fp8'"),
    ({"micro_batch_size": 0}, "train.micro_batch_size must be >= 1"),
    ({"learning_rate": "fast"}, "train.learning_rate='fast'"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"num_epochs": 0}, "num_epochs >= 1 or max_steps"),
])
def test_train_config_validation(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(**values)


def test_ints_are_accepted_where_floats_are_declared():
    assert TrainConfig(learning_rate=1).learning_rate == 1.0
    assert isinstance(LoraConfig(lora_alpha=16).lora_alpha, float)


def test_toml_and_unknown_keys(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[train]\nlearning_rate = 1e-4\nmax_steps = 3\n'
                    '[lora]\nr = 4\ntarget_modules = ["q_proj"]\n')
    sections = load_toml(good)
    assert build(TrainConfig, sections["train"], "train").max_steps == 3
    assert build(LoraConfig, sections["lora"], "lora").target_modules == ["q_proj"]

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearnin_rate = 1e-4\n")
    message = r"bad.toml: unknown key train.learnin_rate; did you mean 'learning_rate'"
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, load_toml(bad)["train"], "train", str(bad))
    bad.write_text("[trian]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_toml(bad)
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")


def test_rank_and_alpha_patterns():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"k_proj": 3.0})
    assert config.rank_and_alpha_for("model.layers.0.self_attn.q_proj") == (8, 16)
    assert config.rank_and_alpha_for("model.layers.0.self_attn.v_proj") == (4, 16)
    assert config.rank_and_alpha_for("model.layers.0.self_attn.k_proj") == (8, 3.0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_layer_reports_the_alpha_and_scaling_it_computes_with(use_rslora):
    """The layer computes its scaling from its own r and alpha: a module matched by alpha_pattern
    or rank_pattern reports that alpha and r, and the scaling follows from them."""
    from peftloop.inject import inject_lora, lora_layers
    from tests.helpers import tiny_model

    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"k_proj": 3.0},
                        use_rslora=use_rslora, target_modules=["q_proj", "k_proj", "v_proj"])
    layers = lora_layers(inject_lora(tiny_model(), config))
    norm = (lambda r: r**0.5) if use_rslora else (lambda r: r)
    expected = {"q_proj": (8, 16, 16 / norm(8)), "k_proj": (8, 3.0, 3.0 / norm(8)),
                "v_proj": (4, 16, 16 / norm(4))}
    for name, layer in layers.items():
        r, alpha, scaling = expected[name.rsplit(".", 1)[-1]]
        assert (layer.r, layer.lora_alpha, layer.use_rslora) == (r, alpha, use_rslora), name
        assert layer.scaling == pytest.approx(scaling), name
