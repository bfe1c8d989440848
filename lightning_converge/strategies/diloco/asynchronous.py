"""Asynchronous DiLoCo: workers of unequal speed that never wait for each other.

:class:`AsyncDiLoCoStrategy`, registered as ``strategy="async_diloco"``, follows
"Asynchronous Local-SGD Training for Language Modeling" (Liu et al., 2024,
arXiv 2401.09135). Each worker runs the user's optimizer alone for its H inner
steps, then sends its pseudo-gradient (where its round started minus where it
ended) to the server and continues from the global parameters the server sends
back, without waiting for any other worker. The server, on rank 0 beside that
rank's own training (a thread), applies each pseudo-gradient as it arrives, with
Delayed Nesterov, plain Nesterov or SGD, an optional staleness gap penalty and
staleness cap (the rules, written out:
:mod:`~lightning_converge.strategies.diloco.async_outer`). With
``dynamic_inner_steps=True`` each worker's H follows its measured speed (Dynamic
Local Updates), so all rounds take about the same wall-clock time. The messages
(:mod:`~lightning_converge.strategies.diloco.async_protocol`) travel
point-to-point on a gloo group of their own, as CPU tensors, whatever the inner
backend; a worker's round trip involves it and the server only.

**Where workers meet.** Training itself has no collective between workers. They
meet (every worker waits for the others) where Lightning is collective: at the
start of ``fit`` (rank 0's parameters are broadcast), at validation (every worker
evaluates the current global parameters, broadcast from rank 0), when a
checkpoint is saved (Lightning's barrier), and
at the end of ``fit``: every worker sends its last pseudo-gradient, and, when all
are applied, every worker takes the final global parameters (the same on every
rank). Each worker runs ``max_steps`` inner steps of its own, so a fast worker
finishes early and waits there. (Lightning broadcasts rank 0's SIGTERM flag
before every training batch, which would make the workers meet at every step:
the strategy turns that broadcast off, and each worker stops on its own SIGTERM
after the batch it is in. ``ModelCheckpoint(train_time_interval=...)``
broadcasts at every step too: use ``every_n_train_steps``.)

**Checkpoints** hold ``checkpoint["async_diloco"]``: the server's state (global
parameters, outer optimizer, Delayed Nesterov's buffer, counters and each
worker's record), and, per rank (:mod:`~lightning_converge.strategies.rank_state`),
each worker's local model, inner optimizer and round state (written by each
worker beside the checkpoint). ``state_dict`` is the
global parameters. Resumed with the same number of workers, each continues its
round; with another number, the global state is restored and every worker starts
a new round from the global parameters. A checkpoint saved after ``fit`` holds
the final state: every worker's last pseudo-gradient applied.

**Faults.** A worker that dies, or sends nothing for ``timeout`` seconds, makes the
server fail with :class:`~lightning_converge.strategies.diloco.async_protocol.AsyncDiLoCoError`
naming it; every other worker then raises that error at its next round trip
(rank 0 at its next round, or when ``fit`` ends), so none hangs; the work since
the last checkpoint is lost, nothing a checkpoint holds. ``timeout`` must exceed
the longest round of any worker (and any time workers spend apart from each
other before a meeting, e.g. a fast worker waiting at a checkpoint).

**Compressed pseudo-gradients** (``compressor``): a worker other than rank 0 sends
its pseudo-gradient compressed, with error feedback of its own (saved in its per-rank
file), and the server applies the decoded value; the reply comes back compressed as
well, as the difference between the global parameters and those the worker holds,
with server-side error feedback (the rule:
:mod:`~lightning_converge.strategies.diloco.async_outer`, **Compressed messages**).
Why the reply too: fp32 parameters would be 4 bytes a parameter back for every
byte or bit sent, most of the round trip; the difference is what changed, which
compresses as a pseudo-gradient does, and the server's copy of what each worker
holds keeps the error from building up. The cost is memory on rank 0: one fp32 copy of
the parameters per worker, on ``outer_state_device``. Rank 0's own worker exchanges
nothing over the wire, so it sends and receives fp32.

**Overlapped round trips** (``overlap=True``; default False): a worker other than rank 0
sends its pseudo-gradient and starts its next round at once, from where it is, and takes
the server's reply at the first inner step after it has arrived. With ``a`` its
parameters when it sent (the end of the last round), ``x`` its parameters after that
inner step and ``o`` the global parameters of the reply (as it holds them), the rule is::

    x <- x + (o - a);  origin <- o

its progress since sending, moved onto the reply's global parameters. The round's
pseudo-gradient ``origin - x`` at its end is then exactly its own progress over the
round (from ``a``), as without overlap. At most one round trip is in flight: a round
that ends before its reply has arrived waits for it (counted in ``reply_waits``), and
so does every meeting (validation, checkpoint, end of fit), so a checkpoint never
holds a pseudo-gradient in flight; with overlap a checkpoint is also a meeting of its
own (the workers meet before rank 0 reads the server's state). Rank 0's own worker
has no wire to wait on: its reply is immediate, and the rule leaves it as without overlap.

Logged per worker, per inner step: ``async_diloco/rounds`` (its pseudo-gradients
applied so far), ``async_diloco/staleness`` (of its last applied pseudo-gradient:
updates the server applied between its pull and its arrival),
``async_diloco/inner_steps`` (its current H), with overlap ``async_diloco/reply_waits``
(round ends that waited for the last reply), ``comm/wait_seconds`` (time blocked
on round trips), ``comm/bytes_sent`` / ``comm/bytes_received`` (the payloads of the
pseudo-gradient sent and the parameters received in this step, compressed or not,
headers aside; rank 0's own worker sends nothing over the wire) and their ``_total``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.comm import COMPRESSORS, Compressor, Layout
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.schedules import Schedule, as_schedule
from lightning_converge.sharding import refuse_sharded
from lightning_converge.strategies.ddp_options import as_timedelta, check_unwrapped, reject_options
from lightning_converge.strategies.diloco.async_outer import (
    Arrival,
    AsyncOuterServer,
    check_async_options,
    parameters_layout,
)
from lightning_converge.strategies.diloco.async_protocol import (
    SERVER_RANK,
    AsyncDiLoCoError,
    Reply,
    ServerThread,
    encode_pseudo_gradient,
    payload_bytes,
    round_trip,
    serve_locally,
)
from lightning_converge.strategies.diloco.dynamic import disable_sigterm_broadcast
from lightning_converge.strategies.diloco.exchange import as_compressor
from lightning_converge.strategies.diloco.outer import available_device, pseudo_gradient
from lightning_converge.strategies.rank_state import RankStateFiles, cpu_copy, load_rank_states, save_rank_states

CHECKPOINT_KEY = "async_diloco"


def point_to_point_compressors() -> list[str]:
    """The registered compressors' names that ``compressor`` accepts (those whose ``point_to_point`` is True)."""
    return sorted(name for name, cls in COMPRESSORS.items() if cls.point_to_point)


class AsyncDiLoCoStrategy(RankStateFiles, DDPStrategy):
    """Asynchronous DiLoCo: each worker's pseudo-gradient is applied as it arrives, no worker waits for another.

    Args:
        inner_steps: H, the inner steps of a round (an int >= 1); with ``dynamic_inner_steps`` the
            fastest worker's H.
        outer_lr: the outer learning rate (eps), a number or a schedule of the inner steps applied so
            far, summed over the workers.
        outer_momentum: beta, in [0, 1).
        outer_optimizer: ``"delayed_nesterov"`` (the paper's Delayed Nesterov), ``"nesterov"`` or
            ``"sgd"`` (heavy-ball), see :mod:`~lightning_converge.strategies.diloco.async_outer`.
        delayed_nesterov_period: N, the arrivals between two momentum updates of Delayed Nesterov
            (an int >= 1); None: the number of workers (the paper's default).
        dynamic_inner_steps: Dynamic Local Updates: each worker's H becomes
            ``max(1, round(inner_steps * its speed / fastest speed))``, speeds measured over each
            worker's last round (:func:`~lightning_converge.strategies.diloco.async_outer.dynamic_inner_steps`).
        staleness_penalty: lambda >= 0 of the CO2-style staleness gap penalty (0: none).
        max_staleness: drop a pseudo-gradient that arrives after more than this many updates since its
            worker pulled (None: apply every one).
        compressor: how pseudo-gradients and replies travel between the workers and the server: None
            (fp32), or a compressor whose payload the server decodes alone (``point_to_point``): a name
            from :func:`point_to_point_compressors` or such a :class:`~lightning_converge.comm.Compressor`
            (to set its options; e.g. ``Int8Compressor(block_size=64)``). See **Compressed
            pseudo-gradients**.
        outer_state_device: where the server keeps the global parameters and outer state (rank 0).
        backend: backend of the fused outer-step kernel (``"auto"``, ``"reference"``, ``"compiled"``,
            ``"triton"``).
        overlap: whether a worker starts its next round while its round trip is on its way, and takes the
            reply when it arrives (see **Overlapped round trips**).
        timeout: seconds (or a ``timedelta``) a worker may stay silent, and a collective may wait,
            before the others fail (see **Faults**).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper; the model is not wrapped, so any
            value other than the wrapper's default raises.

    Only one inner optimizer is supported.
    """

    # Workers step on their own gradients: Grokfast's state is saved per worker (see rank_state).
    gradients_differ_between_ranks = True

    def __init__(
        self,
        inner_steps: int = 500,
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        outer_optimizer: str = "delayed_nesterov",
        delayed_nesterov_period: Optional[int] = None,
        dynamic_inner_steps: bool = False,
        staleness_penalty: float = 0.0,
        max_staleness: Optional[int] = None,
        compressor: Union[str, Compressor, None] = None,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        overlap: bool = False,
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
        check_async_options(
            inner_steps,
            outer_optimizer,
            outer_lr,
            outer_momentum,
            delayed_nesterov_period,
            staleness_penalty,
            max_staleness,
        )
        compressor = as_compressor(compressor)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if compressor is not None and not compressor.point_to_point:
            raise ValueError(
                f"compressor must be None or one whose payload the server decodes on its own: one of "
                f"{point_to_point_compressors()} (or such a Compressor instance), got {compressor.name!r}: "
                "it averages over all ranks with collectives ('powersgd' all-reduces its shared factors, "
                "'onebit' is 'sign' in a two-phase all-reduce: use 'sign')"
            )
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
        self.inner_steps = inner_steps
        self._outer_lr = as_schedule(outer_lr, "outer_lr")
        self._outer_momentum = float(outer_momentum)
        self._outer_optimizer = outer_optimizer
        self._delayed_nesterov_period = delayed_nesterov_period
        self._dynamic = bool(dynamic_inner_steps)
        self._staleness_penalty = float(staleness_penalty)
        self._max_staleness = max_staleness
        self._outer_device = available_device(outer_state_device, "outer_state_device")
        self._backend = validate_backend(backend)
        self.compressor = compressor
        self._overlap = overlap
        # What tests and benchmarks may observe: each arrival the server handled, in order (rank 0).
        self.on_arrival: Optional[Callable[[Arrival], None]] = None

        # Set up by configure_ddp when fitting starts.
        self._params: list[torch.nn.Parameter] = []
        self._local_params: list[Tensor] = []
        self._layout: Optional[Layout] = None  # the compressor's view of the flat pseudo-gradient
        self._control: Optional[dist.ProcessGroup] = None  # point-to-point round trips
        self._meet: Optional[dist.ProcessGroup] = None  # broadcasts where the workers meet
        self._server: Optional[AsyncOuterServer] = None  # rank 0
        self._lock = threading.Lock()
        self._server_thread: Optional[ServerThread] = None
        # With overlap, on the other ranks: the thread that runs the round trip in flight, and its reply.
        self._round_trips: Optional[ThreadPoolExecutor] = None
        self._in_flight: Optional[Future] = None
        self._anchor: list[Tensor] = []  # the parameters when the round trip in flight was sent
        self._evaluating_global = False
        self._finished = False
        self._reset_worker_state()

    def _reset_worker_state(self) -> None:
        # This worker's round: where it started (the global parameters it pulled), its length and progress.
        self._origin: list[Tensor] = []
        self._round_length = self.inner_steps
        self._steps_in_round = 0
        self._round_started: Optional[float] = None
        self._version = 0  # the server's version this worker last pulled
        self.rounds = 0  # this worker's pseudo-gradients applied (the server's count)
        self.pseudo_gradients_sent = 0  # and sent (this worker's count; more if some were dropped)
        self.staleness = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0
        self.reply_waits = 0  # with overlap: round ends at which the last reply had not arrived yet
        self._step_bytes = (0, 0)

    # ------------------------------------------------------------------ public read-outs

    @property
    def server(self) -> Optional[AsyncOuterServer]:
        """The server (global parameters and outer state), on rank 0 while fitting; None elsewhere."""
        return self._server

    @property
    def outer_steps(self) -> int:
        """The server's updates applied when this worker last pulled the global parameters (its view of
        the outer step; EMA and LAWA update when it changes)."""
        return self._version

    @property
    def current_inner_steps(self) -> int:
        """H of this worker's current round (with ``dynamic_inner_steps``, set by the server)."""
        return self._round_length

    @property
    def global_parameters(self) -> list[Tensor]:
        """The global parameters this worker last pulled (rank 0: the server's current ones)."""
        return self._server.params if self._server is not None else self._origin

    # ------------------------------------------------------------------ Lightning hooks

    def configure_ddp(self) -> None:
        """Fires in ``setup`` when fitting starts, where ``DDPStrategy`` would wrap the model.

        The model stays unwrapped. Rank 0's parameters and buffers are broadcast, the two gloo groups
        of the control plane are opened, rank 0 builds the server, and every worker's round starts
        from the (now identical) parameters.
        """
        module = self.lightning_module
        refuse_sharded(
            module,
            type(self).__name__,
            "its server on rank 0 holds the whole global parameters, which every worker pulls and pushes whole",
        )
        _sync_module_states(module)
        self._finished = False
        self._control = dist.new_group(backend="gloo", timeout=self._timeout)
        self._meet = dist.new_group(backend="gloo", timeout=self._timeout)
        named = list(module.named_parameters())
        self._params = [param for _, param in named]
        self._local_params = [p.detach() for p in self._params]
        self._layout = parameters_layout(self._params, [name for name, _ in named])
        if self._overlap and self.global_rank != SERVER_RANK:
            self._round_trips = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-diloco-round-trip")
            self._anchor = [p.detach().clone() for p in self._params]
        self._reset_worker_state()
        self._origin = [p.detach().to(self._outer_device, torch.float32, copy=True) for p in self._params]
        if self.global_rank == SERVER_RANK:
            period = self._delayed_nesterov_period or self.world_size
            self._server = AsyncOuterServer(
                self._params,
                self._outer_optimizer,
                self._outer_lr,
                self._outer_momentum,
                period,
                self._staleness_penalty,
                self._max_staleness,
                self.inner_steps,
                self._dynamic,
                self._outer_device,
                self._backend,
                compressor=self.compressor,
            )
            for rank in range(self.world_size):
                self._server.pull(rank)

    def setup(self, trainer: Any) -> None:
        """Fires once per ``fit``/``validate``/... before the loops run: DDP's setup, then, when fitting,
        the check that there is one inner optimizer, and Lightning's per-batch SIGTERM broadcast is
        turned off (it would make the workers meet at every step)."""
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports one inner optimizer, configure_optimizers returned "
                f"{len(self.optimizers)}"
            )
        disable_sigterm_broadcast(trainer)

    def on_train_start(self) -> None:
        """Fires when training starts, after a resumed state is restored: rank 0 starts serving."""
        if self._server is not None and self.world_size > 1:
            self._server_thread = ServerThread(
                self._server,
                self._lock,
                self._control,
                self.world_size,
                self._timeout,
                type(self).__name__,
                on_arrival=self.on_arrival,
            )
            self._server_thread.start()
        self._round_started = time.perf_counter()

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Fires for every step of the inner optimizer: the step, then, at the end of this worker's round,
        its round trip to the server."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._steps_in_round += 1
        if self._in_flight is not None and self._in_flight.done():
            self._take_in_flight()
        if self._steps_in_round >= self._round_length:
            self._end_round(final=False)
        self._log_counters()
        return output

    def on_train_end(self) -> None:
        """Fires when ``fit`` finishes training (not on an exception): :meth:`finish_local_training`."""
        self.finish_local_training()

    @torch.no_grad()
    def finish_local_training(self) -> None:
        """End of ``fit``, once: this worker sends its last pseudo-gradient (if its round made progress);
        when every worker's is applied, every worker takes the final global parameters."""
        if self._finished or not self._params:
            return
        self._end_round(final=True)
        if self._server_thread is not None:
            self._server_thread.join()  # every other worker's final arrival applied (or a clear error)
            self._server_thread = None
        self._take_global_parameters(self._control)
        self._finished = True

    def agreed_parameters(self) -> Optional[list[Tensor]]:
        """The parameters the workers agree on while each trains a local copy: the global parameters
        this worker last pulled, until the end of ``fit``; None afterwards (the model's parameters are
        then the final global ones on every worker).

        EMA and LAWA average these, so under this strategy each worker's average follows the global
        parameters as that worker saw them; the checkpoint holds rank 0's."""
        if not self._params or self._finished:
            return None
        return self._origin

    def on_validation_start(self) -> None:
        """Fires before each validation (the sanity check included), after the callbacks' hook: the workers
        meet; each evaluates the current global parameters, broadcast from rank 0, unless a callback
        evaluates with an average (EMA or LAWA with ``validate_with="average"``: then each worker's average
        of the global parameters it has seen)."""
        callbacks = self.lightning_module.trainer.callbacks
        if any(getattr(callback, "evaluates_with_average", False) for callback in callbacks):
            return
        if self._params and not self._finished and not self._evaluating_global:
            self._take_in_flight()
            flat = self._broadcast_global(self._meet)
            for param, value in zip(self._params, self._split(flat)):
                param.data = value.to(param.device, param.dtype, copy=True)
            self._evaluating_global = True

    def move_global_parameters(self, values: Any) -> None:
        """Switch EMA (``EMA(switch_every_epoch=True)``) would move the global parameters from every worker
        at once; the asynchronous server has no such step: a clear error."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot switch the global parameters (Switch EMA, EMA(switch_every_epoch=True)): "
            "use EMA without switching, or DiLoCoStrategy"
        )

    def on_validation_end(self) -> None:
        """Fires after each validation: this worker's local parameters come back."""
        if self._evaluating_global:
            for param, local in zip(self._params, self._local_params):
                param.data = local
            self._evaluating_global = False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Fires on every rank when a checkpoint is assembled: the model's state with the global parameters
        (rank 0 writes the checkpoint: the server's current ones). With overlap, the workers meet first,
        each with its reply in flight taken, so the server's state holds every pseudo-gradient sent."""
        state = super().lightning_module_state_dict()
        if self.agreed_parameters() is None:
            return state
        if self._overlap and self.world_size > 1:
            self._take_in_flight()
            dist.barrier(group=self._meet)
        with self._lock:
            current = [g.clone() for g in self.global_parameters]
        for (name, param), value in zip(self.lightning_module.named_parameters(), current):
            if name in state:
                state[name] = value.to(param.device, param.dtype)
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Fires on every rank when a checkpoint is saved (the workers meet: Lightning's barrier): rank 0
        adds the server's state; every worker writes its own state beside the checkpoint (see
        :mod:`~lightning_converge.strategies.rank_state`), unless the checkpoint holds weights only."""
        if self._params and "optimizer_states" in checkpoint:
            if self._server is not None:
                with self._lock:
                    checkpoint[CHECKPOINT_KEY] = cpu_copy(self._server.state_dict())
            save_rank_states(self, checkpoint, filepath, {CHECKPOINT_KEY: self._worker_state()}, storage_options)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Fires on every rank when ``fit`` resumes, before ``setup``: hands this worker its own state."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved_world_size = checkpoint.get("rank_states", {}).get("world_size")
        states = load_rank_states(self, checkpoint, checkpoint_path, weights_only)
        if CHECKPOINT_KEY in checkpoint:
            checkpoint[CHECKPOINT_KEY] = {
                "server": checkpoint[CHECKPOINT_KEY],
                "worker": states.get(CHECKPOINT_KEY),
                "same_workers": saved_world_size == self.world_size,
            }
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Fires when resuming ``fit``, after ``setup``: rank 0 restores the server; each worker its round
        (or, resumed by another number of workers, starts a new one from the global parameters)."""
        super().load_optimizer_state_dict(checkpoint)
        if CHECKPOINT_KEY not in checkpoint:
            return
        saved = checkpoint[CHECKPOINT_KEY]
        server_state, worker = saved["server"], saved["worker"]
        if self._server is not None:
            self._server.load_state_dict(server_state, same_workers=saved["same_workers"])
            if not saved["same_workers"]:
                for rank in range(self.world_size):
                    self._server.pull(rank)
        if worker is not None:
            self.lightning_module.load_state_dict(worker["model"])
            self.optimizers[0].load_state_dict(worker["optimizer"])
            _optimizer_to_device(self.optimizers[0], self.root_device)
            self._set_origin(worker["origin"])
            for name in (
                "_round_length",
                "_steps_in_round",
                "_version",
                "rounds",
                "pseudo_gradients_sent",
                "staleness",
                "bytes_sent",
                "bytes_received",
                "wait_seconds",
                "reply_waits",
            ):
                setattr(self, name, worker[name.lstrip("_")])
            if self.compressor is not None and worker["compressor"] is not None:
                self.compressor.load_state_dict(worker["compressor"])
        else:
            self._set_origin(server_state["global_params"])
            self._version = server_state["version"]
            for param, value in zip(self._params, self._origin):
                param.detach().copy_(value)

    def teardown(self) -> None:
        """Fires when the trainer finishes a stage, also after an exception: the local parameters come
        back from evaluation; the control plane's groups close once the server thread has ended (after an
        error it is left to die with the process: it may be blocked on a dead worker)."""
        self.on_validation_end()
        if self._round_trips is not None:
            self._round_trips.shutdown(wait=False, cancel_futures=True)
            self._round_trips = None
            self._in_flight = None
        if self._server_thread is None:
            for group in (self._control, self._meet):
                if group is not None:
                    dist.destroy_process_group(group)
            self._control = self._meet = None
        super().teardown()

    # ------------------------------------------------------------------ one round

    def _end_round(self, final: bool) -> None:
        """Send this worker's pseudo-gradient (none if its round has made no progress) and, unless
        ``final``, continue from the global parameters the server returns (with overlap: at once, from
        where it is; the reply is taken when it arrives)."""
        if self._in_flight is not None:  # the last reply is due first: this round started from it
            self.reply_waits += not final and not self._in_flight.done()
            self._take_in_flight()
        started = time.perf_counter()
        progressed = self._steps_in_round > 0
        speed = None
        if progressed and self._round_started is not None:
            speed = self._steps_in_round / max(started - self._round_started, 1e-9)
        grad = pseudo_gradient(self._origin, self._local_params) if progressed else None
        self.pseudo_gradients_sent += progressed
        steps, self._steps_in_round = self._steps_in_round, 0
        if self._server is not None:
            if self._server_thread is not None:
                self._server_thread.raise_if_failed()
            grad = None if grad is None else grad.to(self._outer_device)
            reply = serve_locally(self._server, self._lock, SERVER_RANK, grad, steps, speed, final)
            if progressed and self.on_arrival is not None:
                self.on_arrival(Arrival(SERVER_RANK, reply.version, reply.staleness, reply.applied))
            self._take_reply(reply, rebase=False)
        else:
            payload = None
            if grad is not None:
                step = self.pseudo_gradients_sent - 1
                payload = encode_pseudo_gradient(self.compressor, grad, self._layout, self.global_rank, step)
                payload = [t.cpu() for t in payload]  # here: the round trip may run on another thread
            self._count_bytes(payload_bytes(payload), 0)
            trip = (payload, steps, speed, final, self._control, self._timeout, type(self).__name__)
            if self._round_trips is not None and not final:
                for anchor, local in zip(self._anchor, self._local_params):
                    anchor.copy_(local)
                self._in_flight = self._round_trips.submit(round_trip, *trip)
            else:
                reply = round_trip(*trip)
                self._count_bytes(0, payload_bytes(reply.payload))
                self._take_reply(reply, rebase=False)
        self.wait_seconds += time.perf_counter() - started
        self._round_started = time.perf_counter()

    def _take_in_flight(self) -> None:
        """With overlap: wait for the reply in flight, if any (raising its round trip's error), and take it."""
        if self._in_flight is None:
            return
        started = time.perf_counter()
        reply = self._in_flight.result()
        self.wait_seconds += time.perf_counter() - started
        self._in_flight = None
        self._count_bytes(0, payload_bytes(reply.payload))
        self._take_reply(reply, rebase=True)

    def _count_bytes(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self._step_bytes = (self._step_bytes[0] + sent, self._step_bytes[1] + received)

    @torch.no_grad()
    def _take_reply(self, reply: Reply, rebase: bool) -> None:
        """The server's reply: counters, the next round's length, and, unless the arrival was final, the new
        origin; the local parameters become it, or, with ``rebase`` (overlap), keep their progress since
        the round trip was sent, moved onto it (see **Overlapped round trips**)."""
        if reply.applied:
            self.staleness = reply.staleness
        self.rounds = reply.rounds
        self._round_length = reply.inner_steps
        if reply.payload is None:
            return
        self._version = reply.version
        if self._server is None and self.compressor is not None:  # the difference from what it holds
            difference = self.compressor.decode(reply.payload, self._layout)
            torch._foreach_add_(self._origin, [d.to(o.device) for d, o in zip(self._split(difference), self._origin)])
        else:
            self._set_origin(self._split(reply.payload[0]))
        if rebase:  # its progress since it sent, moved onto the new origin
            for local, origin, anchor in zip(self._local_params, self._origin, self._anchor):
                local.add_(origin.to(local.device) - anchor)
        else:
            for local, origin in zip(self._local_params, self._origin):
                local.copy_(origin)

    def _log_counters(self) -> None:
        step_sent, step_received = self._step_bytes
        self._step_bytes = (0, 0)
        for name, value in (
            ("async_diloco/rounds", self.rounds),
            ("async_diloco/staleness", self.staleness),
            ("async_diloco/inner_steps", self.current_inner_steps),
            ("comm/wait_seconds", self.wait_seconds),
            ("comm/bytes_sent", step_sent),
            ("comm/bytes_received", step_received),
            ("comm/bytes_sent_total", self.bytes_sent),
            ("comm/bytes_received_total", self.bytes_received),
            *([("async_diloco/reply_waits", self.reply_waits)] if self._overlap else []),
        ):
            self.lightning_module.log(name, float(value), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ where the workers meet

    def _broadcast_global(self, group: dist.ProcessGroup) -> Tensor:
        """Collective: the current global parameters (flat fp32, CPU) from rank 0 to every worker.

        A barrier first: a worker enters it only after its round trip in flight has been answered, so
        once all are in, no update is on its way and the parameters sent stay the server's current ones
        until the workers part (what a checkpoint saved meanwhile holds too)."""
        try:
            if self.world_size > 1:
                dist.barrier(group=group)
            if self._server is not None:
                with self._lock:
                    flat = self._server.flat_params().cpu()
            else:
                flat = torch.empty(sum(p.numel() for p in self._params), dtype=torch.float32)
            if self.world_size > 1:
                dist.broadcast(flat, src=SERVER_RANK, group=group)
        except RuntimeError as error:
            raise AsyncDiLoCoError(
                f"{type(self).__name__}: worker {self.global_rank} waited in vain for the others to meet "
                f"(validation or the end of fit) within the timeout ({self._timeout}): a worker has died or "
                f"failed (its own error names the missing one). Cause: {error}"
            ) from error
        return flat

    @torch.no_grad()
    def _take_global_parameters(self, group: dist.ProcessGroup) -> None:
        """Collective: every worker's parameters (and round origin) become the current global ones (for the
        server: every worker has pulled them, exactly)."""
        flat = self._broadcast_global(group)
        if self._server is not None:
            with self._lock:
                for rank in range(self.world_size):
                    self._server.pull(rank)
        self._set_origin(self._split(flat))
        for local, value in zip(self._local_params, self._origin):
            local.copy_(value)

    @torch.no_grad()
    def _set_origin(self, values: Any) -> None:
        """This worker's round now starts from ``values`` (one per parameter), copied into the persistent
        origin tensors, which averaging callbacks follow (:meth:`agreed_parameters`)."""
        for origin, value in zip(self._origin, values):
            origin.copy_(value)

    def _split(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into tensors shaped as the parameters."""
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self._params]), self._params)]

    def _worker_state(self) -> dict[str, Any]:
        """This worker's own state; its local model also while evaluation has other weights swapped in."""
        state = super().lightning_module_state_dict()
        for (name, _), local in zip(self.lightning_module.named_parameters(), self._local_params):
            if name in state:
                state[name] = local
        return {
            "model": state,
            "optimizer": self.optimizers[0].state_dict(),
            "origin": self._origin,
            "round_length": self._round_length,
            "steps_in_round": self._steps_in_round,
            "version": self._version,
            "rounds": self.rounds,
            "pseudo_gradients_sent": self.pseudo_gradients_sent,
            "staleness": self.staleness,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "wait_seconds": self.wait_seconds,
            "reply_waits": self.reply_waits,
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
        }

    # ------------------------------------------------------------------ registration

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "async_diloco",
            cls,
            description="Asynchronous DiLoCo: each worker's pseudo-gradient is applied as it arrives "
            "(Delayed Nesterov, dynamic local updates); no worker waits for another",
            override=True,
        )
