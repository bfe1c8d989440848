"""Weight EMA: the exponential moving average of parameters behind EMA, Switch EMA and Polyak averaging."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def ema_update(averages: list[Tensor], currents: list[Tensor], *, decay: Tensor) -> None:
    """Move each average toward its current tensor, in place: ``average = decay * average + (1 - decay) * current``,
    except where ``current`` is inf or NaN: there the average keeps its value.

    Written as ``torch.lerp`` with weight ``1 - decay``, which is exact at both
    ends: ``decay=1`` keeps the average, ``decay=0`` copies the current tensor.
    ``averages`` may be fp32 for bf16/fp16 ``currents`` (an average kept in bf16
    would round away updates smaller than its 8-bit mantissa); the math is done
    in the averages' dtype, at least fp32.

    The inf/NaN guard is elementwise, in the same pass: an average never takes
    in a non-finite value (it would stay there for good), and no separate
    finiteness pass or host sync is needed. ``current - current == 0`` tests
    finiteness (inf - inf and NaN - NaN are NaN); compiled, it costs nothing on
    top of the lerp, where ``isfinite`` costs 15%.
    """
    for average, current in zip(averages, currents):
        current = current.to(average.dtype)
        finite = (current - current) == 0
        average.copy_(torch.where(finite, torch.lerp(average, current, 1 - decay), average))

ema_update.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.ema").ema_update)
