"""Evaluation by generation: the eval examples' prompts and references (records and hand-built
examples), exact match and the caller's metrics logged beside eval_loss, early stopping on them,
the errors raised before anything runs, and the same figures from two DDP processes as from one.

Run as a script (``torchrun ... tests/test_task_metrics.py OUT``) it is one process of the DDP test.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftloop import distributed
from peftloop.callbacks import Callback
from peftloop.config import ConfigError, DataConfig, LoraConfig, TrainConfig
from peftloop.data import ExampleBuilder, load_datasets
from peftloop.generate import Task, exact_match, generate, generate_text, task_metric_sums, task_of
from peftloop.inject import inject_lora
from peftloop.models import load_pretrained
from peftloop.records import truncate
from peftloop.tokenizer import Tokenizer
from peftloop.train import generation_tasks, seed_everything, train
from tests.helpers import QA, lora_model, qa_records, read_log, save_chat_base, toy_examples, write_jsonl
from tests.helpers import tokenizer as tokenizer  # fixture

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And bees?"},
        {"role": "assistant", "content": "Honey."}]


def run(model, data, out, eval_data, callbacks=(), **cfg):
    defaults = dict(output_dir=str(out), progress_bar=False, log_every=1, learning_rate=1e-3)
    return train(model, data, eval_data, TrainConfig(**{**defaults, **cfg}), callbacks=list(callbacks))


# ---- the prompt and the reference of an eval example ----------------------------------------


def test_prompt_completion_and_chat_eval_examples_keep_their_prompt_and_reference(tokenizer):
    builder = ExampleBuilder(tokenizer, DataConfig(), keep_task=True)
    pc = builder({"prompt": "Q: What do bees make?\nA:", "completion": " Honey."}, "f:1")
    assert pc["reference"] == " Honey."
    assert pc["input_ids"][:len(pc["prompt_ids"])] == pc["prompt_ids"]  # the prompt the loss saw
    assert [t for t, label in zip(pc["input_ids"], pc["labels"]) if label == -100] == pc["prompt_ids"]

    chat = builder({"messages": CHAT}, "f:2")  # the last assistant turn, after the conversation before it
    assert chat["reference"] == "Honey."
    assert chat["prompt_ids"] == tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True)
    assert chat["input_ids"][:len(chat["prompt_ids"])] == chat["prompt_ids"]
    conversational = builder({"prompt": CHAT[:2], "completion": CHAT[2:3]}, "f:3")
    assert conversational["reference"] == "Blue."
    assert conversational["prompt_ids"] == tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True)

    assert "prompt_ids" not in builder({"text": "Just text."}, "f:4")  # no prompt: loss on every token
    plain = ExampleBuilder(tokenizer, DataConfig())({"prompt": "Q?", "completion": " A."}, "f:5")
    assert set(plain) == {"input_ids", "labels"}  # training examples carry nothing more
    cut = ExampleBuilder(tokenizer, DataConfig(max_seq_len=4), keep_task=True)
    short, was_cut = truncate(cut({"prompt": "Q:", "completion": " a long answer indeed"}, "f:6"), 4)
    assert was_cut and len(short["input_ids"]) == 4 and short["reference"] == " a long answer indeed"


def test_load_datasets_keeps_the_task_on_eval_examples_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(2))
    train_data, eval_data = load_datasets(DataConfig(train_file=str(path), eval_file=str(path)), tokenizer)
    assert "reference" not in train_data[0]
    assert [e["reference"] for e in eval_data] == [f" {a}" for _, a in QA] * 2


def test_a_hand_built_example_is_prompted_by_the_tokens_before_its_first_label():
    example = {"input_ids": [1, 7, 8, 9, 2, 5, 6, 2], "labels": [-100, -100, -100, -100, -100, 5, 6, 2]}
    assert task_of(example) == Task([1, 7, 8, 9, 2], [5, 6, 2])
    assert task_of({"input_ids": [1, 4, 5], "labels": [1, 4, 5]}) is None  # a text example
    assert task_of({"input_ids": [1, 4, 5], "labels": [-100] * 3}) is None
    two_runs = {"input_ids": [1, 4, 5, 6, 7], "labels": [-100, 4, -100, 6, 7]}
    assert task_of(two_runs) == Task([1], [4])  # the first labelled run is the reference
    assert exact_match(" Honey. ", "Honey.") == 1.0 and exact_match("Honey", "Honey.") == 0.0
    assert exact_match([5, 6], [5, 6]) == 1.0 and exact_match([5], [5, 6]) == 0.0


def test_token_id_references_compare_without_the_stop_token():
    """No tokenizer: completions and references are token ids, compared without a final stop token
    (the model config's eos); two references are the model's greedy completions, two are not."""
    model = lora_model(seed=1).eval()
    stop = model.config.eos_token_id
    prompts = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24], [1, 33, 8]]
    own = generate(model, prompts, 6, eos_token_id=stop)
    with_stop = own[1] if own[1][-1] == stop else [*own[1], stop]  # a final stop token or not: the same
    tasks = [Task(prompts[0], own[0]), Task(prompts[1], with_stop),
             Task(prompts[2], [*own[2][:-1], 60 if own[2][-1] != 60 else 59]), Task(prompts[3], [*own[3], 9])]
    assert task_metric_sums(model, tasks, 6, batch_size=3) == {"exact_match": 2.0}


# ---- logged beside eval_loss ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    return save_chat_base(tmp_path_factory.mktemp("base") / "qwen2-tiny")


def test_exact_match_and_a_user_metric_are_logged_beside_eval_loss(chat_base, tmp_path, capsys):
    """A prompt/completion eval set read by peftloop.data: every evaluation logs eval_exact_match and
    eval_<name> of the caller's metric; the figures are those of generate_text on the eval prompts."""
    tokenizer = Tokenizer.from_pretrained(chat_base)
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(4))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", qa_records(1))
    data_config = DataConfig(train_file=str(path), eval_file=str(eval_path))
    train_data, eval_data = load_datasets(data_config, tokenizer)
    seed_everything(0)
    model = load_pretrained(chat_base)
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    seen = []

    def first_word(prediction: str, reference: str) -> float:
        seen.append((prediction, reference))
        return float(prediction.split()[:1] == reference.split()[:1])

    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=24, micro_batch_size=4,
                         learning_rate=1e-2, eval_every=12, eval_generate_max_new_tokens=10,
                         progress_bar=False)
    result = train(model, train_data, eval_data, config, tokenizer=tokenizer,
                   eval_metrics={"first_word": first_word})
    evals = [r for r in read_log(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    for record in evals:
        assert record["eval_generated"] == 4
        assert 0.0 <= record["eval_exact_match"] <= record["eval_first_word"] <= 1.0
    assert {reference for _, reference in seen} == {f" {a}" for _, a in QA}
    assert all(isinstance(prediction, str) for prediction, _ in seen) and len(seen) == 8

    completions = generate_text(model, tokenizer, [r["prompt"] for r in qa_records(1)], max_new_tokens=10)
    expected = sum(c.strip() == a for c, (_, a) in zip(completions, QA)) / 4
    assert result.metrics["eval_exact_match"] == evals[-1]["eval_exact_match"] == expected
    assert expected == 1.0  # the adapter learned the four answers (the random base knows none)
    assert "exact match 100.0%" in capsys.readouterr().out


def test_hand_built_examples_are_scored_on_token_ids_without_a_tokenizer(tmp_path):
    """No tokenizer, examples of input_ids and labels: the reference is the labelled tokens. Half the
    eval references are the model's greedy completions (it barely moves at lr 1e-9): exact match 0.5;
    an example with no prompt is not generated."""
    model = lora_model(seed=3)
    stop = model.config.eos_token_id
    prompts = [[1, 5, 9, 13, 2], [1, 7, 2], [1, 20, 21, 22, 2], [1, 33, 8, 2]]
    greedy = generate(model, prompts, 5, eos_token_id=stop)
    answers = [greedy[0], greedy[1], [*greedy[2][:-1], (greedy[2][-1] + 1) % 61], [*greedy[3], 9]]
    eval_data = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
    eval_data.append({"input_ids": [1, 4, 5], "labels": [1, 4, 5]})
    run(model, toy_examples(8), tmp_path, eval_data, max_steps=1, micro_batch_size=8, learning_rate=1e-9,
        eval_generate_max_new_tokens=5, eval_batch_size=3)
    (record,) = [r for r in read_log(tmp_path) if "eval_loss" in r]
    assert record["eval_exact_match"] == 0.5 and record["eval_generated"] == 4


# ---- early stopping on a task metric ----------------------------------------------------------


class ScriptedMetric(Callback):
    """Replaces eval_exact_match by the next value of a script (runs before EarlyStopping)."""

    def __init__(self, values):
        self.values, self.evaluated_at = list(values), []

    def on_evaluate(self, state, metrics):
        metrics["eval_exact_match"] = self.values[len(self.evaluated_at)]
        self.evaluated_at.append(state.global_step)


@pytest.mark.parametrize(("mode", "stop_step"), [("auto", 12), ("max", 12), ("min", 6)])
def test_early_stopping_watches_exact_match_higher_is_better(tmp_path, mode, stop_step):
    # Evaluations at steps 2, 4, ...; higher is better: 0.2, 0.5 improve, 0.4 does not (1), 0.6
    # improves, 0.6 (equal) and 0.3 do not (2 in a row: stop at the 6th, step 12). Lower is better
    # ("min"): 0.5 and 0.4 do not improve on 0.2: stop at the 3rd, step 6.
    script = ScriptedMetric([0.2, 0.5, 0.4, 0.6, 0.6, 0.3, 0.1, 0.1, 0.1, 0.1])
    data = toy_examples(16)
    result = run(lora_model(), data, tmp_path, data[:2], callbacks=[script], micro_batch_size=4, max_steps=40,
                 eval_every=2, early_stopping_patience=2, early_stopping_metric="eval_exact_match",
                 early_stopping_mode=mode, eval_generate_max_new_tokens=1)
    assert result.global_step == stop_step
    assert script.evaluated_at == list(range(2, stop_step + 1, 2))


def test_early_stopping_on_a_user_metric(tmp_path):
    calls = []

    def constant(prediction, reference):  # never improves after the first evaluation
        calls.append(prediction)
        return 1.0

    data = toy_examples(16)
    result = train(lora_model(), data, data[:2], TrainConfig(
        output_dir=str(tmp_path), progress_bar=False, micro_batch_size=4, max_steps=40, eval_every=2,
        eval_generate_max_new_tokens=2, early_stopping_patience=1, early_stopping_metric="eval_constant"),
        tokenizer=_DigitsTokenizer(), eval_metrics={"constant": constant})
    assert result.global_step == 4 and len(calls) == 4
    assert all(isinstance(c, str) for c in calls)


class _DigitsTokenizer:
    """Decodes ids as space-separated numbers (enough for a metric on texts)."""

    stop_token_ids, pad_token_id, eos_token_id = [2], 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(t) for t in ids if not (skip_special_tokens and t == 2))


# ---- refused before anything runs -------------------------------------------------------------


def test_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="eval_generate_max_new_tokens"):
        TrainConfig(early_stopping_patience=2, early_stopping_metric="eval_exact_match")
    with pytest.raises(ConfigError, match="early_stopping_mode"):
        TrainConfig(early_stopping_mode="up")
    with pytest.raises(ConfigError, match="eval_generate_max_new_tokens must be >= 0"):
        TrainConfig(eval_generate_max_new_tokens=-1)
    data = toy_examples(4)
    cases = [
        (dict(eval_generate_max_new_tokens=0), dict(eval_metrics={"f": exact_match}), "set eval_generate"),
        (dict(eval_generate_max_new_tokens=2), dict(eval_metrics={"f": exact_match}), "pass the tokenizer"),
        (dict(eval_generate_max_new_tokens=2), dict(eval_metrics={"loss": exact_match},
                                                    tokenizer=_DigitsTokenizer()), "eval_loss is logged"),
        (dict(eval_generate_max_new_tokens=2, early_stopping_patience=1, early_stopping_metric="eval_f1"), {},
         r"eval_f1.*not logged.*eval_exact_match"),
    ]
    for i, (cfg, kwargs, message) in enumerate(cases):
        out = tmp_path / f"case-{i}"
        with pytest.raises(ValueError, match=message):
            train(lora_model(), data, data, TrainConfig(output_dir=str(out), **cfg), **kwargs)
        assert not out.exists()
    text_refs = [{**e, "prompt_ids": e["input_ids"][:2], "reference": "words"} for e in data]
    with pytest.raises(ValueError, match="references are texts: pass the tokenizer"):
        train(lora_model(), data, text_refs, TrainConfig(output_dir=str(tmp_path / "x"),
                                                        eval_generate_max_new_tokens=2))
    only_text = [{"input_ids": [1, 4, 5], "labels": [1, 4, 5]}]
    with pytest.raises(ValueError, match="no eval example has a prompt"):
        train(lora_model(), data, only_text, TrainConfig(output_dir=str(tmp_path / "y"),
                                                        eval_generate_max_new_tokens=2))


def test_each_ddp_rank_takes_every_other_prompt_and_fsdp_is_refused():
    data = toy_examples(7)
    config = TrainConfig(eval_generate_max_new_tokens=2)
    every = generation_tasks(lora_model(), data, config, None, None, distributed.Dist())
    ranks = [generation_tasks(lora_model(), data, config, None, None,
                              distributed.Dist(rank=r, world_size=2, strategy="ddp")) for r in (0, 1)]
    assert ranks[0] == every[0::2] and ranks[1] == every[1::2] and len(every) == 7
    assert [len(t.prompt_ids) for t in every] == sorted(len(t.prompt_ids) for t in every)
    with pytest.raises(ValueError, match="fsdp"):
        generation_tasks(lora_model(), data, config, None, None, distributed.Dist(0, 2, 0, "fsdp"))
    assert generation_tasks(lora_model(), data, TrainConfig(), None, None, distributed.Dist()) == []


@pytest.mark.slow
def test_two_ddp_processes_log_the_exact_match_of_one(tmp_path):
    """torchrun, 2 CPU processes: each generates its share of the 7 prompts; the logged exact match
    and prompt count are those of one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PEFTLOOP_DIST_TIMEOUT": "60"}
    worker = [str(Path(__file__))]
    subprocess.run([sys.executable, *worker, str(tmp_path / "one")], env=env, check=True, timeout=240,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={port}", "--max-restarts=0", *worker, str(tmp_path / "two")],
                         env=env, timeout=240, capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one_eval = [r for r in read_log(tmp_path / "one") if "eval_loss" in r]
    two_eval = [r for r in read_log(tmp_path / "two") if "eval_loss" in r]
    assert [r["eval_generated"] for r in two_eval] == [7, 7]
    assert [r["eval_exact_match"] for r in two_eval] == [r["eval_exact_match"] for r in one_eval]
    assert 0.0 < one_eval[-1]["eval_exact_match"] < 1.0


def _ddp_worker(output_dir: str) -> None:
    """One process of the DDP test: 2 steps, an evaluation by generation after each, 7 prompts: 3 of
    the references are the model's own greedy completions (the lr barely moves it), 4 are not."""
    model = lora_model(seed=3)
    prompts = [[1, *range(5, 5 + n), 2] for n in (1, 4, 2, 7, 3, 5)]
    greedy = generate(model, prompts, 4, eos_token_id=model.config.eos_token_id)
    answers = [g if i % 2 else [*g, 7, 7] for i, g in enumerate(greedy)]
    eval_data = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
    eval_data.append({"input_ids": [1, 9, 2, 9], "labels": [-100, -100, -100, 9]})
    config = TrainConfig(output_dir=output_dir, max_steps=2, micro_batch_size=2, eval_every=1,
                         learning_rate=1e-9, eval_generate_max_new_tokens=4, eval_batch_size=2,
                         progress_bar=False)
    train(model, toy_examples(8), eval_data, config)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
