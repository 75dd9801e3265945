"""The built-in demo: LoRA teaches a small random Llama to reverse strings, offline, in about a minute.

What it does, in order:
  1. builds a small Llama-architecture base model from a fixed seed and writes it in Hugging Face
     format (config.json, model.safetensors, tokenizer.json) to OUTPUT/base;
  2. makes a dataset: "abcde=" -> "edcba</s>" over 16 letters, with held-out strings for evaluation;
  3. measures the task (exact match of greedy generations) with the base model;
  4. loads the base back from OUTPUT/base, injects LoRA (r=16 on every Linear, lm_head trained in
     full) and trains with peftloop.train;
  5. measures the task again and writes the adapter in PEFT's format to OUTPUT/adapter.

Run it with ``peftloop train`` (no arguments) or ``python -m peftloop train``. Any train or lora
setting can be overridden: ``peftloop train --max_steps 100 --r 8``.
"""

from __future__ import annotations

import builtins
import json
import random
import time
from pathlib import Path

import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from peftloop import distributed
from peftloop.config import LoraConfig, TrainConfig
from peftloop.generate import generate, generate_text
from peftloop.inject import describe_trainable, disable_adapters, inject_lora
from peftloop.models import load_pretrained, save_pretrained
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM
from peftloop.tokenizer import Tokenizer
from peftloop.train import resolve_device, seed_everything, train

LETTERS = "abcdefghijklmnop"
SPECIAL = ["<pad>", "<s>", "</s>"]
SEPARATOR = "="
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

DEMO_TRAIN = dict(max_steps=300, micro_batch_size=32, learning_rate=3e-3, warmup_steps=20,
                  lr_scheduler="cosine", eval_every=100, log_every=25)
DEMO_LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", modules_to_save=["lm_head"])


def build_tokenizer():
    """A character-level tokenizer built with the tokenizers library (saved as a real tokenizer.json).
    Encoding with special tokens puts <s> first, as Llama's tokenizers do."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, SEPARATOR, *LETTERS])}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", BOS_ID)])
    return tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {**special, "add_bos_token": True, "add_eos_token": False, "model_max_length": 64,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def base_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       tie_word_embeddings=False)


def random_words(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
        if w not in exclude:
            words.append(w)
    return words


def prompt_ids(tokenizer, word: str) -> list[int]:
    return [BOS_ID, *tokenizer.encode(word + SEPARATOR, add_special_tokens=False).ids]


def to_example(tokenizer, word: str) -> dict[str, list[int]]:
    """Loss only on the answer: the prompt's labels are -100."""
    prompt = prompt_ids(tokenizer, word)
    answer = [*tokenizer.encode(word[::-1], add_special_tokens=False).ids, EOS_ID]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def exact_match(model, tokenizer, words: list[str]) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of words whose greedy generation is exactly the reversed word, and the outputs."""
    outputs = generate(model, [prompt_ids(tokenizer, w) for w in words], max_new_tokens=9,
                       eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    texts = [tokenizer.decode([t for t in out if t != EOS_ID]) for out in outputs]
    score = sum(text == w[::-1] for w, text in zip(words, texts)) / len(words)
    return score, list(zip(words, texts))


def run_demo(output_dir: str | Path = "peftloop-demo", train_overrides: dict | None = None,
             lora_overrides: dict | None = None) -> dict:
    """Run the demo end to end; returns the figures it prints."""
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    train_config = TrainConfig(**{**DEMO_TRAIN, "output_dir": str(output_dir), **(train_overrides or {})})
    lora_config = LoraConfig(**{**DEMO_LORA, **(lora_overrides or {})})
    seed_everything(train_config.seed)
    # Under torchrun every rank runs this function: rank 0 alone writes and prints.
    dist_, _ = distributed.setup(train_config.strategy, resolve_device(train_config.device))
    print = builtins.print if dist_.is_main else (lambda *args, **kwargs: None)  # noqa: A001

    # 1. the base model, written in Hugging Face format
    tokenizer = build_tokenizer()
    base = LlamaForCausalLM(base_config(tokenizer.get_vocab_size()))
    base.init_weights(torch.Generator().manual_seed(0))
    base_dir = output_dir / "base"
    if dist_.is_main:
        save_pretrained(base, base_dir)
        save_tokenizer(tokenizer, base_dir)
    distributed.barrier(dist_)
    print(f"[demo] base model ({sum(p.numel() for p in base.parameters()):,} params) -> {base_dir}")

    # 2. data: held-out words never appear in training
    rng = random.Random(train_config.seed)
    test_words = random_words(100, rng)
    eval_words = random_words(200, rng, exclude=set(test_words))
    train_words = random_words(4000, rng, exclude=set(test_words) | set(eval_words))
    train_data = [to_example(tokenizer, w) for w in train_words]
    eval_data = [to_example(tokenizer, w) for w in eval_words]

    # 3. the task before training
    model = load_pretrained(base_dir, dtype="fp32")
    before, _ = exact_match(model, tokenizer, test_words)

    # 4. LoRA + training
    inject_lora(model, lora_config)  # records base_model_name_or_path: the absolute base_dir
    print(f"[demo] {describe_trainable(model)}")
    result = train(model, train_data, eval_data, train_config)

    # 5. the task after training
    after, samples = exact_match(model, tokenizer, test_words)
    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    summary = {
        "first_logged_loss": losses[0], "last_logged_loss": losses[-1],
        "eval_loss": result.metrics.get("eval_loss"),
        "exact_match_before": before, "exact_match_after": after,
        "steps": result.global_step, "wall_time_s": round(time.perf_counter() - t0, 1),
        "adapter": str(output_dir / "adapter"),
    }
    print(f"[demo] loss {losses[0]:.3f} -> {losses[-1]:.4f} over {result.global_step} steps "
          f"(eval loss {summary['eval_loss']:.4f})")
    print(f"[demo] reversal exact match on 100 held-out words: {before:.0%} before -> {after:.0%} after")
    show_before_and_after(model, base_dir, [f"{w}{SEPARATOR}" for w, _ in samples[:3]], print)
    print(f"[demo] adapter (PEFT format) -> {summary['adapter']}   ({summary['wall_time_s']} s)")
    print(f"[demo] try: peftloop generate --model {base_dir} --adapter {summary['adapter']} --compare "
          f"--prompt {samples[0][0]}{SEPARATOR}")
    return summary


def show_before_and_after(model, base_dir: Path, prompts: list[str], print=builtins.print) -> None:  # noqa: A002
    """What ``peftloop generate --compare`` prints: the base model's and the adapter's greedy outputs,
    through the tokenizer files saved with the base."""
    tokenizer = Tokenizer.from_pretrained(base_dir)
    with disable_adapters(model):
        before = generate_text(model, tokenizer, prompts, max_new_tokens=9)
    after = generate_text(model, tokenizer, prompts, max_new_tokens=9)
    for prompt, old, new in zip(prompts, before, after):
        print(f"[demo]   {prompt} base: {old!r:14} -> with the adapter: {new!r}")
