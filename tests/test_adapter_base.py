"""Adapters that find their base: ``load_pretrained`` records what it loaded (``model.name_or_path``:
the hub id, or the absolute folder), ``save_adapter`` and ``peftloop train`` write it as
``base_model_name_or_path``, and ``peftloop generate/merge --adapter DIR`` without ``--model`` /
``--base`` load that base, from any working directory."""

import json
import shutil

import huggingface_hub.constants
import pytest

from peftloop import LoraConfig, inject_lora, save_adapter
from peftloop.cli import main
from peftloop.models import load_pretrained
from tests.helpers import qa_records, save_chat_base, tiny_model, write_jsonl
from tests.hf_builders import install_in_hub_cache

HUB_ID = "tiny-org/chat-base"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_chat_base(tmp_path_factory.mktemp("base") / "chat-base")


@pytest.fixture
def hub(base, tmp_path, monkeypatch):
    """An offline hub cache in which HUB_ID is ``base``."""
    cache = tmp_path / "hub"
    install_in_hub_cache(cache, HUB_ID, base)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return HUB_ID


def adapter_base(folder) -> str | None:
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def with_lora(model):
    return inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))


def test_load_pretrained_records_the_hub_id_or_the_absolute_folder(base, hub, monkeypatch):
    monkeypatch.chdir(base.parent)
    assert load_pretrained(base.name).name_or_path == str(base.resolve())
    assert load_pretrained(f"./{base.name}").name_or_path == str(base.resolve())
    assert load_pretrained(hub).name_or_path == HUB_ID


def test_save_adapter_records_what_was_loaded(base, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(base.parent)
    save_adapter(with_lora(load_pretrained(base.name)), tmp_path / "from-folder")
    assert adapter_base(tmp_path / "from-folder") == str(base.resolve())
    save_adapter(with_lora(load_pretrained(hub)), tmp_path / "from-hub")
    assert adapter_base(tmp_path / "from-hub") == HUB_ID
    # a base the config names is kept; a relative folder becomes absolute
    model = with_lora(tiny_model())
    save_adapter(model, tmp_path / "relative", LoraConfig(r=2, target_modules=["q_proj"],
                                                          base_model_name_or_path=base.name))
    assert adapter_base(tmp_path / "relative") == str(base.resolve())
    save_adapter(model, tmp_path / "named", LoraConfig(r=2, target_modules=["q_proj"],
                                                       base_model_name_or_path="org/elsewhere"))
    assert adapter_base(tmp_path / "named") == "org/elsewhere"
    # a model built in memory was loaded from nothing: nothing to record
    save_adapter(model, tmp_path / "in-memory")
    assert adapter_base(tmp_path / "in-memory") is None
    assert model.lora_config.base_model_name_or_path is None  # the model's own config is untouched


def test_train_records_the_folder_and_generate_and_merge_find_it_from_elsewhere(base, tmp_path, monkeypatch,
                                                                                capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(base, work / "smol")
    elsewhere.mkdir()
    write_jsonl(work / "train.jsonl", qa_records(2))
    monkeypatch.chdir(work)
    assert main(["train", "--model", "smol", "--data", "train.jsonl", "--output-dir", "run",
                 "--max-steps", "2", "--progress-bar", "false"]) == 0
    adapter = work / "run" / "adapter"
    assert adapter_base(adapter) == str((work / "smol").resolve())

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    prompt = ["--prompt", "Q: What do bees make?\nA:", "--max-new-tokens", "6"]
    assert main(["generate", "--adapter", str(adapter), *prompt]) == 0
    found = capsys.readouterr()
    assert f"base model {(work / 'smol').resolve()} (from {adapter / 'adapter_config.json'})" in found.err
    assert main(["generate", "--adapter", str(adapter), "--model", str(work / "smol"), *prompt]) == 0
    assert capsys.readouterr().out == found.out
    assert main(["merge", "--adapter", str(adapter), "--out", "merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()


def test_train_from_the_hub_records_the_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", qa_records(2))
    assert main(["train", "--model", hub, "--data", "train.jsonl", "--output-dir", "run", "--max_steps", "1",
                 "--progress_bar", "false"]) == 0
    assert adapter_base(tmp_path / "run" / "adapter") == HUB_ID
    assert main(["merge", "--adapter", "run/adapter", "--out", "merged"]) == 0


@pytest.fixture
def unnamed_adapter(base, tmp_path):
    """An adapter for ``base`` whose adapter_config.json does not name it."""
    folder = tmp_path / "adapter"
    save_adapter(with_lora(load_pretrained(base)), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("command, flag", [(["generate", "--prompt", "x"], "--model"),
                                           (["merge", "--out", "{tmp}/merged"], "--base")])
def test_an_adapter_that_does_not_name_its_base_needs_the_flag(unnamed_adapter, tmp_path, capsys, command,
                                                              flag):
    argv = [a.format(tmp=tmp_path) for a in command]
    assert main([*argv, "--adapter", str(unnamed_adapter)]) == 2
    assert (f"{unnamed_adapter / 'adapter_config.json'}: base_model_name_or_path is not set, so the base "
            f"model is unknown: pass {flag} NAME_OR_DIR") in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_a_recorded_base_that_is_gone_is_named(unnamed_adapter, tmp_path, capsys):
    config = json.loads((unnamed_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (unnamed_adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--adapter", str(unnamed_adapter), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'moved-away'}: no such folder" in err
    assert f"(the base_model_name_or_path of {unnamed_adapter / 'adapter_config.json'}; pass --model" in err


def test_generate_needs_a_model_or_an_adapter(capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--model is required (or --adapter DIR, whose adapter_config.json names its base)" in (
        capsys.readouterr().err)


def test_the_library_recipe_records_the_base_in_the_trained_adapter(base, tmp_path, monkeypatch):
    """load_pretrained -> inject_lora -> train: the adapter train() writes names its base too."""
    from peftloop import TrainConfig, train

    monkeypatch.chdir(base.parent)
    model = with_lora(load_pretrained(base.name))
    assert model.lora_config.base_model_name_or_path == str(base.resolve())
    examples = [{"input_ids": [1, 4, 5, 6, 3], "labels": [-100, -100, 5, 6, 3]}] * 4
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, progress_bar=False)
    train(model, examples, config=config)
    assert adapter_base(tmp_path / "run" / "adapter") == str(base.resolve())
