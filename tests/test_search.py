"""Hyperparameter search: ``train(..., trial=...)`` and ``peftloop search``, with the real optuna.

The hook: a dict's values override the TrainConfig (and LoRA values must be the model's); an
optuna trial gets every evaluation and a pruned one stops after its step, checkpoints intact,
raising optuna.TrialPruned. The driver: 8 demo trials with a median pruner prune at least one,
a search killed with SIGKILL resumes without re-running finished trials, and the best trial's
adapter loads in peft.
"""

from __future__ import annotations

import json

import pytest
import torch

from peftloop.adapter_format import adapter_state_dict
from peftloop.checkpoint import list_checkpoints, verify_manifest
from peftloop.config import LoraConfig, TrainConfig
from peftloop.inject import inject_lora
from peftloop.train import train
from tests.helpers import tiny_model, toy_examples

optuna = pytest.importorskip("optuna", reason="the 'optuna' extra is not installed")


def lora_model(**lora):
    model = tiny_model(0)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                     "init_lora_weights": False, **lora}))
    return model


def config(tmp_path, **values) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path), "progress_bar": False, "log_every": 1,
                          "learning_rate": 1e-3, "micro_batch_size": 4, "device": "cpu", **values})


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def quiet_study(**kwargs):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(**kwargs)


# -- train(trial=dict) ----------------------------------------------------------------------------


def test_dict_trial_overrides_the_train_config(tmp_path):
    data = toy_examples(16)
    overrides = {"learning_rate": 2e-2, "warmup_steps": 2, "weight_decay": 0.1}
    with_trial = lora_model()
    train(with_trial, data, None, config(tmp_path / "trial", max_steps=4), trial=overrides)
    direct = lora_model()
    train(direct, data, None, config(tmp_path / "direct", max_steps=4, **overrides))
    for key, value in adapter_state_dict(direct).items():
        torch.testing.assert_close(adapter_state_dict(with_trial)[key], value, rtol=0, atol=0)
    assert [r["lr"] for r in read_log(tmp_path / "trial") if "lr" in r] == \
        [r["lr"] for r in read_log(tmp_path / "direct") if "lr" in r]


def test_dict_trial_lora_values_must_be_the_models(tmp_path):
    data = toy_examples(8)
    # the model's own values (as the search driver passes them) are accepted
    train(lora_model(), data, None, config(tmp_path / "same", max_steps=1),
          trial={"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "learning_rate": 1e-3})
    train(lora_model(target_modules=["q_proj", "v_proj"]), data, None, config(tmp_path / "list", max_steps=1),
          trial={"target_modules": "v_proj,q_proj"})
    with pytest.raises(ValueError, match=r"lora.r=16.*inject_lora"):
        train(lora_model(), data, None, config(tmp_path / "r", max_steps=1), trial={"r": 16})
    with pytest.raises(ValueError, match=r"lora.target_modules"):
        train(lora_model(target_modules=["q_proj", "v_proj"]), data, None,
              config(tmp_path / "t", max_steps=1), trial={"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="'learning_rte' is neither"):
        train(lora_model(), data, None, config(tmp_path / "typo", max_steps=1), trial={"learning_rte": 1e-3})
    assert not (tmp_path / "r").exists() and not (tmp_path / "typo").exists()  # refused before any write


# -- train(trial=optuna.Trial) ----------------------------------------------------------------------


def test_optuna_trial_values_override_and_every_evaluation_is_reported(tmp_path):
    data = toy_examples(16)
    study = quiet_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    lr = trial.suggest_float("learning_rate", 1e-2, 1e-2)
    trial.suggest_int("my_own_setting", 3, 3)  # the objective's own: train() leaves it alone
    result = train(lora_model(), data, data[:6], config(tmp_path, max_steps=6, eval_every=2),
                   trial=trial)
    study.tell(trial, result.metrics["eval_loss"])
    log = read_log(tmp_path)
    assert [r["lr"] for r in log if r.get("step") == 1 and "lr" in r] == [lr]  # no warmup: step 1 at the peak
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    assert study.trials[0].intermediate_values == pytest.approx(evals) and sorted(evals) == [2, 4, 6]


def test_pruned_trial_stops_after_its_step_with_checkpoints_intact(tmp_path):
    data = toy_examples(16)
    # prunes any loss above 0, but not before step 3: the evaluation at step 4 prunes
    study = quiet_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=3))

    def objective(trial):
        trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
        result = train(lora_model(), data, data[:6], config(tmp_path, max_steps=10, eval_every=2,
                                                            save_every=2), trial=trial)
        return result.metrics["eval_loss"]

    study.optimize(objective, n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert sorted(study.trials[0].intermediate_values) == [2, 4]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    for path in list_checkpoints(tmp_path):
        verify_manifest(path)
    assert max(r["step"] for r in read_log(tmp_path)) == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_pruning_raises_trial_pruned_out_of_train(tmp_path):
    study = quiet_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()
    data = toy_examples(8)
    with pytest.raises(optuna.TrialPruned, match="after step 1"):
        train(lora_model(), data, data[:4], config(tmp_path, max_steps=5, eval_every=1), trial=trial)


def test_optuna_trial_needs_eval_data_and_a_known_metric(tmp_path):
    data = toy_examples(8)
    study = quiet_study()
    with pytest.raises(ValueError, match="needs eval_data"):
        train(lora_model(), data, None, config(tmp_path / "a", max_steps=1), trial=study.ask())
    with pytest.raises(ValueError, match=r"eval_exact_mtch.*eval_loss"):
        train(lora_model(), data, data[:4], config(tmp_path / "b", max_steps=2, eval_every=1),
              trial=study.ask(), trial_metric="eval_exact_mtch")
