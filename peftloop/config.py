"""Configuration: dataclasses with a docstring under each field, and their validation.

``LoraConfig`` is what goes into ``adapter_config.json`` (PEFT's field names and defaults; the
translation to and from that file is ``adapter_format``'s). ``TrainConfig`` is everything the
loop in ``train.py`` reads; ``ModelConfig`` and ``DataConfig`` are the CLI's model and data.
Each validates itself in ``__post_init__`` and names the offending key when something is wrong.
Reading them from TOML files and ``--key value`` flags is ``config_io``'s job.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key (and the file when known)."""


# --------------------------------------------------------------------------------------------
# LoRA


@dataclass
class LoraConfig:
    """Which layers get adapters and how. Field names and defaults are PEFT's ``LoraConfig``'s."""

    r: int = 8
    """Rank of the update B·A. 8-64 is typical; higher ranks rarely help on small data."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input only (the frozen path sees the raw input). 0.05-0.1 is common."""
    target_modules: list[str] | str | None = None
    """Which Linear layers get adapters: a list (each entry an exact module name or a suffix after
    a dot, e.g. "q_proj"), a string (a regex full-matched against the module name), or
    "all-linear" (every Linear except the output head)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, with the same matching rules as target_modules."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (a trainable copy), e.g. ["lm_head"]."""
    bias: str = "none"
    """Only "none" is supported: biases stay frozen and are not saved."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) (Kalajdzievski 2023); helps at high ranks."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): a trainable magnitude per output row."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero (the adapter starts as the identity). "gaussian": A ~ N(0, 1/r).
    "pissa" / "olora": initialise from the base weight's SVD / QR (the base weight is changed).
    False: random B too (tests only)."""
    fan_in_fan_out: bool = False
    """PEFT's flag for GPT-2's Conv1D layers; peftloop adapts nn.Linear only, so it must be False."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the end of the module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like rank_pattern."""
    task_type: str | None = "CAUSAL_LM"
    """PEFT's task type; "CAUSAL_LM" makes PEFT build a PeftModelForCausalLM on load."""
    base_model_name_or_path: str | None = None
    """The base checkpoint the adapter was trained on (hub id or folder), recorded for loaders."""

    def __post_init__(self):
        _check_types(self, "lora")
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ConfigError(f"lora.bias={self.bias!r}: only 'none' is supported (biases stay frozen)")
        if self.fan_in_fan_out:
            raise ConfigError("lora.fan_in_fan_out=True: peftloop adapts nn.Linear only (no Conv1D)")
        inits = (True, False, "gaussian", "pissa", "olora")
        niter = re.fullmatch(r"pissa_niter_(\d+)", str(self.init_lora_weights))
        if self.init_lora_weights not in inits and not (niter and int(niter.group(1)) >= 1):
            raise ConfigError(f"lora.init_lora_weights={self.init_lora_weights!r}: expected one of {inits} "
                              "or 'pissa_niter_K' (K >= 1 subspace iterations)")
        for key in {**self.rank_pattern, **self.alpha_pattern}:
            try:
                re.compile(key)
            except re.error as e:
                raise ConfigError(f"lora rank/alpha pattern {key!r} is not a valid regex: {e}") from None

    def rank_and_alpha_for(self, module_name: str) -> tuple[int, float]:
        """(r, lora_alpha) of one module, after rank_pattern / alpha_pattern (PEFT's matching).
        The scaling itself is the layer's to compute (``LoRALinear.scaling``)."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        return r, _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    @property
    def mutates_base(self) -> bool:
        """True for PiSSA/OLoRA: the init moves part of W into the adapter (W becomes a residual)."""
        return mutates_base(self.init_lora_weights)


def mutates_base(init_lora_weights: bool | str) -> bool:
    """True for the inits that move the principal part of W into the adapter (PiSSA, OLoRA)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith(("pissa", "olora"))


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Everything the loop reads. Defaults follow transformers' TrainingArguments where they exist."""

    output_dir: str = "runs/peftloop"
    """Where checkpoints, the final adapter and log.jsonl go."""
    seed: int = 42
    """Seeds python, numpy and torch (dropout) and the data order. LoRA's init happens earlier, in
    inject_lora: the CLI and the demo seed it with this value (library users call
    peftloop.seed_everything(seed) before inject_lora)."""
    num_epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; > 0 overrides num_epochs (the data is cycled as needed)."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass. Raise until memory runs out, then use grad_accum."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Effective batch = micro_batch_size * grad_accum."""
    learning_rate: float = 2e-4
    """Peak learning rate. LoRA typically wants 1e-4..3e-4, 10x a full fine-tune's."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (never to biases, norms, DoRA magnitudes)."""
    adam_beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    adam_beta2: float = 0.999
    """AdamW's decay rate of the squared gradient's running mean."""
    adam_eps: float = 1e-8
    """AdamW's epsilon, added to the denominator's square root."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): lora_B's learning rate = ratio x lora_A's. 0 disables; ~16 suggested."""
    lr_scheduler: str = "linear"
    """"constant", "linear" (to 0) or "cosine" (to min_lr_ratio x peak), each after a linear warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak learning rate over this many steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps (used when warmup_steps is 0)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of the peak."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    precision: str = "fp32"
    """"fp32", "bf16" (autocast, no scaler) or "fp16" (autocast + dynamic loss scaling)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing epsilon (torch's definition)."""
    shuffle: bool = True
    """Shuffle the training examples each epoch (seeded by seed + epoch)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when eval data is given)."""
    eval_batch_size: int = 8
    """Examples per forward pass during evaluation (per process), and prompts per generation batch."""
    eval_generate_max_new_tokens: int = 0
    """Evaluation by generation: 0 (off), or the most tokens to generate greedily for each eval
    example that has a prompt (prompt/completion and chat records); each evaluation then also
    logs eval_exact_match (the fraction of completions equal to the reference) and the
    eval_<name> of every metric given to train(eval_metrics=...). Costs a generation pass over
    the eval set at each evaluation."""
    log_every: int = 1
    """Log the mean loss of the last N steps to the console and log.jsonl."""
    progress_bar: bool = True
    """A progress bar on the console (rank 0) showing the latest log values; false prints each log
    record as a line instead (log.jsonl is written either way)."""
    report_to: list[str] | str = "none"
    """Where else the log records go, as the Trainer's report_to: "none" (the console and
    log.jsonl only) or "tensorboard" (also TensorBoard event files in output_dir/runs; needs
    pip install 'peftloop[tensorboard]'), or a list of them."""
    save_every: int = 0
    """Save a checkpoint-N folder every N optimizer steps (0: never)."""
    save_each_epoch: bool = False
    """Also save a checkpoint at the end of each epoch."""
    save_total_limit: int = 0
    """Keep only the newest N checkpoints (0: keep all). The oldest is deleted only after the new one
    is complete."""
    resume_from_checkpoint: str | bool | None = None
    """A checkpoint-N folder, or True for the newest complete one in output_dir."""
    early_stopping_patience: int = 0
    """Stop when early_stopping_metric has not improved for N evaluations (0: off)."""
    early_stopping_metric: str = "eval_loss"
    """The evaluation metric early stopping watches: eval_loss, eval_perplexity, or with
    eval_generate_max_new_tokens eval_exact_match and the eval_<name> of train(eval_metrics=...)."""
    early_stopping_mode: str = "auto"
    """"min" (lower is better), "max" (higher is better), or "auto": min for a metric whose name
    ends in loss or perplexity, max for any other (exact match, scores)."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    nan_policy: str = "skip"
    """A step whose loss or gradient norm is NaN/inf (fp32/bf16; fp16 has the scaler): "skip" it
    (no update, counted and logged) or "stop" with the step number and the first bad parameter."""
    on_save_error: str = "stop"
    """A checkpoint that cannot be written (disk full, ...): "stop" cleanly with the error, or
    "continue" training and try again at the next save. The previous checkpoint is intact either way."""
    strategy: str = "auto"
    """Under torchrun: "ddp" (replicate the model), "fsdp" (FSDP2: shard it per decoder layer), or
    "auto" (ddp when WORLD_SIZE > 1). "none" refuses to run under torchrun with more than one process."""

    def __post_init__(self):
        _check_types(self, "train")
        positive = ("micro_batch_size", "grad_accum", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_epochs", "warmup_steps", "eval_every", "save_every", "save_total_limit",
                     "early_stopping_patience", "max_grad_norm", "weight_decay", "loraplus_lr_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={self.precision!r}: expected 'fp32', 'bf16' or 'fp16'")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError(f"train.lr_scheduler={self.lr_scheduler!r}: "
                              "expected 'constant', 'linear' or 'cosine'")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"train.nan_policy={self.nan_policy!r}: expected 'skip' or 'stop'")
        if self.on_save_error not in ("stop", "continue"):
            raise ConfigError(f"train.on_save_error={self.on_save_error!r}: expected 'stop' or 'continue'")
        if self.strategy not in ("auto", "none", "ddp", "fsdp"):
            raise ConfigError(f"train.strategy={self.strategy!r}: expected 'auto', 'none', 'ddp' or 'fsdp'")
        reports = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if any(r not in ("none", "tensorboard") for r in reports):
            raise ConfigError(f"train.report_to={self.report_to!r}: expected 'none' or 'tensorboard' "
                              "(or a list of them)")
        if self.max_steps <= 0 and self.num_epochs == 0:
            raise ConfigError("train: set num_epochs >= 1 or max_steps >= 1")
        if self.eval_generate_max_new_tokens < 0:
            raise ConfigError(f"train.eval_generate_max_new_tokens must be >= 0 (0: off), "
                              f"got {self.eval_generate_max_new_tokens}")
        if self.early_stopping_mode not in ("auto", "min", "max"):
            raise ConfigError(f"train.early_stopping_mode={self.early_stopping_mode!r}: "
                              "expected 'auto', 'min' or 'max'")
        if self.early_stopping_patience and not self.eval_generate_max_new_tokens \
                and self.early_stopping_metric not in ("eval_loss", "eval_perplexity"):
            raise ConfigError(f"train.early_stopping_metric={self.early_stopping_metric!r} is not logged "
                              "without an evaluation by generation: set train.eval_generate_max_new_tokens "
                              "(or watch eval_loss)")

    @property
    def early_stopping_greater_is_better(self) -> bool:
        """Whether a higher early_stopping_metric is an improvement (early_stopping_mode resolved)."""
        if self.early_stopping_mode == "auto":
            return not self.early_stopping_metric.endswith(("loss", "perplexity"))
        return self.early_stopping_mode == "max"


# --------------------------------------------------------------------------------------------
# Model and data (the ``peftloop train --model ... --data ...`` path)


@dataclass
class ModelConfig:
    """Which base model to fine-tune and how to hold it in memory."""

    name_or_path: str | None = None
    """A Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M") or a local folder with config.json,
    safetensors weights and tokenizer.json. None (the default) runs the built-in demo."""
    revision: str | None = None
    """Hub branch, tag or commit to load (hub ids only; None: "main")."""
    cache_dir: str | None = None
    """Hub cache folder (None: huggingface_hub's default, HF_HUB_CACHE / HF_HOME)."""
    dtype: str = "fp32"
    """Dtype the frozen base weights are loaded in: "fp32", "bf16" or "fp16". bf16 halves the
    memory; LoRA's own tensors stay fp32 whatever this is."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    much less activation memory for about a third more compute."""
    offload_activations: bool = False
    """With gradient_checkpointing: keep each layer's checkpointed input in pinned CPU memory
    instead of on the GPU (Unsloth's offloaded checkpointing; pays off above ~512 tokens)."""
    quantization: str | None = None
    """None, or "nf4" (QLoRA): every Linear layer but the output head is held in 4-bit
    NormalFloat, quantised as the checkpoint streams in, frozen. dtype is then the dtype of
    everything else (embeddings, norms, head) and of the 4-bit layers' computation (bf16 on a GPU)."""
    double_quant: bool = True
    """With quantization: store the 4-bit block scales in 8 bits too (QLoRA's double
    quantisation: 4.127 instead of 4.5 bits per weight)."""
    quant_blocksize: int = 64
    """With quantization: consecutive weights sharing one scale (QLoRA: 64; a power of two, 32-4096)."""

    def __post_init__(self):
        _check_types(self, "model")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: expected 'fp32', 'bf16' or 'fp16'")
        if self.quantization not in (None, "nf4"):
            raise ConfigError(f"model.quantization={self.quantization!r}: expected 'nf4' (or none)")
        if self.quant_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"model.quant_blocksize={self.quant_blocksize}: "
                              "expected a power of two in 32..4096")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("model.offload_activations=true needs model.gradient_checkpointing=true "
                              "(it offloads the inputs that checkpointing keeps)")


DATA_FORMATS = ("auto", "text", "prompt_completion", "messages")


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token sequences (docs/data.md has the JSONL shapes)."""

    train_file: str | None = None
    """JSONL file of training records, one JSON object per line."""
    eval_file: str | None = None
    """JSONL file of evaluation records (same shapes). Takes precedence over eval_split."""
    eval_split: float = 0.0
    """Fraction of train_file's records held out for evaluation when there is no eval_file. A
    record is held out by a hash of (train.seed, its line number), so the split is the same
    streamed or not, and does not change when lines are appended."""
    format: str = "auto"
    """"text", "prompt_completion", "messages", or "auto" (each line by the fields it has)."""
    text_field: str = "text"
    """The field holding the text of a "text" record."""
    prompt_field: str = "prompt"
    """The field holding the prompt of a "prompt_completion" record (a string or a list of messages)."""
    completion_field: str = "completion"
    """The field holding the completion (a string, or a list of messages when the prompt is one)."""
    messages_field: str = "messages"
    """The field holding a "messages" record's conversation: [{"role", "content"}, ...]."""
    completion_only_loss: bool = True
    """Loss only on completions and assistant turns (labels -100 on prompts, system and user
    turns, template headers). False: loss on every token. Text records always train on everything."""
    add_eos: bool = True
    """Append the tokenizer's eos token to text and completion records (chat templates write their own)."""
    max_seq_len: int = 2048
    """Longer examples are truncated to this many tokens (the end is cut) and counted; one whose
    every label token is cut off is dropped and counted."""
    packing: bool = False
    """Concatenate examples into sequences of up to max_seq_len tokens. Position ids restart at
    each example and attention never crosses into another example, so each example's loss is what
    it would be on its own; there is just no padding."""
    group_by_length: bool = False
    """Put examples of similar length in the same micro-batch (less padding). Within each window
    of 50 micro-batches of the epoch's seeded order, examples are sorted by length; the batch
    holding the longest example comes first, so running out of memory shows at once."""
    streaming: bool = False
    """Read train_file lazily, line by line, in every epoch: a file larger than memory trains.
    The dataset has no length, so train.max_steps must be set."""
    shuffle_buffer: int = 10000
    """Streaming only: examples are shuffled within a buffer of this many (seeded per epoch)."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed lines instead of stopping at the first with an error naming
    the file and line: bad JSON, a missing or empty field, a message without role or content."""

    def __post_init__(self):
        _check_types(self, "data")
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"data.format={self.format!r}: expected one of {', '.join(DATA_FORMATS)}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"data.eval_split must be in [0, 1), got {self.eval_split}")
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


# --------------------------------------------------------------------------------------------
# Type checks (every __post_init__ calls _check_types)


def _check_types(obj, section: str) -> None:
    """Coerce ints to floats where a float is declared and refuse anything else of the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, coerced = _fits(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{section}.{f.name}={value!r}: expected {type_name(hints[f.name])}")
        setattr(obj, f.name, coerced)


def _fits(value, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _fits(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (list, tuple, set)) and all(_fits(v, item)[0] for v in value):
            return True, list(value)
        return False, value
    if origin is dict:
        return isinstance(value, dict), value
    return True, value


def type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")
