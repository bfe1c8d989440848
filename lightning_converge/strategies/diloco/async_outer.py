"""The server side of asynchronous DiLoCo: one outer step per pseudo-gradient, as each arrives.

Lightning-free and transport-free, so it is unit-tested without processes:
:class:`AsyncOuterServer` holds the global parameters (an
:class:`~lightning_converge.strategies.diloco.outer.OuterState`) and applies the
pseudo-gradient of whichever worker arrives, in arrival order, with one of three
outer rules. Notation: arrival ``t = 1, 2, ...`` brings pseudo-gradient ``g_t``
(the worker's start point minus its end point) from a worker that pulled the
global parameters ``theta_pull`` at version ``v_pull`` (the number of updates
applied then); ``eps`` is ``outer_lr``, ``beta`` is ``outer_momentum``, ``m``
the momentum buffer (0 at first).

* ``"sgd"``: heavy-ball momentum at every arrival, ``m <- beta m + g_t``,
  ``theta <- theta - eps m``.
* ``"nesterov"``: Nesterov momentum at every arrival, ``m <- beta m + g_t``,
  ``theta <- theta - eps (g_t + beta m)``. Unstable on stale interleaved updates
  (Liu et al., section 4).
* ``"delayed_nesterov"`` (the default): **Delayed Nesterov**, the outer update of
  "Asynchronous Local-SGD Training for Language Modeling" (Liu et al., 2024,
  arXiv 2401.09135), with ``N = delayed_nesterov_period``. Pseudo-gradients are
  buffered, ``Delta <- Delta + g_t``; the momentum moves only every N arrivals::

      if t % N == 0:  m <- beta m + Delta / N;  theta <- theta - eps (g_t / N + beta m);  Delta <- 0
      else:                                     theta <- theta - eps g_t / N

  So every pseudo-gradient is applied at once, a 1/N share of it without
  momentum, and the momentum term is added once per N arrivals, from their
  average: N fresh arrivals move the global parameters exactly as one
  synchronous Nesterov outer step on their average would (sync DiLoCo with N
  workers). ``N = 1`` is ``"nesterov"``. (In the paper the steps in between may
  also carry a fraction ``c`` of the momentum term, its "momentum activation";
  this is its default ``c = 0``.)

Staleness of an arrival: ``v_now - v_pull``, the updates applied since the
worker pulled. Two controls act on it before the rule above runs:

* ``max_staleness``: an arrival staler than this is dropped (not applied; counted
  in ``dropped``); the worker pulls the current parameters and goes on.
* ``staleness_penalty`` (lambda), the staleness gap penalty of CO2 ("CO2: Efficient
  Distributed Training with Full Communication-Computation Overlap", Sun et al.,
  2024, arXiv 2401.16265), in this form: the pseudo-gradient is scaled by
  ``1 / (1 + lambda * ||theta_now - theta_pull|| / ||g_t||)``, so an update is scaled
  down as far as the global model moved since its worker pulled, relative to the
  update's own length (a fresh update, gap 0, is not scaled). With lambda > 0 the
  server keeps each worker's ``theta_pull``.

**Dynamic local updates** (Liu et al., section 5): :func:`dynamic_inner_steps`
gives each worker ``H_i = max(1, round(H * v_i / max_j v_j))`` inner steps for
speeds ``v`` (inner steps a second), so the fastest runs ``H`` and every round
takes about the same wall-clock time. Speeds not yet reported (None) get ``H``.

The outer learning rate may be a schedule of the inner steps applied so far,
summed over the workers (``inner_steps_applied``).

**Compressed messages** (``compressor``, a :class:`~lightning_converge.comm.Compressor`
whose ``point_to_point`` is True): a worker sends ``compress(g_t)`` with error feedback of
its own, and the server applies ``g_t = decode(payload)`` (:meth:`AsyncOuterServer.decode`).
The reply is compressed too, as a difference: the server keeps, per worker, the
global parameters as that worker holds them, ``theta_w``, and sends
``compress(theta - theta_w)``; both sides then add ``decode(payload)`` to
``theta_w``, bit for bit the same (:meth:`AsyncOuterServer.pull_payload`). What a
payload did not carry stays in ``theta - theta_w`` and goes with the next reply:
server-side error feedback, without a residual of its own. A worker's round
starts from ``theta_w`` (its pseudo-gradient is measured from there; the staleness
penalty's gap too), which lags ``theta`` by the compression error only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from lightning_converge.checks import check_choice, check_in_range, check_int
from lightning_converge.comm import Compressor, Exchange, Layout
from lightning_converge.schedules import Schedule
from lightning_converge.strategies.diloco.outer import OuterState

#: The rank that runs the server (beside its own worker).
SERVER_RANK = 0

#: The outer rules the server runs; ``"delayed_nesterov"`` needs ``delayed_nesterov_period``.
ASYNC_OUTER_OPTIMIZERS = ("delayed_nesterov", "nesterov", "sgd")


def check_async_options(
    inner_steps: Any,
    outer_optimizer: Any,
    outer_lr: Any,
    outer_momentum: Any,
    delayed_nesterov_period: Any,
    staleness_penalty: Any,
    max_staleness: Any,
) -> None:
    """Raise, naming the argument and what it may be, if an option of asynchronous DiLoCo is invalid
    (``delayed_nesterov_period`` and ``max_staleness`` may be None)."""
    check_int("inner_steps", inner_steps, 1)
    check_choice("outer_optimizer", outer_optimizer, ASYNC_OUTER_OPTIMIZERS)
    if not callable(outer_lr):  # a schedule's values are the user's
        check_in_range("outer_lr", outer_lr, 0, low_open=True)
    check_in_range("outer_momentum", outer_momentum, 0, 1, high_open=True)
    check_int("delayed_nesterov_period", delayed_nesterov_period, 1, allow_none=True)
    check_in_range("staleness_penalty", staleness_penalty, 0)
    check_int("max_staleness", max_staleness, 0, allow_none=True)


def dynamic_inner_steps(speeds: Sequence[Optional[float]], inner_steps: int) -> list[int]:
    """Dynamic local updates: each worker's inner steps for its speed (inner steps a second; None: not yet
    measured), ``max(1, round(inner_steps * speed / fastest))``; the fastest, and any unmeasured, run
    ``inner_steps``."""
    known = [speed for speed in speeds if speed is not None and speed > 0]
    if not known:
        return [inner_steps] * len(speeds)
    fastest = max(known)
    return [
        inner_steps if speed is None or speed <= 0 else max(1, round(inner_steps * speed / fastest)) for speed in speeds
    ]


class SoleSender(Exchange):
    """What a compressor sees of a point-to-point message: one sender, ``rank`` (a world of one; ternary
    draws its random numbers by it), and no collective."""

    def __init__(self, rank: int) -> None:
        super().__init__(group=None)
        self._rank = rank

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return self._rank


def parameters_layout(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> Layout:
    """The compressors' view of a flat vector of ``params`` (names: their indices unless given)."""
    names = [str(index) for index in range(len(params))] if names is None else names
    return Layout(tuple(names), tuple(p.shape for p in params))


@dataclass
class Arrival:
    """What the server did with one pseudo-gradient: the version it reached, the arrival's staleness,
    whether it was applied (False: dropped by ``max_staleness``) and the scale it was applied with."""

    worker: int
    version: int
    staleness: int
    applied: bool
    scale: float = 1.0


@dataclass
class WorkerRecord:
    """The server's view of one worker: the version it pulled, its applied rounds, its last speed."""

    pulled_version: int = 0
    rounds: int = 0
    speed: Optional[float] = None
    # The global parameters as it holds them since its last pull, flat (kept only with a staleness penalty
    # or a compressor: with one, the sum of the decoded replies).
    pulled: Optional[Tensor] = field(default=None, repr=False)


class AsyncOuterServer:
    """The global parameters and the outer rule of asynchronous DiLoCo (see the module docstring).

    Not thread-safe: the caller serializes :meth:`arrive` and :meth:`pull` (the strategy holds a lock).

    Args:
        params: the model's parameters; the global parameters start as fp32 copies on ``device``.
        outer_optimizer: a name from :data:`ASYNC_OUTER_OPTIMIZERS`.
        outer_lr: a schedule of the inner steps applied so far (summed over workers).
        outer_momentum, delayed_nesterov_period, staleness_penalty, max_staleness, inner_steps,
            dynamic: as for :class:`~lightning_converge.strategies.diloco.AsyncDiLoCoStrategy`.
        device, backend: where the outer state lives; the fused kernel's backend.
        compressor: how the workers' pseudo-gradients arrive and the replies go (None: fp32), see
            **Compressed messages** above; the server compresses with a copy of its own.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        outer_optimizer: str,
        outer_lr: Schedule,
        outer_momentum: float,
        delayed_nesterov_period: int,
        staleness_penalty: float,
        max_staleness: Optional[int],
        inner_steps: int,
        dynamic: bool,
        device: torch.device,
        backend: str,
        *,
        compressor: Optional[Compressor] = None,
    ) -> None:
        delayed = outer_optimizer == "delayed_nesterov"
        self._period = delayed_nesterov_period if delayed else None
        self._lr = outer_lr
        self._momentum = outer_momentum
        # Delayed Nesterov's momentum step is heavy-ball with lr eps * beta: m <- beta m + Delta/N; theta -= eps beta m.
        kernel_lr = (lambda step: outer_momentum * outer_lr(step)) if delayed else outer_lr
        self.outer = OuterState(
            params, "sgd" if delayed else outer_optimizer, kernel_lr, outer_momentum, device, backend
        )
        self._pieces = [(index, 0, p.numel()) for index, p in enumerate(self.outer.params)]
        self.delayed_sum: Optional[list[Tensor]] = [torch.zeros_like(p) for p in self.outer.params] if delayed else None
        self._penalty = staleness_penalty
        self._max_staleness = max_staleness
        self._inner_steps = inner_steps
        self._dynamic = dynamic
        self.compressor = None if compressor is None else copy.deepcopy(compressor)
        self.layout = parameters_layout(self.outer.params)
        # Updates applied (the version), arrivals (applied or dropped), dropped, inner steps applied.
        self.version = 0
        self.arrivals = 0
        self.dropped = 0
        self.inner_steps_applied = 0
        self.workers: dict[int, WorkerRecord] = {}

    @property
    def params(self) -> list[Tensor]:
        """The global parameters (fp32, on the outer state's device), in ``module.parameters()`` order."""
        return self.outer.params

    def flat_params(self) -> Tensor:
        """A flat fp32 copy of the global parameters (what a worker pulls)."""
        return torch.cat([p.reshape(-1) for p in self.outer.params])

    def pull(self, worker: int) -> tuple[Tensor, int]:
        """``worker`` takes the current global parameters, exactly: (flat copy, version)."""
        record = self.workers.setdefault(worker, WorkerRecord())
        record.pulled_version = self.version
        flat = self.flat_params()
        if self._penalty > 0 or self.compressor is not None:
            record.pulled = flat.clone()
        return flat, self.version

    def pull_payload(self, worker: int) -> list[Tensor]:
        """``worker`` takes the current global parameters over the wire: without a compressor ``[flat fp32
        copy]``; with one, the compressed difference from the parameters it holds, which it adds after
        decoding (as the server does to its copy, see **Compressed messages**)."""
        if self.compressor is None:
            return [self.pull(worker)[0]]
        record = self.workers[worker]
        payload = self.compressor.compress(
            self.flat_params() - record.pulled, self.layout, {}, SoleSender(SERVER_RANK), record.rounds
        )
        record.pulled += self.compressor.decode(payload, self.layout)
        record.pulled_version = self.version
        return payload

    def decode(self, payload: Sequence[Tensor]) -> Tensor:
        """The flat fp32 pseudo-gradient a worker's payload stands for (without a compressor: the payload)."""
        if self.compressor is None:
            return payload[0]
        return self.compressor.decode(list(payload), self.layout)

    def inner_steps_for(self, worker: int) -> int:
        """The inner steps ``worker`` runs in its next round (dynamic local updates, or ``inner_steps``)."""
        if not self._dynamic:
            return self._inner_steps
        ranks = sorted(self.workers)
        return dynamic_inner_steps([self.workers[r].speed for r in ranks], self._inner_steps)[ranks.index(worker)]

    @torch.no_grad()
    def arrive(self, worker: int, pseudo_gradient: Tensor, inner_steps: int, speed: Optional[float] = None) -> Arrival:
        """Apply ``worker``'s flat pseudo-gradient (measured from the parameters it last pulled, after
        ``inner_steps`` inner steps at ``speed`` steps a second); the worker then pulls (:meth:`pull`)."""
        record = self.workers.setdefault(worker, WorkerRecord())
        if speed is not None:
            record.speed = speed
        staleness = self.version - record.pulled_version
        self.arrivals += 1
        if self._max_staleness is not None and staleness > self._max_staleness:
            self.dropped += 1
            return Arrival(worker, self.version, staleness, applied=False)
        flat = pseudo_gradient.to(self.outer.device, torch.float32)
        grads = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]
        scale = self._penalty_scale(record, grads) if self._penalty > 0 and staleness > 0 else 1.0
        if scale != 1.0:
            grads = [g * scale for g in grads]
        self._step(grads)
        self.version += 1
        self.inner_steps_applied += inner_steps
        record.rounds += 1
        return Arrival(worker, self.version, staleness, applied=True, scale=scale)

    def _penalty_scale(self, record: WorkerRecord, grads: Sequence[Tensor]) -> float:
        if record.pulled is None:  # pulled before this server existed (resumed): no gap known
            return 1.0
        gap = torch.linalg.vector_norm(self.flat_params() - record.pulled)
        size = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        # The server runs beside training (its own thread), so reading these two numbers stalls no step.
        gap, size = gap.item(), size.item()
        return 1.0 if size == 0 else 1.0 / (1.0 + self._penalty * gap / size)

    def _step(self, grads: list[Tensor]) -> None:
        step = self.inner_steps_applied
        if self._period is None:  # sgd / nesterov: one kernel step per arrival
            self.outer.step(self._pieces, torch.cat([g.reshape(-1) for g in grads]), step)
            return
        torch._foreach_add_(self.delayed_sum, grads)
        torch._foreach_add_(self.params, grads, alpha=-self._lr(step) / self._period)  # the plain share, every arrival
        if (self.arrivals % self._period) == 0:
            torch._foreach_div_(self.delayed_sum, float(self._period))
            self.outer.step(self._pieces, torch.cat([d.reshape(-1) for d in self.delayed_sum]), step)
            for d in self.delayed_sum:
                d.zero_()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The global state: parameters, outer optimizer, Delayed Nesterov's buffer, counters, and each
        worker's record (keyed by rank; a run with another number of workers ignores them)."""
        return {
            **self.outer.state_dict(),
            "delayed_sum": self.delayed_sum,
            "version": self.version,
            "arrivals": self.arrivals,
            "dropped": self.dropped,
            "inner_steps_applied": self.inner_steps_applied,
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
            "workers": {
                rank: {"pulled_version": r.pulled_version, "rounds": r.rounds, "speed": r.speed, "pulled": r.pulled}
                for rank, r in self.workers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], same_workers: bool) -> None:
        """Restore :meth:`state_dict`; the workers' records only if ``same_workers`` (else they start afresh)."""
        self.outer.load_state_dict(state)
        if (state["delayed_sum"] is None) != (self.delayed_sum is None):
            raise ValueError(
                "AsyncDiLoCoStrategy: the checkpoint's outer optimizer differs from this run's "
                "(Delayed Nesterov against another rule); resume with the outer_optimizer that saved it"
            )
        if self.delayed_sum is not None:
            for current, saved in zip(self.delayed_sum, state["delayed_sum"]):
                current.copy_(saved)
        self.version = state["version"]
        self.arrivals = state["arrivals"]
        self.dropped = state["dropped"]
        self.inner_steps_applied = state["inner_steps_applied"]
        if self.compressor is not None and state.get("compressor") is not None:
            self.compressor.load_state_dict(state["compressor"])
        self.workers = {}
        if same_workers:
            if self.compressor is not None and any(saved["pulled"] is None for saved in state["workers"].values()):
                raise ValueError(
                    "AsyncDiLoCoStrategy: the checkpoint was saved without a compressor, so the server does not "
                    "know the parameters each worker holds; resume with compressor=None, or with another number "
                    "of workers (every worker then starts from the global parameters)"
                )
            for rank, saved in state["workers"].items():
                pulled = saved["pulled"]
                self.workers[rank] = WorkerRecord(
                    saved["pulled_version"],
                    saved["rounds"],
                    saved["speed"],
                    None if pulled is None else pulled.to(self.outer.device),
                )
