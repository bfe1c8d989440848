"""Compressed data parallelism: DDP whose gradient all-reduce sends compressed gradients."""

# No ``from __future__ import annotations``: jsonargparse (LightningCLI) reads the signature's types.
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge import comm
from lightning_converge.checks import check_int
from lightning_converge.comm import COMPRESSORS, Compressor, Layout, ScaledReduce, compressor_options, make_compressor
from lightning_converge.strategies.comm_hook import CommHookDDPStrategy
from lightning_converge.strategies.ddp_options import reject_options

# Registered names -> compressor. "ddp_compressed" takes the default compressor.
_ALIASES = {
    "ddp_int8": "int8",
    "ddp_sign": "sign",
    "ddp_powersgd": "powersgd",
    "ddp_topk": "topk",
    "ddp_fp16": "fp16",
}


class CompressedDDPStrategy(CommHookDDPStrategy):
    """DDP that averages gradients through a compressor from :mod:`lightning_converge.comm`.

    Registered as ``strategy="ddp_compressed"`` (int8), and ``"ddp_int8"``,
    ``"ddp_sign"``, ``"ddp_powersgd"``, ``"ddp_topk"``, ``"ddp_fp16"`` (those
    compressors with their defaults), on ``import lightning_converge``.

    Args:
        compressor: ``"none"`` (plain DDP: every bucket is averaged in its own dtype,
            with the same arithmetic as DDP's built-in all-reduce, so parameters
            match ``strategy="ddp"`` exactly); a name from
            :data:`lightning_converge.comm.COMPRESSORS` (``"fp16"``, ``"bf16"``,
            ``"int8"``, ``"sign"``, ``"ternary"``, ``"topk"``, ``"powersgd"``,
            ``"onebit"``, or one added with
            :func:`~lightning_converge.comm.register_compressor`), with its default
            options; or a :class:`~lightning_converge.comm.Compressor` instance with
            yours, e.g. ``PowerSGDCompressor(rank=4)``, in YAML
            ``compressor: {class_path: lightning_converge.comm.PowerSGDCompressor, init_args: {rank: 4}}``.
        start_step: optimizer steps of plain averaging before compression starts
            (PowerSGD's paper and torch's hook warm up this way). Compressors that
            count steps (``topk``'s sparsity warm-up) count from here.
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper
            (``find_unused_parameters``, ``bucket_cap_mb``, ``static_graph``, ...).
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
        precision_plugin, process_group_backend, timeout, start_method:
            :class:`~lightning.pytorch.strategies.DDPStrategy`'s.
        **kwargs: taken only to explain mistakes: a compressor option (``rank=4``)
            or a DDP wrapper option (``find_unused_parameters=True``) given here
            raises a ``TypeError`` that says where it goes; anything else raises
            as unknown, with the closest valid name.

    An unknown compressor or option, or an option out of range, raises here,
    before any training.

    When each hook fires: see :class:`~lightning_converge.strategies.comm_hook.CommHookDDPStrategy`.
    The communication hook compresses each bucket (fp32 math whatever the
    gradients' dtype), exchanges it and hands back the average; each rank keeps
    its own error-feedback residuals and compressor state, which it writes to its
    own file beside the checkpoint (key ``"compressed_ddp"``, see
    :mod:`~lightning_converge.strategies.rank_state`) so that
    a resumed run continues exactly. Gradient accumulation communicates once per optimizer step, and
    ``precision="bf16-mixed"`` compresses the fp32 gradients of the fp32 parameters.
    Under ``precision="16-mixed"`` with a gradient scaler, the hook compresses
    unscaled gradients and overflow steps leave the compressor untouched
    (:class:`~lightning_converge.comm.ScaledReduce`); :meth:`optimizer_step`
    then keeps or restores the step's compressor state.
    """

    checkpoint_key = "compressed_ddp"

    def __init__(
        self,
        compressor: Union[str, Compressor] = "int8",
        start_step: int = 0,
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
        **kwargs: Any,
    ) -> None:
        self.compressor = _resolve_compressor(compressor, kwargs)
        reject_options(type(self), kwargs)
        self.start_step = check_int("start_step", start_step, 0, owner=type(self).__name__)
        self._scaled_reduce = None if self.compressor is None else ScaledReduce(self.compressor)
        self._loss_scale: tuple[int, float] = (-1, 1.0)  # (step, the scaler's scale during that step)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            ddp_kwargs=ddp_kwargs,
        )

    def reduce_bucket(self, buffer: Tensor, layout: Layout) -> "Tensor | torch.futures.Future[Tensor]":
        step = self.optimizer_steps_done - self.start_step
        if self.compressor is None or step < 0:
            return self.exchange.average_async(buffer)  # overlaps backward, as DDP's own all-reduce
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None:
            return self.compressor.reduce(buffer.float(), layout, self.exchange, step)
        return self._scaled_reduce.reduce(buffer.float(), layout, self.exchange, step, self._scale_of_step(scaler))

    def _scale_of_step(self, scaler: Any) -> float:
        """The loss scale of this step's backward pass, read once per step (``get_scale`` synchronizes)."""
        step = self.optimizer_steps_done
        if self._loss_scale[0] != step:
            self._loss_scale = (step, float(scaler.get_scale()))
        return self._loss_scale[1]

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._scaled_reduce is not None:
            self._scaled_reduce.finish_step()
        return output

    def comm_state_dict(self) -> dict[str, Any]:
        state = super().comm_state_dict()
        if self.compressor is not None:
            state["compressor"] = self.compressor.state_dict()
        return state

    def load_comm_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_comm_state_dict(state_dict)
        if self.compressor is not None and "compressor" in state_dict:
            self.compressor.load_state_dict(state_dict["compressor"])

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "ddp_compressed", cls, description="DDP with int8 gradient compression and error feedback", override=True
        )
        for name, compressor in _ALIASES.items():
            description = f"DDP with {compressor} gradient compression"
            strategy_registry.register(name, cls, description=description, override=True, compressor=compressor)


CompressedDDPStrategy.register_strategies(StrategyRegistry)


def _resolve_compressor(compressor: Union[str, Compressor], strategy_kwargs: dict[str, Any]) -> Optional[Compressor]:
    """The compressor ``compressor`` stands for (None for ``"none"``). A compressor option among the
    strategy's keyword arguments raises a ``TypeError`` that shows the instance form."""
    if isinstance(compressor, Compressor):
        cls = type(compressor)
    elif isinstance(compressor, str) and (compressor == "none" or compressor in COMPRESSORS):
        cls = COMPRESSORS.get(compressor)
    else:
        raise ValueError(
            f"compressor must be 'none', a name from {sorted(COMPRESSORS)} or a "
            f"lightning_converge.comm.Compressor instance, got {compressor!r}"
        )
    candidates = [cls] if cls is not None else list(COMPRESSORS.values())
    options = {
        name: value
        for name, value in strategy_kwargs.items()
        if any(name in compressor_options(candidate) for candidate in candidates)
    }
    if options and cls is None:
        raise TypeError(f"compressor='none' (plain DDP) takes no compressor options, got {sorted(options)}")
    if options:
        module = "lightning_converge.comm" if getattr(comm, cls.__name__, None) is cls else cls.__module__
        arguments = ", ".join(f"{name}={value!r}" for name, value in options.items())
        init_args = ", ".join(f"{name}: {value!r}" for name, value in options.items())
        raise TypeError(
            f"{', '.join(map(repr, options))} {'is an option' if len(options) == 1 else 'are options'} of the "
            f"compressor, not of CompressedDDPStrategy: pass compressor={cls.__name__}({arguments}) "
            f"(YAML: compressor: {{class_path: {module}.{cls.__qualname__}, init_args: {{{init_args}}}}})"
        )
    if cls is None:
        return None
    return compressor if isinstance(compressor, Compressor) else make_compressor(compressor)
