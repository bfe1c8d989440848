"""Dynamic local updates for synchronous DiLoCo: each worker's inner steps follow its measured speed.

The Dynamic Local Updates of "Asynchronous Local-SGD Training for Language
Modeling" (Liu et al., 2024, section 5), applied to synchronous rounds: in every
round worker ``i`` runs ``H_i = max(1, round(H * v_i / max_j v_j))`` real inner
steps (:func:`~lightning_converge.strategies.diloco.async_outer.dynamic_inner_steps`),
``v`` being the workers' speeds (inner steps a second) measured over their last
round, so a slow worker does fewer inner steps and every worker reaches the sync
at about the same time. The first round, before any speed is known, is H for all.

**Idle steps.** Every worker still goes through H Lightning steps a round (the
round schedule, ``trainer.global_step``, epochs, validation, checkpoints and
``max_steps`` stay the same on every worker, so all of Lightning's collectives
and the pseudo-gradient all-reduce stay matched): the steps after its ``H_i``-th
are *idle*: the batch is drawn from the dataloader (and left unused), the
module's ``training_step``, the backward pass and the optimizer step are
skipped (``outputs`` is ``{"loss": nan, "idle": True}``), and the
learning-rate schedulers step as they do at any step, so every
worker's learning rate follows the common progress, as in Liu et al.'s
framework. A worker's real steps come first in its round, its idle ones last.

**Speeds.** A worker's speed is its real steps over the seconds they took, timed
from one training batch's start to the next (a step's forward, backward,
optimizer step, its callbacks and the next batch's loading), over the real steps
of its current round whose batches both began and ended inside the round
(the last step before a sync is not timed: its interval holds the sync).
Validation inside the round is not timed. The timing synchronizes nothing with
the device (on CUDA the host may run a few kernels ahead of the device within an
interval). Each worker's speed travels with the round's sync, as a tiny
all-gather on the exchange's process group beside the pseudo-gradient all-reduce
(:meth:`~lightning_converge.strategies.diloco.exchange.PseudoGradientExchange.start_gather`),
and every worker computes every ``H_i`` from the same gathered table: the one host
read this adds, W numbers once a round at the sync, where the outer step on a CPU
outer state reads the average back anyway. Time spent in Lightning's collectives
outside validation (a checkpoint's barrier, a ``sync_dist`` log) counts as
training time in the round it falls in.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch

from lightning_converge.strategies.diloco.async_outer import dynamic_inner_steps
from lightning_converge.strategies.diloco.exchange import PseudoGradientExchange


def disable_sigterm_broadcast(trainer: Any) -> None:
    """Stop Lightning from broadcasting rank 0's SIGTERM flag before every training batch: a collective that
    would make every worker wait for the slowest at every step (for workers that run at their own pace:
    dynamic local updates, asynchronous DiLoCo). Each worker still stops on its own SIGTERM: the epoch loop
    checks its flag after every batch."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


class DynamicInnerSteps:
    """This worker's inner steps in the current round, and the clock that measures its speed.

    Args:
        clock: the clock that times the steps (seconds).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        # H_i of the current round (None before the first round starts) and the speeds it came from.
        self.inner_steps: Optional[int] = None
        self.speeds: Optional[list[Optional[float]]] = None
        # The speeds gathered at the last sync, not yet used (a future resolving to one number per worker).
        self._gathering: Optional[torch.futures.Future] = None
        self._gathered: Optional[list[Optional[float]]] = None
        # The timing of this round's real steps: seconds and steps timed so far; the last batch's start, and
        # whether it began a real step; the steps of the round done then; validation time since then.
        self.seconds = 0.0
        self.steps = 0
        self._last_start: Optional[float] = None
        self._last_real = False
        self._last_steps_done = 0
        self._paused = 0.0
        self._pause_start: Optional[float] = None

    def is_idle(self, steps_done: int) -> bool:
        """Whether the step after ``steps_done`` steps of the round is idle (this worker's H_i are done)."""
        return self.inner_steps is not None and steps_done >= self.inner_steps

    def measured_speed(self) -> Optional[float]:
        """This worker's inner steps a second over the timed real steps of its current round (None: none
        timed). Tests replace it to force a table of speeds."""
        return self.steps / self.seconds if self.steps and self.seconds > 0 else None

    # ------------------------------------------------------------------ timing

    def batch_starts(self, steps_done: int) -> None:
        """A training batch starts, ``steps_done`` steps into the round: the interval since the previous
        batch's start is timed if that batch belonged to a real step of this round."""
        now = self._clock()
        if self._last_start is not None and self._last_real:
            self.seconds += now - self._last_start - self._paused
            self.steps += steps_done - self._last_steps_done
        self._last_start, self._last_real = now, not self.is_idle(steps_done)
        self._last_steps_done = steps_done
        self._paused = 0.0

    def pause(self) -> None:
        """Validation starts: its time is not the worker's training speed."""
        self._pause_start = self._clock()

    def resume(self) -> None:
        """Validation ends."""
        if self._pause_start is not None:
            self._paused += self._clock() - self._pause_start
            self._pause_start = None

    # ------------------------------------------------------------------ the sync and the rounds

    def share_speed(self, exchange: PseudoGradientExchange, device: torch.device) -> None:
        """At a sync, after the pseudo-gradient's all-reduce started: start gathering every worker's speed
        (0 for one not yet measured) on the exchange's group, in its order."""
        self._gathering = exchange.start_gather(self.measured_speed() or 0.0, device)

    def receive_speeds(self, exchange: PseudoGradientExchange, step: int) -> None:
        """After the sync's average is applied, at inner step ``step``: wait for the gathered speeds (they
        came beside it)."""
        if self._gathering is not None:
            numbers = exchange.resolve_gather(self._gathering, step)
            self._gathering = None
            self._gathered = [speed if speed > 0 else None for speed in numbers]

    def start_round(self, round_length: int, rank: int) -> None:
        """A round of ``round_length`` (H) steps starts: this worker's H_i from the speeds gathered at the
        last sync (H before any), and a fresh clock."""
        if self._gathered is not None:
            self.speeds, self._gathered = self._gathered, None
            self.inner_steps = dynamic_inner_steps(self.speeds, round_length)[rank]
        else:
            self.inner_steps = round_length
        self.seconds, self.steps = 0.0, 0
        self._last_start, self._last_real, self._last_steps_done = None, False, 0

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This worker's H_i of the current round and the time and steps timed in it so far."""
        return {"inner_steps": self.inner_steps, "seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the batch running when the checkpoint was saved is not timed."""
        self.inner_steps = state["inner_steps"]
        self.seconds, self.steps = state["seconds"], state["steps"]
        self._last_start, self._last_real = None, False
