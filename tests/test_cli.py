"""The peftloop command: the demo end to end (shortened), merge, and input errors."""

import json
import subprocess
import sys

import pytest
import torch

from peftloop.cli import main
from tests.helpers import read_log


@pytest.mark.slow
def test_demo_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "--output-dir", str(out), "--max_steps", "40", "--micro_batch_size", "16",
                 "--eval_every", "20", "--log_every", "1", "--progress_bar", "false", "--lora.r", "8"]) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "adapter (PEFT format)" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "base" / name).is_file(), name
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"] == ["lm_head"]
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert [r["step"] for r in log if "eval_loss" in r] == [20, 40]

    peft = pytest.importorskip("peft", reason="the 'ref' extra is not installed")
    from peftloop.checkpoint import load_adapter
    from peftloop.models import load_pretrained
    from tests.hf_builders import load_reference

    theirs = peft.PeftModel.from_pretrained(load_reference(out / "base"), out / "adapter").eval()
    ours = load_adapter(load_pretrained(out / "base"), out / "adapter").eval()
    ids = torch.tensor([[1, 4, 5, 6, 3]])
    torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-5)


def test_config_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nmax_steps = 3\nmicro_batch_size = 4\nprogress_bar = false\neval_every = 0\n"
                      "[lora]\nr = 2\ntarget_modules = [\"q_proj\", \"v_proj\"]\nmodules_to_save = []\n")
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o"), "--r", "4"]) == 0
    saved = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--max_step", "3"], "unknown option --max_step; did you mean --max_steps?"),
    (["train", "--precision", "fp8"], "train.precision='fp8'"),
    (["train", "--r", "0"], "lora.r must be a positive integer"),
])
def test_bad_input_is_an_error_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_merge_with_a_missing_adapter(tmp_path, capsys):
    from peftloop.models import save_pretrained
    from tests.helpers import tiny_model

    save_pretrained(tiny_model(), tmp_path / "base")
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "nope/adapter_config.json: file not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "peftloop", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "merge" in result.stdout
