"""Adan ("Adan: Adaptive Nesterov Momentum Algorithm"), as in the authors' sail-sg/Adan code."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel


@kernel
def adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    no_prox: bool = False,
    cautious: bool = False,
) -> None:
    """One Adan step, in place.

    ``prev_grads`` start as the first gradient, so the first difference is zero.
    Three bias corrections: the gradient EMA, the difference EMA, the second moment.
    Weight decay is the proximal form ``p / (1 + lr*wd)`` unless ``no_prox``.
    """
    for p, g, m, d, n, prev, step in zip(
        params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, steps
    ):
        g32 = g.float()
        diff = g32 - prev
        m.lerp_(g32, 1 - beta1)
        d.lerp_(diff, 1 - beta2)
        nesterov = g32 + beta2 * diff
        n.mul_(beta3).add_(nesterov * nesterov * (1 - beta3))
        denom = n.sqrt() / torch.sqrt(1 - beta3**step) + eps
        update = (m / (1 - beta1**step) + beta2 * d / (1 - beta2**step)) / denom
        if cautious:
            update = update * cautious_mask(update, g32)
        if no_prox:
            p.copy_(p.float() * (1 - lr * weight_decay) - lr * update)
        else:
            p.copy_((p.float() - lr * update) / (1 + lr * weight_decay))
        prev.copy_(g32)


adan.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adan").adan)
