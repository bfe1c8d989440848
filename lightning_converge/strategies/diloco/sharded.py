"""DiLoCo over FSDP2 replicas: a 2-D device mesh, replicas x shards.

:class:`ShardedDiLoCoStrategy`, registered as ``strategy="diloco_fsdp"`` (and
:class:`ShardedStreamingDiLoCoStrategy`, ``strategy="streaming_diloco_fsdp"``, its Streaming DiLoCo), is Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy` (launchers, ``configure_model``, the
model's and the inner optimizer's checkpoints) with the DiLoCo engine
(:mod:`~lightning_converge.strategies.diloco.engine`) mixed in. The ranks form a mesh of
``replicas`` rows; each row is one replica of the model, sharded over its ranks by FSDP2. In
``configure_model`` the module shards itself over the replica's ranks, as under
``ModelParallelStrategy``::

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]   # this replica's ranks
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

(``self.device_mesh["replica"]`` holds the ranks with the same shard in every replica.) Inner steps
are FSDP2's: gradients are reduce-scattered within the replica only. Every ``inner_steps`` steps
each rank runs the outer step on its own shards: its pseudo-gradient is averaged over the ranks
that hold the same shard in the other replicas (one all-reduce on a process group of their own),
and the global parameters and the outer momentum are kept on this rank's shards too (fp32 local
tensors on ``outer_state_device``). Nothing crosses the replicas but that all-reduce.

Checkpoints: the model (the global parameters) and the inner optimizer as ``ModelParallelStrategy``
saves them (``save_distributed_checkpoint``); ``checkpoint["diloco"]`` with the global parameters,
the outer momentum and pending averages as DTensors sharded like the parameters, which
:mod:`lightning_converge.sharding`'s checkpoint mechanism writes as the distributed checkpoint's shards
(no gather; records in the metadata file) or, for a single-file checkpoint, gathers into full tensors;
either is restored onto the current run's shards. Each rank's local shards, inner-optimizer state and
fragment origins go in its own file (:mod:`~lightning_converge.strategies.rank_state`): they differ
between replicas and shards: a run on another number of ranks (another mesh) restores the global state
resharded and restarts the interrupted inner phase from it, as ``diloco`` does on another number of workers;
a run on as many ranks in another mesh is refused when it resumes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from lightning_converge.checks import check_int
from lightning_converge.comm import Compressor
from lightning_converge.schedules import Schedule
from lightning_converge.sharding import (
    full,
    local,
    prepare_checkpoint,
    reshard,
    restore_checkpoint,
    restored_state,
    saved_state,
    writes_distributed_checkpoint,
)
from lightning_converge.strategies.ddp_options import as_timedelta, reject_options
from lightning_converge.strategies.diloco.engine import DiLoCoEngine
from lightning_converge.strategies.diloco.fragments import Fragment, Piece
from lightning_converge.strategies.diloco.outer import BUILT_IN_OUTER_OPTIMIZERS
from lightning_converge.strategies.diloco.streaming import set_streaming_options
from lightning_converge.strategies.rank_state import RankStateFiles

#: Names of the mesh's dimensions: the replicas, and the ranks one replica is sharded over.
MESH_DIMS = ("replica", "data_parallel")


class _ShardedStateCheckpoints:
    """Mixin between the DiLoCo engine and ``ModelParallelStrategy`` (the engine's ``save_checkpoint`` adds
    ``checkpoint["diloco"]``, with DTensors, before it calls this one): the checkpoint prepared and restored
    with :func:`~lightning_converge.sharding.prepare_checkpoint` / :func:`~lightning_converge.sharding.
    restore_checkpoint` around ``ModelParallelStrategy``'s write and read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Fires on every rank when a checkpoint is saved, after the engine added its state: the DTensors in it
        go into the distributed checkpoint's shards, or are gathered for a single-file checkpoint."""
        prepare_checkpoint(checkpoint, writes_distributed_checkpoint(self))
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Fires on every rank when ``fit`` resumes, after ``setup``: what ``ModelParallelStrategy`` read, with
        the sharded state read from the distributed checkpoint's shards onto this run's mesh."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        restore_checkpoint(checkpoint, checkpoint_path, self.lightning_module)
        return checkpoint


class ShardedDiLoCoStrategy(DiLoCoEngine, RankStateFiles, _ShardedStateCheckpoints, ModelParallelStrategy):
    """DiLoCo whose replicas are each sharded with FSDP2: inner steps sharded within a replica, the outer
    step on each rank's shards, averaged across the replicas only.

    Args:
        replicas: the number of replicas (DiLoCo's workers); the ranks, ``devices * num_nodes``, are split
            into ``replicas`` consecutive groups of equal size, each sharding one replica. ``"auto"``: one
            replica per node.
        inner_steps, outer_lr, outer_momentum, compressor, delay, outer_state_device, backend: as for
            :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy`; the outer state lives on each
            rank's shards (the ``outer_state_device`` of those shards).
        outer_optimizer: ``"nesterov"`` or ``"sgd"`` (the fused outer step, which runs on shards alike);
            a ``torch.optim`` factory is not supported here (its state could not be gathered for checkpoints).
        save_distributed_checkpoint, process_group_backend: as for
            :class:`~lightning.pytorch.strategies.ModelParallelStrategy`.
        timeout: seconds (or a ``timedelta``) a collective may wait before it fails.

    The module must shard every parameter over ``self.device_mesh["data_parallel"]`` in
    ``configure_model`` (checked when fitting starts). Each rank reads its own part of the data
    (``replicas x shards`` parts, as under DDP on as many processes). Validation, the end of ``fit``, EMA and
    LAWA (averaging the global parameters, here on the shards) and checkpoints behave as under
    :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy` (see there; the checkpoint layout is in this
    module's docstring).
    """

    def __init__(
        self,
        replicas: Union[int, Literal["auto"]] = "auto",
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        outer_optimizer: str = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        delay: int = 0,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        *,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        reject_options(type(self), kwargs, wraps_model=False)
        if replicas != "auto":
            check_int("replicas", replicas, 1, owner=owner)
        if not isinstance(outer_optimizer, str):
            raise ValueError(
                f"{owner}: outer_optimizer must be one of {sorted(BUILT_IN_OUTER_OPTIMIZERS)} (the fused outer "
                f"step on each rank's shards), got {outer_optimizer!r}"
            )
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=as_timedelta(timeout),
        )
        self._init_engine(
            inner_steps, outer_optimizer, outer_lr, outer_momentum, compressor, delay, outer_state_device, backend
        )
        self._replicas = replicas
        # The shards' storages while evaluation puts the global parameters in them (``_local_params`` then
        # holds copies of the local values).
        self._shard_views: list[Tensor] = []

    # ------------------------------------------------------------------ the mesh

    @property
    def replicas(self) -> int:
        """The number of replicas (``"auto"``: the number of nodes)."""
        return self.num_nodes if self._replicas == "auto" else self._replicas

    def _check_mesh(self, world_size: int) -> None:
        if world_size % self.replicas:
            raise ValueError(
                f"{type(self).__name__}: replicas={self.replicas} does not divide the {world_size} processes "
                f"(devices x num_nodes): every replica must be sharded over the same number of ranks"
            )

    def _configure_launcher(self) -> None:
        """Fires when the Trainer is built, once it has given the strategy its devices: checks the mesh."""
        self._check_mesh(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        """Fires in every process before ``configure_model``: the process group and the replicas x shards
        mesh, which ``configure_model`` reads as ``self.device_mesh``."""
        self._setup_distributed()
        self._check_mesh(self.world_size)
        shape = (self.replicas, self.world_size // self.replicas)
        self._device_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=MESH_DIMS)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank reads its own part of the data: replicas x shards parts."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def _replica_groups(self) -> list[list[int]]:
        """The ranks that hold the same shard, one list per shard: the columns of the mesh."""
        return self.device_mesh.mesh.t().tolist()

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Any) -> None:
        """Fires once per ``fit``/``validate``/...: ``ModelParallelStrategy``'s setup; when fitting, the
        one-optimizer check, the check that every parameter is sharded within its replica, replica 0's
        shards copied to the other replicas, and the engine built on this rank's shards."""
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        module = self.lightning_module
        self._check_sharded_within_replicas(module)
        replica_group = self.device_mesh.get_group("replica")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if isinstance(tensor, DTensor):  # this rank's shard, from the same shard of replica 0
                    dist.broadcast(local(tensor), group=replica_group, group_src=0)
                else:
                    dist.broadcast(tensor.detach(), src=0)
        names, params = zip(*module.named_parameters())
        self._build_engine(names, params, [local(p) for p in params], self._replica_groups())

    def _check_sharded_within_replicas(self, module: torch.nn.Module) -> None:
        shard_mesh: DeviceMesh = self.device_mesh["data_parallel"]
        wrong = [
            name
            for name, p in module.named_parameters()
            if not isinstance(p, DTensor) or p.device_mesh.mesh.tolist() != shard_mesh.mesh.tolist()
        ]
        if wrong:
            raise ValueError(
                f"{type(self).__name__} trains each replica sharded over its own ranks, but {wrong[:3]} "
                f"({len(wrong)} parameters) are not sharded over self.device_mesh['data_parallel']: call "
                "fully_shard(..., mesh=self.device_mesh['data_parallel']) on the whole model in configure_model"
            )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Fires when a checkpoint is assembled: ``ModelParallelStrategy``'s state dict (sharded, or full on
        rank 0), with the global parameters in place of this rank's local ones while the replicas train."""
        state = super().lightning_module_state_dict()
        agreed = self.agreed_parameters()
        if agreed is None:
            return state
        for (name, param), value in zip(self.lightning_module.named_parameters(), agreed):
            value = value.to(local(param).device, param.dtype)
            if self._save_distributed_checkpoint:
                saved = state[name]
                state[name] = DTensor.from_local(
                    value.to(saved.device),
                    saved.device_mesh,
                    saved.placements,
                    shape=saved.shape,
                    stride=saved.stride(),
                )
            else:
                gathered = full(value, param)  # a collective: every rank gathers, rank 0 keeps it
                if name in state:
                    state[name] = gathered.cpu()
        return state

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Fires on every rank when ``fit`` resumes, after ``setup`` (``ModelParallelStrategy`` restores the
        model and the inner optimizer here, and Lightning calls no ``load_optimizer_state_dict`` after it):
        then this worker's own state and the outer state."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if "diloco" in checkpoint:
            self._restore_checkpoint_state(checkpoint["diloco"])
        return checkpoint

    # ------------------------------------------------------------------ checkpoints: sharded state

    def _shared_state(self) -> dict[str, Any]:
        """The engine's shared state with the outer state's shards as DTensors sharded like the parameters
        (views: no copy, no communication; the replicas hold the same values)."""
        state = super()._shared_state()
        state["global_params"] = self._saved(state["global_params"])
        buffers = state["outer_optimizer"]["momentum_buffers"]
        state["outer_optimizer"] = {"momentum_buffers": self._saved(buffers)}
        for fragment, saved in zip(self._fragments, state["fragments"]):
            saved["pieces"] = self._whole_pieces(fragment)
            if saved["pending_average"] is not None:
                shards = self._pieces(fragment)
                parts = saved["pending_average"].split([shard.numel() for shard in shards])
                saved["pending_average"] = [
                    saved_state(part.view_as(shard), self._params[index])
                    for part, shard, (index, _, _) in zip(parts, shards, fragment.pieces)
                ]
        return state

    def _restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        self._check_saved_mesh(state.get("worker"))
        state = dict(state)
        state["global_params"] = self._restored(state["global_params"])
        state["outer_optimizer"] = {"momentum_buffers": self._restored(state["outer_optimizer"]["momentum_buffers"])}
        fragments = [dict(saved) for saved in state["fragments"]]
        for fragment, saved in zip(self._fragments, fragments):
            if [tuple(piece) for piece in saved["pieces"]] == self._whole_pieces(fragment):
                saved["pieces"] = fragment.pieces  # else the engine says how the fragments differ
            if saved["pending_average"] is not None:
                shards = [
                    restored_state(tensor, self._params[index])
                    for tensor, (index, _, _) in zip(saved["pending_average"], fragment.pieces)
                ]
                saved["pending_average"] = torch.cat([shard.reshape(-1) for shard in shards])
        state["fragments"] = fragments
        super()._restore_checkpoint_state(state)
        worker = state.get("worker")
        if worker is not None:  # each rank sends its own shards' bytes
            self._exchange.bytes_sent, self._exchange.bytes_received = worker["bytes"]

    def _worker_state(self) -> dict[str, Any]:
        return {
            **super()._worker_state(),
            "bytes": (self._exchange.bytes_sent, self._exchange.bytes_received),
            "mesh": tuple(self.device_mesh.shape),
        }

    def _check_saved_mesh(self, worker: Optional[Mapping[str, Any]]) -> None:
        """Refuse this rank's saved local state (read because the number of ranks is the same) if the mesh that
        saved it was another: its local shards and inner-optimizer state belong to another replica's shards.
        (On another number of ranks there is no such state: the outer state is restored resharded.)"""
        mesh = tuple(self.device_mesh.shape)
        saved = tuple(worker.get("mesh", mesh)) if worker is not None else mesh
        if saved != mesh:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was saved by {saved[0]} replicas x {saved[1]} shards and is "
                f"resumed as {mesh[0]} x {mesh[1]} on as many ranks: each rank's saved local shards and "
                f"inner-optimizer state cannot be matched to this mesh. Resume with replicas={saved[0]}, or on "
                "another number of ranks (the global state is restored, resharded, and the interrupted inner "
                "phase restarts from it)"
            )

    def _saved(self, shards: Sequence[Tensor]) -> list[Tensor]:
        return [saved_state(shard, param) for shard, param in zip(shards, self._params)]

    def _restored(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [restored_state(tensor, param) for tensor, param in zip(tensors, self._params)]

    def _pieces(self, fragment: Fragment) -> list[Tensor]:
        """The fragment's local tensors (its pieces are whole shards: the fragments here are by layer)."""
        return [self._local_params[index] for index, _, _ in fragment.pieces]

    def _whole_pieces(self, fragment: Fragment) -> list[Piece]:
        """The fragment's pieces as whole parameters, as the checkpoint records them (the same on every rank)."""
        return [(index, 0, self._params[index].numel()) for index, _, _ in fragment.pieces]

    # ------------------------------------------------------------------ how this strategy holds the model

    @torch.no_grad()
    def _put_in_module(self, values: Sequence[Tensor]) -> None:
        reshard(self.lightning_module)  # no gathered copy may outlive the shards' new values
        self._shard_views = self._local_params
        self._local_params = [shard.clone() for shard in self._shard_views]
        for shard, value in zip(self._shard_views, values):
            shard.copy_(value)

    @torch.no_grad()
    def _put_local_back(self) -> None:
        reshard(self.lightning_module)
        for shard, value in zip(self._shard_views, self._local_params):
            shard.copy_(value)
        self._local_params, self._shard_views = self._shard_views, []

    def _local_model_state(self) -> dict[str, Any]:
        module = self.lightning_module
        params = {name: value for (name, _), value in zip(module.named_parameters(), self._local_params)}
        return {**params, **{name: local(buffer) for name, buffer in module.named_buffers()}}

    def _local_optimizer_state(self) -> dict[str, Any]:
        """The inner optimizer's state with its DTensors as this rank's shards (``"sharded"`` lists them)."""
        state = self.optimizers[0].state_dict()
        sharded = [
            (index, key)
            for index, values in state["state"].items()
            for key, value in values.items()
            if isinstance(value, DTensor)
        ]
        local_state = {
            index: {key: local(value) for key, value in values.items()} for index, values in state["state"].items()
        }
        return {**state, "state": local_state, "sharded": sharded}

    @torch.no_grad()
    def _load_local_state(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        module = self.lightning_module
        reshard(module)
        named = dict(module.named_parameters())
        for (name, _), value in zip(named.items(), self._local_params):
            value.copy_(model[name])
        for name, buffer in module.named_buffers():
            local(buffer).copy_(model[name])
        params = [p for group in self.optimizers[0].param_groups for p in group["params"]]
        state = {index: dict(values) for index, values in optimizer["state"].items()}
        for index, key in optimizer["sharded"]:
            param = params[index]
            state[index][key] = DTensor.from_local(
                state[index][key].to(local(param).device),
                param.device_mesh,
                param.placements,
                shape=param.shape,
                stride=param.stride(),
            )
        self.optimizers[0].load_state_dict({"state": state, "param_groups": optimizer["param_groups"]})
        _optimizer_to_device(self.optimizers[0], self.root_device)

    # ------------------------------------------------------------------ registration

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "diloco_fsdp",
            cls,
            description="DiLoCo over FSDP2 replicas: each replica sharded within its ranks, the outer step on "
            "each rank's shards averaged across the replicas",
            override=True,
        )


class ShardedStreamingDiLoCoStrategy(ShardedDiLoCoStrategy):
    """Streaming DiLoCo over FSDP2 replicas: :class:`ShardedDiLoCoStrategy` whose parameters synchronize in
    fragments, in turn, overlapped with the inner steps (registered as ``strategy="streaming_diloco_fsdp"``).

    Args:
        num_fragments, overlap_steps, mixing_alpha, fragment_assignment: as for
            :class:`~lightning_converge.strategies.diloco.StreamingDiLoCoStrategy`, by layer only
            (``"strided"`` or ``"contiguous"``, weighed by the whole parameters' sizes, so every rank assigns
            alike): ``"balanced"`` cuts the flattened tensors into runs, which on shards would be other
            elements on every rank.

    The other arguments are :class:`ShardedDiLoCoStrategy`'s, without ``delay`` (``overlap_steps`` is the
    overlap here).
    """

    def __init__(
        self,
        replicas: Union[int, Literal["auto"]] = "auto",
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        num_fragments: int = 4,
        overlap_steps: int = 1,
        mixing_alpha: float = 0.5,
        fragment_assignment: str = "strided",
        outer_optimizer: str = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        *,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            replicas,
            inner_steps,
            outer_optimizer,
            outer_lr,
            outer_momentum,
            compressor,
            0,  # overlap_steps is the overlap here
            outer_state_device,
            backend,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
            **kwargs,
        )
        if fragment_assignment == "balanced":
            raise ValueError(
                f"{type(self).__name__}: fragment_assignment must be 'strided' or 'contiguous', got 'balanced', "
                "which cuts the flattened parameters into runs: on shards, other elements on every rank"
            )
        set_streaming_options(
            self, inner_steps, num_fragments, overlap_steps, mixing_alpha, fragment_assignment, outer_optimizer
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "streaming_diloco_fsdp",
            cls,
            description="Streaming DiLoCo over FSDP2 replicas: fragments synchronized in turn, each rank's shards "
            "averaged across the replicas",
            override=True,
        )
