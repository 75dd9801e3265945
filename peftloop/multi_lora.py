"""K LoRA adapters on one frozen base layer, each applied to its own rows of a fused batch.

::

        x (rows of adapters 0, 1, 2 ...) ─► base_layer (W frozen, once over all rows) ──────┐
        │                                                                                  (+) ──► y
        └─ rows of adapter k ─► dropout_k ─► A_k ([r_k, in]) ─► B_k ([out, r_k]) ─► ×s_k ──┘

Training several small jobs on one base (K adapters, one per job) costs one base matmul per
micro-batch instead of K: the rows of a fused micro-batch carry, through ``RowRouting``, the
adapter they belong to, the base runs once over all of them, and each adapter's low-rank update
runs on its own rows only (``kernels.multi_lora_linear``, the maths of ``lora_linear``).
Adapter k's rows compute exactly what a ``LoRALinear`` holding adapter k computes on them, and
its gradients come from its rows alone.

Dropout: a ``LoRALinear`` in ``train()`` draws its mask from torch's global RNG. Here each
adapter can have its own RNG state (``RowRouting.rng_states``), swapped in around that
adapter's draw, so adapter k consumes the random numbers it would consume trained alone; and
its own sequence length (``RowRouting.lengths``), so that rows padded to a longer fused batch
draw the mask of their unpadded shape.

Only plain LoRA (and rsLoRA), on an ``nn.Linear`` or 4-bit ``NF4Linear`` base: no DoRA, no
PiSSA/OLoRA (they change the shared base per adapter), no merging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from peftloop.kernels import multi_lora_linear
from peftloop.lora import init_lora_factors, lora_scaling
from peftloop.nf4 import NF4Linear

BASE_LAYERS = (nn.Linear, NF4Linear)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a ``MultiLoRALinear``."""

    r: int
    """Rank of the update B·A."""
    lora_alpha: float
    """Scale numerator: the update is multiplied by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))."""
    lora_dropout: float = 0.0
    """Dropout on this adapter's LoRA branch input (training mode only)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""


@dataclass
class RowRouting:
    """Which rows of the next forward passes belong to which adapter."""

    segments: list[tuple[int, int, int]]
    """(adapter k, first row, end row) over dim 0 (the batch rows) of every input. One adapter's
    rows are contiguous; an adapter absent from the batch has no segment; rows in no segment get
    the base only."""
    rng_states: dict[int, torch.Tensor] | None = None
    """Per adapter k: the torch CPU RNG state (``torch.get_rng_state()``) adapter k's dropout
    draws come from. Each layer swaps it in around adapter k's draw and writes the advanced state
    back, so adapter k consumes exactly the random numbers a single ``LoRALinear`` would consume
    in ``train()`` alone. None: every draw comes from the global RNG, in segment order."""
    lengths: dict[int, int] | None = None
    """Per adapter k: the length of dim 1 (the sequence) its rows have alone, when they were
    right-padded to the fused batch's length. Adapter k's dropout mask is then drawn for
    ``x_k[:, :lengths[k]]``, as a ``LoRALinear`` given the unpadded rows draws it, and the pad
    positions are kept (their outputs must not reach any loss: train_many labels pads -100 and
    causal attention keeps real tokens blind to the pads after them). An adapter absent from the
    dict, or a 2-D input (no sequence dim), is not trimmed."""


class LoRAAdapter(nn.Module):
    """One adapter's trainable factors: ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``, fp32.

    Built in the order a ``LoRALinear`` builds its own (the two ``nn.Linear``s, then PEFT's init),
    so from the same RNG state the two hold the same tensors."""

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec, device=None,
                 init_lora_weights: bool | str = True):
        super().__init__()
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoRAAdapter: init_lora_weights={init_lora_weights!r} is not supported by "
                             "the multi-adapter layer (True, False or 'gaussian'; PiSSA/OLoRA change the "
                             "shared base)")
        self.r, self.lora_alpha, self.lora_dropout = spec.r, spec.lora_alpha, spec.lora_dropout
        self.use_rslora = spec.use_rslora
        self.scaling = lora_scaling(spec.r, spec.lora_alpha, spec.use_rslora)
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, device=device, dtype=torch.float32)
        if init_lora_weights is not False:  # False: random A and B (tests that need a non-identity adapter)
            init_lora_factors(self.lora_A, self.lora_B, init_lora_weights)

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}"


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or ``NF4Linear`` with K LoRA adapters, each on the rows routed to it."""

    is_adapter_wrapper = True  # peftloop.modules recognises adapter wrappers by this marker

    def __init__(self, base_layer: nn.Linear | NF4Linear, adapters: Sequence[LoRAAdapter]):
        super().__init__()
        if not isinstance(base_layer, BASE_LAYERS):
            raise TypeError(f"MultiLoRALinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        if not adapters:
            raise ValueError("MultiLoRALinear needs at least one adapter")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for k, adapter in enumerate(adapters):
            shapes = (tuple(adapter.lora_A.weight.shape[1:]), tuple(adapter.lora_B.weight.shape[:1]))
            if shapes != ((self.in_features,), (self.out_features,)):
                raise ValueError(f"MultiLoRALinear: adapter {k} maps {shapes[0][0]} -> {shapes[1][0]} "
                                 f"features, the base {self.in_features} -> {self.out_features}")
        self.adapters = nn.ModuleList(adapters)
        self.routing: RowRouting | None = None
        # The adapters' RNG states before this layer's last forward draw: what an activation
        # checkpoint's recomputation must draw from again (see rng_states_for_this_pass).
        self.states_before_draw: dict[int, torch.Tensor] | None = None

    @classmethod
    def from_specs(cls, base_layer: nn.Linear | NF4Linear, specs: Sequence[AdapterSpec],
                   init_lora_weights: bool | str = True) -> MultiLoRALinear:
        """A layer with fresh adapters, drawn one after the other from torch's RNG."""
        device = (base_layer.packed_weight if isinstance(base_layer, NF4Linear) else base_layer.weight).device
        in_f, out_f = base_layer.in_features, base_layer.out_features
        adapters = [LoRAAdapter(in_f, out_f, spec, device, init_lora_weights) for spec in specs]
        return cls(base_layer, adapters)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, NF4Linear)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing is None:
            if len(self.adapters) > 1:
                raise RuntimeError(f"MultiLoRALinear with {len(self.adapters)} adapters: no rows are "
                                   "routed; call set_routing(model, RowRouting(segments=...)) before the "
                                   "forward pass")
            routing = RowRouting(segments=[(0, 0, x.shape[0])])
        adapters = list(self.adapters)
        dropout_ps = [a.lora_dropout if self.training else 0.0 for a in adapters]
        rng_states = routing.rng_states
        if rng_states is not None and any(dropout_ps):
            rng_states = self.rng_states_for_this_pass(rng_states)
        base = self.base_layer.state if self.quantized else self.base_layer.weight
        # The op casts x, W, b and every A and B to the compute dtype itself (autocast's, else x's);
        # the fp32 factors receive fp32 gradients through those casts.
        return multi_lora_linear(x, base, self.base_layer.bias, [a.lora_A.weight for a in adapters],
                                 [a.lora_B.weight for a in adapters], [a.scaling for a in adapters],
                                 routing.segments, dropout_ps, rng_states=rng_states,
                                 lengths=routing.lengths)

    def rng_states_for_this_pass(self, rng_states: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The RNG states this forward pass draws dropout from.

        Activation checkpointing runs a layer's forward pass a second time inside the backward
        pass, under the global RNG state of the first run, so a ``LoRALinear`` draws the same mask
        again. The adapters' own states have moved on by then: the recomputation draws from a copy
        of the states this layer's last forward pass started from, and advances nothing. (A
        forward pass inside a backward pass is a recomputation; the non-reentrant checkpoint
        tells them apart the same way, by the autograd graph task running.)"""
        recomputing = torch._C._current_graph_task_id() != -1
        if not recomputing:
            self.states_before_draw = dict(rng_states)  # the tensors are replaced, never modified
            return rng_states
        if self.states_before_draw is None:
            raise RuntimeError("MultiLoRALinear: a forward pass inside a backward pass (an activation "
                               "checkpoint's recomputation) without a forward pass before it")
        return dict(self.states_before_draw)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={len(self.adapters)}"
                + (", nf4 base" if self.quantized else ""))


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def set_routing(model: nn.Module, routing: RowRouting | None) -> None:
    """Route the rows of the next forward passes on every ``MultiLoRALinear`` in ``model`` (None: none).

    All layers share the one ``RowRouting`` object, so its ``rng_states`` advance as the layers
    draw, in the order the model runs them."""
    for layer in multi_lora_layers(model).values():
        layer.routing = routing
