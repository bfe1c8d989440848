"""Training-loss curves of multi-rank runs, shared by the distributed benchmarks.

- :func:`mean_over_ranks`: per step, the mean of the ranks' losses (the loss of the whole batch);
- :func:`trailing_mean`: a per-step curve smoothed;
- :func:`first_step_at_or_below`: when a smoothed curve first reaches a level;
- :class:`StopAtLoss`: a callback that ends a fit there, so a timed run stops at a target loss.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import lightning as L
import torch


def mean_over_ranks(losses_by_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per step, the mean of the ranks' training losses."""
    return [sum(losses) / len(losses) for losses in zip(*losses_by_rank)]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def first_step_at_or_below(smoothed: Sequence[float], level: float, window: int) -> Optional[int]:
    """0-based index of the first step (once the trailing mean spans a whole window) at or below ``level``."""
    return next((i for i in range(window - 1, len(smoothed)) if smoothed[i] <= level), None)


class StopAtLoss(L.Callback):
    """Stop after the first step at which the training loss of all ranks, averaged and smoothed as
    the benchmarks' summaries do it, is at or below ``target`` (:func:`first_step_at_or_below`).

    Every step all-gathers each rank's loss (8 bytes, not counted as the strategy's), so the ranks
    decide alike.
    """

    def __init__(self, target: float, window: int) -> None:
        self.target, self.window = target, window
        self.losses_by_step: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = torch.tensor(float(outputs["loss"]), dtype=torch.float64)
        self.losses_by_step.append(trainer.strategy.all_gather(loss).tolist())
        smoothed = trailing_mean(mean_over_ranks(list(zip(*self.losses_by_step))), self.window)
        if first_step_at_or_below(smoothed, self.target, self.window) is not None:
            trainer.should_stop = True
