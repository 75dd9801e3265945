"""Hyperparameter search: ``train(..., trial=...)`` and ``peftloop search``, with the real optuna.

The hook: a dict's values override the TrainConfig (and LoRA values must be the model's); an
optuna trial gets every evaluation and a pruned one stops after its step, checkpoints intact,
raising optuna.TrialPruned. The driver: 8 demo trials with a median pruner prune at least one,
a search killed with SIGKILL resumes without re-running finished trials, and the best trial's
adapter loads in peft.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftloop import search, search_space
from peftloop.adapter_format import adapter_state_dict
from peftloop.checkpoint import list_checkpoints, load_adapter, verify_manifest
from peftloop.config import ConfigError, LoraConfig, TrainConfig
from peftloop.inject import inject_lora
from peftloop.models import load_pretrained
from peftloop.train import train
from tests.helpers import (
    logits_of,
    qa_records,
    read_log,
    save_chat_base,
    tiny_model,
    toy_examples,
    write_jsonl,
)
from tests.hf_builders import load_reference

optuna = pytest.importorskip("optuna", reason="the 'optuna' extra is not installed")

ROOT = Path(__file__).resolve().parents[1]


def lora_model(**lora):
    model = tiny_model(0)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                     "init_lora_weights": False, **lora}))
    return model


def config(tmp_path, **values) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path), "progress_bar": False, "log_every": 1,
                          "learning_rate": 1e-3, "micro_batch_size": 4, "device": "cpu", **values})


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


def test_a_trial_the_pruner_cuts_at_its_last_evaluation_completes(tmp_path):
    study = quiet_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()
    data = toy_examples(8)
    result = train(lora_model(), data, data[:4], config(tmp_path, max_steps=2, eval_every=2), trial=trial)
    assert result.global_step == 2 and sorted(study.trials[0].intermediate_values) == [2]


# -- the space file -----------------------------------------------------------------------------------


SPACE = """
[search]
metric = "eval_loss"
n_startup_trials = 1

[learning_rate]
type = "float"
low = 1e-4
high = 1e-2
log = true

[r]
type = "categorical"
choices = [4, 8]

[target_modules]
type = "categorical"
choices = [["q_proj", "v_proj"], "all-linear"]

[warmup_steps]
type = "int"
low = 0
high = 4
step = 2
"""


def test_space_file_reads_into_params():
    space = search_space.parse_space(SPACE, "space.toml")
    assert [(p.name, p.section, p.kind) for p in space.params] == [
        ("learning_rate", "train", "float"), ("r", "lora", "categorical"),
        ("target_modules", "lora", "categorical"), ("warmup_steps", "train", "int")]
    assert (space.metric, space.direction, space.n_startup_trials) == ("eval_loss", "minimize", 1)
    one = '\n[r]\ntype = "categorical"\nchoices = [4]'
    parse = search_space.parse_space
    assert parse('[search]\nmetric = "eval_exact_match"' + one, "s").direction == "maximize"
    assert parse('[search]\nmetric = "eval_perplexity"' + one, "s").direction == "minimize"
    # a list choice is offered to optuna as its label and comes back as the list
    study = quiet_study()
    study.enqueue_trial({"target_modules": "q_proj,v_proj"})
    trial = study.ask()
    assert space.params[2].suggest(trial) == ["q_proj", "v_proj"]
    assert trial.params["target_modules"] == "q_proj,v_proj"
    assert 0 <= space.params[3].suggest(trial) <= 4 and space.params[3].suggest(trial) % 2 == 0


@pytest.mark.parametrize("text, message", [
    ('[learning_rte]\ntype = "float"\nlow = 1\nhigh = 2', r"\[learning_rte\]: not a \[train\] or \[lora\] "
                                                         r"setting; did you mean 'learning_rate'"),
    ('[r]\ntype = "choice"\nchoices = [1]', r"\[r\]: expected a table with type"),
    ('[r]\ntype = "int"\nlow = 8\nhigh = 4', r"\[r\]: low=8 is above high=4"),
    ('[r]\ntype = "int"\nlow = 4.5\nhigh = 8', r"\[r\]: low must be an integer"),
    ('[learning_rate]\ntype = "float"\nlow = 0.0\nhigh = 1.0\nlog = true', r"log = true needs low > 0"),
    ('[r]\ntype = "int"\nlow = 4\nhigh = 8\nstep = 0', r"step must be a positive integer"),
    ('[r]\ntype = "int"\nlow = 4\nhigh = 8\nlog = "yes"', r"log must be true or false"),
    ('[search]\nmetric = 3\n[r]\ntype = "categorical"\nchoices = [4]', r"metric must be an evaluation"),
    ('[r]\ntype = "categorical"\nchoices = []', r"choices must be a non-empty list"),
    ('[target_modules]\ntype = "categorical"\nchoices = [["q_proj"], "q_proj"]', r"two choices are the same"),
    ('[r]\ntype = "categorical"\nchoices = [4]\nlow = 1', r"unknown keys \['low'\]"),
    ('[output_dir]\ntype = "categorical"\nchoices = ["a"]', r"set by the search itself"),
    ('[search]\nmetrc = "eval_loss"\n[r]\ntype = "categorical"\nchoices = [4]', r"\[search\] has unknown"),
    ('[search]\nmetric = "eval_loss"', r"no settings to search"),
    ('[r]\ntype = "categorical"\nchoices = [4', r"invalid TOML"),
])
def test_space_file_errors_name_the_table(text, message):
    with pytest.raises(ConfigError, match=message):
        search_space.parse_space(text, "space.toml")


def test_every_value_of_the_space_is_checked_against_the_base_before_any_trial():
    sections = {"train": {}, "lora": {"r": 8}, "model": {}, "data": {}}
    space = search_space.parse_space('[warmup_ratio]\ntype = "float"\nlow = 0.0\nhigh = 1.5', "space.toml")
    with pytest.raises(ConfigError, match=r"space.toml: \[warmup_ratio\] value 1.5: .*must be in \[0, 1\)"):
        search_space.check_space(space, sections, "space.toml")
    space = search_space.parse_space('[warmup_steps]\ntype = "float"\nlow = 0.0\nhigh = 10.0', "space.toml")
    with pytest.raises(ConfigError, match=r"\[warmup_steps\] value 0.0"):
        search_space.check_space(space, sections, "space.toml")


# -- the study ----------------------------------------------------------------------------------------


def test_study_resumes_marks_interrupted_trials_and_refuses_another_space(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space.parse_space(SPACE, "space.toml")
    sections = {"train": {"max_steps": 4}, "lora": {}, "model": {}, "data": {}}
    study = search.open_study(tmp_path, space, sections, "median", seed=0)
    done = study.ask()
    values = {p.name: p.suggest(done) for p in space.params}
    study.tell(done, 1.5)
    killed = study.ask()  # left running, as by a kill
    for p in space.params:
        p.suggest(killed)
    again = search.open_study(tmp_path, space, sections, "median", seed=0)
    trials = again.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[2].params == {} and trials[2].user_attrs == {"retry_of": 1}
    rerun = again.ask()
    assert rerun.number == 2 and {p.name: p.suggest(rerun) for p in space.params} == \
        {p.name: p.value_of(killed.params[p.name]) for p in space.params}
    assert [t.number for t in search.finished_trials(again)] == [0] and trials[0].params == {
        p.name: search_space.label(v) for p, v in zip(space.params, values.values())}
    other = search_space.parse_space(SPACE.replace("choices = [4, 8]", "choices = [4, 16]"), "space.toml")
    with pytest.raises(ConfigError, match=r"study.db holds a study made with other settings \(space.params"):
        search.open_study(tmp_path, other, sections, "median", seed=0)
    with pytest.raises(ConfigError, match=r"base.train differ"):
        search.open_study(tmp_path, space, {**sections, "train": {"max_steps": 5}}, "median", seed=0)


def test_one_search_per_folder_at_a_time(tmp_path):
    with search.search_lock(tmp_path):
        with pytest.raises(ConfigError, match="another peftloop search is running there"):
            with search.search_lock(tmp_path):
                pass
    with search.search_lock(tmp_path):  # released
        pass


def test_a_killed_group_leaves_every_trial_of_it_to_run_again(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space.parse_space(SPACE, "space.toml")
    sections = {"train": {"max_steps": 4}, "lora": {}, "model": {}, "data": {}}
    study = search.open_study(tmp_path, space, sections, "median", seed=0)
    group = [study.ask() for _ in range(3)]  # a group of three running when the search was killed
    asked = [{p.name: p.suggest(t) for p in space.params} for t in group]
    again = search.open_study(tmp_path, space, sections, "median", seed=0)
    assert [t.state.name for t in again.get_trials()] == ["FAIL"] * 3 + ["WAITING"] * 3
    reruns = [again.ask() for _ in range(3)]
    assert [t.user_attrs["retry_of"] for t in again.get_trials()[3:]] == [0, 1, 2]
    assert [{p.name: p.suggest(t) for p in space.params} for t in reruns] == asked
    assert search.finished_trials(again) == []


def planned(number: int, tmp_path, target_modules, precision="fp32") -> search.PlannedTrial:
    return search.PlannedTrial(argparse.Namespace(number=number), {},
                               TrainConfig(output_dir=str(tmp_path / f"trial-{number}"), precision=precision),
                               LoraConfig(target_modules=target_modules))


def test_a_group_is_the_largest_set_of_waiting_trials_that_can_share_a_forward_pass(tmp_path):
    qv, every = ["q_proj", "v_proj"], "all-linear"
    waiting = [planned(0, tmp_path, qv), planned(1, tmp_path, every), planned(2, tmp_path, every),
               planned(3, tmp_path, qv, precision="bf16"), planned(4, tmp_path, every)]
    assert [p.number for p in search.largest_group(waiting, 4)] == [1, 2, 4]
    assert [p.number for p in search.largest_group(waiting, 2)] == [1, 2]
    # a tie goes to the kind of the earliest asked trial, so a lone kind is not left waiting for ever;
    # precision is a kind of its own (one forward pass, one autocast)
    assert [p.number for p in search.largest_group(waiting[:2], 4)] == [0]
    assert [p.number for p in search.largest_group([waiting[4], waiting[3], waiting[0]], 4)] == [4]
    assert [p.number for p in search.largest_group([waiting[3], waiting[0]], 4)] == [3]


@pytest.mark.parametrize("space_text, message", [
    ('[search]\nmetric = "eval_exact_match"\n[r]\ntype = "categorical"\nchoices = [4]',
     r"--parallel: metric 'eval_exact_match' is not logged by trials trained together"),
    ('[use_dora]\ntype = "categorical"\nchoices = [false, true]',
     r"\[use_dora\] value True: --parallel: DoRA"),
    ('[init_lora_weights]\ntype = "categorical"\nchoices = [true, "pissa"]',
     r"\[init_lora_weights\] value 'pissa': --parallel: .*changes the base"),
    ('[eval_generate_max_new_tokens]\ntype = "int"\nlow = 0\nhigh = 8',
     r"\[eval_generate_max_new_tokens\] value 8: --parallel: evaluation by generation"),
])
def test_parallel_refuses_what_no_group_can_train_before_any_trial(space_text, message):
    space = search_space.parse_space(space_text, "space.toml")
    sections = {"train": {"max_steps": 4}, "lora": {"target_modules": "all-linear"}, "model": {}, "data": {}}
    search_space.check_space(space, sections, "space.toml")  # fine one at a time
    with pytest.raises(ConfigError, match=message):
        search_space.check_groups(space, sections, "space.toml")
    with pytest.raises(ConfigError, match=r"the base config: --parallel: modules_to_save"):
        search_space.check_groups(search_space.parse_space('[r]\ntype = "int"\nlow = 2\nhigh = 4', "s"),
                                  {**sections, "lora": {"modules_to_save": ["lm_head"]}}, "s")


def test_the_demo_search_in_groups_leaves_out_the_trained_head_copy(tmp_path):
    parser = argparse.ArgumentParser()
    search.add_search_parser(parser.add_subparsers(dest="command"))
    for parallel in ("1", "4"):
        args, rest = parser.parse_known_args(["search", "--n-trials", "8", "--parallel", parallel,
                                              "--output-dir", str(tmp_path / parallel)])
        assert search.run_search(args, rest, check_only=True) == 0
    train_defaults, one = search.task_defaults(search.ModelConfig(), tmp_path, parallel=1)
    _, grouped = search.task_defaults(search.ModelConfig(), tmp_path, parallel=4)
    assert one["modules_to_save"] == ["lm_head"] and "modules_to_save" not in grouped
    assert {k: v for k, v in one.items() if k != "modules_to_save"} == grouped
    assert not (tmp_path / "1").exists() and not (tmp_path / "4").exists()


def test_command_errors_are_reported_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--output-dir", str(out)]
    assert search.main(["--n-trials", "2", "--space", str(tmp_path / "no.toml"), *flags]) == 2
    assert "space file not found" in capsys.readouterr().err
    assert search.main(["--n-trials", "2", "--model", str(tmp_path), *flags]) == 2
    assert "--space is needed" in capsys.readouterr().err
    assert search.main(["--n-trials", "0", *flags]) == 2
    assert "--n-trials must be >= 1" in capsys.readouterr().err
    assert search.main(["--n-trials", "2", "--parallel", "0", *flags]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err
    assert search.main(["--n-trials", "2", "--max_stepz", "3", *flags]) == 2
    assert "max_stepz" in capsys.readouterr().err
    assert not out.exists()



def docs_block(after: str) -> str:
    """The fenced block that follows the line holding ``after``, on the page of the search docs."""
    pages = [ROOT / "docs" / "tracking-and-search.md", ROOT / "docs" / "search.md"]
    text = next(t for t in (p.read_text() for p in pages if p.exists()) if after in t)
    fence = text.index("```", text.index(after))
    body = text.index("\n", fence) + 1
    return text[body:text.index("```", body)]


def test_the_documented_space_fits_the_documented_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("space.toml").write_text(docs_block("docs-test: skip a search space"))
    Path("base.toml").write_text(docs_block("docs-test: file base.toml"))
    parser = argparse.ArgumentParser()
    search.add_search_parser(parser.add_subparsers(dest="command"))
    args, rest = parser.parse_known_args(["search", "--config", "base.toml", "--space", "space.toml",
                                          "--n-trials", "20", "--pruner", "median"])
    assert search.run_search(args, rest, check_only=True) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.toml", "space.toml"]  # nothing written


# -- peftloop search on the demo task -------------------------------------------------------------------

# Two learning rates far apart: with the median pruner, a 1e-5 trial that follows two finished trials
# is behind their median at its first evaluation.
DEMO_SPACE = """
[search]
n_startup_trials = 2

[learning_rate]
type = "categorical"
choices = [3e-3, 1e-5]

[r]
type = "categorical"
choices = [2, 4]

[target_modules]
type = "categorical"
choices = [["q_proj", "v_proj"], "all-linear"]
"""
SHORT = ["--max_steps", "4", "--warmup_steps", "0", "--eval_every", "2", "--micro_batch_size", "8",
         "--log_every", "4"]


def search_argv(tmp_path, n_trials: int, *extra: str) -> list[str]:
    (tmp_path / "space.toml").write_text(DEMO_SPACE)
    return ["--space", str(tmp_path / "space.toml"), "--n-trials", str(n_trials),
            "--output-dir", str(tmp_path / "search"), *SHORT, *extra]


def stored_trials(folder):
    return optuna.load_study(study_name=search.STUDY_NAME, storage=f"sqlite:///{folder / 'study.db'}").trials


@pytest.mark.slow
def test_search_on_the_demo_task_prunes_and_reports_a_best_adapter_that_loads_in_peft(tmp_path, capsys):
    assert search.main(search_argv(tmp_path, 8, "--pruner", "median")) == 0
    out = tmp_path / "search"
    table = json.loads((out / "summary.json").read_text())
    states = [r["state"] for r in table["trials"]]
    assert len(states) == 8 and "pruned" in states and "complete" in states, states
    for row in table["trials"]:
        if row["state"] == "pruned":
            assert row["steps"] < 4  # stopped early
        else:  # the trial's LoRA settings were applied before injection
            adapter = out / f"trial-{row['trial']}" / "adapter"
            config = json.loads((adapter / "adapter_config.json").read_text())
            assert config["r"] == row["params"]["r"] and row["steps"] == 4
    best = table["best_trial"]
    assert best["value"] == min(r["value"] for r in table["trials"] if r["state"] == "complete")
    printed = capsys.readouterr().out
    assert f"best trial {best['trial']}: eval_loss {best['value']:.4f}" in printed
    assert f"adapter (PEFT format) -> {best['adapter']}" in printed
    assert f"| **{best['trial']}** | complete |" in (out / "summary.md").read_text()

    pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")
    tokens = torch.tensor([[1, 5, 9, 3, 7, 12, 19, 4], [1, 16, 4, 4, 8, 3, 11, 2]])
    ours = load_adapter(load_pretrained(out / "base"), best["adapter"]).eval()
    theirs = peft.PeftModel.from_pretrained(load_reference(out / "base"), best["adapter"]).eval()
    assert not torch.allclose(logits_of(ours, tokens), logits_of(load_pretrained(out / "base"), tokens))
    torch.testing.assert_close(logits_of(theirs, tokens), logits_of(ours, tokens), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_search_resumes_and_reruns_only_the_interrupted_trial(tmp_path):
    out = tmp_path / "search"
    argv = search_argv(tmp_path, 4)
    proc = subprocess.Popen([sys.executable, "-m", "peftloop.search", *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while not (out / "trial-2").exists():  # trials 0 and 1 are done, trial 2 has started
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the search did not reach trial 2"
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    before = stored_trials(out)
    assert [t.state.name for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"]

    assert search.main(argv) == 0
    after = stored_trials(out)
    assert [t.state.name for t in after] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    for old in before[:2]:  # the finished trials are kept as they were, not run again
        new = after[old.number]
        assert (new.params, new.value, new.datetime_complete) == \
            (old.params, old.value, old.datetime_complete)
    assert after[3].user_attrs["retry_of"] == 2 and after[3].params == before[2].params
    rows = json.loads((out / "summary.json").read_text())["trials"]
    assert rows[2]["state"] == "interrupted, re-run as 3"
    # a second run of the same command has nothing left to do
    assert search.main(argv) == 0 and len(stored_trials(out)) == 5


@pytest.mark.slow
def test_search_on_a_pretrained_model_and_jsonl_data(tmp_path):
    base = save_chat_base(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", qa_records(4))
    (tmp_path / "space.toml").write_text('[r]\ntype = "categorical"\nchoices = [2, 4]\n'
                                         '[learning_rate]\ntype = "float"\nlow = 1e-3\nhigh = 1e-2\n')
    out = tmp_path / "search"
    assert search.main(["--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--eval_split", "0.25",
                        "--space", str(tmp_path / "space.toml"), "--n-trials", "2", "--output-dir", str(out),
                        "--max_steps", "2", "--eval_every", "1", "--micro_batch_size", "4",
                        "--progress_bar", "false"]) == 0
    rows = json.loads((out / "summary.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for row in rows:
        config = json.loads((out / f"trial-{row['trial']}" / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == row["params"]["r"] and config["base_model_name_or_path"] == str(base)
        assert len(config["target_modules"]) == 7  # peftloop train's default: every linear layer but the head
        log = read_log(out / f"trial-{row['trial']}")
        assert [r["lr"] for r in log if r.get("step") == 1 and "lr" in r] == [row["params"]["learning_rate"]]


# -- peftloop search --parallel K: trials trained together (train_many) -------------------------------

GOOD_LR, BAD_LR = 3e-3, 1e-5  # after 2 demo steps: eval_loss ~2.83 against ~2.99, the base's


def queue_trials(folder: Path, trials: list[dict]) -> None:
    """A study in ``folder`` with exactly these trials queued (values as optuna stores them: a list of
    target modules as its label), so that the search runs them, in this order, whatever the sampler."""
    folder.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=search.STUDY_NAME, storage=f"sqlite:///{folder / 'study.db'}")
    for params in trials:
        study.enqueue_trial(params)


def assert_loads_in_peft(base: Path, adapter: Path, trained: bool) -> None:
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")
    tokens = torch.tensor([[1, 5, 9, 3, 7, 12, 19, 4], [1, 16, 4, 4, 8, 3, 11, 2]])
    ours = load_adapter(load_pretrained(base), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(load_reference(base), adapter).eval()
    if trained:
        assert not torch.allclose(logits_of(ours, tokens), logits_of(load_pretrained(base), tokens))
    torch.testing.assert_close(logits_of(theirs, tokens), logits_of(ours, tokens), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_parallel_search_trains_4_at_a_time_prunes_one_and_every_adapter_loads_in_peft(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the 'ref' extra (transformers) is not installed")
    out = tmp_path / "search"
    # the first group, two good trials and two bad ones, all finish (nothing is pruned before two
    # trials complete); in the second, the bad ones are above the median of the first group's
    # evaluations at step 2, midway between good and bad, and stop there, while their group-mates
    # train on to step 4
    lrs = [GOOD_LR, GOOD_LR, BAD_LR, BAD_LR] + [GOOD_LR, BAD_LR, GOOD_LR, BAD_LR]
    queue_trials(out, [{"learning_rate": lr, "r": 2 + 2 * (k % 2), "target_modules": "all-linear"}
                       for k, lr in enumerate(lrs)])
    assert search.main(search_argv(tmp_path, 8, "--pruner", "median", "--parallel", "4")) == 0
    printed = capsys.readouterr().out
    assert "trials 0, 1, 2, 3 train together" in printed and "trials 4, 5, 6, 7 train together" in printed
    rows = json.loads((out / "summary.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["complete"] * 5 + ["pruned", "complete", "pruned"]
    assert [r["steps"] for r in rows] == [4] * 5 + [2, 4, 2]
    assert max(r["seconds"] for r in rows[4:] if r["state"] == "pruned") < \
        min(r["seconds"] for r in rows[4:] if r["state"] == "complete")  # each trial's own time
    for row in rows:
        folder = out / f"trial-{row['trial']}"
        assert max(r["step"] for r in read_log(folder)) == row["steps"]
        config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == row["params"]["r"] and not config["modules_to_save"]  # no head copy in a group
        assert_loads_in_peft(out / "base", folder / "adapter", trained=row["state"] == "complete")


@pytest.mark.slow
def test_a_trial_trained_in_a_group_gets_the_adapter_it_gets_alone(tmp_path, capsys):
    # trial 0 adapts other modules than trials 1 and 2: with --parallel 2 it runs alone, they together
    trials = [{"learning_rate": GOOD_LR, "r": 2, "target_modules": "q_proj,v_proj"},
              {"learning_rate": GOOD_LR, "r": 4, "target_modules": "all-linear"},
              {"learning_rate": BAD_LR, "r": 2, "target_modules": "all-linear"}]
    searches = {"1": ["--modules_to_save", ""], "2": []}  # what --parallel leaves out of the demo's LoRA
    for parallel, extra in searches.items():
        out = tmp_path / parallel
        queue_trials(out / "search", trials)
        assert search.main(search_argv(out, 3, "--parallel", parallel, *extra)) == 0
    assert "trials 1, 2 train together" in capsys.readouterr().out
    alone, grouped = (json.loads((tmp_path / p / "search" / "summary.json").read_text())["trials"]
                      for p in searches)
    for a, g in zip(alone, grouped):
        assert [a[k] for k in ("state", "params", "steps")] == [g[k] for k in ("state", "params", "steps")]
        assert g["value"] == pytest.approx(a["value"], rel=1e-6)
        adapter = Path("search") / f"trial-{a['trial']}" / "adapter" / "adapter_model.safetensors"
        tensors = [load_file(tmp_path / p / adapter) for p in searches]
        assert tensors[0].keys() == tensors[1].keys()
        for key, alone_tensor in tensors[0].items():
            assert_same_to_rounding(tensors[1][key], alone_tensor, f"trial {a['trial']}: {key}")


def assert_same_to_rounding(grouped: torch.Tensor, alone: torch.Tensor, what: str) -> None:
    """Bit for bit, as docs/many-adapters.md states for a plain CPU base: every row's gradient is
    the same floating-point expression in the group as in train() alone (multi_lora_backward calls
    the single-adapter core segment by segment). A wrong seed, config or routing is off by the size
    of the entries; a last-bit change (a base GEMM whose sum is formed differently) fails too."""
    assert torch.equal(grouped, alone), f"{what}: max |diff| {float((grouped - alone).abs().max()):.3g}"
