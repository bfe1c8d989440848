"""Grokfast's EMA gradient filter ("Grokfast: Accelerated Grokking by Amplifying Slow Gradients")."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def grokfast_ema(grads: list[Tensor], slows: list[Tensor], *, alpha: Tensor, lamb: Tensor) -> None:
    """Amplify the slow component of each gradient, in place, in one pass.

    ``slow = alpha * slow + (1 - alpha) * grad``, then ``grad += lamb * slow``.
    ``slows`` are fp32; ``grads`` may be bf16/fp16, and the math is fp32 either way.

    Where a gradient element is inf or NaN its slow keeps its value (a slow that
    took one in would keep it for good). With ``alpha=1`` and ``lamb=0`` a pass
    changes nothing at all: how a caller skips a step with a device-side flag,
    without reading it back to the host.
    """
    for g, s in zip(grads, slows):
        g32 = g.float()
        finite = (g32 - g32) == 0  # inf - inf and NaN - NaN are NaN
        s.copy_(torch.where(finite, s * alpha + g32 * (1 - alpha), s))
        g.copy_(g32 + lamb * s)


grokfast_ema.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.grokfast").grokfast_ema
)
