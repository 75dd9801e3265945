"""``peftloop train --model <HF folder> --data <jsonl>`` end to end, ``peftloop generate`` showing
the adapter's effect, ``peftloop merge`` for every family, and the errors of the real-model path."""

import json

import pytest
import torch

from peftloop import LoraConfig, inject_lora, load_adapter, save_adapter
from peftloop.cli import main
from peftloop.generate import generate, generate_text
from peftloop.models import load_pretrained
from peftloop.tokenizer import Tokenizer
from tests.helpers import QA, assert_merged_logits_close, qa_records, read_log, save_chat_base, write_jsonl
from tests.hf_builders import FAMILIES, build_checkpoint, load_reference


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """helpers.save_chat_base: a tiny Qwen2-shaped checkpoint with a ChatML tokenizer."""
    return save_chat_base(tmp_path_factory.mktemp("base") / "qwen2-tiny")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", qa_records(4))


def test_train_evaluates_saves_and_generate_shows_the_adapter(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(base), "--data", str(data), "--output-dir", str(out),
                 "--max_steps", "24", "--micro_batch_size", "4", "--learning_rate", "1e-2", "--r", "8",
                 "--lora_alpha", "16", "--eval_split", "0.25", "--eval_every", "12",
                 "--eval_generate_max_new_tokens", "10", "--progress_bar", "false"]) == 0
    printed = capsys.readouterr().out
    assert "records -> " in printed and "eval loss" in printed and "adapter (PEFT format)" in printed
    log = read_log(out)
    assert [r["step"] for r in log if "eval_loss" in r] == [12, 24]
    # the task itself, measured by greedy completions of the held-out prompts: learned by step 24
    evals = [r for r in log if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[-1]["eval_exact_match"] == 1.0
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert adapter_config["target_modules"] == sorted(all_linear)  # the CLI's default
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    prompts = [f"Q: {q}\nA:" for q, _ in QA]
    argv = ["generate", "--model", str(base), "--adapter", str(out / "adapter"), "--compare",
            "--max-new-tokens", "10"]
    assert main(argv + [arg for p in prompts for arg in ("--prompt", p)]) == 0
    printed = capsys.readouterr().out
    for _, answer in QA:
        assert f"[adapter]  {answer}\n" in printed  # the adapter answers; the random base does not
    assert not any(f"[base]     {answer}" in printed for _, answer in QA)


def test_a_toml_config_with_model_and_data_sections(base, data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nname_or_path = "{base}"\ndtype = "fp32"\n'
                      f'[data]\ntrain_file = "{data}"\npacking = true\nmax_seq_len = 64\n'
                      '[train]\nmax_steps = 2\nprogress_bar = false\n'
                      '[lora]\nr = 2\ntarget_modules = ["q_proj"]\n')
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["target_modules"] == ["q_proj"]


def test_streaming_trains_with_max_steps(base, data, tmp_path, capsys):
    argv = ["train", "--model", str(base), "--data", str(data), "--streaming", "true",
            "--progress_bar", "false"]
    assert main([*argv, "--output-dir", str(tmp_path / "no-steps")]) == 2
    message = "data.streaming reads the file lazily and has no length: set train.max_steps"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "no-steps").exists()
    assert main([*argv, "--output-dir", str(tmp_path / "s"), "--max_steps", "5",
                 "--shuffle_buffer", "4"]) == 0
    assert "(streamed, last pass): " in capsys.readouterr().out
    assert (tmp_path / "s" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.jsonl"], "data.train_file given without a model: set --model"),
    (["--model", "./missing-model-folder", "--data", "{data}"], "missing-model-folder: no such folder"),
    (["--model", "{base}", "--data", "{bad}"], "bad.jsonl:2: invalid JSON"),
    (["--model", "{base}", "--data", "{data}", "--format", "csv"], "data.format='csv'"),
    (["--model", "{base}", "--data", "{data}", "--dtype", "int8"], "model.dtype='int8'"),
])
def test_errors_name_the_problem_and_write_nothing(base, data, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    argv = [a.format(base=base, data=data, bad=bad) for a in argv]
    out = tmp_path / "out"
    assert main(["train", *argv, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generate_errors(base, capsys):
    assert main(["generate", "--model", str(base), "--prompt", "x", "--compare"]) == 2
    assert "--compare needs --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_writes_a_checkpoint_transformers_loads_with_our_logits(tmp_path, family, capsys):
    pytest.importorskip("peft", reason="the 'ref' extra is not installed")
    folder = build_checkpoint(tmp_path / "base", family, seed=3)
    model = load_pretrained(folder)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--base", str(folder), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).is_file(), name
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids)
        merged_in_transformers = load_reference(tmp_path / "merged")(ids).logits
        merged_in_peftloop = load_pretrained(tmp_path / "merged")(ids)
    assert_merged_logits_close(merged_in_transformers, ours)
    assert_merged_logits_close(merged_in_peftloop, ours)
    with torch.no_grad():  # the adapter did change the model, so the comparison means something
        assert (load_pretrained(folder)(ids) - ours).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# peftloop generate --prompts FILE.jsonl --out FILE.jsonl


@pytest.fixture
def adapter(base, tmp_path):
    """A random (B != 0) adapter on the chat base, so that it changes the output."""
    folder = tmp_path / "adapter"
    save_adapter(inject_lora(load_pretrained(base), LoraConfig(r=4, target_modules="all-linear",
                                                               init_lora_weights=False)), folder)
    return folder


PROMPTS = [{"prompt": "Q: What do bees make?\nA:", "completion": " honey"},  # extra fields are ignored
           {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Name a river."}]},
           {"prompt": "Once"},
           {"prompt": [{"role": "user", "content": "Hello"}]}]  # a conversational prompt


def test_generate_a_file_of_prompts_into_a_jsonl_file(base, adapter, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "results" / "completions.jsonl"
    argv = ["generate", "--adapter", str(adapter), "--prompts", str(prompts), "--max-new-tokens", "5"]
    assert main([*argv, "--out", str(out), "--batch-size", "2", "--compare"]) == 0
    assert f"4 completions -> {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sorted(row) for row in rows] == [["base_completion", "completion", "prompt"],
                                             ["base_completion", "completion", "messages"],
                                             ["base_completion", "completion", "prompt"],
                                             ["base_completion", "completion", "prompt"]]
    assert [row.get("prompt", row.get("messages")) for row in rows] == [
        r.get("prompt", r.get("messages")) for r in PROMPTS]
    assert sorted(p.name for p in out.parent.iterdir()) == ["completions.jsonl"]  # no temporary file left

    # what generate_text / the chat template give for the same prompts, in the same batches of 2
    model = load_adapter(load_pretrained(base), adapter)
    tokenizer = Tokenizer.from_pretrained(base)
    texts = generate_text(model, tokenizer, ["Q: What do bees make?\nA:", "Once"], 5)
    assert [r["completion"] for r in rows[0::2]] == texts
    chats = [tokenizer.apply_chat_template(PROMPTS[i].get("messages") or PROMPTS[i]["prompt"],
                                           add_generation_prompt=True) for i in (1, 3)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = generate(model, chats, 5, eos_token_id=tokenizer.stop_token_ids, pad_token_id=pad)
    assert [r["completion"] for r in rows[1::2]] == [tokenizer.decode(ids) for ids in new]
    assert any(r["completion"] != r["base_completion"] for r in rows)  # the adapter is applied

    # without --out: the same lines on the console
    assert main([*argv, "--batch_size", "2", "--compare"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "fine"}', '{"prompt": '], "prompts.jsonl:2: invalid JSON"),
    (['{"text": "a"}'], "prompts.jsonl:1: expected a non-empty \"prompt\" string or \"messages\" list "
                        "(the record has 'text')"),
    (['{"prompt": ""}'], "prompts.jsonl:1: expected a non-empty \"prompt\""),
    (['{"messages": [{"role": "user"}]}'], "prompts.jsonl:1: messages[0] is not a {\"role\": str, "
                                           "\"content\": str} message"),
    ([], "prompts.jsonl: no records"),
])
def test_a_bad_prompts_file_is_named_by_line_and_nothing_is_written(base, tmp_path, capsys, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(base), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    ([], "give the prompts with --prompt TEXT (repeatable) or --prompts FILE.jsonl"),
    (["--prompt", "x", "--prompts", "p.jsonl"], "give the prompts with --prompt TEXT"),
    (["--prompts", "missing.jsonl"], "--prompts missing.jsonl: no such file"),
    (["--prompt", "x", "--batch-size", "0"], "--batch_size must be >= 1, got 0"),
    (["--prompt", "x", "--out", "{tmp}"], "is a folder: give the JSONL file to write"),
])
def test_generate_input_errors(base, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["generate", "--model", str(base), *argv]) == 2
    assert message in capsys.readouterr().err
