"""Shared pieces of the benchmark scripts: the machine's name, the one results writer, memory
counters, the measured subprocess, model shapes.

Results: every benchmark writes ``benchmarks/results/<benchmark>-<machine>-<date>.json`` and a
Markdown report beside it (same stem, ``.md``; ``compare`` adds its plot as ``.png``), through
:func:`write_results`. ``<benchmark>`` is the module name (``python -m benchmarks.<benchmark>``),
``<machine>`` the slug of :func:`machine` (the GPU for GPU benchmarks), ``<date>`` ISO
(YYYY-MM-DD). A run whose settings change the regime measured (say, activation checkpointing on)
adds its variant to the name, ``<benchmark>__<variant>-<machine>-<date>``, so that it does not
replace the default run of the same day. The JSON holds ``benchmark``, ``machine``, ``date``,
``command``, the versions of the libraries measured (``torch``, ...), the variant (if any), the
benchmark's own settings, and ``records``: the rows.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULT_NAME = re.compile(r"^(?P<benchmark>[a-z0-9_]+?)(?:__(?P<variant>[a-z0-9_]+))?"
                         r"-(?P<machine>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<date>\d{4}-\d{2}-\d{2})\.(?:json|md|png)$")


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


def today() -> str:
    return time.strftime("%Y-%m-%d")


def result_stem(benchmark: str, machine_name: str, date: str, results: Path | None = None,
                variant: str | None = None) -> Path:
    """``benchmarks/results/<benchmark>[__<variant>]-<machine slug>-<date>``: add ``.json``, ``.md`` or
    ``.png``."""
    name = f"{benchmark}__{variant}" if variant else benchmark
    return (results or RESULTS) / f"{name}-{slug(machine_name)}-{date}"


def command_line(benchmark: str) -> str:
    """This run's command as it is typed: ``python -m benchmarks.<benchmark>`` and its arguments."""
    return shlex.join(["python", "-m", f"benchmarks.{benchmark}", *sys.argv[1:]])


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (missing: ``l``)."""
    rule = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(columns))]
    return [f"| {' | '.join(columns)} |", f"|{'|'.join(rule)}|",
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def write_results(benchmark: str, records: list[dict], *, title: str, body: Sequence[str],
                  meta: dict | None = None, machine_name: str | None = None, date: str | None = None,
                  libraries: Sequence[str] = ("torch",), results: Path | None = None,
                  variant: str | None = None) -> Path:
    """Writes a benchmark's results: ``<stem>.json`` and ``<stem>.md``, returns the stem.

    ``records`` are the rows, ``meta`` the benchmark's settings (shape, method, ...), ``body`` the
    Markdown under the title and the line naming the machine, versions, date and command
    (the table, its notes). ``machine_name`` defaults to :func:`machine`, ``date`` to today,
    ``results`` to benchmarks/results; ``variant`` names a run of non-default settings (see above)."""
    where = machine_name or machine()
    date = date or today()
    command = command_line(benchmark)
    versions = {name: importlib.import_module(name).__version__ for name in libraries}
    stem = result_stem(benchmark, where, date, results or RESULTS, variant)
    head = {"benchmark": benchmark, **({"variant": variant} if variant else {}), "machine": where,
            "date": date, "command": command, **versions}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**head, **(meta or {}), "records": records}, indent=1)
                                         + "\n")
    provenance = "; ".join(f"{name} {v}" for name, v in versions.items())
    md = [f"# {title}", "", f"Machine: {where}; {provenance}; {date}. Command: `{command}`", "", *body]
    stem.with_suffix(".md").write_text("\n".join(md).rstrip("\n") + "\n")
    print(f"wrote {stem.relative_to(ROOT) if stem.is_relative_to(ROOT) else stem}.json and .md")
    return stem


# ---------------------------------------------------------------------------------------------
# Memory, measured in a fresh subprocess


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """The resident set now (VmRSS, KiB), the baseline; resets the peak counter (VmHWM) to it
    (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0). Peak growth = VmHWM afterwards - baseline."""
    baseline = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return baseline


def run_child(benchmark: str, child_args: Sequence[str], env: dict | None = None) -> dict:
    """Runs ``python -m benchmarks.<benchmark> --_child ...`` in a fresh process from the repository
    root and returns the JSON record it prints last."""
    cmd = [sys.executable, "-m", f"benchmarks.{benchmark}", *child_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Model shapes


# SmolLM2-135M's config.json fields (random weights stand in for the hub's)
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1,
                "eos_token_id": 2}


def write_smollm2_shape(root: Path, dtypes: Sequence[str]) -> dict[str, Path]:
    """SmolLM2-135M's shape with random weights (seed 0), one checkpoint per dtype
    (``root/smollm2-135m-shape-<dtype>``), and a one-layer, 64-token ``root/tiny`` to warm up on."""
    import torch

    from peftloop.models import save_pretrained
    from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

    folders = {}
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.init_weights(torch.Generator().manual_seed(0))
    for name in sorted(dtypes, key=["fp32", "bf16"].index):  # fp32 first: .to() casts the model in place
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        folders[name] = save_pretrained(model.to(dtype), root / f"smollm2-135m-shape-{name}")
    tiny = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": 1, "vocab_size": 64}))
    folders["tiny"] = save_pretrained(tiny, root / "tiny")
    return folders


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
    max_position_embeddings: int = 2048
    head_dim: int | None = None
    """Written to config.json only when set (None: hidden_size // num_attention_heads)."""
    rope_scaling: dict | None = field(default=None, compare=False)
    """Llama 3's {"rope_type": "llama3", ...}, written to config.json only when set."""

    def config_dict(self) -> dict:
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
               "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
               "num_key_value_heads": self.num_key_value_heads, "intermediate_size": self.intermediate_size,
               "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
               "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
               "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
               "torch_dtype": "float32"}
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

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
    # Llama-3.2-1B's config.json (1.24B parameters; gpu_suite trains it on a GPU)
    "llama-1b": Shape("llama-1b", 2048, 16, 32, 8, 8192, 128256, True, rope_theta=500000.0,
                      max_position_embeddings=131072, head_dim=64,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
