"""Every entry point is reproducible from its seed: two runs in fresh processes (torch seeds its
generator differently in each) give bit-identical adapters and the same logged numbers.

Fresh processes are the point: within one process the tests' autouse seeding would hide an
entry point that forgets to seed (that is how ``peftloop train --seed N`` shipped unseeded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import qa_records, save_chat_base, write_jsonl

# What a log record holds that is a measurement of the machine, not of the training.
TIMING_KEYS = {"tokens_per_s", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "step_time", "elapsed", "eta", "peak_memory_mb"}


def run_fresh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run in a new interpreter with the environment a user has (no PYTHONHASHSEED pinning)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged_numbers(log: Path) -> list[dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records, f"{log} is empty"
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_chat_base(tmp_path_factory.mktemp("base") / "chat-base")


@pytest.fixture
def qa_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", qa_records(repeat=4))


@pytest.mark.slow
def test_cli_train_twice_with_one_seed_gives_the_same_adapter_and_log(base, qa_data, tmp_path):
    """Dropout on, a shuffled order and an eval split: every random draw the CLI makes."""
    def train(out: str, seed: int):
        run_fresh(["-m", "peftloop.cli", "train", "--model", str(base), "--data", str(qa_data),
                   "--output-dir", out,
                   "--seed", str(seed), "--max_steps", "4", "--micro_batch_size", "4", "--r", "4",
                   "--lora_dropout", "0.1", "--eval_split", "0.25", "--eval_every", "2", "--log_every", "1",
                   "--progress_bar", "false"], tmp_path)
        return tmp_path / out

    first, second, other = train("a", 5), train("b", 5), train("c", 6)
    assert adapter_bytes(first / "adapter") == adapter_bytes(second / "adapter")
    assert logged_numbers(first / "log.jsonl") == logged_numbers(second / "log.jsonl")
    assert any("grad_norm" in r for r in logged_numbers(first / "log.jsonl"))
    # ... and the seed is what decides it: another seed, another adapter
    assert adapter_bytes(first / "adapter") != adapter_bytes(other / "adapter")


LIBRARY_RECIPE = textwrap.dedent("""
    import sys
    from peftloop import LoraConfig, TrainConfig, inject_lora, save_adapter, seed_everything, train
    from peftloop.models import load_pretrained

    seed_everything(int(sys.argv[2]))
    model = load_pretrained(sys.argv[1])
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    examples = [{"input_ids": [1, 4, 5, 6, 3, 6, 5, 4, 2], "labels": [-100] * 5 + [6, 5, 4, 2]}] * 16
    train(model, examples, config=TrainConfig(output_dir=sys.argv[3], max_steps=3, micro_batch_size=4,
                                              log_every=1, progress_bar=False, seed=int(sys.argv[2])))
    save_adapter(model, sys.argv[3] + "/final")
""")


@pytest.mark.slow
def test_the_documented_library_recipe_is_reproducible(base, tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(LIBRARY_RECIPE)
    for out in ("a", "b"):
        run_fresh([str(script), str(base), "3", str(tmp_path / out)], tmp_path)
    assert adapter_bytes(tmp_path / "a" / "final") == adapter_bytes(tmp_path / "b" / "final")
    assert logged_numbers(tmp_path / "a" / "log.jsonl") == logged_numbers(tmp_path / "b" / "log.jsonl")


@pytest.mark.slow
def test_the_demo_is_reproducible(tmp_path):
    for out in ("a", "b"):
        run_fresh(["-m", "peftloop.cli", "train", "--output-dir", out, "--max_steps", "3", "--log_every", "1",
                   "--progress_bar", "false"], tmp_path)
    assert adapter_bytes(tmp_path / "a" / "adapter") == adapter_bytes(tmp_path / "b" / "adapter")
    assert logged_numbers(tmp_path / "a" / "log.jsonl") == logged_numbers(tmp_path / "b" / "log.jsonl")


@pytest.mark.slow
def test_cli_train_under_torchrun_is_reproducible(base, qa_data, tmp_path):
    """Two ranks (DDP, gloo) draw one LoRA init, different dropout masks, and the same run twice.
    (``--lora.r``, not ``--r``: torchrun's own parser would take ``--r`` for an abbreviation of its flags.)"""
    from tests.test_distributed import free_port

    for out in ("a", "b"):
        run_fresh(["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                   "--max-restarts=0", "-m", "peftloop", "train", "--model", str(base),
                   "--data", str(qa_data), "--output-dir", out, "--seed", "7", "--max_steps", "3",
                   "--micro_batch_size", "2", "--lora.r", "4", "--lora_dropout", "0.1", "--log_every", "1",
                   "--progress_bar", "false", "--strategy", "ddp"],
                  tmp_path)
    assert adapter_bytes(tmp_path / "a" / "adapter") == adapter_bytes(tmp_path / "b" / "adapter")
    assert logged_numbers(tmp_path / "a" / "log.jsonl") == logged_numbers(tmp_path / "b" / "log.jsonl")
