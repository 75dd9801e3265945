"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 against one process, resume, and a dying rank.

Each case launches real processes, so these are the slowest tests; they still run in CI.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftloop.checkpoint import list_checkpoints, load_adapter, read_safetensors, verify_manifest
from peftloop.models import load_pretrained

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(output_dir, nproc=2, timeout=240, **kwargs):
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    env = {**os.environ, "PEFTLOOP_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--max-restarts=0", str(WORKER)]
    return subprocess.run([*cmd, "--output-dir", str(output_dir), *flags], env=env, capture_output=True,
                          text=True, timeout=timeout)


def adapter(path):
    return read_safetensors(Path(path) / "adapter" / "adapter_model.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process with the same global batch (4 examples per micro-batch, 2 per step)."""
    out = tmp_path_factory.mktemp("single")
    check(launch(out, nproc=1, micro_batch_size=4))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, single, strategy):
    check(launch(tmp_path, strategy=strategy, micro_batch_size=2))
    diff = max_diff(adapter(tmp_path), adapter(single))
    print(f"{strategy}: max |adapter difference| vs one process = {diff:.3e}")
    assert diff < 1e-5
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == len((single / "log.jsonl").read_text().splitlines())  # rank 0 alone writes the log


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_under_distribution_reproduces_the_uninterrupted_run(tmp_path, strategy):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(launch(straight, strategy=strategy))
    check(launch(resumed, strategy=strategy, save_every=3, stop_at=3))
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-3"]
    check(launch(resumed, strategy=strategy, resume=True))
    a, b = adapter(straight), adapter(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_under_a_different_world_size(tmp_path, single):
    # 2 processes x 2 examples save at step 3; 1 process x 4 examples (same global batch) finishes
    check(launch(tmp_path, strategy="ddp", micro_batch_size=2, save_every=3, stop_at=3))
    check(launch(tmp_path, nproc=1, micro_batch_size=4, resume=True))
    assert max_diff(adapter(tmp_path), adapter(single)) < 1e-5
    # and the other way round: 1 process saves, 2 processes finish
    other = tmp_path / "other"
    check(launch(other, nproc=1, micro_batch_size=4, save_every=3, stop_at=3))
    check(launch(other, strategy="fsdp", micro_batch_size=2, resume=True))
    assert max_diff(adapter(other), adapter(single)) < 1e-5


def test_a_dead_rank_stops_the_job_and_leaves_the_last_checkpoint(tmp_path):
    start = time.monotonic()
    result = launch(tmp_path, strategy="ddp", save_every=3, die_at=4, max_steps=8, timeout=180)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 150, "the surviving rank hung"
    output = result.stdout + result.stderr
    assert "rank" in output.lower() and ("SIGKILL" in output or "exitcode" in output), output[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    verify_manifest(tmp_path / "checkpoint-3")
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_cli_under_torchrun(tmp_path, strategy):
    """`torchrun -m peftloop train` (the demo) trains under both strategies and leaves a loadable adapter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "--max-restarts=0", "-m", "peftloop", "train",
           "--output-dir", str(tmp_path), "--max_steps", "6",
           "--micro_batch_size", "8", "--eval_every", "0", "--progress_bar", "false", "--strategy", strategy]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PEFTLOOP_DIST_TIMEOUT": "60"})
    check(result)
    assert result.stdout.count("[demo] base model") == 1  # rank 0 alone prints and writes
    load_adapter(load_pretrained(tmp_path / "base"), tmp_path / "adapter")
