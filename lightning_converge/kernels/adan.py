"""Adan ("Adan: Adaptive Nesterov Momentum Algorithm"), as in the authors' sail-sg/Adan code."""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.adamw import stacked_steps
from lightning_converge.kernels.dispatch import kernel, math_dtype


def adan_bias_corrections(
    steps: list[Tensor], beta1: Tensor, beta2: Tensor, beta3: Tensor
) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor, in float64: ``1 - beta1**step``, ``1 - beta2**step`` and ``sqrt(1 - beta3**step)``."""
    step = stacked_steps(steps)
    beta1, beta2, beta3 = (beta.to(torch.float64) for beta in (beta1, beta2, beta3))
    return dict(
        bias_correction1=(1 - beta1**step).unbind(),
        bias_correction2=(1 - beta2**step).unbind(),
        bias_correction3_sqrt=torch.sqrt(1 - beta3**step).unbind(),
    )


@kernel(step_factors=adan_bias_corrections)
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
    bias_correction1: Sequence[Tensor],
    bias_correction2: Sequence[Tensor],
    bias_correction3_sqrt: Sequence[Tensor],
) -> None:
    """One Adan step, in place.

    ``prev_grads`` start as the first gradient, so the first difference is zero.
    Three bias corrections: the gradient EMA, the difference EMA, the second moment.
    Weight decay is the proximal form ``p / (1 + lr*wd)`` unless ``no_prox``.
    """
    for p, g, m, d, n, prev, bc1, bc2, bc3_sqrt in zip(
        params,
        grads,
        exp_avgs,
        exp_avg_diffs,
        exp_avg_sqs,
        prev_grads,
        bias_correction1,
        bias_correction2,
        bias_correction3_sqrt,
    ):
        g_ = g.to(math_dtype(p))
        diff = g_ - prev
        m.lerp_(g_, 1 - beta1)
        d.lerp_(diff, 1 - beta2)
        nesterov = g_ + beta2 * diff
        n.mul_(beta3).add_(nesterov * nesterov * (1 - beta3))
        denom = n.sqrt() / bc3_sqrt + eps
        update = (m / bc1 + beta2 * d / bc2) / denom
        if cautious:
            update = update * cautious_mask(update, g_)
        if no_prox:
            p.copy_(p.to(g_.dtype) * (1 - lr * weight_decay) - lr * update)
        else:
            p.copy_((p.to(g_.dtype) - lr * update) / (1 + lr * weight_decay))
        prev.copy_(g_)


adan.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adan").adan)
