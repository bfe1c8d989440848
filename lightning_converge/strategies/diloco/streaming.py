"""Streaming DiLoCo ("Streaming DiLoCo with overlapping communication", Douillard et al., 2025).

:class:`StreamingDiLoCoStrategy`, registered as ``strategy="streaming_diloco"``, is
:class:`~lightning_converge.strategies.diloco.DiLoCoStrategy`'s engine with more
than one fragment (:mod:`~lightning_converge.strategies.diloco.fragments`), an
overlap of ``overlap_steps`` inner steps between a fragment's sync and the
application of its average, and ``mixing_alpha`` mixing of the new global values
into the local ones; this module holds only its options (:func:`set_streaming_options`, shared with
:class:`~lightning_converge.strategies.diloco.ShardedStreamingDiLoCoStrategy`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision

from lightning_converge.checks import check_choice, check_int, check_probability
from lightning_converge.comm import Compressor
from lightning_converge.schedules import Schedule
from lightning_converge.strategies.diloco.engine import DiLoCoEngine
from lightning_converge.strategies.diloco.fragments import FRAGMENT_ASSIGNMENTS
from lightning_converge.strategies.diloco.outer import BUILT_IN_OUTER_OPTIMIZERS, OuterOptimizerFactory
from lightning_converge.strategies.diloco.strategy import DiLoCoStrategy


def set_streaming_options(
    strategy: DiLoCoEngine,
    inner_steps: Union[int, Schedule, Callable[[int], float]],
    num_fragments: int,
    overlap_steps: int,
    mixing_alpha: float,
    fragment_assignment: str,
    outer_optimizer: Union[str, OuterOptimizerFactory],
) -> None:
    """Check Streaming DiLoCo's options (a clear error naming the argument) and give them to ``strategy``'s
    engine; called by the streaming strategies' ``__init__`` after the engine's options are set."""
    owner = type(strategy).__name__
    check_int("num_fragments", num_fragments, 1, owner=owner)
    check_int("overlap_steps", overlap_steps, 0, owner=owner)
    check_probability("mixing_alpha", mixing_alpha, owner=owner)
    check_choice("fragment_assignment", fragment_assignment, FRAGMENT_ASSIGNMENTS, owner=owner)
    if fragment_assignment == "balanced" and not isinstance(outer_optimizer, str):
        raise ValueError(
            "fragment_assignment='balanced' cuts tensors into parts, which a torch.optim outer optimizer "
            f"cannot step one at a time: use outer_optimizer in {tuple(BUILT_IN_OUTER_OPTIMIZERS)}"
        )
    strategy._schedule.num_fragments = num_fragments
    strategy._schedule.overlap_steps = overlap_steps
    strategy._mixing_alpha = float(mixing_alpha)
    strategy._fragment_assignment = fragment_assignment
    if not callable(inner_steps):
        strategy._schedule.check_round_length(inner_steps)


class StreamingDiLoCoStrategy(DiLoCoStrategy):
    """Streaming DiLoCo: fragments of the parameters synchronize in turn, overlapped with training.

    Args:
        inner_steps: H, the steps between two syncs of the same fragment (an int
            or a schedule, as for :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy`).
        num_fragments: F, how many fragments the parameter tensors are split
            into; fragment ``f`` syncs ``(f + 1) * H // F`` steps into each round of
            H steps. At most the number of parameter tensors, and at most H.
        overlap_steps: tau, the inner steps between the start of a fragment's
            all-reduce and the application of its result; must be smaller than
            the per-fragment period ``H // F``, so one all-reduce is in flight at
            a time.
        mixing_alpha: when a fragment's new global value arrives, its local
            parameters become ``mixing_alpha * local + (1 - mixing_alpha) *
            global``: 0 replaces them (plain DiLoCo), larger values keep some of
            the ``overlap_steps`` of local progress made while the all-reduce ran.
        fragment_assignment: by layer (the entries of ``nn.ModuleList`` /
            ``nn.Sequential`` containers): ``"strided"`` puts layer ``l`` in
            fragment ``l % F`` (the paper's choice: each fragment spans the depth
            of the network); ``"contiguous"`` gives each fragment a run of
            consecutive layers. Tensors outside the layers (embeddings, head) go
            to the lightest fragments; see
            :func:`~lightning_converge.strategies.diloco.assign_fragments`. Whole
            tensors cannot always make equal fragments (a GPT's embeddings and
            head add to one block's bytes): ``"balanced"`` cuts the parameters,
            laid end to end, into F equal runs
            (:func:`~lightning_converge.strategies.diloco.split_evenly`), so each
            sync sends 1/F of the bytes; it needs a built-in ``outer_optimizer``.

    The other arguments are :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy`'s, without ``delay``
    (``overlap_steps`` is the overlap here). The outer state stays fp32 whatever
    the ``compressor`` does to the exchanged pseudo-gradients.
    """

    # Fragments sync at different steps of a round, with overlap: dynamic local updates are DiLoCo's only.
    supports_dynamic_inner_steps = False

    def __init__(
        self,
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        num_fragments: int = 4,
        overlap_steps: int = 1,
        mixing_alpha: float = 0.5,
        fragment_assignment: str = "strided",
        outer_optimizer: Union[str, OuterOptimizerFactory] = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        *,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            inner_steps=inner_steps,
            outer_optimizer=outer_optimizer,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            compressor=compressor,
            delay=0,  # overlap_steps is the overlap here
            outer_state_device=outer_state_device,
            backend=backend,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            ddp_kwargs=ddp_kwargs,
            **kwargs,
        )
        set_streaming_options(
            self, inner_steps, num_fragments, overlap_steps, mixing_alpha, fragment_assignment, outer_optimizer
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "streaming_diloco",
            cls,
            description="Streaming DiLoCo: parameter fragments synchronized in turn, overlapped with inner steps",
            override=True,
        )
