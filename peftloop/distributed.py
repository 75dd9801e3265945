"""Scale-out under torchrun: the process group, DDP / FSDP2 wrapping, and the collectives the loop uses.

    torchrun --nproc-per-node 2 -m peftloop train ...            one node
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m peftloop train ...

``train()`` calls ``setup`` itself: under torchrun (WORLD_SIZE > 1) it joins the process group
(nccl on CUDA, gloo on the CPU); alone it does nothing, and every helper below is then a no-op,
so the loop reads the same with one process or many.

- DDP replicates the model; gradients of the trainable tensors are averaged after the last
  micro-batch of a window (``no_sync`` before it).
- FSDP2 (``fully_shard``) shards every decoder layer and the root: each rank holds 1/N of every
  tensor, the frozen base included, and gathers a layer's weights only while it runs. FSDP2 shards
  each parameter separately, so frozen and trainable tensors can share a layer (FSDP1's "uniform
  requires_grad" restriction does not apply).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(strategy: str, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by the environment, if any. Returns (Dist, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), device
    if strategy == "none":
        raise RuntimeError(f"train.strategy='none' but WORLD_SIZE={world_size}: "
                           "use 'ddp' or 'fsdp' under torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A dead peer surfaces as a timeout error in the survivors' next collective, never a hang.
        timeout = timedelta(seconds=float(os.environ.get("PEFTLOOP_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank, world_size, local_rank, "ddp" if strategy == "auto" else strategy), device


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Broadcast rank 0's trainable tensors (every rank must start from the same adapter), then
    wrap for the strategy. Returns the module to call; the original stays reachable as ``.module``
    (DDP) or is the same object (FSDP2 changes the module in place)."""
    if not d.enabled:
        return model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    if d.strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of the deepest ``layers`` ModuleList
    (HF naming: model.model.layers), or every child ModuleList's items as a fallback."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return list(module)
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, skip: bool):
    """While ``skip``, backward accumulates locally without reducing gradients across ranks."""
    if not skip:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: float | int, d: Dist, device: torch.device) -> float:
    """The sum over ranks (the value itself when alone)."""
    if not d.enabled:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if it is true on any, so that all ranks take the same branch."""
    if not d.enabled:
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, d: Dist):
    """Rank 0's object on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, d: Dist) -> list | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def scatter_objects(objs: list | None, d: Dist):
    """Rank 0 hands objs[r] to rank r."""
    if not d.enabled:
        return objs[0]
    box = [None]
    dist.scatter_object_list(box, objs if d.is_main else None, src=0)
    return box[0]


def run_on_rank0(fn, d: Dist, task: str):
    """``fn()`` on rank 0 alone; its result there, None on the other ranks.

    A failure is shared: rank 0 raises its exception and every other rank a RuntimeError that
    names it, so no rank is left waiting in a collective that rank 0 will never reach."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    error_text = broadcast_object(error and f"{type(error).__name__}: {error}", d)
    if error is not None:
        raise error
    if error_text:
        raise RuntimeError(f"rank 0 could not {task}: {error_text}")
    return result


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state as whole CPU tensors keyed by parameter name, whatever the wrapping
    (a collective under FSDP2: each rank holds only its shard of every moment)."""
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None,
                              d: Dist) -> None:
    """Load a whole optimizer state (``full_optimizer_state``'s form) that only rank 0 holds: it is
    broadcast, and under FSDP2 each rank keeps its shard."""
    set_optimizer_state_dict(model, optimizer, state if d.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled))


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it), else t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
