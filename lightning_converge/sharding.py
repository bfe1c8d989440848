"""Parameters sharded as DTensors (FSDP2's ``fully_shard``, Lightning's ``ModelParallelStrategy``): the pieces
the callbacks and strategies share to keep per-element state on each rank's shard, and to checkpoint it.

During training a callback works on the local shards only (:func:`local`): its state has the shard's shape
(possibly empty: a (1, d) parameter over two ranks leaves one rank nothing), and a step moves no bytes
between ranks.

Checkpoints of sharded state
----------------------------
One mechanism for every callback and strategy whose state is per element of sharded parameters:

* ``state_dict()`` (or whatever puts the state into the checkpoint) holds :func:`saved_state` of each shard:
  a DTensor sharded like the parameter, a view of the shard (no copy, no communication). Use
  :func:`saved_states` for a dict by parameter name.
* Before the strategy writes the checkpoint (every rank), :func:`prepare_checkpoint` turns every DTensor found
  outside ``checkpoint["state_dict"]`` and ``checkpoint["optimizer_states"]`` into what the strategy's format
  holds: with ``ModelParallelStrategy(save_distributed_checkpoint=True)`` the DTensor moves into
  ``checkpoint["state_dict"]`` under ``"_sharded_state/<its path in the checkpoint>"``, so torch's distributed
  checkpoint (DCP) writes each rank's shards into the checkpoint directory beside the model's, with no gather;
  where it was, rank 0's metadata file keeps a small record (:data:`RECORD_KEY`: the key, global shape,
  dtype, placements, mesh dimension names). Otherwise (a single-file checkpoint that rank 0 writes) each
  DTensor is gathered into a full tensor (one all-gather each, every rank).
* After the strategy read a checkpoint (every rank), :func:`restore_checkpoint` reads every record's shards
  through DCP into a DTensor sharded the same way over the current run's mesh (the mesh of the module's
  parameters with the recorded dimension names), so another number of ranks reads the same state resharded.
  The DTensors' local shards are host (CPU) tensors.
* On restore, :func:`restored_state` makes this rank's shard of what the checkpoint held, whichever it was:
  a DTensor sharded like the parameter gives its local shard (no communication), a full tensor is cut
  (no communication), a DTensor sharded otherwise is gathered first (a collective: every rank restores alike).
* :func:`attach` puts both steps around a strategy's ``save_checkpoint`` / ``load_checkpoint`` (stand-ins on
  the strategy instance, once; a strategy may instead call the two functions in its own overrides, and a
  checkpoint already prepared or restored has nothing left for a second call). The callbacks of this pack
  attach in ``setup``.

A state of more dimensions than its parameter, whose leading ``leading`` dimensions are not sharded (Grokfast's
ring of gradients, ``(window_size, *shape)``), passes ``leading`` to :func:`saved_state` /
:func:`restored_state`: the parameter's placements shift by that many dimensions.

A sharded strategy keeps its own state (DiLoCo's outer state: global parameters, momentum) the same way. In
its ``save_checkpoint`` override it puts ``saved_states(shards, params)`` (by parameter name) into the
checkpoint dict, then calls ``prepare_checkpoint(checkpoint, writes_distributed_checkpoint(self))`` and the
base class's (``ModelParallelStrategy``'s) ``save_checkpoint``; in its ``load_checkpoint`` override it calls
``restore_checkpoint(checkpoint, checkpoint_path, self.lightning_module)`` on what the base class returned,
and where it restores its state (e.g. ``load_optimizer_state_dict``) takes ``restored_state(saved, param)``:
this rank's shard, whatever the checkpoint's format or the number of ranks that wrote it. (Not
:func:`attach`: its stand-in would prepare the checkpoint before the override adds the strategy's state.)
:func:`read_checkpoint` reads any of these checkpoints in one process, with
full tensors (inspection, tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

#: Prefix of the keys under which sharded state travels inside a distributed checkpoint's ``state_dict``.
DCP_PREFIX = "_sharded_state/"
#: The key of the record that stands, in rank 0's metadata file, for a DTensor written through DCP.
RECORD_KEY = "sharded_state"


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
    return gather(saved_state(shard, like))


def local_shard(full_tensor: Tensor, like: Tensor, leading: int = 0) -> Tensor:
    """This rank's shard of ``full_tensor``, sharded as ``like`` with ``leading`` unsharded dimensions in front
    (no communication); ``full_tensor`` itself when ``like`` is not sharded. Raises if the shapes differ."""
    if not isinstance(like, DTensor):
        return full_tensor
    if tuple(full_tensor.shape[leading:]) != tuple(like.shape):
        raise ValueError(
            f"a restored state of shape {tuple(full_tensor.shape)} for a parameter of shape {tuple(like.shape)}"
            + (f" (with {leading} leading dimensions)" if leading else "")
        )
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    for dim, (size, start) in enumerate(zip(shape, offset), start=leading):
        full_tensor = full_tensor.narrow(dim, min(start, full_tensor.shape[dim]), size)
    return full_tensor.contiguous()


def _placements(like: DTensor, leading: int) -> tuple:
    """``like``'s placements for a state with ``leading`` more (unsharded) dimensions in front."""
    placements = []
    for placement in like.placements:
        if type(placement) is Shard:
            placements.append(Shard(placement.dim + leading))
        elif isinstance(placement, Replicate):
            placements.append(placement)
        else:
            raise ValueError(f"cannot checkpoint state sharded like a parameter placed as {like.placements}")
    return tuple(placements)


def _dtensor(local_tensor: Tensor, mesh: Any, placements: tuple, shape: tuple) -> DTensor:
    """A DTensor of global ``shape`` whose shard on this rank is ``local_tensor`` (no copy, no communication,
    on whatever device ``local_tensor`` is: torch's own state-dict helpers make host-side DTensors this way)."""
    stride = torch.empty(shape, device="meta").stride()
    spec = DTensorSpec(mesh, placements, TensorMeta(torch.Size(shape), stride, local_tensor.dtype))
    return DTensor(local_tensor, spec, requires_grad=False)


def saved_state(shard: Tensor, like: Tensor, leading: int = 0) -> Tensor:
    """What a checkpoint holds for per-element state whose shard on this rank is ``shard``: a DTensor sharded
    like ``like`` (``leading`` unsharded dimensions in front), a view of ``shard`` (no copy, no communication);
    ``shard`` itself when ``like`` is not sharded. Raises if ``shard`` is not this rank's shape."""
    if not isinstance(like, DTensor):
        return shard
    shard = shard.detach()
    placements = _placements(like, leading)
    shape = (*shard.shape[:leading], *like.shape)
    expected, _ = compute_local_shape_and_global_offset(shape, like.device_mesh, placements)
    if tuple(expected) != tuple(shard.shape):
        raise ValueError(f"a state shard of shape {tuple(shard.shape)} where this rank's shard is {tuple(expected)}")
    return _dtensor(shard, like.device_mesh, placements, shape)


def saved_states(states: Mapping[str, Tensor], likes: Mapping[str, Tensor], leading: int = 0) -> dict[str, Tensor]:
    """:func:`saved_state` of each state by parameter name (states of names not in ``likes`` as they are)."""
    return {
        name: saved_state(state, likes[name], leading) if name in likes else state for name, state in states.items()
    }


def gather(tensor: Tensor) -> Tensor:
    """The full tensor of a DTensor (an all-gather: every rank calls it), on its local shard's device; any
    other tensor as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    local_tensor = tensor.to_local()
    mesh = tensor.device_mesh
    if local_tensor.device.type != mesh.device_type:  # a host-side DTensor: gather on the mesh's device
        tensor = DTensor.from_local(
            local_tensor.to(mesh.device_type), mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
        )
    return tensor.full_tensor().to(local_tensor.device)


def restored_state(state: Tensor, like: Tensor, leading: int = 0) -> Tensor:
    """This rank's shard of a restored per-element state, sharded as ``like`` (``leading`` unsharded
    dimensions in front): the local shard of a DTensor sharded that way (what :func:`restore_checkpoint`
    reads), cut from a full tensor (a single-file checkpoint), both without communication; a DTensor sharded
    otherwise is gathered first (every rank restores alike). Not sharded ``like``: the full tensor."""
    if isinstance(state, DTensor):
        if tuple(state.shape[leading:]) != tuple(like.shape):
            raise ValueError(
                f"a restored state of shape {tuple(state.shape)} for a parameter of shape {tuple(like.shape)}"
            )
        if (
            isinstance(like, DTensor)
            and state.device_mesh == like.device_mesh
            and tuple(state.placements) == _placements(like, leading)
        ):
            return state.to_local()
        state = gather(state)
    return local_shard(state, like, leading)


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


@torch.no_grad()
def load_module_state(module: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict of full tensors or DTensors (a restored checkpoint's) into a module whose parameters
    may be sharded: each rank copies its own shards (:func:`restored_state`). A module with no DTensor uses
    ``load_state_dict``."""
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
        local(tensor).copy_(restored_state(state_dict[name], tensor))


# -- checkpoints ---------------------------------------------------------------------------------------------

#: Top-level checkpoint entries the strategy itself writes sharded (or gathers): never walked here.
_STRATEGY_KEYS = ("state_dict", "optimizer_states")


def _walk(container: Any, path: tuple, visit: Callable[[Any, tuple], Any], skip: tuple = ()) -> Any:
    """``container`` with every dict value and list item replaced, depth first, by ``visit(value, path)``
    where that returns something other than ``None`` (dicts and lists are changed in place); the entries of
    ``container`` named in ``skip`` are left alone."""
    items: Iterator = iter(container.items()) if isinstance(container, dict) else iter(enumerate(container))
    for key, value in list(items):
        if key in skip:
            continue
        replaced = visit(value, (*path, str(key)))
        if replaced is not None:
            container[key] = replaced
        elif isinstance(value, (dict, list)):
            _walk(value, (*path, str(key)), visit)
    return container


def writes_distributed_checkpoint(strategy: Any) -> bool:
    """Whether ``strategy`` writes checkpoints through DCP (``ModelParallelStrategy(save_distributed_checkpoint=
    True)``, its default) rather than one file that rank 0 writes."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


def prepare_checkpoint(checkpoint: dict[str, Any], distributed: bool) -> None:
    """Make ``checkpoint`` writable by a strategy, before it writes it (every rank calls it, in the same order):
    with ``distributed`` (the strategy writes ``checkpoint["state_dict"]`` through DCP) every DTensor found
    elsewhere moves into ``checkpoint["state_dict"]`` and a record stands in its place; otherwise each is
    gathered into a full tensor (module docstring)."""
    moved: dict[str, Tensor] = {}

    def visit(value: Any, path: tuple) -> Any:
        if not isinstance(value, DTensor):
            return None
        if not distributed:
            return gather(value)
        key = DCP_PREFIX + "/".join(path)
        moved[key] = value
        names = value.device_mesh.mesh_dim_names
        return {
            RECORD_KEY: key,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "placements": [["shard", p.dim] if isinstance(p, Shard) else ["replicate"] for p in value.placements],
            "mesh_dim_names": None if names is None else list(names),
        }

    _walk(checkpoint, (), visit, skip=_STRATEGY_KEYS)
    if moved:
        checkpoint["state_dict"].update(moved)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and RECORD_KEY in value


def _mesh_for(record: Mapping[str, Any], module: torch.nn.Module) -> Any:
    """The mesh, among those of ``module``'s DTensor parameters and buffers, that a record's state is read
    onto: the one with the recorded dimension names (or, unnamed, the only one of that many dimensions)."""
    meshes = {tensor.device_mesh for tensor in [*module.parameters(), *module.buffers()] if isinstance(tensor, DTensor)}
    names = record["mesh_dim_names"]
    ndim = len(record["placements"])
    fitting = [
        mesh
        for mesh in meshes
        if mesh.ndim == ndim and (names is None or list(mesh.mesh_dim_names or ()) == list(names))
    ]
    if len(fitting) != 1:
        raise ValueError(
            f"cannot restore the sharded state {record[RECORD_KEY]!r} (saved over a {ndim}-D mesh named {names}): "
            f"the model's sharded parameters span {len(fitting)} such meshes of {len(meshes)}; the checkpoint is "
            "restored after configure_model shards the model the way it was sharded when saved"
        )
    return fitting[0]


def _template(record: Mapping[str, Any], module: torch.nn.Module) -> DTensor:
    """An empty host-side DTensor for a record, sharded as recorded over the current run's mesh."""
    mesh = _mesh_for(record, module)
    placements = tuple(Shard(kind[1]) if kind[0] == "shard" else Replicate() for kind in record["placements"])
    shape = tuple(record["shape"])
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    local_tensor = torch.empty(local_shape, dtype=getattr(torch, record["dtype"]), device="cpu")
    return _dtensor(local_tensor, mesh, placements, shape)


def restore_checkpoint(checkpoint: dict[str, Any], path: Any, module: torch.nn.Module) -> None:
    """Replace every record in a checkpoint the strategy read from ``path`` (a DCP directory) with the DTensor
    it stands for, read through DCP, each rank its own shards over ``module``'s current mesh (every rank calls
    it, after the model is sharded). A checkpoint without records is left as it is."""
    templates: dict[str, DTensor] = {}

    def visit(value: Any, _path: tuple) -> Any:
        if not _is_record(value):
            return None
        templates[value[RECORD_KEY]] = template = _template(value, module)
        return template

    _walk(checkpoint, (), visit, skip=_STRATEGY_KEYS)
    if templates:
        # The same nesting as the strategy's own save, so the keys are those DCP wrote.
        dcp.load({"state_dict": templates}, checkpoint_id=Path(path))


#: Marks a strategy whose checkpoint methods :func:`attach` wrapped.
_ATTACHED = "_lightning_converge_sharded_checkpoints"


def attach(strategy: Any) -> None:
    """Wrap ``strategy``'s ``save_checkpoint`` and ``load_checkpoint`` (once; stand-ins on the instance) with
    :func:`prepare_checkpoint` before the save and :func:`restore_checkpoint` after the load. A strategy whose
    checkpoints hold no DTensor outside its own entries sees no difference."""
    if getattr(strategy, _ATTACHED, False):
        return
    save_checkpoint, load_checkpoint = strategy.save_checkpoint, strategy.load_checkpoint

    def save(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        prepare_checkpoint(checkpoint, writes_distributed_checkpoint(strategy))
        return save_checkpoint(checkpoint, filepath, storage_options)

    def load(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = load_checkpoint(checkpoint_path, weights_only=weights_only)
        restore_checkpoint(checkpoint, checkpoint_path, strategy.lightning_module)
        return checkpoint

    strategy.save_checkpoint = save
    strategy.load_checkpoint = load
    setattr(strategy, _ATTACHED, True)


def read_checkpoint(path: Any) -> dict[str, Any]:
    """A checkpoint as one process sees it, with full tensors: a single file as ``torch.load`` reads it, or
    a distributed checkpoint directory with its model state, optimizer states and every record replaced by
    the full tensors DCP wrote (no process group needed: for inspection, conversion and tests)."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=False)
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # What torch's dcp_to_torch_save does, into memory: every tensor DCP wrote, whole.
    stored: dict[str, Any] = {}
    reader = dcp.FileSystemReader(path)
    _load_state_dict(stored, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    state_dict = stored.pop("state_dict")
    _walk(checkpoint, (), lambda value, _: state_dict[value[RECORD_KEY]] if _is_record(value) else None)
    checkpoint["state_dict"] = {key: value for key, value in state_dict.items() if not key.startswith(DCP_PREFIX)}
    checkpoint.update(stored)  # optimizer_<i>
    return checkpoint
