"""Tiny Hugging Face-format checkpoints for the tests: a real config.json, random safetensors
weights written by transformers itself, and a tokenizer.json trained with the tokenizers
library on the paragraphs below, with the special tokens and chat template of its family.

    folder = build_checkpoint(tmp_path / "qwen2", "qwen2")          # needs the 'ref' extra
    folder = build_tokenizer_folder(tmp_path / "tok", "chatml")      # tokenizers only

Families (FAMILIES) cover every architecture peftloop supports and the switches each has:
Llama (plain, with biases, Llama 3 rope scaling, the SmolLM2 and TinyLlama shapes), Mistral
(with a sliding window shorter than the test sequences), Qwen2 (q/k/v bias, tied; and with
sliding layers), Qwen3 (q/k norm, head_dim != hidden/heads; and with attention_bias).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

PARAGRAPHS = [
    "The river runs past the old mill and under the stone bridge before it reaches the sea. In spring the "
    "water is high and brown; in late summer it is low and clear enough to count the stones on the bottom.",
    "To bake bread, mix flour, water, salt and a little yeast, then knead the dough until it is smooth. Let "
    "it rise for two hours, shape it, let it rise again, and bake it in a hot oven for forty minutes.",
    "A good question has a short answer. What colour is the sky? Blue, on a clear day. How many legs does a "
    "spider have? Eight. Which planet is closest to the sun? Mercury. What do bees make? Honey.",
    "The train left the station at seven o'clock, crossed the valley, climbed through three tunnels and "
    "arrived in the mountain town just after noon, where the market was already busy with people.",
    "Numbers can be written as words: one, two, three, four, five, six, seven, eight, nine, ten. Letters "
    "come in order too: a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, u, v, w, x, y, z.",
    "Hello! Thank you for asking. I am fine, and I hope you are well. Please tell me what you need, and I "
    "will do my best to help you with it today.",
]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
INST_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# style -> (special tokens in id order, tokenizer_config fields, chat template, BOS added by tokenizer.json)
TOKENIZER_STYLES = {
    "llama2": (["<unk>", "<s>", "</s>"],
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                "add_bos_token": True, "add_eos_token": False}, INST_TEMPLATE, "<s>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3_TEMPLATE,
               "<|begin_of_text|>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, CHATML_TEMPLATE,
               None),
}

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
# family name -> (model_type, tokenizer style, config overrides)
FAMILIES = {
    "llama": ("llama", "llama2", {}),
    "llama-bias": ("llama", "llama2", dict(attention_bias=True, mlp_bias=True)),
    "llama3": ("llama", "llama3", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                                             factor=8.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0,
                                                             original_max_position_embeddings=8))),
    "smollm": ("llama", "chatml", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                       tie_word_embeddings=True)),
    "tinyllama": ("llama", "llama2", dict(num_attention_heads=8, num_key_value_heads=1)),
    "mistral": ("mistral", "llama2", dict(sliding_window=5)),
    "qwen2": ("qwen2", "chatml", dict(tie_word_embeddings=True)),
    "qwen2-sliding": ("qwen2", "chatml", dict(use_sliding_window=True, sliding_window=4,
                                              max_window_layers=1)),
    "qwen3": ("qwen3", "chatml", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen3-bias": ("qwen3", "chatml", dict(head_dim=16, attention_bias=True)),
}


# ---------------------------------------------------------------------------------------------
# Tokenizers (the tokenizers library only)


def train_tokenizer(style: str, vocab_size: int = 320):
    """A BPE tokenizer trained on PARAGRAPHS: byte-level (GPT-2/Llama 3/Qwen) or "▁" metaspace
    (Llama 2/Mistral), with the style's special tokens first and, for Llama, BOS added by the
    post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, _, _, bos_in_json = TOKENIZER_STYLES[style]
    if style == "llama2":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(PARAGRAPHS, trainer)
    if bos_in_json:
        bos_id = tokenizer.token_to_id(bos_in_json)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_in_json} $A", pair=f"{bos_in_json} $A {bos_in_json} $B",
            special_tokens=[(bos_in_json, bos_id)])
    return tokenizer


def save_tokenizer_files(folder: Path, style: str, tokenizer=None) -> Path:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and special_tokens_map.json."""
    _, fields, template, _ = TOKENIZER_STYLES[style]
    tokenizer = tokenizer or train_tokenizer(style)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {**fields, "chat_template": template, "model_max_length": 64,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {k: v for k, v in fields.items() if k.endswith("_token") and v is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    if style == "llama3":  # Llama 3 instruct stops at either end-of-turn token
        eos = [tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|end_of_text|>")]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}) + "\n")
    return folder


def build_tokenizer_folder(folder: Path, style: str = "chatml") -> Path:
    return save_tokenizer_files(folder, style)


# ---------------------------------------------------------------------------------------------
# Checkpoints (transformers, the 'ref' extra)


def hf_config(family: str, vocab_size: int, **overrides):
    import transformers

    model_type, _, family_overrides = FAMILIES[family]
    fields = {**SMALL, **family_overrides, **overrides, "vocab_size": vocab_size}
    return transformers.AutoConfig.for_model(model_type, **fields)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so each weight, bias and norm matters: weights N(0, 0.1), norm
    weights 1 + N(0, 0.1), biases N(0, 0.1) (transformers' init would make biases 0 and norms 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise + 1.0 if "norm" in name else noise)


def build_checkpoint(folder: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, **overrides) -> Path:
    """A tiny checkpoint of ``family`` written by transformers' save_pretrained, plus its tokenizer."""
    import transformers

    _, style, _ = FAMILIES[family]
    tokenizer = train_tokenizer(style)
    config = hf_config(family, tokenizer.get_vocab_size(), **overrides)
    specials = TOKENIZER_STYLES[style][1]
    config.bos_token_id = tokenizer.token_to_id(specials["bos_token"]) if specials.get("bos_token") else None
    config.eos_token_id = tokenizer.token_to_id(specials["eos_token"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    save_tokenizer_files(folder, style, tokenizer)
    return Path(folder)


def load_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model for a checkpoint folder, eager attention (the most literal reference)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------------------
# The hub cache layout


def install_in_hub_cache(cache_dir: Path, repo_id: str, source: Path, commit: str = "0123456789" * 4,
                         refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``source``'s files out as huggingface_hub's cache does: blobs named by their hash,
    snapshots/<commit>/ with symlinks into blobs, refs/<name> holding the commit."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
