"""The LoRA linear layer: a frozen ``nn.Linear`` plus a trainable low-rank update.

::

        x ──────────────► base_layer (W frozen, [out, in]) ─────────┐
        │                                                         (+) ──► y
        └─► dropout ─► lora_A ([r, in]) ─► lora_B ([out, r]) ─► ×s ─┘

    y = x·Wᵀ + b + s · dropout(x)·Aᵀ·Bᵀ,   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1. B starts at zero,
so the adapted layer starts equal to the base layer. Parameter names follow PEFT
(``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``) so saving is a prefix away from
PEFT's on-disk keys.

The trainable A and B are fp32 whatever the base dtype: under autocast they are cast to the
compute dtype inside the forward pass, and their gradients and optimizer state stay fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from peftloop.kernels import lora_linear


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        scaling: float | None = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.scaling = scaling if scaling is not None else lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(init_lora_weights)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads ``layer.weight`` (tied heads, shape checks)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self, init: bool | str) -> None:
        """PEFT's init: A kaiming-uniform(a=√5) (nn.Linear's default), B = 0; "gaussian": A ~ N(0, 1/r)."""
        if init is False:  # random A and B: only for tests that need a non-identity adapter
            return
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype
        p = self.lora_dropout if self.training else 0.0
        weight, bias = self.base_layer.weight, self.base_layer.bias
        # One compute dtype for the fused op; the casts of A and B are differentiable, so their
        # gradients arrive in fp32. A frozen base stored in `dtype` is not copied at all.
        with torch.autocast(device_type, enabled=False):
            return lora_linear(
                x.to(dtype),
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                self.lora_A.weight.to(dtype),
                self.lora_B.weight.to(dtype),
                self.scaling,
                dropout_p=p,
            )

    # merge / unmerge ------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, shape [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (computed in fp32, cast back to W's dtype). Forward then costs one matmul."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(). Exact up to one rounding of W to its dtype (bit-exact for fp32 up to float error)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}"


class TrainableCopy(nn.Module):
    """A module trained in full (PEFT's ``modules_to_save``): a trainable fp32 copy beside the
    frozen original, so disabling the adapter gives back the base model."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        import copy

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
