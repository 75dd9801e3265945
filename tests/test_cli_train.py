"""``peftloop train --model <HF folder> --data <jsonl>`` end to end, ``peftloop generate`` showing
the adapter's effect, ``peftloop merge`` for every family, and the errors of the real-model path."""

import json

import pytest
import torch

from peftloop.cli import main
from peftloop.models import load_pretrained
from tests.helpers import QA, assert_merged_logits_close, qa_records, save_chat_base, write_jsonl
from tests.hf_builders import FAMILIES, build_checkpoint, load_reference


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """helpers.save_chat_base: a tiny Qwen2-shaped checkpoint with a ChatML tokenizer."""
    return save_chat_base(tmp_path_factory.mktemp("base") / "qwen2-tiny")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", qa_records(4))


def test_train_evaluates_saves_and_generate_shows_the_adapter(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                 "--max_steps", "24", "--micro_batch_size", "4", "--learning_rate", "1e-2", "--r", "8",
                 "--lora_alpha", "16", "--eval_split", "0.25", "--eval_every", "12",
                 "--progress_bar", "false"]) == 0
    printed = capsys.readouterr().out
    assert "records -> " in printed and "eval loss" in printed and "adapter (PEFT format)" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [12, 24]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert adapter_config["target_modules"] == sorted(all_linear)  # the CLI's default
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    prompts = [f"Q: {q}\nA:" for q, _ in QA]
    argv = ["generate", "--model", str(base), "--adapter", str(out / "adapter"), "--compare",
            "--max-new-tokens", "10"]
    assert main(argv + [arg for p in prompts for arg in ("--prompt", p)]) == 0
    printed = capsys.readouterr().out
    for _, answer in QA:
        assert f"[adapter]  {answer}\n" in printed  # the adapter answers; the random base does not
    assert not any(f"[base]     {answer}" in printed for _, answer in QA)


def test_a_toml_config_with_model_and_data_sections(base, data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nname_or_path = "{base}"\ndtype = "fp32"\n'
                      f'[data]\ntrain_file = "{data}"\npacking = true\nmax_seq_len = 64\n'
                      '[train]\nmax_steps = 2\nprogress_bar = false\n'
                      '[lora]\nr = 2\ntarget_modules = ["q_proj"]\n')
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["target_modules"] == ["q_proj"]


def test_streaming_trains_with_max_steps(base, data, tmp_path, capsys):
    argv = ["train", "--model", str(base), "--data", str(data), "--streaming", "true",
            "--progress_bar", "false"]
    assert main([*argv, "--output-dir", str(tmp_path / "no-steps")]) == 2
    message = "data.streaming reads the file lazily and has no length: set train.max_steps"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "no-steps").exists()
    assert main([*argv, "--output-dir", str(tmp_path / "s"), "--max_steps", "5",
                 "--shuffle_buffer", "4"]) == 0
    assert "(streamed, last pass): " in capsys.readouterr().out
    assert (tmp_path / "s" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.jsonl"], "data.train_file given without a model: set --model"),
    (["--model", "./missing-model-folder", "--data", "{data}"], "missing-model-folder: no such folder"),
    (["--model", "{base}", "--data", "{bad}"], "bad.jsonl:2: invalid JSON"),
    (["--model", "{base}", "--data", "{data}", "--format", "csv"], "data.format='csv'"),
    (["--model", "{base}", "--data", "{data}", "--dtype", "int8"], "model.dtype='int8'"),
])
def test_errors_name_the_problem_and_write_nothing(base, data, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    argv = [a.format(base=base, data=data, bad=bad) for a in argv]
    out = tmp_path / "out"
    assert main(["train", *argv, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generate_errors(base, capsys):
    assert main(["generate", "--model", str(base), "--prompt", "x", "--compare"]) == 2
    assert "--compare needs --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_writes_a_checkpoint_transformers_loads_with_our_logits(tmp_path, family, capsys):
    pytest.importorskip("peft", reason="the 'ref' extra is not installed")
    from peftloop import LoraConfig, inject_lora, save_adapter

    folder = build_checkpoint(tmp_path / "base", family, seed=3)
    model = load_pretrained(folder)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--base", str(folder), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).is_file(), name
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids)
        merged_in_transformers = load_reference(tmp_path / "merged")(ids).logits
        merged_in_peftloop = load_pretrained(tmp_path / "merged")(ids)
    assert_merged_logits_close(merged_in_transformers, ours)
    assert_merged_logits_close(merged_in_peftloop, ours)
    with torch.no_grad():  # the adapter did change the model, so the comparison means something
        assert (load_pretrained(folder)(ids) - ours).abs().max() > 1e-2
