"""The DiLoCo engine: what every synchronous DiLoCo strategy does, whatever holds the model.

:class:`DiLoCoEngine` is a mixin for a Lightning strategy. It holds the inner
steps' schedule, the syncs of the fragments, the outer updates, the end of
``fit``, evaluation with the global parameters and the checkpoint state; the
strategy it is mixed into (before the Lightning strategy among the bases)
provides the processes, the model and its checkpoints:

* :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy` over
  ``DDPStrategy``: every worker holds the whole model;
* :class:`~lightning_converge.strategies.diloco.ShardedDiLoCoStrategy` over
  ``ModelParallelStrategy``: every replica shards the model with FSDP2, and
  each rank runs the engine on its own shards.

The engine works on *local tensors*: one per parameter, in
``module.parameters()`` order, the tensor the inner optimizer writes (the
parameter itself, or this rank's shard of it). The strategy gives them to
:meth:`DiLoCoEngine._build_engine` when fitting starts, and implements the few
methods that depend on how the model is held (marked "Provided by the
strategy" below): putting other values into the model for evaluation and back,
and this worker's model and inner-optimizer state in checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.checks import check_choice
from lightning_converge.comm import Compressor
from lightning_converge.kernels import ema_update
from lightning_converge.kernels.dispatch import ScalarSlots, validate_backend
from lightning_converge.schedules import Schedule, as_schedule
from lightning_converge.strategies.diloco.dynamic import DynamicInnerSteps, disable_sigterm_broadcast
from lightning_converge.strategies.diloco.exchange import PendingSync, PseudoGradientExchange, as_compressor
from lightning_converge.strategies.diloco.fragments import Fragment, build_fragments, pieces_of
from lightning_converge.strategies.diloco.outer import (
    OuterOptimizerFactory,
    OuterState,
    available_device,
    check_outer_options,
    pseudo_gradient,
)
from lightning_converge.strategies.diloco.schedule import RoundSchedule
from lightning_converge.strategies.diloco.state import (
    restore_shared_state,
    restore_worker_state,
    shared_state,
    worker_state,
)
from lightning_converge.strategies.rank_state import cpu_copy, load_rank_states, save_rank_states


class DiLoCoEngine:
    """DiLoCo's engine, mixed into a Lightning strategy: see the module's docstring.

    The strategy's ``__init__`` calls :meth:`_init_engine` with the DiLoCo options (documented in
    :class:`~lightning_converge.strategies.diloco.DiLoCoStrategy`), and its ``setup``, when fitting
    starts, :meth:`_build_engine` with the model's parameters and their local tensors.
    """

    # Workers step on their own gradients: Grokfast's state is saved per worker (see rank_state).
    gradients_differ_between_ranks = True
    # Whether the strategy accepts dynamic_inner_steps=True (one fragment, synced at the round's end).
    supports_dynamic_inner_steps = False

    def _init_engine(
        self,
        inner_steps: Union[int, Schedule, Callable[[int], float]],
        outer_optimizer: Union[str, OuterOptimizerFactory],
        outer_lr: Union[float, Schedule],
        outer_momentum: float,
        compressor: Union[str, Compressor, None],
        delay: int,
        outer_state_device: Union[str, torch.device],
        backend: str,
        dynamic_inner_steps: bool = False,
    ) -> None:
        """Check the DiLoCo options (a clear error naming the argument) and keep them; called by the
        strategy's ``__init__``."""
        check_outer_options(outer_optimizer, outer_lr, outer_momentum)
        check_choice("delay", delay, (0, 1), owner=type(self).__name__)  # outer steps the outer update lags
        check_choice("dynamic_inner_steps", dynamic_inner_steps, (False, True), owner=type(self).__name__)
        if dynamic_inner_steps and not self.supports_dynamic_inner_steps:
            raise ValueError(f"{type(self).__name__} does not support dynamic_inner_steps: use DiLoCoStrategy")
        if dynamic_inner_steps and delay:
            raise ValueError(
                "dynamic_inner_steps=True needs delay=0: each round's inner steps come from the speeds that "
                "travel with the sync before it, which delay=1 does not wait for"
            )
        compressor = as_compressor(compressor)
        # A DiLoCo round is one fragment, applied at once, replacing the local values (Streaming sets its own).
        self._schedule = RoundSchedule(as_schedule(inner_steps, "inner_steps"))
        self._outer_optimizer_spec = outer_optimizer
        self._outer_lr = as_schedule(outer_lr, "outer_lr")
        self._outer_momentum = float(outer_momentum)
        self._exchange = PseudoGradientExchange(compressor, owner=type(self).__name__)
        self._delay = delay
        self._outer_device = available_device(outer_state_device, "outer_state_device")
        self._backend = validate_backend(backend)
        # The mixing decay on the local parameters' device, refilled at each pull; an idle step's loss (nan).
        self._scalars = ScalarSlots()
        self._mixing_alpha = 0.0
        self._fragment_assignment = "contiguous"
        # This worker's inner steps in the current round and its speed (dynamic local updates), or None.
        self._dynamic = DynamicInnerSteps() if dynamic_inner_steps else None
        if not callable(inner_steps):
            self._schedule.check_round_length(inner_steps)

        # Set up by _build_engine when fitting starts.
        self._params: list[torch.nn.Parameter] = []
        self._local_params: list[Tensor] = []
        self._outer: Optional[OuterState] = None
        self._fragments: list[Fragment] = []
        # Whether the module holds the global parameters for evaluation (its local ones: `_local_params`).
        self._evaluating_global = False
        # (shared state, this worker's state) kept by finish_local_training for checkpoints saved after fit.
        self._state_at_train_end: Optional[tuple[dict[str, Any], dict[str, Any]]] = None

    # ------------------------------------------------------------------ public read-outs

    @property
    def outer_steps(self) -> int:
        """Outer updates applied so far (one per fragment sync)."""
        return 0 if self._outer is None else self._outer.steps

    @property
    def bytes_sent(self) -> int:
        """Bytes of pseudo-gradient this worker has sent in the exchanges completed so far."""
        return self._exchange.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes of averaged pseudo-gradient this worker has received in the exchanges completed so far."""
        return self._exchange.bytes_received

    @property
    def wait_seconds(self) -> float:
        """Seconds this worker has spent blocked, waiting for exchanges to complete."""
        return self._exchange.wait_seconds

    @property
    def global_parameters(self) -> list[Tensor]:
        """The global parameters (fp32, on ``outer_state_device``), in ``module.parameters()`` order."""
        return [] if self._outer is None else self._outer.params

    # ------------------------------------------------------------------ Lightning hooks

    def _build_engine(
        self,
        names: Sequence[str],
        params: Sequence[torch.nn.Parameter],
        local_params: Sequence[Tensor],
        replica_groups: Optional[list[list[int]]] = None,
    ) -> None:
        """Called by the strategy's ``setup`` when fitting starts, once the workers' parameters are equal:
        opens the exchange's process group (one per list of ``replica_groups``, the ranks that average
        together; by default all ranks), and builds the fragments and the outer state from the
        ``local_params`` (one per parameter of ``params``, named ``names``: the tensors the inner
        optimizer writes). Fragments are assigned by the parameters' whole sizes, so every rank assigns alike."""
        self._state_at_train_end = None
        self._exchange.open(self._timeout, replica_groups)
        self._params = list(params)
        # Views of this worker's storages, which stay put while evaluation puts other weights in the module.
        self._local_params = list(local_params)
        self._fragments = build_fragments(
            names,
            self._local_params,
            self._schedule.num_fragments,
            self._fragment_assignment,
            layer_sizes=[p.numel() for p in params],
        )
        self._outer = OuterState(
            self._local_params,
            self._outer_optimizer_spec,
            self._outer_lr,
            self._outer_momentum,
            self._outer_device,
            self._backend,
            steps=self.outer_steps,  # a later fit with this strategy goes on counting
        )

    def setup(self, trainer: Any) -> None:
        """Fires once per ``fit``/``validate``/... before the loops run: the strategy's setup, then, when
        fitting, the check that there is one inner optimizer and the length of the first round."""
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports one inner optimizer, "
                f"configure_optimizers returned {len(self.optimizers)}"
            )
        if self._dynamic is not None:
            if not trainer.lightning_module.automatic_optimization:
                raise ValueError(
                    f"{type(self).__name__}(dynamic_inner_steps=True) needs automatic optimization: its idle "
                    "steps skip the module's training_step, which must not hold the optimizer steps"
                )
            disable_sigterm_broadcast(trainer)
        self._start_round()

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Fires for every step of the inner optimizer (automatic or manual optimization): the step (an idle
        one, with ``dynamic_inner_steps``, only runs the closure, whose training step it skips), then the
        syncs and outer updates the schedule puts after it."""
        if self._is_idle_step():
            output = closure()
        else:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._after_inner_step()
        if self._dynamic is not None:
            inner_steps = float(self._dynamic.inner_steps)
            self.lightning_module.log("diloco/inner_steps", inner_steps, on_step=True, on_epoch=False)
        return output

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Fires for every training batch: the module's ``training_step``, except in an idle step (with
        ``dynamic_inner_steps``, past this worker's inner steps of the round), which returns
        ``{"loss": nan, "idle": True}`` at once (Lightning refuses None under several processes; the
        callbacks' ``outputs`` say which steps were idle)."""
        if self._is_idle_step():
            return {"loss": self._scalars("idle_loss", float("nan"), self.root_device), "idle": True}
        return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        """Fires after every training batch's ``training_step``: the backward pass (with its callbacks' hooks),
        skipped in an idle step."""
        if self._is_idle_step():
            return closure_loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Fires before every training batch, after the callbacks' and the module's hooks: with
        ``dynamic_inner_steps``, the clock that measures this worker's speed."""
        if self._dynamic is not None:
            self._dynamic.batch_starts(self._schedule.inner_step - self._schedule.round_start)

    def _is_idle_step(self) -> bool:
        """Whether the coming inner step is idle: this worker's dynamic inner steps of the round are done."""
        schedule = self._schedule
        return self._dynamic is not None and self._dynamic.is_idle(schedule.inner_step - schedule.round_start)

    def on_train_end(self) -> None:
        """Fires when ``fit`` finishes training (not on an exception), after the callbacks' ``on_train_end``:
        :meth:`finish_local_training`, unless a callback has already called it."""
        self.finish_local_training()

    @torch.no_grad()
    def finish_local_training(self) -> None:
        """End the workers' local training when ``fit`` ends, once: every worker ends with the global parameters.

        First the state training needs to continue (every worker's local parameters, inner-optimizer
        state and error-feedback residuals, the outer state, the position in the schedule) is kept,
        as CPU copies, for checkpoints saved after ``fit``: a run resumed from one continues as if it
        had not stopped. Then what is in flight is applied, and each fragment whose local parameters
        hold unsent progress takes one last, blocking outer step; the local parameters are replaced
        by the global ones. Callbacks that write into the model when training ends (EMA, LAWA with
        ``keep_average_on_train_end``) call this first, from their own ``on_train_end``, which
        Lightning runs before the strategy's.
        """
        if self._state_at_train_end is not None or not self._fragments:
            return
        self._state_at_train_end = (cpu_copy(self._shared_state()), cpu_copy(self._worker_state()))
        for fragment in self._fragments:
            overlapped = fragment.pending is not None and fragment.pending.apply_at_step is not None
            if overlapped:  # its time has not come; it must not be lost
                self._apply_outer_update(fragment)
            if not fragment.in_sync:  # a delay=1 update still pending is applied inside, as at any sync
                self._start_sync(fragment, apply_at_step=self._schedule.inner_step)
            if fragment.pending is not None:
                self._apply_outer_update(fragment, mixing_alpha=0.0)  # replace, so all workers end identical

    def agreed_parameters(self) -> Optional[list[Tensor]]:
        """The parameters the workers agree on while each trains a local copy: the global parameters
        (fp32, on ``outer_state_device``, in ``module.parameters()`` order), from the start of ``fit`` to
        :meth:`finish_local_training`; None otherwise (the model's own parameters are then the agreed ones).

        Averaging callbacks (EMA, LAWA) average these, not a worker's local parameters."""
        if not self._fragments or self._state_at_train_end is not None:
            return None
        return self._outer.params

    @torch.no_grad()
    def move_global_parameters(self, values: Sequence[Tensor]) -> None:
        """Replace the global parameters by ``values`` (one per parameter, in ``module.parameters()``
        order, the same on every worker), and move every worker's local parameters, and the origin of
        its inner phase, by as much: the progress of the inner phase carries over, the pseudo-gradients
        stay what they were. Switch EMA (``EMA(switch_every_epoch=True)``) switches the model this way."""
        global_params = self._outer.params
        shifts = [value.to(g.device, g.dtype) - g for g, value in zip(global_params, values, strict=True)]
        for global_param, value in zip(global_params, values):
            global_param.copy_(value)
        for fragment in self._fragments:
            locals_ = pieces_of(self._local_params, fragment.pieces)
            if fragment.in_sync and fragment.origin is None:  # exactly the global values, on every worker
                for local, global_piece in zip(locals_, pieces_of(global_params, fragment.pieces)):
                    local.copy_(global_piece)
                continue
            for local, shift in zip(locals_, pieces_of(shifts, fragment.pieces)):
                local.add_(shift.to(local.device, local.dtype))
            for origin, shift in zip(fragment.origin or [], pieces_of(shifts, fragment.pieces)):
                origin.add_(shift)

    def on_validation_start(self) -> None:
        """Fires before each validation (the sanity check included), after the callbacks' hook: while the
        workers train local copies, the model evaluates the global parameters, the same on every worker
        and the model checkpoints save, unless a callback evaluates with an average of them (EMA or LAWA
        with ``validate_with="average"``). Validation does not count as training time for ``dynamic_inner_steps``."""
        if self._dynamic is not None:
            self._dynamic.pause()
        self._swap_in_global_parameters()

    def on_validation_end(self) -> None:
        """Fires after each validation, after the callbacks' hook: the local parameters come back."""
        self._swap_out_global_parameters()
        if self._dynamic is not None:
            self._dynamic.resume()

    def _swap_in_global_parameters(self) -> None:
        agreed = self.agreed_parameters()
        callbacks = self.lightning_module.trainer.callbacks
        if agreed is None or self._evaluating_global:
            return
        if any(getattr(callback, "evaluates_with_average", False) for callback in callbacks):
            return
        self._put_in_module(agreed)
        self._evaluating_global = True

    def _swap_out_global_parameters(self) -> None:
        if not self._evaluating_global:
            return
        self._put_local_back()
        self._evaluating_global = False

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Fires on every rank when a checkpoint is saved: adds ``checkpoint["diloco"]`` and every worker's
        local state (each worker writes its own file beside the checkpoint, see
        :mod:`~lightning_converge.strategies.rank_state`), unless the checkpoint holds weights only. After
        ``fit``, both are the state kept when training ended."""
        if self._fragments and "optimizer_states" in checkpoint:
            if self._state_at_train_end is None:
                shared, worker = self._shared_state(), self._worker_state()
            else:
                shared, worker = self._state_at_train_end
            checkpoint["diloco"] = shared
            save_rank_states(self, checkpoint, filepath, {"diloco": worker}, storage_options)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Fires on every rank when ``fit`` resumes, before ``setup``: reads the checkpoint and hands this
        worker its own local state (and its callbacks' per-rank states), read from its own file."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        states = load_rank_states(self, checkpoint, checkpoint_path, weights_only)
        if "diloco" in checkpoint:
            checkpoint["diloco"]["worker"] = states.get("diloco")
        return checkpoint

    def teardown(self) -> None:
        """Fires when the trainer finishes a stage, also after an exception: closes the pseudo-gradient
        process group (an all-reduce still in flight is abandoned)."""
        self._swap_out_global_parameters()
        if self._exchange.is_open:
            for fragment in self._fragments:
                fragment.pending = None
            self._exchange.close()
        super().teardown()

    # ------------------------------------------------------------------ the schedule

    def _start_round(self) -> None:
        """Begin a round of inner steps at the current step (a schedule that takes ``lr`` reads the inner lr)."""
        lr = self.optimizers[0].param_groups[0]["lr"] if self._schedule.inner_steps_takes_lr else None
        self._schedule.start_round(lr)
        if self._dynamic is not None:
            self._dynamic.start_round(self._schedule.round_length, self.global_rank)

    @torch.no_grad()
    def _after_inner_step(self) -> None:
        """Count the step; start the syncs and apply the updates due after it; log the counters."""
        schedule = self._schedule
        schedule.inner_step += 1
        step = schedule.inner_step
        for fragment in self._fragments:
            fragment.in_sync = False
        for fragment in self._fragments:
            if step == schedule.sync_step(fragment.index):
                self._start_sync(fragment, apply_at_step=None if self._delay else step + schedule.overlap_steps)
        for fragment in self._fragments:
            if fragment.pending is not None and fragment.pending.apply_at_step == step:
                self._apply_outer_update(fragment)
        if schedule.round_ends:
            self._start_round()
        step_bytes_sent, step_bytes_received = self._exchange.take_step_bytes()
        module = self.lightning_module
        for name, value in (
            ("diloco/outer_step", self.outer_steps),
            ("comm/bytes_sent", step_bytes_sent),
            ("comm/bytes_received", step_bytes_received),
            ("comm/bytes_sent_total", self.bytes_sent),
            ("comm/bytes_received_total", self.bytes_received),
            ("comm/wait_seconds", self.wait_seconds),
        ):
            module.log(name, float(value), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ one sync

    def _start_sync(self, fragment: Fragment, apply_at_step: Optional[int]) -> None:
        """Take the fragment's pseudo-gradient and start its all-reduce.

        The pseudo-gradient is measured from where the inner phase started: the
        global parameters, or the fragment's ``origin``. With ``delay=1`` the next
        inner phase then starts from the newest global parameters, the previous
        outer step's average (which had a whole inner phase to arrive) applied;
        at the first outer step, with nothing to apply, it starts where this one
        ended, which becomes its origin.
        """
        local_params = pieces_of(self._local_params, fragment.pieces)
        origin = fragment.origin or pieces_of(self._outer.params, fragment.pieces)
        pseudo_grad = pseudo_gradient(origin, local_params)
        fragment.origin = None
        if self._delay:
            if fragment.pending is not None:
                self._apply_outer_update(fragment)
            else:
                fragment.origin = [p.detach().to(self._outer_device, torch.float32, copy=True) for p in local_params]
                fragment.in_sync = True  # the next phase starts here: a sync now would send zeros
        exchange = self._exchange.start(pseudo_grad, fragment.layout, self._schedule.inner_step)
        fragment.pending = PendingSync(apply_at_step, exchange)
        if self._dynamic is not None:  # every worker's speed travels beside the pseudo-gradient
            self._dynamic.share_speed(self._exchange, pseudo_grad.device)

    def _apply_outer_update(self, fragment: Fragment, mixing_alpha: Optional[float] = None) -> None:
        """Apply the fragment's pending average: one outer step on its global parameters, then the
        local parameters move to the new global ones (``mixing_alpha``, the strategy's by default)."""
        averaged = self._exchange.resolve(fragment.pending, self._schedule.inner_step)
        fragment.pending = None
        if self._dynamic is not None:
            self._dynamic.receive_speeds(self._exchange, self._schedule.inner_step)
        self._outer.step(fragment.pieces, averaged, self._schedule.inner_step)
        self._pull_global(fragment, self._mixing_alpha if mixing_alpha is None else mixing_alpha)

    def _pull_global(self, fragment: Fragment, mixing_alpha: float) -> None:
        """``local = mixing_alpha * local + (1 - mixing_alpha) * global`` for the fragment (0 replaces)."""
        local_params = pieces_of(self._local_params, fragment.pieces)
        device = local_params[0].device
        ema_update(
            local_params,
            [g.to(device) for g in pieces_of(self._outer.params, fragment.pieces)],
            decay=self._scalars("mixing_alpha", mixing_alpha, device),
            backend=self._backend,
        )
        fragment.in_sync = mixing_alpha == 0.0

    # ------------------------------------------------------------------ checkpoints (the format: diloco.state)

    def _shared_state(self) -> dict[str, Any]:
        """What every worker holds alike (in-flight exchanges are waited for)."""
        return shared_state(self._schedule, self._outer, self._exchange, self._fragments)

    def _worker_state(self) -> dict[str, Any]:
        """This worker's own state; its local model also while evaluation has other weights swapped in."""
        state = worker_state(self._local_model_state(), self._local_optimizer_state(), self._fragments, self._exchange)
        if self._dynamic is not None:
            state["dynamic_inner_steps"] = self._dynamic.state_dict()
        return state

    def _restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        restore_shared_state(
            state, self._schedule, self._outer, self._exchange, self._fragments, self.root_device, type(self).__name__
        )
        worker = state.get("worker")
        if worker is not None:
            self._load_local_state(worker["model"], worker["optimizer"])
            restore_worker_state(worker, self._fragments, self._exchange, self._outer_device)
        else:
            # Resumed by another number of workers (rank_state warned): start from the global parameters.
            for local, global_param in zip(self._local_params, self._outer.params):
                local.copy_(global_param)
            rank_zero_warn(
                f"{type(self).__name__}: the workers' local states cannot be matched to this run's workers: "
                "the interrupted inner phase restarts from the global parameters."
            )
            for fragment in self._fragments:
                fragment.in_sync = True
                fragment.origin = None
        if self._dynamic is not None:  # this worker's inner steps of the round, or (none saved) H
            saved = None if worker is None else worker.get("dynamic_inner_steps")
            if saved is None:
                self._dynamic.start_round(self._schedule.round_length, self.global_rank)
            else:
                self._dynamic.load_state_dict(saved)

    # ------------------------------------------------------------------ provided by the strategy

    def _put_in_module(self, values: Sequence[Tensor]) -> None:
        """Make the module hold ``values`` (one per parameter, like the local tensors) for evaluation, keeping
        this worker's local values; ``_local_params`` must go on reading and writing those."""
        raise NotImplementedError

    def _put_local_back(self) -> None:
        """Undo :meth:`_put_in_module`: the module holds this worker's local values again."""
        raise NotImplementedError

    def _local_model_state(self) -> dict[str, Any]:
        """This worker's model state for its own checkpoint file (its local values, also during evaluation)."""
        raise NotImplementedError

    def _local_optimizer_state(self) -> dict[str, Any]:
        """This worker's inner-optimizer state for its own checkpoint file."""
        raise NotImplementedError

    def _load_local_state(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        """Restore what :meth:`_local_model_state` and :meth:`_local_optimizer_state` returned."""
        raise NotImplementedError
