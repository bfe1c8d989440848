"""Grokfast's EMA gradient filter ("Grokfast: Accelerated Grokking by Amplifying Slow Gradients")."""

from __future__ import annotations

import importlib

from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def grokfast_ema(grads: list[Tensor], slows: list[Tensor], *, alpha: Tensor, lamb: Tensor) -> None:
    """Amplify the slow component of each gradient, in place, in one pass.

    ``slow = alpha * slow + (1 - alpha) * grad``, then ``grad += lamb * slow``.
    ``slows`` are fp32; ``grads`` may be bf16/fp16, and the math is fp32 either way.
    """
    for g, s in zip(grads, slows):
        g32 = g.float()
        s.mul_(alpha).add_(g32 * (1 - alpha))
        g.copy_(g32 + lamb * s)


grokfast_ema.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.grokfast").grokfast_ema
)
