"""The loop's semantics: accumulation normalisation, AMP, clipping, schedules, eval, saving, resume."""

import math

import pytest
import torch

from peftloop.adapter_format import adapter_state_dict
from peftloop.callbacks import Callback
from peftloop.checkpoint import CheckpointError, list_checkpoints, read_safetensors
from peftloop.config import TrainConfig
from peftloop.data import collate
from peftloop.demo import run_demo
from peftloop.schedule import lr_at
from peftloop.train import summed_token_loss, train
from tests.helpers import StopAt, lora_model, read_log, tiny_model, toy_examples


def run(model, data, tmp_path, eval_data=None, callbacks=(), **cfg):
    defaults = dict(output_dir=str(tmp_path), progress_bar=False, log_every=1, learning_rate=1e-3)
    return train(model, data, eval_data, TrainConfig(**{**defaults, **cfg}), callbacks=list(callbacks))


class GradCapture(Callback):
    """Keeps a copy of the gradients the optimizer is about to apply, step by step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, state, model):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


class ParamCapture(Callback):
    def __init__(self, model):
        self.model, self.params = model, []

    def on_step_end(self, state, metrics):
        self.params.append({k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()})


# -- accumulation -------------------------------------------------------------------------------

def test_accumulation_equals_one_big_batch_with_uneven_padding(tmp_path):
    data = toy_examples(12, min_len=2, max_len=14)  # very uneven label counts per example
    big, small = GradCapture(), GradCapture()
    run(lora_model(), data, tmp_path / "a", callbacks=[big], micro_batch_size=12, grad_accum=1,
        max_steps=1, shuffle=False, max_grad_norm=0)
    run(lora_model(), data, tmp_path / "b", callbacks=[small], micro_batch_size=3, grad_accum=4,
        max_steps=1, shuffle=False, max_grad_norm=0)
    assert big.grads[0].keys() == small.grads[0].keys() and big.grads[0]
    for name, g in big.grads[0].items():
        torch.testing.assert_close(small.grads[0][name], g, rtol=1e-5, atol=1e-7)
    loss_big, loss_small = read_log(tmp_path / "a")[0]["loss"], read_log(tmp_path / "b")[0]["loss"]
    assert loss_small == pytest.approx(loss_big, rel=1e-6)


def test_step_loss_is_token_weighted_not_mean_of_means(tmp_path):
    data = toy_examples(4, min_len=2, max_len=14)
    model = lora_model()
    run(model, data, tmp_path, micro_batch_size=1, grad_accum=4, max_steps=1, shuffle=False,
        learning_rate=1e-12)
    # recompute: total summed loss / total label tokens over the window, at the initial weights
    fresh = lora_model()
    with torch.no_grad():
        batches = [collate([e]) for e in data]
        total = sum(float(summed_token_loss(fresh, b)) for b in batches)
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        mean_of_means = sum(float(summed_token_loss(fresh, b)) / int((b["labels"][:, 1:] != -100).sum())
                            for b in batches) / 4
    logged = read_log(tmp_path)[0]["loss"]
    assert logged == pytest.approx(total / tokens, rel=1e-6)
    assert abs(logged - mean_of_means) > 1e-4  # the data is uneven enough to tell them apart


def test_partial_last_window_makes_a_step(tmp_path):
    data = toy_examples(10)
    result = run(lora_model(), data, tmp_path, micro_batch_size=2, grad_accum=2, num_epochs=2)
    assert result.global_step == 2 * math.ceil(5 / 2)


# -- clipping, AMP ---------------------------------------------------------------------------------

def test_clipping_logs_the_norm_before_clipping_and_clips(tmp_path):
    data = toy_examples(8)
    grads = GradCapture()
    run(lora_model(), data, tmp_path, callbacks=[grads], micro_batch_size=8, max_steps=1,
        max_grad_norm=1e-3, learning_rate=1.0)
    logged = read_log(tmp_path)[0]["grad_norm"]
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.grads[0].values()]))
    assert logged > 1e-2  # the raw norm is large...
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)  # ...and the applied gradient is clipped


def test_fp16_scaler_skips_an_inf_step_and_leaves_parameters_unharmed(tmp_path):
    data = toy_examples(16)
    model = lora_model()
    target = model.model.layers[0].self_attn.q_proj.lora_B.weight
    calls = {"n": 0}

    def poison(grad):  # the second optimizer step gets an inf gradient (micro_batch = whole window)
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 2 else grad

    target.register_hook(poison)
    params = ParamCapture(model)
    result = run(model, data, tmp_path, callbacks=[params], micro_batch_size=16, max_steps=4,
                 precision="fp16", shuffle=False)
    log = read_log(tmp_path)
    assert result.metrics["skipped_steps"] == 1
    for k in params.params[0]:  # step 2 changed nothing ...
        assert torch.equal(params.params[1][k], params.params[0][k]), k
        assert torch.isfinite(params.params[3][k]).all()
    # ... step 3 did
    assert any(not torch.equal(params.params[2][k], params.params[1][k]) for k in params.params[0])
    assert math.isfinite(log[3]["loss"])


def test_bf16_training_is_the_same_on_both_cpu_matmul_paths(tmp_path, force_cpu_low_precision):
    """bf16 autocast on a CPU with bf16 hardware (native GEMMs) and without it (fp32 products,
    rounded once): the same products, so the same losses to bf16 rounding, on every host."""
    losses = {}
    for mode in ("native", "fp32"):
        force_cpu_low_precision(mode)
        run(lora_model(), toy_examples(16), tmp_path / mode, precision="bf16", micro_batch_size=4,
            max_steps=3, learning_rate=1e-2, shuffle=False)
        losses[mode] = [r["loss"] for r in read_log(tmp_path / mode) if "loss" in r]
    assert len(losses["native"]) == 3 and all(math.isfinite(x) for x in losses["native"])
    assert losses["fp32"] == pytest.approx(losses["native"], rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_demo_task_learns(tmp_path, precision):
    # Short on purpose: bf16 matmuls are slow on CPUs without native bf16 (AVX2-only hosts).
    summary = run_demo(tmp_path, train_overrides={"max_steps": 80, "micro_batch_size": 16, "warmup_steps": 5,
                                                   "precision": precision, "progress_bar": False,
                                                   "eval_every": 0, "log_every": 10})
    assert summary["first_logged_loss"] > 2.5  # ~log(vocab): the base model knows nothing
    assert summary["last_logged_loss"] < 0.6 * summary["first_logged_loss"]
    assert summary["eval_loss"] < 0.6 * summary["first_logged_loss"]


# -- schedules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_match_transformers(kind):
    transformers = pytest.importorskip("transformers", reason="the 'ref' extra is not installed")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup,
            "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w)}[kind]
    sched = make(opt, 7, 50)
    for step in range(50):
        ours = lr_at(step, peak_lr=1.0, total_steps=50, warmup_steps=7, kind=kind)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_cosine_floor():
    floor = lr_at(100, peak_lr=1.0, total_steps=100, warmup_steps=0, kind="cosine", min_lr_ratio=0.1)
    assert floor == pytest.approx(0.1)


def test_loop_sets_the_scheduled_lr(tmp_path):
    run(lora_model(), toy_examples(8), tmp_path, micro_batch_size=2, max_steps=4, warmup_steps=2,
        lr_scheduler="linear", learning_rate=1.0)
    assert [r["lr"] for r in read_log(tmp_path)] == [0.0, 0.5, 1.0, 0.5]


# -- eval, label smoothing, early stopping, saving ---------------------------------------------------------

def test_eval_loss_and_perplexity(tmp_path):
    data = toy_examples(8)
    result = run(lora_model(), data, tmp_path, eval_data=data[:5], micro_batch_size=4, max_steps=2,
                 learning_rate=1e-12)
    fresh = lora_model()
    with torch.no_grad():
        batch = collate(data[:5])
        expected = float(summed_token_loss(fresh, batch)) / int((batch["labels"][:, 1:] != -100).sum())
    assert result.metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_label_smoothing_follows_torch_definition(tmp_path):
    data = toy_examples(8)
    smooth = run(lora_model(), data, tmp_path, micro_batch_size=8, max_steps=1, learning_rate=1e-12,
                 label_smoothing=0.3, shuffle=False)
    fresh = lora_model()
    with torch.no_grad():
        batch = collate(data)
        logits = fresh(batch["input_ids"])[:, :-1].flatten(0, 1)
        targets = batch["labels"][:, 1:].flatten()
        expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.3)
        plain = torch.nn.functional.cross_entropy(logits, targets)
    assert smooth.train_loss == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - float(plain)) > 1e-3


class ScriptedEvalLoss(Callback):
    """Replaces the eval_loss of each evaluation by the next value of a script, so the step where
    early stopping must stop is known. It runs before EarlyStopping (train() appends that last)."""

    def __init__(self, values):
        self.values, self.evaluated_at = list(values), []

    def on_evaluate(self, state, metrics):
        metrics["eval_loss"] = self.values[len(self.evaluated_at)]
        self.evaluated_at.append(state.global_step)


@pytest.mark.parametrize(("patience", "stop_step"), [(1, 6), (2, 12), (3, 14)])
def test_early_stopping_stops_after_exactly_patience_evaluations_without_improvement(tmp_path, patience,
                                                                                      stop_step):
    # Evaluations at steps 2, 4, 6, ...: 3.0 and 2.5 improve; 2.6 does not (1 in a row); 2.4 improves
    # (the count restarts); 2.7, 2.4 (equal is no improvement), 2.5 do not (1, 2, 3 in a row).
    script = ScriptedEvalLoss([3.0, 2.5, 2.6, 2.4, 2.7, 2.4, 2.5, 1.0, 1.0, 1.0])
    data = toy_examples(16)
    result = run(lora_model(), data, tmp_path, eval_data=data[:4], callbacks=[script], micro_batch_size=4,
                 max_steps=40, eval_every=2, early_stopping_patience=patience)
    assert result.global_step == stop_step
    assert script.evaluated_at == list(range(2, stop_step + 1, 2))  # and no final evaluation after the stop
    assert len([r for r in read_log(tmp_path) if "eval_loss" in r]) == stop_step // 2


def test_max_steps_cycles_through_epochs_and_logs_the_data_position(tmp_path):
    # 8 examples, 2 per micro-batch, 2 micro-batches per step: 2 steps per epoch, 5 steps = 2.5 epochs
    run(lora_model(), toy_examples(8), tmp_path, micro_batch_size=2, grad_accum=2, max_steps=5)
    assert [r["epoch"] for r in read_log(tmp_path)] == [0.5, 1.0, 1.5, 2.0, 2.5]


def test_a_model_without_adapters_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no LoRA adapters to train: call inject_lora.*load_adapter"):
        run(tiny_model(), toy_examples(4), out, max_steps=1)
    frozen = lora_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"adapters .* are frozen.*is_trainable=True"):
        run(frozen, toy_examples(4), out, max_steps=1)
    assert not out.exists()


def test_saving_every_n_steps_with_a_total_limit(tmp_path):
    data = toy_examples(8)
    run(lora_model(), data, tmp_path, micro_batch_size=2, max_steps=7, save_every=2, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_saving_each_epoch(tmp_path):
    data = toy_examples(8)
    run(lora_model(), data, tmp_path, micro_batch_size=2, grad_accum=2, num_epochs=3, save_each_epoch=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# -- resume --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_is_bit_exact(tmp_path, precision):
    # dropout (RNG), shuffling across epochs (data position), accumulation, warmup + cosine (schedule),
    # weight decay and the fp16 scaler (optimizer and scaler state) all have to come back exactly.
    data = toy_examples(14, seed=3)
    cfg = dict(micro_batch_size=3, grad_accum=2, max_steps=10, warmup_steps=2, lr_scheduler="cosine",
               weight_decay=0.1, save_every=5, precision=precision)
    straight = lora_model(lora_dropout=0.2)
    run(straight, data, tmp_path / "straight", **cfg)

    interrupted = lora_model(lora_dropout=0.2)
    run(interrupted, data, tmp_path / "resumed", callbacks=[StopAt(5)], **cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-5"]
    # another init: everything must come from the checkpoint
    resumed = lora_model(adapter_seed=123, lora_dropout=0.2)
    result = run(resumed, data, tmp_path / "resumed", resume_from_checkpoint=True, **cfg)
    assert result.global_step == 10

    a = read_safetensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = read_safetensors(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda p: [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(p) if "loss" in r]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_resume_from_an_explicit_path_and_missing_checkpoint(tmp_path):
    data = toy_examples(8)
    run(lora_model(), data, tmp_path, micro_batch_size=2, max_steps=4, save_every=2)
    result = run(lora_model(), data, tmp_path, micro_batch_size=2, max_steps=6,
                 resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert result.global_step == 6
    with pytest.raises(CheckpointError, match="checkpoint-99"):
        run(lora_model(), data, tmp_path, micro_batch_size=2, max_steps=6,
            resume_from_checkpoint=str(tmp_path / "checkpoint-99"))
