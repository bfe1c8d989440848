"""Parameters sharded as DTensors (FSDP2's ``fully_shard``, Lightning's ``ModelParallelStrategy``): the pieces
the callbacks share to keep per-element state on each rank's shard.

During training a callback works on the local shards only (:func:`local`): its state has the shard's shape
(possibly empty: a (1, d) parameter over two ranks leaves one rank nothing), and a step moves no bytes
between ranks. Checkpoints hold full tensors, so a checkpoint does not depend on how the model was sharded:
:func:`full` gathers a shard at save time (a collective: every rank saves, as Lightning's ``dump_checkpoint``
does), :func:`local_shard` cuts this rank's shard out of a restored full tensor without communication.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient sharded by FSDP2 or tensor parallelism)."""
    return isinstance(tensor, DTensor)


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    return any(isinstance(tensor, DTensor) for tensor in tensors)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` (a view of its storage: writing it writes the parameter), or ``tensor``."""
    return tensor.detach().to_local() if isinstance(tensor, DTensor) else tensor


def full(shard: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose shard on this rank is ``shard``, sharded as ``like`` (all-gather; every rank
    calls it); ``shard`` itself when ``like`` is not sharded."""
    if not isinstance(like, DTensor):
        return shard
    return DTensor.from_local(
        shard.to(like.device), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def local_shard(full_tensor: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full_tensor``, sharded as ``like`` (no communication); ``full_tensor`` itself
    when ``like`` is not sharded. Raises if the shapes differ."""
    if not isinstance(like, DTensor):
        return full_tensor
    if tuple(full_tensor.shape) != tuple(like.shape):
        raise ValueError(
            f"a restored state of shape {tuple(full_tensor.shape)} for a parameter of shape {tuple(like.shape)}"
        )
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    for dim, (size, start) in enumerate(zip(shape, offset)):
        full_tensor = full_tensor.narrow(dim, min(start, full_tensor.shape[dim]), size)
    return full_tensor.contiguous()


def refuse_sharded(module: torch.nn.Module, strategy: str, reason: str) -> None:
    """Raise ``ValueError`` naming ``strategy`` and ``reason`` if ``module`` has sharded (DTensor) parameters:
    for strategies that need every rank to hold whole parameters (called during set-up, before training)."""
    sharded = [name for name, p in module.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"{strategy} cannot train a sharded model: {sharded[:3]} ({len(sharded)} parameters) are DTensors "
            f"(fully_shard / tensor parallelism in configure_model), and {reason}. Use Lightning's "
            "ModelParallelStrategy for a sharded model, or leave the model whole (no fully_shard) with this strategy"
        )


def reshard(module: torch.nn.Module) -> None:
    """Make every ``fully_shard``-ed part of ``module`` hold its sharded parameters again (frees the gathered
    ones; no communication), so its next forward gathers the shards afresh. Code that writes into the shards
    calls it first: a forward without backward (FSDP2's root after a forward with gradients enabled) leaves
    gathered copies that the next forward would use as they are."""
    for part in module.modules():
        if isinstance(part, FSDPModule):
            part.reshard()


def full_states(states: Mapping[str, Tensor], likes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``states`` (per-shard state by parameter name) with each shard of a sharded ``likes[name]`` gathered."""
    return {name: full(state, likes[name]) if name in likes else state for name, state in states.items()}


def full_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A module's ``state_dict()`` with every DTensor gathered (every rank calls it)."""
    return {name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in state_dict.items()}


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a full state dict into a module whose parameters may be sharded: each rank copies its own shards
    (no communication). A module with no DTensor uses ``load_state_dict``."""
    named = dict(module.named_parameters())
    if not any_sharded(named.values()):
        module.load_state_dict(state_dict)
        return
    named.update(module.named_buffers())
    missing = [name for name in named if name not in state_dict]
    if missing:
        raise KeyError(f"the state dict lacks {missing[:3]} ({len(missing)} tensors of the module missing)")
    reshard(module)
    for name, tensor in named.items():
        local(tensor).copy_(local_shard(state_dict[name], tensor))
