"""What the compressed data-parallel strategies share: DDP with this pack's own communication hook."""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
from datetime import timedelta
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.comm import CommStats, Exchange, Layout
from lightning_converge.sharding import refuse_sharded
from lightning_converge.strategies.rank_state import RankStateFiles, load_rank_states, save_rank_states


def _run_comm_hook(strategy: "CommHookDDPStrategy", bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """The DDP communication hook: one bucket's gradients -> a future of their average.

    A plain average (:meth:`~lightning_converge.comm.Exchange.average_async`) is the future of an
    asynchronous all-reduce, as in torch's own ``allreduce_hook``: on GPU it
    overlaps the rest of backward. A compressor's collectives run synchronously
    inside the hook (they decode and feed error feedback between collectives) and
    return a completed future. DDP hands buckets over in the same order on every
    rank, so the ranks' collectives pair up.
    """
    buffer = bucket.buffer()
    layout = strategy.layout_of(bucket.parameters())
    if layout.numel != buffer.numel():
        raise RuntimeError(f"DDP bucket of {buffer.numel()} elements holds parameters of {layout.numel}")
    strategy.exchange.count_uncompressed(buffer)
    averaged = strategy.reduce_bucket(buffer, layout)
    if not isinstance(averaged, Tensor):  # already a future (torch._C.Future from a collective)
        return averaged
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(averaged.to(buffer.dtype))
    return future


class CommHookDDPStrategy(RankStateFiles, DDPStrategy):
    """DDP whose gradient all-reduce is replaced by :meth:`reduce_bucket`, on every device, with byte accounting.

    Lightning registers DDP communication hooks on CUDA only; this strategy
    registers its own on the wrapped module itself, so it runs on CPU and gloo too.
    Subclasses implement :meth:`reduce_bucket` and keep their per-rank state in
    :meth:`comm_state_dict` / :meth:`load_comm_state_dict`. Every collective of
    training goes through ``self.exchange``, which counts the bytes.

    When each hook fires:

    * :meth:`configure_ddp`, during ``Trainer.fit`` set-up, right after Lightning
      wraps the module in ``DistributedDataParallel``: registers the communication
      hook on the wrapped module. Before wrapping, a model whose parameters are
      sharded (DTensors: ``fully_shard`` in ``configure_model``) is refused with a
      ``ValueError`` giving the strategy's ``why_not_sharded``.
    * the communication hook, during the backward pass of each micro-batch that
      synchronizes gradients (the last of a gradient-accumulation window: Lightning
      runs the others under ``no_sync``, which communicates nothing), once per DDP
      bucket as the bucket's gradients become ready, in the same bucket order on
      every rank. Gradients there are as backward left them: unclipped, and
      under fp16 AMP still scaled.
    * :meth:`optimizer_step`, once per optimizer step after the step: logs this
      step's ``comm/bytes_sent``, ``comm/bytes_received`` and
      ``comm/compression_ratio`` (uncompressed bytes over bytes sent), and the
      run's cumulative ``comm/bytes_sent_total`` and ``comm/bytes_received_total``
      (restored on resume), through the LightningModule's ``log``, and keeps the
      step's counts in ``last_comm_stats``. Bytes are this rank's.
    * :meth:`save_checkpoint` (every rank, whenever the Trainer saves): each rank
      writes its own :meth:`comm_state_dict` (under ``checkpoint_key``), and the
      per-rank states of callbacks that follow the gradients when
      ``gradients_differ_between_ranks``, to a file beside the checkpoint
      (:mod:`lightning_converge.strategies.rank_state`), unless the checkpoint
      holds weights only.
    * :meth:`load_checkpoint` (every rank, when ``fit`` resumes from ``ckpt_path``):
      each rank reads its own file; with a different number of ranks the state
      starts afresh, with a warning.
    * :meth:`remove_checkpoint` (every rank, when ``ModelCheckpoint`` rotates
      checkpoints out): the per-rank files go with the checkpoint.

    Args:
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper
            (``find_unused_parameters``, ``bucket_cap_mb``, ``static_graph``, ...).
        The other arguments are :class:`~lightning.pytorch.strategies.DDPStrategy`'s.
    """

    checkpoint_key: ClassVar[str]
    #: Why the strategy refuses sharded (DTensor) parameters, in the error raised at set-up.
    why_not_sharded: ClassVar[str]

    def __init__(
        self,
        *,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        ddp_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **(ddp_kwargs or {}),
        )
        self.exchange = Exchange()
        self.last_comm_stats = CommStats()
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self._parameter_names: dict[int, str] = {}

    def reduce_bucket(self, buffer: Tensor, layout: Layout) -> "Tensor | torch.futures.Future[Tensor]":
        """The gradients of one DDP bucket -> what every rank uses as their average, or a future of it
        (``self.exchange.average_async``).

        ``buffer`` is this rank's flat bucket (it may be overwritten), holding the
        gradients of the parameters in ``layout``.
        """
        raise NotImplementedError

    def comm_state_dict(self) -> dict[str, Any]:
        """This rank's communication state (tensors and plain values only); subclasses add theirs."""
        return {"bytes_totals": [self.bytes_sent_total, self.bytes_received_total]}

    def load_comm_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`comm_state_dict` returned on this rank."""
        self.bytes_sent_total, self.bytes_received_total = state_dict.get("bytes_totals", (0, 0))

    @property
    def optimizer_steps_done(self) -> int:
        """Optimizer steps taken so far (``trainer.global_step``): the same on every rank, and restored on resume."""
        return self.lightning_module.trainer.global_step

    def configure_ddp(self) -> None:
        refuse_sharded(self.lightning_module, type(self).__name__, self.why_not_sharded)
        super().configure_ddp()
        self._parameter_names = {id(p): name for name, p in self.lightning_module.named_parameters()}
        self.model.register_comm_hook(self, _run_comm_hook)

    def layout_of(self, parameters: Iterable[Tensor]) -> Layout:
        """The layout of a flat buffer holding ``parameters``' gradients, named as in the LightningModule."""
        parameters = list(parameters)
        names = tuple(self._parameter_names.get(id(p), f"parameter{i}") for i, p in enumerate(parameters))
        return Layout(names, tuple(p.shape for p in parameters))

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.log_comm_stats()
        return output

    def log_comm_stats(self) -> None:
        """Log the bytes counted since the last call (one optimizer step) and start counting afresh."""
        self.last_comm_stats = stats = self.exchange.take_stats()
        self.bytes_sent_total += stats.bytes_sent
        self.bytes_received_total += stats.bytes_received
        module = self.lightning_module
        for name, value in (
            ("comm/bytes_sent", stats.bytes_sent),
            ("comm/bytes_received", stats.bytes_received),
            ("comm/compression_ratio", stats.compression_ratio),
            ("comm/bytes_sent_total", self.bytes_sent_total),
            ("comm/bytes_received_total", self.bytes_received_total),
        ):
            # float64: a float32 counts bytes exactly only up to 16 MiB.
            value = torch.tensor(value, dtype=torch.float64, device=module.device)
            module.log(name, value, on_step=True, on_epoch=False)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        if "optimizer_states" in checkpoint:  # a full checkpoint, not save_weights_only
            save_rank_states(
                self, checkpoint, filepath, {self.checkpoint_key: self.comm_state_dict()}, storage_options
            )
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = load_rank_states(self, checkpoint, checkpoint_path, weights_only).get(self.checkpoint_key)
        if state is not None:
            self.load_comm_state_dict(state)
        return checkpoint

