"""Crash safety: SIGKILL at many moments, then resume; full disks; NaN policies."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftloop.files as files
from peftloop.adapter_format import adapter_state_dict
from peftloop.callbacks import Callback
from peftloop.checkpoint import CheckpointError, list_checkpoints, verify_manifest
from peftloop.config import TrainConfig
from peftloop.files import recover_interrupted_writes
from peftloop.train import NonFiniteError, train
from tests.helpers import lora_model, read_log, toy_examples

WORKER = Path(__file__).with_name("fault_worker.py")


@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_the_uninterrupted_run(tmp_path):
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in reports if not r["ok"]]
    assert len(reports) >= 20, result.stderr[-3000:]
    assert not failed, json.dumps(failed, indent=1) + result.stderr[-3000:]
    assert result.returncode == 0
    # the kill points cover a fresh start, mid-run resumes and the end of the run
    resumed_from = {r["resumed_from"] for r in reports}
    assert None in resumed_from and len(resumed_from) >= 4


def config(tmp_path, **kw):
    return TrainConfig(**{"output_dir": str(tmp_path), "micro_batch_size": 4, "max_steps": 6, "save_every": 2,
                          "progress_bar": False, **kw})


def failing_save_file(fail_on_call):
    real, count = files.save_file, {"n": 0}

    def save_file(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] == fail_on_call:
            Path(filename).write_bytes(b"\0" * 10)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)
    return save_file


def test_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # the 2nd checkpoint's optimizer
    monkeypatch.setattr(files, "save_file", failing_save_file(fail_on_call=5))
    message = r"could not write .*checkpoint-4: .*No space left.*checkpoint-2"
    with pytest.raises(CheckpointError, match=message):
        train(lora_model(), toy_examples(16), config=config(tmp_path))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    verify_manifest(tmp_path / "checkpoint-2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_disk_can_be_survived(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "save_file", failing_save_file(fail_on_call=5))
    result = train(lora_model(), toy_examples(16), config=config(tmp_path, on_save_error="continue"))
    assert result.global_step == 6
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-6"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_real_full_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no permission); "
                    "the injected failures above still run")
    try:
        class FillTheDisk(Callback):
            def on_save(self, state, path):
                if state.global_step == 2:  # after the first checkpoint, leave no room for another
                    with open(mount / "filler", "wb") as f:
                        try:
                            while True:
                                f.write(b"\0" * 65536)
                        except OSError:
                            pass

        with pytest.raises(CheckpointError, match="No space left"):
            train(lora_model(), toy_examples(16), config=config(mount), callbacks=[FillTheDisk()])
        assert [p.name for p in list_checkpoints(mount)] == ["checkpoint-2"]
        verify_manifest(mount / "checkpoint-2")
        assert not [p for p in mount.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


class Poison(Callback):
    """Turns the gradients of one parameter into NaN before the optimizer step of one step."""

    def __init__(self, step, name="model.layers.1.mlp.down_proj.lora_B.weight"):
        self.step, self.name, self.params = step, name, []

    def on_before_optimizer_step(self, state, model):
        if state.global_step + 1 == self.step:
            model.get_parameter(self.name).grad.fill_(float("nan"))

    def on_step_end(self, state, metrics):
        self.params.append({k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()})


def test_nan_policy_skip_counts_and_protects_the_weights(tmp_path, monkeypatch):
    # the poison goes in after clipping computed the norm, so make the norm itself non-finite too
    model = lora_model()
    poison = Poison(3)
    poison.model = model
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        norm = real_clip(params, max_norm, *a, **k)
        return norm * float("nan") if len(poison.params) == 2 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    result = train(model, toy_examples(16), config=config(tmp_path, learning_rate=1e-2), callbacks=[poison])
    assert result.metrics["nonfinite_steps"] == 1 and result.metrics["skipped_steps"] == 1
    for k in poison.params[1]:
        assert torch.equal(poison.params[2][k], poison.params[1][k])  # step 3 changed nothing
        assert torch.isfinite(poison.params[-1][k]).all()
    assert result.train_loss == result.train_loss  # not NaN
    log = read_log(tmp_path)
    assert len([r for r in log if "loss" in r]) == 6


def test_nan_policy_stop_names_the_step_and_the_parameter(tmp_path):
    model = lora_model()
    bad = "model.layers.0.self_attn.v_proj.lora_A.weight"
    model.get_parameter(bad).register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match=f"step 1: the gradient of {bad} has NaN/inf"):
        train(model, toy_examples(8), config=config(tmp_path, nan_policy="stop"))
    assert not list_checkpoints(tmp_path)


def test_a_nan_never_reaches_a_checkpoint(tmp_path):
    class Corrupt(Callback):
        def on_step_end(self, state, metrics):
            if state.global_step == 3:
                with torch.no_grad():
                    self.model.model.layers[0].self_attn.q_proj.lora_A.weight[0, 0] = float("nan")

    model = lora_model()
    corrupt = Corrupt()
    corrupt.model = model
    with pytest.raises(NonFiniteError, match="not saving checkpoint-4: .*q_proj.lora_A.weight has NaN"):
        train(model, toy_examples(16), config=config(tmp_path), callbacks=[corrupt])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_recover_interrupted_writes(tmp_path):
    (tmp_path / ".tmp-checkpoint-4-0123abcd").mkdir()
    (tmp_path / ".old-adapter-89abcdef").mkdir()  # crashed between "old aside" and "new in"
    (tmp_path / ".old-adapter-89abcdef" / "adapter_config.json").write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".old-checkpoint-2-00000000").mkdir()  # the new one made it: the old one goes
    (tmp_path / ".unrelated").mkdir()
    recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".unrelated", "adapter", "checkpoint-2"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
