"""QLoRA: LoRA on a 4-bit (NF4) base. The same math as LoRA on the dequantised weights; 4-bit
loading as the checkpoint streams in (peak memory measured); the base's size; learning the demo
task; merging (fp32, then bf16 with the rounding reported); the CLI; FSDP2 sharding the 4 bits."""

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from peftloop.cli import main as cli_main
from peftloop.config import LoraConfig, TrainConfig
from peftloop.inject import count_parameters, inject_lora, lora_layers, merge_and_unload
from peftloop.models import load_pretrained, save_pretrained
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM
from peftloop.nf4 import dequantize_model, nf4_layers, quantize_model
from peftloop.train import train
from tests.helpers import TOKENS, save_chat_base, tiny_model

LABELS = torch.where(torch.arange(9) < 3, -100, TOKENS)


def _qlora(seed=0, **lora):
    model = quantize_model(tiny_model(seed=seed))
    torch.manual_seed(1)
    return inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                         init_lora_weights=False, **lora))


def test_qlora_is_lora_on_the_dequantised_weights():
    qlora = _qlora()
    reference = dequantize_model(quantize_model(tiny_model(seed=0)))  # fp32 Linears holding dequant(W4)
    torch.manual_seed(1)
    inject_lora(reference, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      init_lora_weights=False))
    assert all(layer.quantized for layer in lora_layers(qlora).values())
    assert not any(layer.quantized for layer in lora_layers(reference).values())
    loss, expected = qlora(TOKENS, labels=LABELS), reference(TOKENS, labels=LABELS)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    loss.backward(), expected.backward()
    ours = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 14
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in qlora.parameters() if not p.requires_grad)


def test_qlora_under_bf16_autocast(cpu_low_precision):
    qlora = _qlora(use_dora=True)
    reference = dequantize_model(quantize_model(tiny_model(seed=0)))
    torch.manual_seed(1)
    inject_lora(reference, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = qlora(TOKENS), reference(TOKENS)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same bf16 ops on the same values


def test_parameters_are_counted_per_weight_not_per_byte():
    plain, quantized = tiny_model(seed=0), quantize_model(tiny_model(seed=0))
    assert count_parameters(quantized)[1] == count_parameters(plain)[1]


# ---------------------------------------------------------------------------------------------
# Loading in 4 bits


SHAPE = dict(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 37M-parameter Llama (35.4M of them in Linear layers), saved in bf16."""
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.init_weights(torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model.to(torch.bfloat16), folder / "model")
    save_pretrained(LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": 1})), folder / "tiny")
    return folder


@pytest.mark.slow
def test_streamed_4bit_load_equals_quantising_the_loaded_model(checkpoint):
    streamed = load_pretrained(checkpoint / "model", dtype="bf16", quantization="nf4", double_quant=True)
    loaded = quantize_model(load_pretrained(checkpoint / "model", dtype="fp32"))
    assert nf4_layers(streamed).keys() == nf4_layers(loaded).keys() and len(nf4_layers(streamed)) == 12 * 7
    for name, layer in nf4_layers(streamed).items():
        other = nf4_layers(loaded)[name]
        assert layer.weight_dtype == torch.bfloat16
        for a, b in zip(layer.state[:4], other.state[:4]):
            assert torch.equal(a, b), name
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16 and streamed.lm_head is not None
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, never quantised


@pytest.mark.slow
def test_the_4bit_base_takes_at_most_0_3_of_its_bf16_size(checkpoint):
    """Measured: the bytes of every tensor a 4-bit layer holds (storage, not element counts),
    against the same weights in bf16."""
    for double_quant, expected in ((True, 4.127 / 16), (False, 4.5 / 16)):
        model = load_pretrained(checkpoint / "model", dtype="bf16", quantization="nf4",
                                double_quant=double_quant)
        layers = nf4_layers(model).values()
        held = sum(p.untyped_storage().nbytes() for layer in layers for p in layer.parameters()
                   if p.dtype != torch.bfloat16)
        bf16 = sum(2 * layer.in_features * layer.out_features for layer in layers)
        assert held / bf16 <= 0.3
        assert held / bf16 == pytest.approx(expected, abs=0.002), (double_quant, held / bf16)


MEASURE = textwrap.dedent("""
    import json, sys, torch
    from peftloop.models import load_pretrained

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    folder, tiny, quantization = sys.argv[1], sys.argv[2], sys.argv[3]
    quantization = None if quantization == "none" else quantization
    load_pretrained(tiny, dtype="bf16", quantization=quantization)  # imports, allocator, thread pools
    baseline = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = load_pretrained(folder, dtype="bf16", quantization=quantization)
    print(json.dumps({"peak_growth": (kib("VmHWM") - baseline) * 1024,
                      "held": sum(p.untyped_storage().nbytes() for p in model.parameters())}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loading_in_4bit_peaks_near_the_4bit_model_not_the_full_one(checkpoint, tmp_path):
    """Peak RSS growth of a fresh process while it loads: close to what the 4-bit model holds,
    far below the fp32 (or bf16) weights; the checkpoint is never held in full precision."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = lambda q: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(checkpoint / "model"), str(checkpoint / "tiny"), q], env=env,
        capture_output=True, text=True, check=True).stdout)
    nf4, bf16 = run("nf4"), run("none")
    fp32_weights = 2 * bf16["held"]
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    print(f"4-bit load: peak growth {mib(nf4['peak_growth'])}, holds {mib(nf4['held'])}; "
          f"bf16 load: peak {mib(bf16['peak_growth'])}; fp32 weights {mib(fp32_weights)}")
    assert nf4["held"] < 0.35 * bf16["held"]
    # the 4-bit model, plus one layer's fp32 weight and the reader's 16 MiB conversion buffer
    assert nf4["peak_growth"] < nf4["held"] + 3 * 512 * 1536 * 4 + (16 << 20) + (8 << 20)
    assert nf4["peak_growth"] < 0.3 * fp32_weights


# ---------------------------------------------------------------------------------------------
# Training and merging


@pytest.mark.slow
def test_qlora_learns_the_demo_task(tmp_path):
    """The built-in demo (reverse a word), 100 steps on a 4-bit base: from no correct answer to
    some, and the eval loss of a plain LoRA run's order."""
    from peftloop import demo

    tokenizer = demo.build_tokenizer()
    base = LlamaForCausalLM(demo.base_config(tokenizer.get_vocab_size()))
    base.init_weights(torch.Generator().manual_seed(0))
    save_pretrained(base, tmp_path / "base")
    rng = random.Random(42)
    test_words = demo.random_words(100, rng)
    eval_words = demo.random_words(200, rng, set(test_words))
    train_words = demo.random_words(4000, rng, set(test_words) | set(eval_words))
    train_data = [demo.to_example(tokenizer, w) for w in train_words]
    eval_data = [demo.to_example(tokenizer, w) for w in eval_words]
    model = load_pretrained(tmp_path / "base", quantization="nf4")
    before, _ = demo.exact_match(model, tokenizer, test_words)
    inject_lora(model, LoraConfig(**demo.DEMO_LORA))
    config = TrainConfig(**{**demo.DEMO_TRAIN, "max_steps": 100, "warmup_steps": 20, "eval_every": 0,
                            "log_every": 100, "progress_bar": False, "output_dir": str(tmp_path / "run")})
    result = train(model, train_data, eval_data, config)
    after, _ = demo.exact_match(model, tokenizer, test_words)
    print(f"QLoRA demo: exact match {before:.0%} -> {after:.0%}, eval loss {result.metrics['eval_loss']:.3f}")
    assert len(nf4_layers(model)) == 4 * 7
    assert before == 0.0 and after >= 0.1
    assert result.metrics["eval_loss"] < 1.2  # from ~3.2 (LoRA alone: 0.91 in the same 100 steps)


def test_merge_and_unload_dequantises_and_reports_the_rounding():
    qlora = _qlora(use_dora=True)
    expected = qlora(TOKENS)
    with pytest.warns(UserWarning, match=r"float32; that rounding changed weights by up to 0 \(max abs diff"):
        merged = merge_and_unload(qlora, dtype=torch.float32)  # fp32: dequant(W4) + ΔW exactly
    assert not nf4_layers(merged) and not lora_layers(merged)
    torch.testing.assert_close(merged(TOKENS), expected, rtol=0, atol=1e-5)

    qlora = _qlora()
    exact = {n: layer.merged_weight() for n, layer in lora_layers(qlora).items()}
    message = r"4-bit \(NF4\) base.*bfloat16.*up to ([0-9.e-]+) \(max abs diff"
    with pytest.warns(UserWarning, match=message) as record:
        merged = merge_and_unload(qlora, dtype=torch.bfloat16)
    worst = max(float((merged.get_submodule(n).weight.float() - w).abs().max()) for n, w in exact.items())
    reported = float(str(record[0].message).split("up to ")[1].split(" ")[0])
    assert reported == pytest.approx(worst, rel=1e-3) and worst > 0
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in merged.modules()
               if isinstance(m, nn.Linear) and m is not merged.lm_head)


def test_a_4bit_model_is_not_saved_as_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="4-bit.*merge_and_unload"):
        save_pretrained(quantize_model(tiny_model()), tmp_path / "x")
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        next(iter(lora_layers(_qlora()).values())).merge()


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny Llama (untied, no biases) with a ChatML tokenizer."""
    return save_chat_base(tmp_path_factory.mktemp("base") / "llama-tiny", model_type="llama",
                          tie_word_embeddings=False)


def test_cli_trains_qlora_with_dora_checkpointing_and_loraplus_then_merges(hf_base, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {q}\nA:", "completion": f" {a}"}) + "\n"
                            for q, a in [("What do bees make?", "Honey."), ("Sky?", "Blue.")] * 4))
    out = tmp_path / "run"
    assert cli_main(["train", "--model", str(hf_base), "--data", str(data), "--output-dir", str(out),
                     "--quantization", "nf4", "--gradient_checkpointing", "true", "--use_dora", "true",
                     "--loraplus_lr_ratio", "16", "--max_steps", "4", "--micro_batch_size", "4",
                     "--learning_rate", "1e-2", "--r", "4", "--progress_bar", "false"]) == 0
    assert "nf4 base" in capsys.readouterr().out
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written["use_dora"] is True and written["r"] == 4
    assert cli_main(["merge", "--base", str(hf_base), "--adapter", str(out / "adapter"), "--out",
                     str(tmp_path / "merged"), "--quantization", "nf4"]) == 0
    assert "max abs diff" in capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    merged = load_pretrained(tmp_path / "merged")
    # the merged model is the QLoRA model: dequant(W4) + the trained update, rounded to bf16
    from peftloop.checkpoint import load_adapter

    qlora = load_adapter(load_pretrained(hf_base, dtype="bf16", quantization="nf4"), out / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged.float()(ids) - qlora.float()(ids)).abs().max()
    assert diff < 0.05 * qlora.float()(ids).abs().max()


# ---------------------------------------------------------------------------------------------
# FSDP2 shards the 4-bit tensors


WORKER = textwrap.dedent("""
    import os, sys, torch
    from peftloop.config import LoraConfig, TrainConfig
    from peftloop.inject import inject_lora, lora_layers
    from peftloop.nf4 import quantize_model
    from peftloop.train import train
    from tests.helpers import tiny_model, toy_examples

    model = quantize_model(tiny_model(seed=0))
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                  use_dora=True))
    config = TrainConfig(output_dir=sys.argv[1], strategy=sys.argv[2], micro_batch_size=int(sys.argv[3]),
                         grad_accum=2, max_steps=3, learning_rate=1e-2, progress_bar=False)
    train(model, toy_examples(16, seed=5), None, config)
    packed = model.model.layers[0].self_attn.q_proj.base_layer.packed_weight
    local = packed.to_local() if hasattr(packed, "to_local") else packed
    print(f"RANK {os.environ.get('RANK', '0')} packed {type(packed).__name__} local {local.numel()} "
          f"of {packed.numel()};", flush=True)
""")


@pytest.mark.slow
def test_fsdp2_shards_the_4bit_base_and_trains_like_one_process(tmp_path):
    from peftloop.checkpoint import read_safetensors

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PEFTLOOP_DIST_TIMEOUT": "60"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "none", "4"], env=env, check=True,
                   capture_output=True, timeout=240)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={port}", "--max-restarts=0", str(script), str(tmp_path / "fsdp"),
                          "fsdp", "2"], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shards = re.findall(r"RANK (\d) packed (\w+) local (\d+) of (\d+);", run.stdout)
    assert sorted(shards) == [("0", "DTensor", "256", "512"), ("1", "DTensor", "256", "512")], run.stdout
    single = read_safetensors(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    sharded = read_safetensors(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == sharded.keys()
    assert max(float((single[k] - sharded[k]).abs().max()) for k in single) < 1e-5
