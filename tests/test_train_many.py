"""train_many: K jobs trained as one give what the K jobs give trained one by one with train().

Tolerance, on the CPU in fp32:
- plain base: none. The group's adapters, logged losses and evaluations are bit-identical to
  train()'s (measured): a row's output elements are the same dot products over the same features
  whether the base GEMM holds that job's rows or every job's, a row's pads come after its real
  tokens (causal attention never reads them; their labels are -100), and each job's loss, token
  count, clipping and AdamW step are its own.
- 4-bit (NF4) base: EQUAL_RTOL of each tensor's (each loss's) magnitude. The 4-bit path multiplies
  by the dequantised weight in a GEMM whose blocking of the sums depends on how many rows it has:
  a base product can round differently in its last bit (measured: 1.3e-7 of an adapter's largest
  entry, 1.2e-7 of a loss, i.e. one ulp, after 7 steps), and AdamW carries that on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftloop.adapter_format import adapter_state_dict
from peftloop.checkpoint import load_adapter
from peftloop.config import LoraConfig, TrainConfig
from peftloop.data import collate
from peftloop.inject import inject_lora, inject_many
from peftloop.models import load_pretrained
from peftloop.multi_lora import RowRouting, multi_lora_layers, set_routing
from peftloop.nf4 import quantize_model
from peftloop.train import seed_everything, train
from peftloop.train_many import Job, fuse, summed_losses, train_many
from tests.helpers import base_dir as base_dir  # noqa: F401  (fixture)
from tests.helpers import logits_of, lora_model, read_log, tiny_model, toy_examples
from tests.hf_builders import load_reference

ROOT = Path(__file__).resolve().parents[1]
LOGGED = ("step", "epoch", "loss", "grad_norm", "lr", "eval_loss", "eval_tokens")  # not the timings
EQUAL_RTOL = 1e-6  # the 4-bit base's tolerance (8 ulps; 1 measured), relative to each value's magnitude


def jobs_of(out: Path, dropout: float = 0.0, equal_lengths: bool = False) -> list[Job]:
    """Three jobs that differ in everything a job may: data (sizes, so they end at different steps),
    rank, alpha, rsLoRA, learning rate, schedule, warmup, weight decay, accumulation, micro-batch
    size, seed, evaluation and early stopping (job 1 stops early)."""
    lengths = dict(min_len=6, max_len=6) if equal_lengths else {}

    def data(n, seed):
        return toy_examples(n, seed=seed, **lengths)

    def config(name, **kw):
        return TrainConfig(output_dir=str(out / name), progress_bar=False, **kw)

    return [
        Job(data(12, 1), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout),
            config("a", micro_batch_size=3, grad_accum=2, num_epochs=2, learning_rate=5e-3, seed=1)),
        Job(data(20, 2), LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", lora_dropout=dropout,
                                    use_rslora=True),
            config("b", micro_batch_size=2, grad_accum=3, max_steps=9, learning_rate=3e-2, warmup_steps=2,
                   weight_decay=0.1, lr_scheduler="cosine", seed=2, eval_every=1, early_stopping_patience=1),
            eval_data=data(4, 9)),
        Job(data(9, 3), LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout),
            config("c", micro_batch_size=4, max_steps=7, learning_rate=2e-3, warmup_ratio=0.3,
                   lr_scheduler="constant", seed=3, eval_every=3), eval_data=data(3, 8)),
    ]


def train_alone(base, job: Job, output_dir: Path):
    """The reference: the job as train() runs it alone, after seed_everything(seed); inject_lora."""
    seed_everything(job.config.seed)
    inject_lora(base, job.lora)
    config = dataclasses.replace(job.config, output_dir=str(output_dir))
    return base, train(base, job.train_data, job.eval_data, config)


def logged(folder: Path) -> list[dict]:
    return [{k: r[k] for k in LOGGED if k in r} for r in read_log(folder)]


def assert_equal(ours, theirs, rtol: float, what: str) -> None:
    """Bit for bit (rtol 0), or within rtol of the magnitude of the tensor or number."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    error = (ours - theirs).abs().max().item()
    assert error <= rtol * theirs.abs().max().item(), f"{what}: differs by {error:.3g}"


def assert_same_as_alone(tmp_path, make_base, rtol: float = 0.0, **data):
    jobs = jobs_of(tmp_path / "group", **data)
    results = train_many(make_base(), jobs)
    for k, job in enumerate(jobs):
        alone, expected = train_alone(make_base(), job, tmp_path / f"alone{k}")
        ours = load_file(Path(job.config.output_dir) / "adapter" / "adapter_model.safetensors")
        theirs = adapter_state_dict(alone)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert_equal(ours[key], theirs[key].detach(), rtol, f"job {k}: {key}")
        ours_log, theirs_log = logged(Path(job.config.output_dir)), logged(tmp_path / f"alone{k}")
        assert [sorted(r) for r in ours_log] == [sorted(r) for r in theirs_log], f"job {k}: other records"
        for ours_record, theirs_record in zip(ours_log, theirs_log):
            for key, value in theirs_record.items():
                assert_equal(ours_record[key], value, rtol, f"job {k}: step {theirs_record['step']}: {key}")
        assert results[k].global_step == expected.global_step
        assert_equal(results[k].train_loss, expected.train_loss, rtol, f"job {k}: train_loss")
        if "eval_loss" in expected.metrics:
            assert_equal(results[k].metrics["eval_loss"], expected.metrics["eval_loss"], rtol, f"job {k}")
    return jobs, results


def test_two_short_jobs_together_equal_two_train_runs(tmp_path):
    """The quick check (the slow tests below run every difference to the end)."""
    jobs = jobs_of(tmp_path / "group")[:2]
    for job in jobs:
        job.config.max_steps, job.config.eval_every = 2, 0
    train_many(tiny_model(0), jobs)
    for k, job in enumerate(jobs):
        alone, _ = train_alone(tiny_model(0), job, tmp_path / f"alone{k}")
        ours = load_file(Path(job.config.output_dir) / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(ours[key], value) for key, value in adapter_state_dict(alone).items())
        assert logged(Path(job.config.output_dir)) == logged(tmp_path / f"alone{k}")


@pytest.mark.slow
def test_three_jobs_together_equal_three_train_runs(tmp_path):
    jobs, results = assert_same_as_alone(tmp_path, lambda: tiny_model(0))
    # they end at different steps: job 0 after its 2 epochs of 2 windows, job 1 stopped early
    # (max_steps 9) and job 2 ran on to its max_steps without it
    steps = [r.global_step for r in results]
    assert steps[0] == 4 and steps[1] < 9 and steps[2] == 7 > steps[1], steps


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_three_jobs_on_a_4bit_base_equal_three_train_runs(tmp_path, dropout):
    assert_same_as_alone(tmp_path, lambda: quantize_model(tiny_model(0)), rtol=EQUAL_RTOL, dropout=dropout)


@pytest.mark.slow
def test_dropout_draws_each_jobs_own_stream(tmp_path):
    # equal lengths: every micro-batch of every job has the fused batch's length (see the next test)
    assert_same_as_alone(tmp_path, lambda: tiny_model(0), dropout=0.1, equal_lengths=True)


@pytest.mark.slow
def test_dropout_with_uneven_lengths(tmp_path):
    """Each job's micro-batches are padded to the fused batch's length; RowRouting.lengths gives
    the layers each job's own length, so its masks are drawn for its unpadded shape: bit for bit."""
    assert_same_as_alone(tmp_path, lambda: tiny_model(0), dropout=0.1)


def fused_pass_with_dropout(pad_id: int):
    """One fused forward and backward pass of three jobs with dropout, each micro-batch of its own
    length, padded by fuse() with input ``pad_id``: (losses, adapter gradients, each multi-adapter
    layer's output with its gradient retained, the jobs' rows, their lengths)."""
    model = tiny_model(0)
    configs = [LoraConfig(r=r, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear")
               for r in (2, 4, 3)]
    states = dict(enumerate(inject_many(model, configs, [1, 2, 3])))
    own = [collate(toy_examples(n, seed=n, min_len=length, max_len=length))
           for n, length in ((2, 3), (3, 6), (1, 4))]
    batch, rows = fuse(own)
    batch["input_ids"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], pad_id)
    lengths = {k: b["input_ids"].shape[1] for k, b in enumerate(own)}
    set_routing(model, RowRouting([(k, a, b) for k, (a, b) in enumerate(rows)], states, lengths))
    outputs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    hooks = [m.register_forward_hook(keep) for m in multi_lora_layers(model).values()]
    losses = summed_losses(model.train(), batch, rows, [0.0] * 3)
    sum(losses).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return [float(x.detach()) for x in losses], grads, outputs, rows, lengths


def test_a_pads_lora_output_reaches_no_real_positions_loss():
    """The pads fuse() appends after a job's shorter rows get a dropout mask of all "kept" (no draw of
    train() alone covers them), so their LoRA outputs are not those of any run alone. They must not
    matter: every loss's gradient with respect to each multi-adapter layer's output is exactly 0 at
    the pad positions (-100 labels; causal attention keeps real tokens blind to later pads), so
    nothing computed at a pad reaches a real position's loss or an adapter's gradient; and another
    pad input changes no loss and no gradient, bit for bit."""
    losses, grads, outputs, rows, lengths = fused_pass_with_dropout(pad_id=0)
    assert sorted(lengths.values()) == [8, 10, 14]  # 2 + twice the copied length
    assert len(outputs) == 7 * 2  # every target of the two decoder layers
    for out in outputs:
        for k, (a, b) in enumerate(rows):
            assert out.grad[a:b, :lengths[k]].abs().max() > 0
            assert torch.equal(out.grad[a:b, lengths[k]:], torch.zeros_like(out.grad[a:b, lengths[k]:]))
    other_losses, other_grads, *_ = fused_pass_with_dropout(pad_id=7)
    assert other_losses == losses
    assert other_grads.keys() == grads.keys()
    assert all(torch.equal(g, grads[n]) for n, g in other_grads.items())


def packed(n: int, seed: int) -> list[dict]:
    """n rows, each two examples packed (position ids restart at the second)."""
    ex = toy_examples(2 * n, seed=seed)
    return [{"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
             "position_ids": [*range(len(a["input_ids"])), *range(len(b["input_ids"]))]}
            for a, b in zip(ex[::2], ex[1::2])]


@pytest.mark.slow
@pytest.mark.parametrize("dropout, steps", [(0.0, 3), (0.1, 2)])
def test_a_packed_job_beside_an_unpacked_one(tmp_path, dropout, steps):
    """The packed job is bit for bit train()'s. The unpacked job's rows now share the fused batch's
    document mask, so its attention runs masked where train() alone runs plain causal attention: a
    different kernel, fp32 rounding (measured 2.8e-6 of an adapter's largest entry after 3 steps).
    With dropout (each job's masks those of its own unpadded micro-batches) that rounding grows
    faster from step to step: measured 0 after 1 step (where dB depends on every mask, so a wrong
    one shows at O(1)), 4.5e-6 after 2, 5.5e-5 after 3; the dropout case stops after 2."""
    jobs = jobs_of(tmp_path / "group", dropout=dropout)[:2]
    jobs[0] = dataclasses.replace(jobs[0], train_data=packed(6, 5))
    for job in jobs:
        job.config.max_steps, job.config.eval_every, job.config.early_stopping_patience = steps, 0, 0
    train_many(tiny_model(0), jobs)
    for k, (job, rtol) in enumerate(zip(jobs, (0.0, 1e-5))):
        alone, _ = train_alone(tiny_model(0), job, tmp_path / f"alone{k}")
        ours = load_file(Path(job.config.output_dir) / "adapter" / "adapter_model.safetensors")
        for key, value in adapter_state_dict(alone).items():
            assert_equal(ours[key], value.detach(), rtol, f"job {k}: {key}")


@pytest.mark.slow
def test_a_jobs_checkpoint_holds_its_own_state(tmp_path):
    jobs = jobs_of(tmp_path)
    jobs = [dataclasses.replace(job, config=dataclasses.replace(job.config, save_every=2, save_total_limit=2))
            for job in jobs]
    results = train_many(tiny_model(0), jobs)
    for job, result in zip(jobs, results):
        folder = Path(job.config.output_dir)
        saved = sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))
        last_even = result.global_step - result.global_step % 2
        assert saved == [last_even - 2, last_even], (folder, saved)
        state = json.loads((folder / f"checkpoint-{last_even}" / "trainer_state.json").read_text())
        assert state["global_step"] == last_even
        assert state["group"]["jobs"] == [j.config.output_dir for j in jobs]
    # a job's checkpoint is train()'s own: train() alone resumes job 2 from it and ends where the group did
    job = jobs[2]
    checkpoint_4 = str(Path(job.config.output_dir) / "checkpoint-4")
    config = dataclasses.replace(job.config, resume_from_checkpoint=checkpoint_4)
    alone, _ = train_alone(tiny_model(0), dataclasses.replace(job, config=config), tmp_path / "resumed")
    ours = load_file(Path(job.config.output_dir) / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[key], value) for key, value in adapter_state_dict(alone).items())


WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    from peftloop.callbacks import Callback
    from peftloop.train_many import train_many
    from tests.helpers import tiny_model
    from tests.test_train_many import resumable_jobs

    class Kill(Callback):
        def on_step_end(self, state, metrics):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    jobs = resumable_jobs({out!r}, resume={resume})
    if {kill_at}:
        jobs[0].callbacks = [Kill()]
    train_many(tiny_model(0), jobs)
""")


def resumable_jobs(out, resume: bool) -> list[Job]:
    """Two jobs with dropout (their streams must come back too), saving every 2 steps (job 1 keeps
    one checkpoint): job 0 runs 7 steps, job 1 ends at step 4."""
    jobs = jobs_of(Path(out), dropout=0.1, equal_lengths=True)[::-2]
    for job, limit in zip(jobs, (0, 1)):
        job.config.save_every, job.config.save_total_limit = 2, limit
        job.config.resume_from_checkpoint = True if resume else None
    return jobs


def run_worker(out: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    code = WORKER.format(root=str(ROOT), out=str(out), kill_at=kill_at, resume=resume)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
# killed mid-run with both jobs live; after job 1 ended (at 4). The kill comes before step N's
# checkpoints, so the group resumes from the one before.
@pytest.mark.parametrize("kill_at, resumed_at", [(3, 2), (6, 4)])
def test_kill_then_resume_equals_the_uninterrupted_group(tmp_path, kill_at, resumed_at):
    assert run_worker(tmp_path / "whole", 0, resume=False).returncode == 0
    assert run_worker(tmp_path / "killed", kill_at, resume=False).returncode == -signal.SIGKILL
    ended_adapter = tmp_path / "killed" / "a" / "adapter" / "adapter_model.safetensors"
    ended_before = ended_adapter.stat().st_mtime_ns if kill_at > 4 else None
    resumed = run_worker(tmp_path / "killed", 0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"train_many resumed from checkpoint-{resumed_at}" in resumed.stdout
    if ended_before is not None:  # job 1 had ended at step 4: it is not run again
        assert ended_adapter.stat().st_mtime_ns == ended_before
    for name in ("a", "c"):
        whole, killed = tmp_path / "whole" / name, tmp_path / "killed" / name
        expected = load_file(whole / "adapter" / "adapter_model.safetensors")
        got = load_file(killed / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
        assert logged(killed) == logged(whole), name


def test_saved_adapters_load_in_peft(tmp_path, base_dir):  # noqa: F811
    peft = pytest.importorskip("peft")
    jobs = jobs_of(tmp_path)[:2]
    train_many(load_pretrained(base_dir), jobs)
    for job in jobs:
        folder = Path(job.config.output_dir) / "adapter"
        theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), folder).eval()
        ours = load_adapter(load_pretrained(base_dir), folder).eval()
        assert not torch.allclose(logits_of(ours), logits_of(load_pretrained(base_dir)), atol=1e-4)
        torch.testing.assert_close(logits_of(theirs), logits_of(ours), rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda jobs: setattr(jobs[1].config, "precision", "bf16"), r"job 1 has precision='bf16' but job 0"),
    (lambda jobs: setattr(jobs[2].config, "output_dir", jobs[0].config.output_dir),
     r"jobs 0 and 2 share output_dir"),
    (lambda jobs: [setattr(job.config, "resume_from_checkpoint", "runs/checkpoint-2") for job in jobs],
     r"resume_from_checkpoint must be True"),
    (lambda jobs: setattr(jobs[0].config, "eval_generate_max_new_tokens", 4), r"job 0 sets eval_generate"),
    (lambda jobs: setattr(jobs[1], "eval_data", None), r"job 1 stops early .* no eval_data"),
    (lambda jobs: setattr(jobs[1].lora, "target_modules", ["q_proj"]), r"configs\[1\] targets other modules"),
])
def test_bad_groups_are_refused_before_anything_runs(tmp_path, change, message):
    jobs = jobs_of(tmp_path)
    change(jobs)
    with pytest.raises(ValueError, match=message):
        train_many(tiny_model(0), jobs)
    assert not any(Path(job.config.output_dir).exists() for job in jobs)


def test_a_model_with_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="already has adapters; give the base model"):
        train_many(lora_model(), jobs_of(tmp_path))
    with pytest.raises(ValueError, match="no jobs"):
        train_many(tiny_model(0), [])
