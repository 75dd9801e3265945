"""Gradient (activation) checkpointing of one decoder layer, optionally offloading its input to the CPU.

    enable_gradient_checkpointing(model)                 # recompute each layer in the backward pass
    enable_gradient_checkpointing(model, offload=True)   # ... and keep its input in pinned CPU memory

Without checkpointing, autograd keeps every activation a layer's backward pass needs (attention
inputs, the MLP's [tokens, intermediate] tensors, ...). With it, a layer keeps only its input;
the backward pass runs the layer's forward again, under the RNG and autocast state of the first
run, so dropout masks and dtypes repeat exactly and the gradients are the same.

- ``checkpoint_layer(layer, x, ...)`` is ``torch.utils.checkpoint.checkpoint`` in its
  non-reentrant mode. It needs no input that requires grad: with a frozen embedding, x has no
  grad, and the LoRA parameters inside the layer still get theirs (the reentrant mode and
  "enable_input_require_grads" hacks exist for that case; peft#1142, transformers#26221).
- ``offload=True`` is Unsloth's offloaded checkpointing (``Unsloth_Offloaded_Gradient_Checkpointer``):
  ``OffloadedCheckpoint`` copies the layer's input to pinned CPU memory (asynchronously) and
  frees it on the GPU; the backward pass copies it back and recomputes. The layer's trainable
  parameters are inputs of the Function, so gradients reach them whether or not x needs one.
  It saves one [batch, seq, hidden] tensor per layer on the GPU for two PCIe copies; Unsloth
  measured it faster than plain checkpointing above ~512 tokens (unsloth#3867). On a CPU-only
  machine the "offload" is no copy at all: the same Function, plain checkpointing. Single-device:
  under FSDP the layer's parameters are sharded and gathered by FSDP's own hooks, use offload=False.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint


class OffloadedCheckpoint(torch.autograd.Function):
    r"""y = layer(x), keeping only x (on the CPU) for the backward pass.

    Forward: x → pinned CPU memory (non-blocking; stream-ordered before anything reuses x's GPU
    memory); y = layer(x) under no_grad; the CPU and device RNG states and the autocast state
    are recorded.

    Backward, with g = dL/dy: x back on the device, ŷ = layer(x) recomputed with grad under the
    recorded RNG and autocast state (ŷ = y exactly), then

        (dL/dx, dL/dθ) = autograd.grad(ŷ, (x, θ), g)      θ: the layer's trainable parameters

    returned as the gradients of the Function's inputs (x, *θ).
    """

    @staticmethod
    def forward(ctx, run, x, *params):
        ctx.run, ctx.params, ctx.device = run, params, x.device
        ctx.x_requires_grad = x.requires_grad
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type),
                        torch.get_autocast_dtype(device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rng = torch_checkpoint.get_device_states(x)
        if x.device.type == "cpu":
            ctx.saved_x = x.detach()
        else:
            ctx.saved_x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            ctx.saved_x.copy_(x.detach(), non_blocking=True)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.saved_x.to(ctx.device, non_blocking=True).detach().requires_grad_(ctx.x_requires_grad)
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.devices, device_type=device_type if ctx.devices else "cuda"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.devices:
                torch_checkpoint.set_device_states(ctx.devices, ctx.device_rng, device_type=device_type)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype,
                                                     enabled=autocast_enabled):
                y = ctx.run(x)
        wanted = (([x] if ctx.x_requires_grad else [])
                  + [p for p, need in zip(ctx.params, ctx.needs_input_grad[2:]) if need])
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
        grad_x = next(grads) if ctx.x_requires_grad else None
        grad_params = [next(grads) if need else None for need in ctx.needs_input_grad[2:]]
        ctx.saved_x = None
        return (None, grad_x, *grad_params)


def checkpoint_layer(layer: nn.Module, x: torch.Tensor, *args, offload: bool = False) -> torch.Tensor:
    """``layer(x, *args)`` whose activations are recomputed in the backward pass (see the module
    docstring)."""
    if not offload:
        return torch_checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
    params = [p for p in layer.parameters() if p.requires_grad]
    return OffloadedCheckpoint.apply(lambda h: layer(h, *args), x, *params)
