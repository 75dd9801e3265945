"""Recompute cheap activations in the backward pass instead of keeping them.

The output of an elementwise op (SwiGLU's ``silu(gate)·up``) or of a norm is saved for the
backward pass by the op that *consumes* it (the LoRA projection after it keeps its input for
dA), while the op that made it already keeps what it needs to make it again (SwiGLU keeps gate
and up, RMSNorm keeps x and one fp32 per row). Keeping both is one activation-sized tensor too
many. Inside ``recompute_activations()``:

- a producer registers its output with ``recomputable(output, make, *inputs)``;
- when autograd saves that output, or any view of it, for any later op, a saved-tensor hook keeps
  a recipe instead (the inputs, which the producer keeps anyway, and ``make``);
- the backward pass that reads it runs ``make(*inputs)`` once (no grad, autocast off), shared by
  every consumer of the same output (q, k and v share one norm output), and frees it with them.

``make`` must give the forward's values bit for bit: the producers pass the function their
forward ran. Outside the block, with grad disabled, or for a non-contiguous output, nothing
changes. Saved-tensor hooks already active around the block (``save_on_cpu``, a counting hook)
keep working: everything else, and the recipes' inputs, go through them. Hooks opened inside the
block (gradient checkpointing of a layer) take precedence there, as torch stacks them, so a
checkpointed layer is recomputed by its checkpoint and nothing here applies to it: nothing is
registered there either, since a recipe holds its inputs until a consumer saves the output or the
block ends, and inside a checkpoint no one saves them (the whole point of checkpointing).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

# Depth of nested recompute_activations() blocks, and the outputs registered in them, by the
# address of their storage. Cleared when the outermost block ends: after the forward pass only
# the recipes that autograd holds are left, and they die with the graph.
_depth = 0
_registered: dict[int, Recipe] = {}
_our_packs: list[Callable] = []  # the pack hook of each open block, innermost last


class Recipe:
    """How to make one output again: ``make(*inputs)``. Holds the output weakly (only to recognise
    it) and, once a consumer saves it, the inputs packed by the enclosing hooks (if any)."""

    def __init__(self, output: torch.Tensor, make: Callable[..., torch.Tensor], inputs: tuple):
        self.output = weakref.ref(output)
        self.version = output._version  # an in-place change after this makes the recipe wrong
        self.make, self.inputs = make, tuple(t.detach() for t in inputs)
        self.device_type = output.device.type
        self.packed_inputs = None
        self.value = None  # the recomputed output, kept while some consumer still holds the recipe

    def describes(self, t: torch.Tensor) -> bool:
        output = self.output()
        return (output is not None and t.dtype == output.dtype and output._version == self.version
                and t.untyped_storage().data_ptr() == output.untyped_storage().data_ptr())

    def pack(self, outer_pack) -> Recipe:
        if self.packed_inputs is None:
            self.packed_inputs = tuple(outer_pack(t) for t in self.inputs) if outer_pack else self.inputs
            self.inputs = ()  # held through packed_inputs from now on
        return self

    def unpack(self, outer_unpack) -> torch.Tensor:
        if self.value is None:
            inputs = self.packed_inputs
            if outer_unpack:
                inputs = tuple(outer_unpack(p) for p in inputs)
            with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
                self.value = self.make(*inputs)
        return self.value


class RecomputedView:
    """What autograd keeps for one saved view of a registered output: the recipe and the view."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: Recipe, t: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, t.size(), t.stride(), t.storage_offset()


def enclosing_hooks():
    """The saved-tensor hooks active now, as (pack, unpack), or None. Read through a private torch
    function; when a torch version lacks it, recompute_activations() turns itself off (False)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return False if top is None else top(False)


@contextlib.contextmanager
def recompute_activations(enabled: bool = True):
    """Inside the block, outputs registered with ``recomputable`` are recomputed in the backward
    pass instead of being saved by the ops that consume them (see the module docstring)."""
    outer = enclosing_hooks() if enabled else False
    if outer is False:
        yield
        return
    outer_pack, outer_unpack = outer or (None, None)

    def pack(t: torch.Tensor):
        recipe = _registered.get(t.untyped_storage().data_ptr())
        if recipe is not None and recipe.describes(t):
            return RecomputedView(recipe.pack(outer_pack), t)
        return outer_pack(t) if outer_pack else t

    def unpack(saved):
        if isinstance(saved, RecomputedView):
            return saved.recipe.unpack(outer_unpack).as_strided(saved.size, saved.stride, saved.offset)
        return outer_unpack(saved) if outer_unpack else saved

    global _depth
    _depth += 1
    _our_packs.append(pack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _depth -= 1
        _our_packs.pop()
        if _depth == 0:
            _registered.clear()


def innermost_hooks_are_ours() -> bool:
    top = enclosing_hooks()
    return bool(top) and top[0] is _our_packs[-1]


def recomputable(output: torch.Tensor, make: Callable[..., torch.Tensor], *inputs: torch.Tensor
                 ) -> torch.Tensor:
    """Registers ``output`` (returned unchanged) as ``make(*inputs)`` for the enclosing
    ``recompute_activations()`` block; outside one, or without grad, does nothing. Only an output
    that requires grad is registered: then its producer keeps the inputs anyway, and the recipe
    costs nothing (otherwise it would keep inputs that nobody else keeps). Under hooks opened inside
    the block (a checkpointed layer) nothing is registered: nothing is saved there, and a recipe
    would keep its inputs alive until the block ends (every layer's, across the forward pass)."""
    if (_depth and torch.is_grad_enabled() and output.requires_grad and output.is_contiguous()
            and output.storage_offset() == 0 and innermost_hooks_are_ours()):
        _registered[output.untyped_storage().data_ptr()] = Recipe(output, make, inputs)
    return output
