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

from peftloop import kernels
from peftloop.kernels.recompute import recompute_activations
from peftloop.models.attention import DocumentBuckets, attend_by_document, attention_plans
from peftloop.models.checkpointing import checkpoint_layer

# model_type -> the architecture name transformers writes in config.json. Every family is the
# same module (``LlamaForCausalLM`` below) with the switches each one needs:
#   llama    attention_bias (q/k/v/o), mlp_bias; Llama 3 rope scaling. SmolLM, TinyLlama are llama.
#   mistral  sliding_window on every layer
#   qwen2    bias on q/k/v (never on o); sliding window on the layers layer_types names
#   qwen3    RMSNorm over each head of q and k; attention_bias (q/k/v/o); sliding window as qwen2
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "llama3")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclass
class LlamaConfig:
    """The fields of a HF ``config.json`` that the architecture reads (names are HF's).

    ``model_type`` picks the family; the family sets the switches that its HF config does not
    spell out (qwen2's q/k/v bias, qwen3's q/k norm), and a switch the family cannot express in
    its config.json is refused, so what ``save`` writes is what transformers builds."""

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
    """Bias on q/k/v/o (llama, qwen3). Qwen2's bias on q/k/v only is qkv_bias."""
    qkv_bias: bool = False
    """Bias on q/k/v but not o: always on for qwen2, which has no key for it in config.json."""
    mlp_bias: bool = False
    """Bias on gate/up/down (llama only)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE: always on for qwen3."""
    sliding_window: int | None = None
    """Each token attends to at most this many tokens (itself included) on the sliding layers;
    None: full causal attention everywhere. Mistral: every layer; qwen2/3: the layers that
    layer_types marks "sliding_attention" (only when their use_sliding_window is true)."""
    layer_types: list[str] | None = None
    """Per layer "full_attention" or "sliding_attention" (None: every layer slides when
    sliding_window is set, as in Mistral)."""
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    """Derived from model_type (kept for callers that read it)."""
    model_type: str = "llama"
    """"llama", "mistral", "qwen2" or "qwen3" (see FAMILIES)."""
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    """The other fields of the config.json this came from (use_cache, transformers_version, ...),
    written back unchanged."""

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; "
                             f"supported: {', '.join(FAMILIES)}")
        self.architectures = [FAMILIES[self.model_type]]
        self.qkv_bias = self.qkv_bias or self.model_type == "qwen2"
        self.qk_norm = self.qk_norm or self.model_type == "qwen3"
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
        self._check_family_switches()
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.layer_types is not None and set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
            raise ValueError(f"layer_types={self.layer_types}: expected {FULL_ATTENTION!r} or "
                             f"{SLIDING_ATTENTION!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or None)")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")

    def _check_family_switches(self) -> None:
        """Refuse a switch this model_type's config.json cannot carry (transformers would build
        a different model from the file than the one we run)."""
        allowed = {
            "attention_bias": ("llama", "qwen3"),
            "qkv_bias": ("qwen2",),
            "mlp_bias": ("llama",),
            "qk_norm": ("qwen3",),
            "sliding_window": ("mistral", "qwen2", "qwen3"),
        }
        for name, families in allowed.items():
            if getattr(self, name) not in (None, False) and self.model_type not in families:
                raise ValueError(f"{name}={getattr(self, name)!r} needs model_type {' or '.join(families)} "
                                 f"(model_type is {self.model_type!r})")

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    # config.json ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Read a HF config.json dict of any family in FAMILIES (transformers 4 or 5 layout)."""
        d = dict(d)
        model_type = d.pop("model_type", None) or _model_type_of(d.get("architectures"), source)
        if model_type not in FAMILIES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                             f"{', '.join(FAMILIES)}")
        d.pop("architectures", None)
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "?")
            raise ValueError(f"{source}: quantization_config (quant_method {method!r}): pre-quantized "
                             "checkpoints are not supported; load the unquantized weights")
        known: dict[str, Any] = {"model_type": model_type}
        known.update(_rope_fields(d, source))
        known.update(_sliding_fields(d, model_type))
        dtype = d.pop("torch_dtype", None) or d.pop("dtype", None)
        if isinstance(dtype, str):
            known["torch_dtype"] = dtype
        # the switches transformers' class for this family reads; any other stays in extra, unused
        ignored = ({"attention_bias", "mlp_bias", "sliding_window", "layer_types"}
                   - set(_SWITCHES_READ[model_type]))
        names = ({f.name for f in dataclasses.fields(cls)} - {"extra", "qkv_bias", "qk_norm"}
                 - set(known) - ignored)
        for name in names & set(d):
            known[name] = d.pop(name)
        for legacy in ("qkv_bias", "qk_norm", "extra"):  # written by early peftloop versions
            d.pop(legacy, None)
        try:
            return cls(**known, extra=d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """HF's config.json for this model_type: the fields transformers' config class declares."""
        d = dict(self.extra)
        common = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
                  "pad_token_id", "initializer_range", "architectures", "model_type", "torch_dtype")
        d.update({name: getattr(self, name) for name in common})
        # transformers 4 reads rope_theta + rope_scaling, transformers 5 rope_parameters: write both.
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}),
                                "rope_theta": self.rope_theta}
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types or [FULL_ATTENTION] * self.num_hidden_layers)
            d.setdefault("max_window_layers", self.num_hidden_layers)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_SWITCHES_READ = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": ("sliding_window",),
    "qwen2": ("sliding_window", "layer_types"),
    "qwen3": ("attention_bias", "sliding_window", "layer_types"),
}


def _model_type_of(architectures: list[str] | None, source: str) -> str:
    by_architecture = {arch: model_type for model_type, arch in FAMILIES.items()}
    for arch in architectures or []:
        if arch in by_architecture:
            return by_architecture[arch]
    raise ValueError(f"{source}: architectures={architectures!r} with no model_type; "
                     f"supported architectures: {', '.join(by_architecture)}")


def _rope_fields(d: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling from transformers 4's keys (rope_theta, rope_scaling) or
    transformers 5's (rope_parameters = {"rope_type", "rope_theta", ...}); pops what it reads."""
    parameters = dict(d.pop("rope_parameters", None) or {})
    scaling = dict(d.pop("rope_scaling", None) or parameters)
    theta = d.pop("rope_theta", None) or scaling.pop("rope_theta", None) or parameters.get("rope_theta")
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    fields: dict[str, Any] = {"rope_scaling": None if rope_type == "default"
                              else {**scaling, "rope_type": rope_type}}
    if theta is not None:
        fields["rope_theta"] = float(theta)
    return fields


def _sliding_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """sliding_window and layer_types as transformers builds them for each family; pops what it reads.

    Mistral slides on every layer when sliding_window is set. Qwen2/3 slide only when
    use_sliding_window is true, on the layers layer_types marks (or, without layer_types, from
    layer max_window_layers on). Llama has no sliding window."""
    if model_type == "llama":
        return {}  # transformers' Llama has no sliding window: such keys stay in extra, unused
    if model_type == "mistral":  # every layer slides; a layer_types key is ignored (as transformers does)
        return {"sliding_window": d.pop("sliding_window", None)}
    window = d.pop("sliding_window", None)
    layer_types = d.pop("layer_types", None)
    use = d.pop("use_sliding_window", False)
    if use and window is not None:
        if layer_types is None:
            first = d.get("max_window_layers", 28)
            layer_types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION
                           for i in range(d.get("num_hidden_layers", 32))]
        if SLIDING_ATTENTION in layer_types:
            return {"sliding_window": window, "layer_types": layer_types}
    return {}


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
        """``attn_mask``: what ``attention_plans`` chose for this layer's window: None (plain
        causal), a ``DocumentBuckets`` (packed rows, attention per document) or a boolean mask."""
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
        # No mask means plain causal attention over the whole cache: aligned at the top left for a
        # prefill (T == S) and attend-to-everything for one new token (T == 1); attention_plans
        # returns a mask in every other case.
        is_causal = attn_mask is None and T > 1
        # q may be fp32 (RoPE with fp32 tables) while v is bf16 under autocast: attend in one dtype.
        dtype = v.dtype
        # bf16 on a CPU without bf16 hardware: attend in fp32 on the bf16 values (4x faster
        # backward there, same products; kernels.matmul_dtype), then round once.
        compute = kernels.matmul_dtype(v)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        enable_gqa = self.n_kv_heads != self.n_heads
        if isinstance(attn_mask, DocumentBuckets):
            y = attend_by_document(q, k, v, attn_mask, enable_gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               enable_gqa=enable_gqa)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y.to(dtype))


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
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_window = config.attention_window(layer)

    def forward(self, x, cos, sin, attn_mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        """Recompute each decoder layer in the backward pass (training only); see
        ``peftloop.models.checkpointing`` and ``LlamaForCausalLM.gradient_checkpointing_enable``."""
        self.offload_activations = False
        """With gradient_checkpointing: keep each layer's input in pinned CPU memory."""
        self.recompute_cheap_activations = True
        """Training: norm and SwiGLU outputs are made again in backward instead of kept by the
        projections that read them (``kernels.recompute``; docs/memory.md). False keeps them."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_caches=None):
        B, T = input_ids.shape
        past = kv_caches[0].length if kv_caches is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        # one plan per distinct window (full attention is window None), built once for all layers:
        # plain causal, per document (packed rows) or a dense mask (see peftloop.models.attention)
        windows = {layer.attention_window for layer in self.layers}
        masks = attention_plans(attention_mask, position_ids, T, past, windows)
        # Norm and SwiGLU outputs are made again in backward instead of kept by the projections
        # that read them (docs/memory.md); a checkpointed layer is left to its checkpoint.
        with recompute_activations(enabled=self.training and self.recompute_cheap_activations):
            for i, layer in enumerate(self.layers):
                cache = kv_caches[i] if kv_caches is not None else None
                attn_mask = masks[layer.attention_window]
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint_layer(layer, x, cos, sin, attn_mask, cache,
                                         offload=self.offload_activations)
                else:
                    x = layer(x, cos, sin, attn_mask, cache)
        return self.norm(x)


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

    def gradient_checkpointing_enable(self, offload: bool = False) -> None:
        """Checkpoint every decoder layer (non-reentrant): activation memory drops to one hidden
        state per layer, for one more forward pass per step. ``offload=True`` moves those hidden
        states to pinned CPU memory too (CUDA). Works with a frozen embedding and base."""
        self.model.gradient_checkpointing, self.model.offload_activations = True, offload

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing, self.model.offload_activations = False, False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's init: normal(0, initializer_range) for Linear and Embedding weights, zero biases,
        unit norms."""
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
                hidden, head.weight, targets, bias=head.bias, label_smoothing=label_smoothing,
                reduction="sum")
        # an adapted head (LoRA on lm_head): run the module, then the loss
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")
