"""The parameter update of 1-bit Adam's compression stage: Adam with a frozen variance."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def onebit_adam_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    variance_steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
) -> None:
    """Update each parameter in place from its (already averaged) momentum and frozen variance.

    The same step as :func:`~lightning_converge.kernels.adamw.adamw` with the moments
    left untouched: the momentum ``exp_avg`` was updated and exchanged by the
    caller, and ``exp_avg_sq`` stopped changing at step ``variance_step``, so its
    bias correction is that step's. ``steps`` count this step. Math in fp32.
    """
    for p, m, v, step, variance_step in zip(params, exp_avgs, exp_avg_sqs, steps, variance_steps):
        # Bias corrections in float64, as AdamW's kernel forms them.
        denom = v.sqrt() / torch.sqrt(1 - beta2.double() ** variance_step.double()) + eps
        update = m / (1 - beta1.double() ** step.double()) / denom
        p.copy_(p.float() * (1 - lr * weight_decay) - lr * update)
