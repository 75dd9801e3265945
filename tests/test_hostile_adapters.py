"""Hostile adapter and checkpoint files: every one gives a clear error and changes nothing.
Property-based fuzzing (hypothesis) of the adapter loader."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftloop.checkpoint import CheckpointError, load_adapter, save_adapter, verify_manifest
from peftloop.config import LoraConfig
from peftloop.inject import inject_lora, lora_layers
from tests.helpers import lora_model, tiny_model

ALLOWED = (CheckpointError, KeyError, ValueError)  # named errors; anything else is a bug


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "adapter"
    save_adapter(lora_model(target_modules=["q_proj", "v_proj"]), folder)
    return folder


def copy_adapter(src, dst, weights: bytes | None = None, config=None):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else (src / "adapter_model.safetensors").read_bytes())
    if config is None:
        config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return dst


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("weights", [
    b"",
    b"\x07",
    struct.pack("<Q", 1 << 60) + b"{}",  # a header length of an exabyte
    safetensors_bytes({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                       {"dtype": "F32", "shape": [1 << 30, 1 << 20], "data_offsets": [0, 1 << 52]}},
                      b"\0" * 64),
    # truncated
    safetensors_bytes({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 8),
    safetensors_bytes({"x": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    b"not a safetensors file at all, just some text" * 10,
], ids=["empty", "one-byte", "huge-header-length", "huge-tensor", "truncated-data", "bad-dtype", "text"])
def test_hostile_safetensors(tmp_path, good_adapter, weights):
    folder = copy_adapter(good_adapter, tmp_path / "a", weights=weights)
    model = tiny_model()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_adapter(model, folder)
    assert not lora_layers(model)


@pytest.mark.parametrize("config, message", [
    ("[]", "expected a JSON object"),
    ('{"peft_type": "PREFIX_TUNING"}', "peft_type='PREFIX_TUNING'"),
    ('{"peft_type": "LORA", "r": "4"}', "lora.r='4'"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": 7}', "target_modules=7"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": [8]}', "lora_alpha"),
    ('{"peft_type": "LORA", "r": 4, "use_rslora": "yes"}', "use_rslora"),
    ('{"peft_type": "LORA", "r": 4, "rank_pattern": {"(": 2}, "target_modules": ["q_proj"]}',
     "not a valid regex"),
    ('{"peft_type": "LORA", "r": -1}', "positive"),
    ("\xff\xfe", "not valid JSON"),
    ('{"peft_type": "LORA", "r": 4' + "]" * 5, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "expected a JSON object|not valid JSON"),  # deeply nested
], ids=["list", "prefix-tuning", "r-string", "targets-int", "alpha-list", "bool-string", "bad-regex",
        "negative-r", "binary", "broken", "deep-nesting"])
def test_hostile_adapter_config(tmp_path, good_adapter, config, message):
    folder = copy_adapter(good_adapter, tmp_path / "a", config=config)
    model = tiny_model()
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, folder)
    assert not lora_layers(model)


def test_keys_for_modules_that_do_not_exist(tmp_path):
    donor = tiny_model(num_hidden_layers=3)  # a deeper model: layer 2 does not exist in the target
    inject_lora(donor, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(donor, tmp_path / "a")
    model = tiny_model()
    with pytest.raises(KeyError, match="model.layers.2.self_attn.q_proj.lora_A.weight"):
        load_adapter(model, tmp_path / "a")
    assert not lora_layers(model)


def test_manifest_cannot_point_outside_its_folder(tmp_path):
    (tmp_path / "secret").write_text("x")
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    for name in ("../secret", "/etc/passwd", "..", "a/b"):
        (ckpt / "manifest.json").write_text(json.dumps({"files": {name: {"size": 1, "sha256": "0"}}}))
        with pytest.raises(CheckpointError, match="not a plain file name"):
            verify_manifest(ckpt)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: (st.lists(inner, max_size=4)
                                                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_weights_bytes(tmp_path, good_adapter, data):
    folder = copy_adapter(good_adapter, tmp_path / "fuzz-bytes", weights=data)
    with pytest.raises(CheckpointError):
        load_adapter(tiny_model(), folder)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_weights(tmp_path, good_adapter, flips):
    data = bytearray((good_adapter / "adapter_model.safetensors").read_bytes())
    for position, xor in flips:
        data[position % len(data)] ^= xor
    folder = copy_adapter(good_adapter, tmp_path / "fuzz-flips", weights=bytes(data))
    model = tiny_model()
    try:
        load_adapter(model, folder)  # flips inside tensor data still load: the values are just different
    except ALLOWED:
        assert not lora_layers(model)


CONFIG_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save",
               "peft_type", "init_lora_weights", "bias", "rank_pattern", "exclude_modules", "use_dora", "x"]


@FUZZ
@given(extra=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4))
def test_fuzz_adapter_config(tmp_path, good_adapter, extra):
    config = json.loads((good_adapter / "adapter_config.json").read_text())
    config.update(extra)
    folder = copy_adapter(good_adapter, tmp_path / "fuzz-config", config=config)
    model = tiny_model()
    try:
        load_adapter(model, folder)
    except ALLOWED:
        assert not lora_layers(model)
    else:
        assert lora_layers(model)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors",
                                   "model.bin", 7])
def test_sharded_index_cannot_name_files_outside_its_folder(tmp_path, shard):
    """A model.safetensors.index.json whose weight_map points anywhere but a shard beside it is
    refused before any file is opened, naming the index and the key."""
    from peftloop.models import CheckpointFormatError, weight_files

    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder = tmp_path / "model"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors",
                                            "lm_head.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors\.index\.json.*lm_head\.weight"):
        weight_files(folder)


def test_sharded_index_with_plain_shard_names_is_accepted(tmp_path):
    from peftloop.models import weight_files

    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a.weight": names[0], "b.weight": names[1]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in weight_files(tmp_path)] == names
