"""Shared pieces of the benchmark scripts: the machine's name, memory counters, model shapes."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The CPU model, its core count and torch's SIMD level (AVX2 / AVX512): the figures depend on them."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape, in Hugging Face config.json terms."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0

    def config_dict(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "intermediate_size": self.intermediate_size,
                "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
                "rope_theta": self.rope_theta, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}

    def linear_params(self) -> int:
        """Parameters of the decoder's Linear layers (what LoRA adapts and what the GEMMs touch)."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        return self.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * i)

    def flops_per_token_step(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token for a frozen base (no dW): 4·P_linear (+ the head) and
        8·L·S·H for attention. LoRA's own matmuls are left out, as in the reference figures."""
        head = self.hidden_size * self.vocab_size
        return 4 * (self.linear_params() + head) + 8 * self.num_hidden_layers * seq_len * self.hidden_size


SHAPES = {
    # the 7M model of the reference figures
    "small": Shape("small", 256, 4, 4, 2, 688, 8192, False),
    # the SmolLM2-135M shape
    "smollm": Shape("smollm", 576, 30, 9, 3, 1536, 49152, True, rope_theta=100000.0),
}
