"""The LoRA linear layer: a frozen ``nn.Linear`` (or a 4-bit ``NF4Linear``) plus a trainable low-rank update.

::

        x ──────────────► base_layer (W frozen, [out, in]) ─────────┐
        │                                                         (+) ──► y
        └─► dropout ─► lora_A ([r, in]) ─► lora_B ([out, r]) ─► ×s ─┘

    y = x·Wᵀ + b + s · dropout(x)·Aᵀ·Bᵀ,   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1. B starts at zero,
so the adapted layer starts equal to the base layer. Parameter names follow PEFT
(``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``) so
saving is a prefix away from PEFT's on-disk keys.

Variants, each a switch of the same layer:

- **QLoRA** (Dettmers et al. 2023): the base is an ``NF4Linear``; ``kernels.nf4_lora_linear``
  dequantises W for the forward pass and again for dx, never keeping it.
- **DoRA** (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5 and §4.3)::

      y = m / ‖W + s·B·A‖_row  ⊙  (x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ)  +  b

  m (``lora_magnitude_vector``, [out]) starts at the row norms of W + s·B·A; the norm is a
  constant in the backward pass (detached), as in the paper and PEFT. Without dropout this is
  PEFT's DoRA exactly. With dropout, PEFT computes the rescaling term on the dropped input,
  which costs a second full x·Wᵀ (``dora.py``: ``F.linear(dropout(x), W)``); here dropout
  stays on the low-rank branch, as in LoRA, and the layer costs one base matmul. Both have the
  same expectation over the dropout mask and the same eval-mode output.
- **PiSSA** (Meng et al. 2024) and **OLoRA** (Büyükakyüz 2024): A and B start from the top-r
  SVD / a QR of W, and W becomes the residual ``W − s·B₀·A₀``. The initial B₀, A₀ are kept
  (``initial_lora_A/B``, not saved) so the adapter can be written as a plain LoRA of rank 2r on
  the *original* W: ``[A; A₀]`` and ``[B, −B₀]`` (``peftloop.adapter_format``; PEFT's
  ``path_initial_model_for_weight_conversion``).

The trainable A, B (and m) are fp32 whatever the base dtype: the kernel ops cast them to the
compute dtype (autocast's, else the input's) inside the forward pass, and their gradients and
optimizer state stay fp32.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from peftloop.config import mutates_base
from peftloop.kernels import lora_linear, nf4_lora_linear
from peftloop.nf4 import NF4Linear

BASE_LAYERS = (nn.Linear, NF4Linear)
# Rows of W + s·B·A formed at a time for the DoRA norm: bounds its fp32 temporary.
NORM_ROWS = 1024


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The one place the scaling is computed: s = alpha / r, rsLoRA alpha / sqrt(r)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@torch.no_grad()
def init_lora_factors(lora_A: nn.Linear, lora_B: nn.Linear, init: bool | str) -> None:
    """PEFT's plain inits, drawn in this order from torch's RNG: True, A kaiming-uniform(a=√5)
    (nn.Linear's default); "gaussian", A ~ N(0, 1/r); B = 0 either way."""
    if init == "gaussian":
        nn.init.normal_(lora_A.weight, std=1.0 / lora_A.out_features)
    else:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)


class LoRALinear(nn.Module):
    is_adapter_wrapper = True  # peftloop.modules recognises adapter wrappers by this marker

    def __init__(
        self,
        base_layer: nn.Linear | NF4Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(base_layer, BASE_LAYERS):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora = use_dora
        device = self._base_tensor.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("initial_lora_A", None, persistent=False)
        self.register_buffer("initial_lora_B", None, persistent=False)
        self.merged = False
        self.disabled = False
        self._merged_norm: torch.Tensor | None = None  # DoRA: the weight norm at merge time, for unmerge
        self.reset_lora_parameters(init_lora_weights)
        if use_dora:
            # After the init: with PiSSA/OLoRA the norm is that of the residual + s·B·A (= the original W).
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, NF4Linear)

    @property
    def _base_tensor(self) -> torch.Tensor:
        return self.base_layer.packed_weight if self.quantized else self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads ``layer.weight`` (tied heads, shape checks)."""
        if self.quantized:
            raise AttributeError(
                "LoRALinear.weight: the base is 4-bit (NF4Linear); use base_layer.dequantize()")
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # init ------------------------------------------------------------------------------------

    def reset_lora_parameters(self, init: bool | str) -> None:
        """PEFT's inits. True: A kaiming-uniform(a=√5) (nn.Linear's default), B = 0. "gaussian":
        A ~ N(0, 1/r), B = 0. "pissa" / "pissa_niter_K" / "olora": from W, which becomes the residual."""
        if init is False:  # random A and B: only for tests that need a non-identity adapter
            return
        if mutates_base(init):
            self._init_from_base(init)
            return
        init_lora_factors(self.lora_A, self.lora_B, init)

    @torch.no_grad()
    def _init_from_base(self, init: str) -> None:
        """PEFT's ``pissa_init`` / ``olora_init``, in fp32: A, B from W, then W ← W − s·B·A.

        PiSSA: W = V·diag(S)·Uᴴ, A = diag(√(S_r/s))·Uᴴ_r, B = V_r·diag(√(S_r/s)), so s·B·A is the
        top-r part of W ("pissa_niter_K": torch.svd_lowrank with K subspace iterations).
        OLoRA: W = Q·R, A = R_r (first r rows), B = Q_r (first r columns).
        A 4-bit base is dequantised, and the residual quantised again (QPiSSA: the residual has a
        smaller range than W, so it quantises better)."""
        weight = self.base_weight(torch.float32)
        r, s = self.r, self.scaling
        if init == "olora":
            Q, R = torch.linalg.qr(weight)
            A, B = R[:r], Q[:, :r]
        else:
            if init == "pissa":
                V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
                V, S, Uh = V[:, :r], S[:r], Uh[:r]
            else:
                V, S, U = torch.svd_lowrank(weight, r, niter=int(init.split("_niter_")[-1]))
                Uh = U.t()
            root = torch.sqrt(S / s)
            A, B = root[:, None] * Uh, V * root[None, :]  # diag(√(S/s))·Uᴴ and V·diag(√(S/s))
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        self.set_base_weight(weight - s * (self.lora_B.weight @ self.lora_A.weight))
        self.initial_lora_A = self.lora_A.weight.detach().clone()
        self.initial_lora_B = self.lora_B.weight.detach().clone()

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W in ``dtype`` (a dequantised copy for a 4-bit base; W itself when it already is ``dtype``)."""
        if self.quantized:
            return self.base_layer.dequantize(dtype)
        return self.base_layer.weight.to(dtype)

    @torch.no_grad()
    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Overwrite W (computed in fp32): rounded to W's dtype, or quantised again for a 4-bit base."""
        if self.quantized:
            self.base_layer.requantize_(weight)
        else:
            self.base_layer.weight.copy_(weight)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put the original W back into a residual base: W ← W_res + s·B₀·A₀ (one rounding)."""
        if self.initial_lora_A is not None:
            weight = self.base_weight(torch.float32)
            weight += self.scaling * (self.initial_lora_B.float() @ self.initial_lora_A.float())
            self.set_base_weight(weight)
            self.initial_lora_A = self.initial_lora_B = None

    # forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or (self.disabled and self.initial_lora_A is None):
            return self.base_layer(x)
        if self.disabled:  # a residual base (PiSSA/OLoRA): the base model's layer is W_res + s·B₀·A₀
            A, B, p, dora = self.initial_lora_A, self.initial_lora_B, 0.0, False
        else:
            A, B = self.lora_A.weight, self.lora_B.weight
            p, dora = (self.lora_dropout if self.training else 0.0), self.use_dora
        bias = self.base_layer.bias
        # The op casts x, W, b, A and B to the compute dtype (autocast's, else x's) itself, as
        # F.linear would; the casts of the fp32 A and B are differentiable, so their gradients
        # arrive in fp32.
        inner_bias = None if dora else bias  # DoRA rescales x·Wᵀ + the LoRA term, then adds b
        if self.quantized:
            y = nf4_lora_linear(x, self.base_layer.state, inner_bias, A, B, self.scaling, dropout_p=p)
        else:
            y = lora_linear(x, self.base_layer.weight, inner_bias, A, B, self.scaling, dropout_p=p)
        if dora:
            y = y * self.magnitude_scale().to(y.dtype)
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y

    # DoRA ------------------------------------------------------------------------------------

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ of each output row, fp32 [out], formed NORM_ROWS rows at a time."""
        weight = self.base_weight(torch.float32) if self.quantized else self.base_layer.weight
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        norms = torch.empty(self.out_features, dtype=torch.float32, device=A.device)
        for start in range(0, self.out_features, NORM_ROWS):
            rows = slice(start, start + NORM_ROWS)
            combined = torch.addmm(weight[rows].float(), B[rows], A, alpha=self.scaling)
            norms[rows] = torch.linalg.vector_norm(combined, dim=1)
        return norms

    def magnitude_scale(self) -> torch.Tensor:
        """m / ‖W + s·B·A‖_row (fp32 [out]): differentiable in m, the norm a constant (DoRA §4.3)."""
        return self.lora_magnitude_vector / self.weight_norm()

    # merge / unmerge ------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, shape [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight the adapted layer computes with, fp32 [out, in]: W + s·B·A, and for DoRA
        (m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A). A 4-bit W is dequantised first."""
        with torch.no_grad():
            weight = self.base_weight(torch.float32) + self.delta_weight()
            if self.use_dora:
                norm = torch.linalg.vector_norm(weight, dim=1)
                weight *= (self.lora_magnitude_vector.float() / norm)[:, None]
            return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (computed in fp32, cast back to W's dtype). Forward then costs one
        matmul."""
        if self.merged:
            return
        if self.quantized:
            raise NotImplementedError(
                "LoRALinear.merge: the base is 4-bit; merging in place would quantise the update away. "
                "Use merge_and_unload(model, dtype=...), which dequantises and merges in fp32")
        w = self.base_layer.weight
        delta = self.delta_weight()
        if self.use_dora:
            self._merged_norm = torch.linalg.vector_norm(w.float() + delta, dim=1)
            factor = (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
            w.copy_((factor * (w.float() + delta)).to(w.dtype))
        else:
            w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(). Exact up to one rounding of W to its dtype (bit-exact for fp32 up to float error)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        if self.use_dora:  # W' = f ⊙ (W + ΔW), f from the norm cached at merge time
            factor = (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
            w.copy_((w.float() / factor - self.delta_weight()).to(w.dtype))
            self._merged_norm = None
        else:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> tuple[nn.Linear, float]:
        """A plain ``nn.Linear`` holding ``merged_weight()`` in ``dtype`` (default: the base's
        dtype; a 4-bit base's ``weight_dtype``), and the largest change that rounding to ``dtype``
        made to any weight (0.0 in fp32)."""
        if self.merged:
            self.unmerge()
        dtype = dtype or (self.base_layer.weight_dtype if self.quantized else self.base_layer.weight.dtype)
        exact = self.merged_weight()
        rounded = exact.to(dtype)
        error = float((rounded.float() - exact).abs().max()) if exact.numel() else 0.0
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=dtype)
        linear.weight = nn.Parameter(rounded, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return linear, error

    def extra_repr(self) -> str:
        variant = "".join([", dora" if self.use_dora else "", ", nf4 base" if self.quantized else "",
                           ", residual base" if self.initial_lora_A is not None else ""])
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"dropout={self.lora_dropout}{variant}")


class TrainableCopy(nn.Module):
    """A module trained in full (PEFT's ``modules_to_save``): a trainable fp32 copy beside the
    frozen original, so disabling the adapter gives back the base model."""

    is_adapter_wrapper = True

    def __init__(self, original_module: nn.Module):
        super().__init__()
        if isinstance(original_module, NF4Linear):
            raise TypeError("modules_to_save: a 4-bit NF4Linear cannot be trained in full; leave it out of "
                            "modules_to_save (or load the model without quantisation)")
        self.original_module = original_module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(original_module).float().requires_grad_(True)
        self.disabled = False

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    @property
    def weight(self) -> torch.Tensor:
        return self.active_module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.active_module, "bias", None)

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)
