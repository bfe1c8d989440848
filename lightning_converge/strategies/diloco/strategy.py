"""DiLoCo over DDP: every worker holds the whole model.

:class:`DiLoCoStrategy` is a :class:`~lightning.pytorch.strategies.DDPStrategy`
(launchers, samplers, the process group and checkpoints work as for ``"ddp"``)
that does not wrap the model in ``DistributedDataParallel``:
:meth:`DiLoCoStrategy.configure_ddp`, where DDP would wrap it, instead
broadcasts rank 0's parameters and buffers, opens the exchange's own process
group for the pseudo-gradients and builds the outer state. The outer state (an
fp32 copy of the global parameters and the outer optimizer's state) lives on
``outer_state_device``, CPU by default. The all-reduce runs on the parameters'
device, in fp32 unless a ``compressor`` is given.

After every inner step the strategy counts the step, starts the syncs and
applies the outer updates the round schedule puts after it
(:mod:`~lightning_converge.strategies.diloco.schedule`), and logs
``diloco/outer_step`` (outer updates applied so far, one per fragment sync);
``comm/bytes_sent`` and ``comm/bytes_received``, the bytes of pseudo-gradient
this worker sent and received in the exchanges completed during that step (0 in
most steps), and ``comm/bytes_sent_total`` and ``comm/bytes_received_total``,
the same since training started; and ``comm/wait_seconds`` (time spent blocked,
waiting for exchanges to complete). Bytes are counted as
:mod:`~lightning_converge.strategies.diloco.exchange` says.

``delay=1`` in detail: at each outer step the worker takes its pseudo-gradient
(measured from the parameters its inner phase started from) and starts its
all-reduce, applies the previous outer step's average, which had a whole inner
phase to arrive, and starts the next inner phase from the resulting global
parameters. Every average thus reaches the global parameters exactly one outer
step late. At the first outer step there is nothing to apply yet: the next
phase goes on from where the first ended (returning to the initial parameters
would throw the first phase's progress away and send the same direction twice),
and its pseudo-gradient is measured from there, so each phase's progress is
sent once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from lightning_converge.comm import Compressor
from lightning_converge.schedules import Schedule
from lightning_converge.sharding import refuse_sharded
from lightning_converge.strategies.ddp_options import as_timedelta, check_unwrapped, reject_options
from lightning_converge.strategies.diloco.engine import DiLoCoEngine
from lightning_converge.strategies.diloco.outer import OuterOptimizerFactory
from lightning_converge.strategies.rank_state import RankStateFiles


class DiLoCoStrategy(DiLoCoEngine, RankStateFiles, DDPStrategy):
    """DiLoCo: local training for ``inner_steps`` steps, then one outer step on the averaged pseudo-gradients.

    Args:
        inner_steps: H, the inner steps between synchronizations: an int >= 1,
            or a schedule evaluated at the step each round starts (rounded to the
            nearest int). A schedule whose ``__call__`` takes ``lr``, such as
            :class:`~lightning_converge.schedules.QSR`, is also given the inner
            optimizer's current learning rate (``lr=``), which must be the same on
            every worker (any step-based lr schedule is).
        outer_optimizer: ``"nesterov"`` (SGD with Nesterov momentum, the paper's)
            or ``"sgd"`` (heavy-ball momentum), both run by the fused
            :func:`~lightning_converge.kernels.diloco_outer_step` kernel; or a
            callable taking the list of global parameters (fp32 tensors on
            ``outer_state_device``) and returning a ``torch.optim.Optimizer``,
            e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``, which then
            owns its own hyperparameters.
        outer_lr: the built-in outer optimizers' learning rate, a number or a
            schedule of the inner step. ``1.0`` with ``outer_momentum=0`` makes
            the global parameters the plain average of the local ones.
        outer_momentum: the built-in outer optimizers' momentum, in [0, 1).
        compressor: how pseudo-gradients travel: None sends them as fp32; a
            name from :data:`lightning_converge.comm.COMPRESSORS` (``"fp16"``,
            ``"bf16"``, ``"int8"``, ``"sign"``, ...) or a
            :class:`~lightning_converge.comm.Compressor` (to set its options)
            compresses them, with error feedback across outer steps when the
            compressor has it. The outer step is fp32 either way. A compressor's
            collectives block, so they run on a thread of their own to overlap
            with the inner steps.
        delay: 0 waits for each all-reduce before continuing. 1 starts it and
            goes on with the next inner phase from the newest global parameters
            without its result; the average is applied at the next outer step,
            one outer step late, when the next all-reduce starts. The all-reduce is
            then hidden behind a whole inner phase (details below).
        dynamic_inner_steps: Dynamic Local Updates (Liu et al., 2024): each round,
            worker ``i`` runs ``H_i = max(1, round(H * v_i / max_j v_j))`` real inner
            steps for the workers' speeds ``v`` measured over the last round, then
            idles (draws its batches, trains on none) until the round's H steps are
            through, so a slow worker does fewer inner steps and none waits at the
            sync. Needs ``delay=0`` and automatic optimization; see
            :mod:`~lightning_converge.strategies.diloco.dynamic` and below.
        outer_state_device: where the global parameters and the outer
            optimizer's state are kept; checked when the strategy is built (a
            ``"cuda"`` device on a machine without one raises then).
        backend: backend of the fused kernels (``"auto"``, ``"reference"``,
            ``"compiled"``, ``"triton"``), see :mod:`lightning_converge.kernels`.
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
            precision_plugin: as for :class:`~lightning.pytorch.strategies.DDPStrategy`;
            the Trainer sets them.
        process_group_backend, start_method: as for
            :class:`~lightning.pytorch.strategies.DDPStrategy`.
        timeout: seconds (or a ``timedelta``) a collective may wait before it
            fails; this is the process groups' timeout, so a worker that dies or
            hangs makes the others raise within it instead of waiting forever.
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper, the same
            argument as in the pack's other strategies. The model is not wrapped
            here, so any value other than the wrapper's default raises, as does
            a wrapper option or a DDP communication hook given as a keyword.

    Only one inner optimizer is supported.

    **Dynamic local updates** (``dynamic_inner_steps=True``). Every worker goes
    through the same H Lightning steps a round, so ``max_steps``, epochs,
    validation and checkpoints fall on the same step on every worker and every
    run ends at the same sync; a worker's steps after its ``H_i``-th are idle (no
    forward, backward or optimizer step, nor their callbacks' hooks; ``outputs``
    of ``on_train_batch_end`` are ``{"loss": nan, "idle": True}``; the
    learning-rate schedulers step, so the learning rate follows the common
    progress). The pseudo-gradients are averaged uniformly,
    as Liu et al.'s server applies every worker's alike: a slow worker's
    pseudo-gradient spans fewer steps and is already the shorter for it (weighting
    it by ``H_i`` as well would count its fewer steps twice), and with equal
    speeds the rule is plain DiLoCo. Lightning's per-batch broadcast of rank 0's
    SIGTERM flag is turned off (it would make every worker wait for the slowest at
    every step; each still stops on its own SIGTERM); a ``sync_dist`` log in
    ``training_step`` has the same effect and defeats the purpose. Each worker's
    ``H_i`` of the current round and its timing so far are in its per-rank
    checkpoint file. Logged: ``diloco/inner_steps`` (this worker's ``H_i``).

    **One model.** Between syncs each worker's parameters are its own; the
    model the workers agree on is the global parameters
    (:meth:`agreed_parameters`). Validation inside ``fit`` evaluates it
    (swapped into the module, on every worker alike; or, when a callback
    evaluates with an average of it, that average), and checkpoints save it as
    ``state_dict``. When ``fit`` ends (:meth:`finish_local_training`), in-flight
    all-reduces are applied and each fragment whose local parameters hold unsent
    progress takes one last, blocking outer step, so every worker ends with the
    same (global) parameters. EMA and LAWA average the global parameters and call
    :meth:`finish_local_training` before writing their average into the model;
    Switch EMA switches the global parameters (:meth:`move_global_parameters`).

    **Checkpoints** hold (in full: :mod:`~lightning_converge.strategies.diloco.state`),
    besides what ``"ddp"`` saves, ``checkpoint["diloco"]``:
    the global parameters, the outer optimizer's state, the position in the
    schedule and the averaged pseudo-gradients still to be applied (the strategy
    waits for in-flight all-reduces when saving); and in
    a file per worker beside the checkpoint (:mod:`~lightning_converge.strategies.rank_state`),
    each worker's local model state, inner-optimizer state and error-feedback
    residuals, and its callbacks' per-worker states (Grokfast's filter: each
    worker filters its own gradients). A run resumed from a checkpoint taken in
    the middle of an inner phase continues exactly. So does one resumed from a
    checkpoint saved after ``fit``: it holds the state kept when training ended,
    before the last sync, while its ``state_dict`` is the synced model. Resumed
    with a different number of workers, the interrupted inner phase restarts
    from the global parameters (with a warning).
    """

    # Whether the strategy accepts dynamic_inner_steps=True (one fragment, synced at the round's end).
    supports_dynamic_inner_steps = True

    def __init__(
        self,
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        outer_optimizer: Union[str, OuterOptimizerFactory] = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        delay: int = 0,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        dynamic_inner_steps: bool = False,
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
        reject_options(type(self), kwargs, wraps_model=False)
        check_unwrapped(type(self), ddp_kwargs)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=as_timedelta(timeout),
            start_method=start_method,
        )
        self._init_engine(
            inner_steps,
            outer_optimizer,
            outer_lr,
            outer_momentum,
            compressor,
            delay,
            outer_state_device,
            backend,
            dynamic_inner_steps,
        )

    # ------------------------------------------------------------------ Lightning hooks

    def configure_ddp(self) -> None:
        """Fires in ``setup`` when fitting starts, where ``DDPStrategy`` would wrap the model.

        The model stays unwrapped (no per-step gradient all-reduce). Instead:
        rank 0's parameters and buffers are broadcast, a separate process group is
        opened for the pseudo-gradients, and the outer state is built from the
        (now identical) parameters.
        """
        module = self.lightning_module
        refuse_sharded(
            module,
            type(self).__name__,
            "every worker here holds the whole model: use ShardedDiLoCoStrategy (strategy='diloco_fsdp') for "
            "DiLoCo over FSDP2 replicas",
        )
        _sync_module_states(module)
        names, params = zip(*module.named_parameters())
        self._build_engine(names, params, [p.detach() for p in params])

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Fires when a checkpoint is assembled: while the workers train local copies, the model's state
        with the global parameters in place of this worker's local ones (the model the workers agree on)."""
        agreed = self.agreed_parameters()
        if agreed is None:
            return super().lightning_module_state_dict()
        return self._module_state_with(agreed)

    def _module_state_with(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """The module's state dict with ``params`` (one per parameter, in ``module.parameters()`` order) as
        its parameters, in their dtypes."""
        state = super().lightning_module_state_dict()
        index_of = {id(p): i for i, p in enumerate(self._params)}
        for name, param in self.lightning_module.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = params[index_of[id(param)]].to(param.dtype)
        return state


    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Fires when resuming ``fit``, after ``setup``: Lightning restores the inner optimizer from
        rank 0's state, then each worker restores its own local state and the outer state."""
        super().load_optimizer_state_dict(checkpoint)
        if "diloco" in checkpoint:
            self._restore_checkpoint_state(checkpoint["diloco"])


    # ------------------------------------------------------------------ how this strategy holds the model

    def _put_in_module(self, values: Sequence[Tensor]) -> None:
        for param, value in zip(self._params, values):
            param.data = value.to(param.device, param.dtype, copy=True)

    def _put_local_back(self) -> None:
        for param, local in zip(self._params, self._local_params):
            param.data = local

    def _local_model_state(self) -> dict[str, Any]:
        return self._module_state_with(self._local_params)

    def _local_optimizer_state(self) -> dict[str, Any]:
        return self.optimizers[0].state_dict()

    def _load_local_state(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        self.lightning_module.load_state_dict(model)
        self.optimizers[0].load_state_dict(optimizer)
        _optimizer_to_device(self.optimizers[0], self.root_device)

    # ------------------------------------------------------------------ registration

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "diloco",
            cls,
            description="DiLoCo: inner optimizer alone for inner_steps steps, then an outer Nesterov step "
            "on the averaged pseudo-gradients",
            override=True,
        )

