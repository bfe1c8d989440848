"""Weight EMA: the exponential moving average of parameters behind EMA, Switch EMA and Polyak averaging."""

from __future__ import annotations

import importlib

from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def ema_update(averages: list[Tensor], currents: list[Tensor], *, decay: Tensor) -> None:
    """Move each average toward its current tensor, in place: ``average = decay * average + (1 - decay) * current``.

    Written as ``torch.lerp`` with weight ``1 - decay``, which is exact at both
    ends: ``decay=1`` keeps the average, ``decay=0`` copies the current tensor.
    ``averages`` may be fp32 for bf16/fp16 ``currents`` (an average kept in bf16
    would round away updates smaller than its 8-bit mantissa); the math is done
    in the averages' dtype, at least fp32.
    """
    for average, current in zip(averages, currents):
        average.lerp_(current.to(average.dtype), 1 - decay)


ema_update.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.ema").ema_update)
