"""recompute_activations: SwiGLU's and RMSNorm's outputs are made again in the backward pass
instead of being kept by the projections that consume them. The gradients are bit for bit those
of a run that keeps them, for every combination of inputs needing a gradient, and the consumer
no longer saves the output's storage."""

from __future__ import annotations

import contextlib
import functools
import gc

import pytest
import torch
from kernel_utils import DTYPES, IMPLS, grad_combinations, randn, run

from peftloop.kernels import lora_linear, rms_norm, swiglu
from peftloop.kernels.recompute import recompute_activations

ROWS, HIDDEN, INTER, RANK = 13, 24, 40, 4


@contextlib.contextmanager
def counting_saved():
    """Saved-tensor hooks that record the storage (address -> bytes) of every tensor autograd keeps."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def leaves(dtype, needs, seed=0, **shapes):
    """A tensor per name, in ``dtype``; ``needs[i]`` says whether the i-th needs a gradient."""
    return [randn(*shape, dtype=dtype, seed=seed + i, requires_grad=need)
            for i, ((_, shape), need) in enumerate(zip(shapes.items(), needs, strict=True))]


def mlp_down(gate, up, down_w, lora_A, lora_B):
    """The end of a Llama MLP: down_proj(swiglu(gate, up)) with LoRA on down_proj."""
    return lora_linear(swiglu(gate, up), down_w, None, lora_A, lora_B, 2.0)


def attention_inputs(x, norm_w, w_q, w_k, lora_A, lora_B):
    """input_layernorm and two LoRA projections of its output (q and k, sharing the adapter)."""
    h = rms_norm(x, norm_w, 1e-5)
    return lora_linear(h, w_q, None, lora_A, lora_B, 2.0), lora_linear(h, w_k, None, lora_A, lora_B, 0.5)


def backward_of(fn, tensors, recompute: bool):
    """fn's outputs, the gradients of every tensor that needs one, and the storages saved."""
    with counting_saved() as saved, recompute_activations(enabled=recompute):
        outputs = fn(*tensors)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    wanted = [t for t in tensors if t.requires_grad]
    cotangents = [randn(*o.shape, dtype=o.dtype, seed=7 + i) for i, o in enumerate(outputs)]
    grads = torch.autograd.grad(outputs, wanted, cotangents) if wanted else ()
    return outputs, grads, saved


def assert_same_run(fn, tensors):
    """With and without recomputation: the same outputs and gradients, bit for bit. Returns the
    storages each run saved."""
    kept_out, kept_grads, kept_saved = backward_of(fn, tensors, recompute=False)
    out, grads, saved = backward_of(fn, tensors, recompute=True)
    for a, b in zip(out, kept_out, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads, kept_grads, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    return kept_saved, saved


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs", grad_combinations(3))
def test_swiglu_output_is_recomputed_for_down_proj(impl, dtype, needs):
    need_gate_up, need_A, need_B = needs
    gate, up = leaves(dtype, (need_gate_up, need_gate_up), gate=(ROWS, INTER), up=(ROWS, INTER))
    down_w = randn(HIDDEN, INTER, dtype=dtype, seed=3)
    lora_A, lora_B = leaves(dtype, (need_A, need_B), seed=4, A=(RANK, INTER), B=(HIDDEN, RANK))
    tensors = [gate, up, down_w, lora_A, lora_B]
    kept, recomputed = run(impl, assert_same_run, mlp_down, tensors)
    if need_gate_up:  # down_proj saved the swiglu output; with recomputation nothing does
        assert sum(kept.values()) - sum(recomputed.values()) == ROWS * INTER * dtype.itemsize
    else:  # swiglu kept nothing: a recipe would keep gate and up in the output's place
        assert sorted(kept.values()) == sorted(recomputed.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs", grad_combinations(4))
def test_rms_norm_output_is_recomputed_for_the_projections(impl, dtype, needs):
    need_x, need_norm_w, need_A, need_B = needs
    x, norm_w = leaves(dtype, (need_x, need_norm_w), x=(3, 5, HIDDEN), w=(HIDDEN,))
    w_q, w_k = randn(HIDDEN, HIDDEN, dtype=dtype, seed=3), randn(HIDDEN, HIDDEN, dtype=dtype, seed=4)
    lora_A, lora_B = leaves(dtype, (need_A, need_B), seed=5, A=(RANK, HIDDEN), B=(HIDDEN, RANK))
    tensors = [x, norm_w, w_q, w_k, lora_A, lora_B]
    kept, recomputed = run(impl, assert_same_run, attention_inputs, tensors)
    if need_x or need_norm_w:  # q and k saved the norm's output; with recomputation nothing does
        assert sum(kept.values()) - sum(recomputed.values()) == 15 * HIDDEN * dtype.itemsize
    else:  # the norm kept nothing: a recipe would keep x in the output's place
        assert sorted(kept.values()) == sorted(recomputed.values())


def test_an_output_changed_in_place_is_saved_as_it_is():
    """A recipe would give the values before the change: the changed tensor is kept instead."""
    gate, up = leaves(torch.float32, (True, True), gate=(ROWS, INTER), up=(ROWS, INTER))
    down_w = randn(HIDDEN, INTER, seed=3)
    lora_A, lora_B = leaves(torch.float32, (True, True), seed=4, A=(RANK, INTER), B=(HIDDEN, RANK))

    def changed(gate, up, down_w, lora_A, lora_B):
        hidden = swiglu(gate, up)
        with torch.no_grad():
            hidden.mul_(3.0)  # a (contrived) in-place change that autograd does not see
        return lora_linear(hidden, down_w, None, lora_A, lora_B, 2.0)

    kept, recomputed = assert_same_run(changed, [gate, up, down_w, lora_A, lora_B])
    assert sorted(kept.values()) == sorted(recomputed.values())


def test_without_grad_or_outside_the_block_nothing_is_registered():
    from peftloop.kernels import recompute

    gate, up = randn(4, 6), randn(4, 6)
    with recompute_activations(), torch.no_grad():
        swiglu(gate, up)
    swiglu(gate.requires_grad_(), up)
    assert not recompute._registered
    with recompute_activations():
        swiglu(gate.detach(), up)  # an output that needs no grad
        assert not recompute._registered
        swiglu(gate, up)
        assert len(recompute._registered) == 1
    assert not recompute._registered  # cleared when the block ends


def test_a_checkpointed_layer_registers_nothing_and_frees_its_intermediates():
    """Inside a checkpoint nothing is saved, so a recipe would only keep its inputs alive until the
    block ends: every checkpointed layer's gate and up across the whole forward pass (measured: ~87
    MB per layer at 4,096 tokens of SmolLM2-135M). Nothing is registered, the intermediates die
    with the layer, and the gradients are those of the run without the block."""
    import weakref

    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from peftloop.kernels import recompute

    gate_w, up_w = randn(INTER, HIDDEN, seed=1), randn(INTER, HIDDEN, seed=2)
    down_w, norm_w = randn(HIDDEN, INTER, seed=3), randn(HIDDEN, seed=4)
    lora_A, lora_B = leaves(torch.float32, (True, True), seed=5, A=(RANK, INTER), B=(HIDDEN, RANK))
    x = randn(ROWS, HIDDEN, seed=6, requires_grad=True)
    alive = []

    def layer(x):
        h = rms_norm(x, norm_w, 1e-5)
        gate, up = h @ gate_w.t(), h @ up_w.t()
        alive.append(weakref.ref(gate))
        return x + lora_linear(swiglu(gate, up), down_w, None, lora_A, lora_B, 2.0)

    # enable_gradient_checkpointing's (offload=True runs the layer under no_grad: nothing registers)
    run_checkpointed = functools.partial(torch_checkpoint, use_reentrant=False)
    expected = torch.autograd.grad(layer(layer(x)).sum(), [x, lora_A, lora_B])
    alive.clear()
    with recompute_activations():
        out = run_checkpointed(layer, run_checkpointed(layer, x))
        assert not recompute._registered
        gc.collect()
        assert all(ref() is None for ref in alive)  # both layers' gate freed before the block ends
    for a, b in zip(torch.autograd.grad(out.sum(), [x, lora_A, lora_B]), expected, strict=True):
        assert torch.equal(a, b)


def test_enclosing_hooks_see_the_recipe_inputs_and_everything_else():
    """A hook around the block (here: one that moves saved tensors out and back) still gets every
    tensor: the others directly, the recipe's inputs when a consumer saves the output."""
    gate, up = leaves(torch.float32, (True, True), gate=(ROWS, INTER), up=(ROWS, INTER))
    down_w = randn(HIDDEN, INTER, seed=3)
    lora_A, lora_B = leaves(torch.float32, (True, True), seed=4, A=(RANK, INTER), B=(HIDDEN, RANK))
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # a different tensor comes back: the recipe must use what unpack returns

    def unpack(t):
        unpacked.append(t.shape)
        return t

    trainable = [gate, up, lora_A, lora_B]
    expected = torch.autograd.grad(mlp_down(gate, up, down_w, lora_A, lora_B).sum(), trainable)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), recompute_activations():
        out = mlp_down(gate, up, down_w, lora_A, lora_B)
    got = torch.autograd.grad(out.sum(), trainable)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    hidden_shape = torch.Size([ROWS, INTER])
    # swiglu saves gate and up, the recipe packs them again; the output itself is never packed
    assert packed.count(hidden_shape) == 4 and len(unpacked) == len(packed)
