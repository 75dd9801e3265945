"""The benchmark harness measures what it says: the same job in every system, and honest summaries.

Timed figures never live in tests; these check the machinery on the small shape with a few steps:
the parity run gives equal, falling loss curves in peftloop and the Trainer, every system's run
reports its steps, and the summary and table compute their ratios from the runs they are given.
The realistic workload: its generator is deterministic, follows its documented lengths, masks
prompts and makes responses a function of the prompt; the Trainer's padding-free path gives the
padded losses; a tiny end-to-end run through compare writes every column. And the suite's shape:
every benchmark runs as ``python -m benchmarks.<name>``, writes its results through the one
writer, and every results file is named ``<benchmark>-<machine>-<date>.<ext>``."""

from __future__ import annotations

import argparse
import json
import math
import pkgutil
import statistics
import subprocess
import sys

import pytest
import torch

import benchmarks
from benchmarks import workload
from benchmarks.common import RESULT_NAME, RESULTS, ROOT, markdown_table, write_results
from benchmarks.compare import (
    CHAT_SYSTEMS,
    markdown,
    parity,
    run,
    summarize,
    summarize_chat,
    targets,
    write_base,
)
from benchmarks.run_one import pad_to_longest

HELPERS = ("common", "workload")  # imported by the benchmarks, not run
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name not in HELPERS)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return write_base("small", tmp_path_factory.mktemp("bench") / "base-small")


@pytest.mark.slow
def test_parity_run_gives_the_same_loss_curve_in_both_systems(small_base, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = argparse.Namespace(warmup=0, threads=0, steps=3)
    result = parity(small_base, args, tmp_path, steps=3)
    assert len(result["peftloop"]) == len(result["trainer"]) == 3
    assert result["max_abs_diff"] <= 1e-4, result  # the bound, per step, in fp32
    # real losses of a 8,192-token vocabulary (from ~ln 8192 = 9.01), falling: the data is learnable
    assert all(8.0 < x < 10.0 for x in result["peftloop"])
    assert result["peftloop"][-1] < result["peftloop"][0] - 0.01, result["peftloop"]


@pytest.mark.slow
def test_every_system_runs_the_job_and_reports_its_steps(small_base, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = argparse.Namespace(warmup=1, threads=0, steps=2)
    for system in ("peftloop", "handloop"):
        r = run(system, small_base, "fp32", args, tmp_path)
        assert r["system"] == system and r["steps"] == 2 and len(r["step_times_s"]) == 2
        assert r["median_step_s"] > 0 and r["peak_rss_mib"] > 100 and "error" not in r
        assert len(r["losses"]) == 2


def test_summary_and_table_take_their_ratios_from_the_runs():
    runs = [{"system": "peftloop", "median_step_s": 1.0, "peak_rss_mib": 500.0},
            {"system": "peftloop", "median_step_s": 1.2, "peak_rss_mib": 520.0},
            {"system": "trainer", "median_step_s": 2.0, "peak_rss_mib": 1000.0},
            {"system": "trainer", "median_step_s": 2.2, "peak_rss_mib": 1010.0}]
    summary = summarize(runs, "small", "fp32", {"fp32": 100.0, "bf16": 10.0})
    # two passes: each system's slower pass is kept (the upper median), for both alike
    assert summary["peftloop"]["median_step_s"] == 1.2 and summary["trainer"]["median_step_s"] == 2.2
    assert summary["ratio"]["tokens_per_s"] == pytest.approx(2.2 / 1.2)
    assert summary["ratio"]["peak_rss"] == pytest.approx(520 / 1010)
    assert summary["peftloop"]["spread"] == pytest.approx(0.2)
    results = {"date": "2026-01-01", "machine": "m", "torch": "t", "threads": 2, "load_before": 0.1,
               "load_after": 0.2, "gemm_peak": {"fp32": 100.0, "bf16": 10.0},
               "configs": {"small/fp32": summary}}
    table = markdown(results, "python -m benchmarks.compare")
    assert "**1.83x**" in table and "**0.51x**" in table and "`python -m benchmarks.compare`" in table
    json.dumps(results)  # the results file is JSON


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_runs_as_a_module_and_answers_help(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in source, (f"benchmarks/{name}.py edits sys.path: it runs as "
                                      f"python -m benchmarks.{name}")
    assert 'if __name__ == "__main__":' in source
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")


def test_result_files_are_named_benchmark_machine_date():
    names = [p.name for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert names
    for name in names:
        match = RESULT_NAME.match(name)
        assert match, f"benchmarks/results/{name} is not <benchmark>-<machine>-<YYYY-MM-DD>.<json|md|png>"
        assert match["benchmark"] in MODULES, (f"benchmarks/results/{name}: no benchmark "
                                               f"{match['benchmark']!r}")


def test_write_results_writes_json_and_markdown_beside_it(tmp_path):
    records = [{"variant": "a", "seconds": 1.5}, {"variant": "b", "seconds": 0.25}]
    rows = [(r["variant"], f"{r['seconds']:.2f}") for r in records]
    table = markdown_table(["variant", "seconds"], rows, "lr")
    assert table[:2] == ["| variant | seconds |", "|---|---:|"]
    stem = write_results("ce_memory", records, title="A title", body=["Some prose.", "", *table],
                         meta={"method": "m"}, machine_name="Some CPU, 2 CPUs, AVX2", date="2026-01-02",
                         results=tmp_path)
    assert stem == tmp_path / "ce_memory-some-cpu-2-cpus-avx2-2026-01-02"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ".json", stem.name + ".md"]
    assert all(RESULT_NAME.match(p.name) for p in tmp_path.iterdir())
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["benchmark"] == "ce_memory" and data["machine"] == "Some CPU, 2 CPUs, AVX2"
    assert data["date"] == "2026-01-02" and data["command"].startswith("python -m benchmarks.ce_memory")
    assert data["method"] == "m" and data["records"] == records and "torch" in data
    md = stem.with_suffix(".md").read_text().splitlines()
    assert md[0] == "# A title"
    assert "Some CPU, 2 CPUs, AVX2" in md[2] and "`python -m benchmarks.ce_memory" in md[2]
    assert md[-5:] == ["", *table]
    variant = write_results("ce_memory", records, title="A title", body=[],
                            machine_name="Some CPU, 2 CPUs, AVX2", date="2026-01-02", results=tmp_path,
                            variant="checkpointed")
    assert variant.name == "ce_memory__checkpointed-some-cpu-2-cpus-avx2-2026-01-02"
    match = RESULT_NAME.match(variant.name + ".json")
    assert (match["benchmark"], match["variant"], match["machine"]) == ("ce_memory", "checkpointed",
                                                                        "some-cpu-2-cpus-avx2")
    assert json.loads(variant.with_suffix(".json").read_text())["variant"] == "checkpointed"
    assert stem.with_suffix(".json").is_file()  # the default run's files stay


# ---------------------------------------------------------------------------------------------
# The realistic workload


def test_workload_is_deterministic_for_a_seed():
    a = workload.chat_examples(40, 8192, 512, seed=3)
    assert a == workload.chat_examples(40, 8192, 512, seed=3)
    assert a != workload.chat_examples(40, 8192, 512, seed=4)
    assert workload.synthetic_examples(4, 64, 8192) == workload.synthetic_examples(4, 64, 8192)


def test_workload_lengths_follow_the_documented_statistics():
    lengths = workload.record_lengths(4000, seed=0)
    for values, documented in ((sorted(p for p, _ in lengths), workload.mean_prompt_tokens()),
                               (sorted(c for _, c in lengths), workload.mean_completion_tokens())):
        error = statistics.stdev(values) / math.sqrt(len(values))
        assert abs(statistics.mean(values) - documented) < 4 * error, (statistics.mean(values), documented)
        # log-normal mix: the median well below the mean, a long tail
        assert values[len(values) // 2] < 0.85 * documented and values[-1] > 4 * documented
    assert workload.mean_prompt_tokens() == pytest.approx(62.925)
    assert workload.mean_completion_tokens() == pytest.approx(181.55)


def test_prompts_are_masked_and_responses_are_a_function_of_the_prompt():
    vocab, cap = 8192, 300
    examples = workload.chat_examples(200, vocab, cap, seed=1)
    vocabulary = workload.Vocabulary(vocab, seed=1)
    template = 1 + len(workload.USER_HEADER)
    assert any(len(e["input_ids"]) == cap for e in examples)  # the cap bites on this mix
    for e in examples:
        ids, labels = e["input_ids"], e["labels"]
        assert len(ids) == len(labels) <= cap
        prompt_len = labels.index(next(t for t in labels if t != workload.IGNORE_INDEX))
        assert all(t == workload.IGNORE_INDEX for t in labels[:prompt_len])
        assert labels[prompt_len:] == ids[prompt_len:]  # the completion, every token labelled
        last_prompt_token = ids[prompt_len - 1 - len(workload.ASSISTANT_HEADER)]
        assert ids[:template] == [workload.BOS, *workload.USER_HEADER]
        completion = workload.completion_of(e)
        body = completion[:-1] if completion[-1] == workload.EOS else completion
        assert body == vocabulary.chain(last_prompt_token, len(body))  # determined by the prompt
    stats = workload.length_stats(examples)
    assert stats["max"] == cap and stats["p50"] <= stats["p90"] <= stats["max"]
    assert 0.5 < stats["label_fraction"] < 0.9


def test_trainer_flattening_gives_the_padded_losses_under_sdpa():
    """DataCollatorWithFlattening is only fair if the flattened row attends block-diagonally: in this
    transformers version, with sdpa on the CPU and no KV cache (the Trainer's use_cache=False; with a
    cache transformers does not look for packed rows), each example's losses equal its padded ones;
    without the restarting position ids (one long causal sequence) they do not."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((5, 2), (9, 4), (13, 3)):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})

    def summed_loss(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # as under the Trainer
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten(), reduction="sum")

    flat = transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(examples)
    with torch.no_grad():
        padded, flattened = summed_loss(pad_to_longest(examples)), summed_loss(flat)
        causal = summed_loss({k: v for k, v in flat.items() if k != "position_ids"})
    assert flat["input_ids"].shape == (1, 27)
    assert flattened.item() == pytest.approx(padded.item(), rel=1e-5)
    assert abs(causal.item() - padded.item()) > 1e-3 * padded.item()


def test_chat_summary_takes_each_systems_best_and_ratios_from_the_runs():
    def record(system, epoch_s, rss, **extra):
        return {"system": system, "epoch_s": epoch_s, "label_tokens": 600, "real_tokens": 1000,
                "processed_tokens": 1250, "peak_rss_mib": rss, "steps": 3, "examples_per_step": 8.0,
                "losses": [9.0, 8.9, 8.8], **extra}

    runs = [record("trainer_padded", 10.0, 1000.0), record("trainer_flattening", 5.0, 900.0),
            record("trainer_grouped", 6.0, 950.0), record("peftloop_padded", 4.0, 400.0),
            record("peftloop_packed", 2.0, 300.0), record("peftloop_packed", 3.0, 320.0)]
    summary = summarize_chat(runs)
    assert summary["ratio"]["peftloop"] == "peftloop_packed"
    assert summary["ratio"]["trainer"] == "trainer_flattening"
    # two passes: the upper median (the slower) is kept, as for the synthetic job
    assert summary["peftloop_packed"]["epoch_s"] == 3.0
    assert summary["peftloop_packed"]["label_tokens_per_s"] == pytest.approx(200.0)
    assert summary["peftloop_packed"]["real_tokens_per_s"] == pytest.approx(1000 / 3)
    assert summary["trainer_padded"]["padding"] == pytest.approx(0.2)
    assert summary["ratio"]["label_tokens_per_s"] == pytest.approx((600 / 3) / (600 / 5))
    assert summary["ratio"]["peak_rss"] == pytest.approx(320 / 900)
    results = {"date": "2026-01-01", "machine": "m", "torch": "t", "threads": 2, "load_before": 0.1,
               "load_after": 0.2, "gemm_peak": {"fp32": 100.0, "bf16": 10.0},
               "chat_data": {"examples": 48, "mean": 250.0, "p50": 180, "p90": 500, "max": 1024,
                             "max_seq_len": 1024, "label_fraction": 0.72},
               "chat": {"smollm/bf16": summary,
                        "smollm/fp32": {**summary, "ratio": {**summary["ratio"], "label_tokens_per_s": 1.7}}}}
    rows = {t: (m, ok) for t, m, _, ok in targets(results)}
    assert rows["chat smollm/bf16: label tokens/s peftloop / Trainer"] == ("1.67x", False)  # target 2x
    assert rows["chat smollm/fp32: label tokens/s peftloop / Trainer"] == ("1.70x", True)  # target 1.6x
    assert rows["chat smollm/bf16: peak RSS peftloop / Trainer"] == ("0.36x", True)  # target 0.4x
    table = markdown(results, "python -m benchmarks.compare")
    assert "**1.67x**" in table and "**missed**" in table and "| met |" in table
    assert "p90 500" in table and "72% of the tokens carry a label" in table


@pytest.mark.slow
def test_compare_runs_the_realistic_workload_end_to_end(tmp_path):
    """A tiny run of every chat system through compare: the JSON and Markdown have every column and
    the ratio is computed from the recorded runs."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cmd = [sys.executable, "-m", "benchmarks.compare", "--workloads", "chat", "--chat-configs", "small/fp32",
           "--chat-examples", "8", "--chat-max-seq-len", "128", "--no-docs", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [path] = tmp_path.glob("compare-*.json")
    data = json.loads(path.read_text())
    assert data["workloads"] == ["chat"] and data["chat_data"]["examples"] == 8
    summary = data["chat"]["small/fp32"]
    assert set(CHAT_SYSTEMS) <= set(summary)
    for r in data["records"]:
        assert r["workload"] == "chat" and r["examples"] == 8 and len(r["losses"]) == r["steps"] > 0
        assert r["label_tokens"] == data["chat_data"]["label_tokens"] and "error" not in r
        # every system trained on exactly the workload's label tokens, counted step by step its own way
        assert r["label_tokens_seen"][-1] == r["label_tokens"], r["system"]
        assert summary[r["system"]]["label_tokens_per_s"] == pytest.approx(r["label_tokens"] / r["epoch_s"])
    assert summary["trainer_flattening"]["padding"] == 0 and summary["trainer_padded"]["padding"] > 0
    best = summary["ratio"]
    assert best["label_tokens_per_s"] == pytest.approx(summary[best["peftloop"]]["label_tokens_per_s"]
                                                       / summary[best["trainer"]]["label_tokens_per_s"])
    md = path.with_suffix(".md").read_text()
    for column in ("label tokens/s", "real tokens/s", "epoch (s)", "padding", "examples/step", "peak RSS",
                   "label tokens/s, best / best", "peak RSS, best / best"):
        assert f" {column} |" in md
    assert f"**{best['label_tokens_per_s']:.2f}x**" in md
    assert path.with_suffix(".png").is_file() or "matplotlib" in proc.stdout
