"""Compressing gradients that a loss scaler scaled (fp16 AMP): units, overflow steps, skipped steps."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout
from lightning_converge.kernels.finite import all_finite


class ScaledReduce:
    """Run a :class:`~lightning_converge.comm.base.Compressor` on gradients scaled by a ``GradScaler``.

    Under fp16 AMP the DDP communication hook sees gradients multiplied by the
    loss scale, and a scaler overflows by design: some steps carry inf/NaN, and
    the scaler skips them and lowers the scale. For each bucket, :meth:`reduce`

    1. divides the gradients by the loss scale, so that the compressor and its
       state (error-feedback residuals, momenta, PowerSGD's warm start) always
       work in unscaled units and stay valid when the scale changes; a bucket
       holding an inf or NaN on this rank is zeroed instead, so no compressor
       sees a non-finite value;
    2. saves the compressor's state of the bucket (:meth:`Compressor.snapshot`);
    3. sends this rank's "finite" flag with the compressor's first collective
       (:meth:`Exchange.carry_flag`: one element or byte more, no extra
       collective), so every rank learns whether the bucket was finite on every
       rank and all ranks decide the same;
    4. returns the average times the loss scale, or all NaN when some rank's
       bucket was not finite: the scaler then finds the overflow on every rank
       and skips the step.

    :meth:`finish_step`, once per optimizer step after it, puts back the saved
    state of all the step's buckets if any of them was not finite: a step the
    scaler skipped leaves the compressor as it was (its finite buckets too, whose
    gradients were not applied either). One host synchronization per optimizer
    step, none per bucket. The cost: one copy of the per-element state per step.
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._restores: list[Callable[[], None]] = []
        self._finite: list[Tensor] = []

    def reduce(self, grad: Tensor, layout: Layout, exchange: Exchange, step: int, scale: float) -> Tensor:
        """The average of ``grad`` (flat fp32, scaled by ``scale``; overwritten) over the ranks, in the same units."""
        finite = all_finite([grad])
        grad.mul_(1.0 / scale).masked_fill_(finite.logical_not(), 0.0)
        self._restores.append(self.compressor.snapshot(layout, grad.device))
        exchange.carry_flag(finite)
        average = self.compressor.reduce(grad, layout, exchange, step)
        finite_everywhere = exchange.flag_on_every_rank()
        self._finite.append(finite_everywhere)
        return average.mul_(torch.where(finite_everywhere, scale, math.nan))

    def finish_step(self) -> bool:
        """Whether this step's buckets were finite on every rank; if not, restore the compressor's state."""
        finite = bool(torch.stack(self._finite).all()) if self._finite else True
        if not finite:
            for restore in reversed(self._restores):  # the oldest snapshot of a bucket wins
                restore()
        self._restores.clear()
        self._finite.clear()
        return finite
