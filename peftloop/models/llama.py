"""A Llama-architecture causal LM with Hugging Face's module names.

    model.embed_tokens ─► N × [ input_layernorm ─► self_attn (q/k/v/o_proj, RoPE, GQA)  ─► (+)
                                post_attention_layernorm ─► mlp (gate/up/down_proj, SwiGLU) ─► (+) ]
                      ─► model.norm ─► lm_head (tied to embed_tokens when the config says so)

Module and parameter names are exactly transformers' ``LlamaForCausalLM``'s, so a HF checkpoint
loads with no key mapping and a PEFT adapter's keys (``base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight``) fit both models. Attention runs through ``scaled_dot_product_attention``;
RMSNorm, RoPE, SwiGLU and the loss go through ``peftloop.kernels`` (Triton on CUDA, torch on CPU).

``model(input_ids, labels=labels)`` returns the *summed* token loss (labels unshifted, as in HF,
-100 ignored): the loop divides by the token count of the whole accumulation window.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftloop import kernels as _kernels

try:  # TEMPORARY until the kernels land
    _kernels.rms_norm
    kernels = _kernels
except AttributeError:
    from peftloop.models import _pending_ops as kernels


@dataclass
class LlamaConfig:
    """The fields of a HF ``config.json`` that the architecture reads (names are HF's)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    """Grouped-query attention: fewer K/V heads than query heads (None: same as query heads)."""
    head_dim: int | None = None
    """Per-head width (None: hidden_size // num_attention_heads)."""
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, or Llama 3's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}."""
    attention_bias: bool = False
    """Bias on q/k/v/o (Qwen2 has it on q/k/v only: see qkv_bias)."""
    qkv_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other field of config.json, written back unchanged."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")

    # config.json ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "rope_parameters" in extra and known.get("rope_scaling") is None:
            # transformers >= 5 writes rope settings under rope_parameters
            rp = extra["rope_parameters"] or {}
            known.setdefault("rope_theta", rp.get("rope_theta", cls.rope_theta))
            if rp.get("rope_type", "default") != "default":
                known["rope_scaling"] = rp
        if known.get("rope_scaling") and known["rope_scaling"].get("rope_type", "default") == "default":
            known["rope_scaling"] = None
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LlamaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """θ_i = base^(-2i/d), with Llama 3's frequency-dependent scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between blended
        # (transformers' _compute_llama3_parameters).
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, llama3)")
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles: bf16 positions lose integer precision past 256.
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        qkv_bias = config.attention_bias or config.qkv_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, attn_mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        is_causal = attn_mask is None and kv_cache is None
        if attn_mask is None and kv_cache is not None and T > 1:
            is_causal = kv_cache.length == T  # prefill of an empty cache
        # q may be fp32 (RoPE with fp32 tables) while v is bf16 under autocast: attend in one dtype.
        dtype = v.dtype
        y = F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v, attn_mask=attn_mask, is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_caches=None):
        B, T = input_ids.shape
        past = kv_caches[0].length if kv_caches is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        attn_mask = build_attention_mask(attention_mask, position_ids, T, past)
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache)
        return self.norm(x)


def build_attention_mask(attention_mask, position_ids, T: int, past: int):
    """A boolean [B, 1, T, past+T] mask (True = attend), or None when plain causal attention is exact.

    Needed for padding on the left (generation) or in the middle, and for packed sequences, whose
    position ids restart at 0 at each example: tokens then attend only within their own example.
    Right padding needs no mask: pads come after every real token, and their labels are -100.
    """
    packed = position_ids.shape[1] > 1 and bool((position_ids[:, 1:] < position_ids[:, :-1]).any())
    if attention_mask is None and not packed:
        return None
    B = position_ids.shape[0]
    S = past + T
    device = position_ids.device
    if attention_mask is not None and not packed and past == 0:
        am = attention_mask.bool()
        # right padding only: every row is ones then zeros -> causal attention is already exact
        if bool((am[:, 1:] <= am[:, :-1]).all()):
            return None
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = causal[None, None].expand(B, 1, T, S).clone()
    if attention_mask is not None:
        mask &= attention_mask.bool()[:, None, None, :S]
    if packed:
        # document id of each position: a new document starts wherever the position id resets
        starts = torch.zeros_like(position_ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
        doc = starts.cumsum(dim=1)
        mask &= (doc[:, None, :, None] == doc[:, None, None, :])
    # A query row with nothing to attend to (a left pad) would give NaN; let it see itself.
    diagonal = torch.arange(T, device=device)[:, None] + past == torch.arange(S, device=device)[None, :]
    mask |= diagonal[None, None]
    return mask


class LlamaForCausalLM(nn.Module):
    """Causal LM. ``forward`` returns logits, or the summed token loss when labels are given."""

    supports_summed_loss = True  # the loop may call model(input_ids, labels=...) for a summed loss

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's init: normal(0, initializer_range) for Linear and Embedding weights, zero biases, unit norms."""
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                label_smoothing: float = 0.0, kv_caches=None):
        hidden = self.model(input_ids, attention_mask, position_ids, kv_caches)
        if labels is None:
            return self.lm_head(hidden)
        return self.summed_loss(hidden, labels, label_smoothing)

    def summed_loss(self, hidden, labels, label_smoothing: float = 0.0):
        """Sum of next-token cross-entropies over labels != -100 (position t predicts labels[t+1]).

        Only the rows that carry a label go through the head: with prompt masking that skips
        most of the [tokens, vocab] work. The head and the loss are fused and chunked
        (``kernels.linear_cross_entropy``), so the full logits are never held in memory.
        """
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        keep = targets != -100
        hidden, targets = hidden[keep], targets[keep]
        head = self.lm_head
        if isinstance(head, nn.Linear) or type(head).__name__ == "TrainableCopy":
            return kernels.linear_cross_entropy(
                hidden, head.weight, targets, bias=head.bias, label_smoothing=label_smoothing, reduction="sum")
        # an adapted head (LoRA on lm_head): run the module, then the loss
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")
