"""AdamW ("Decoupled Weight Decay Regularization"), the same update as ``torch.optim.AdamW``."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel


@kernel
def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    cautious: bool = False,
) -> None:
    """One AdamW step, in place. ``steps`` already count this step (1 on the first).

    Math in fp32 whatever the parameter dtype; state is fp32.
    """
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g32 = g.float()
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).add_(g32 * g32 * (1 - beta2))
        denom = v.sqrt() / torch.sqrt(1 - beta2**step) + eps
        update = m / (1 - beta1**step) / denom
        if cautious:
            update = update * cautious_mask(update, g32)
        p.copy_(p.float() * (1 - lr * weight_decay) - lr * update)


adamw.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adamw").adamw)
