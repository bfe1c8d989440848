"""AdamW ("Decoupled Weight Decay Regularization"), the same update as ``torch.optim.AdamW``."""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel


def adam_bias_corrections(steps: list[Tensor], beta1: Tensor, beta2: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor: ``1 - beta1**step`` and ``sqrt(1 - beta2**step)``."""
    step = torch.stack(steps)
    return dict(
        bias_correction1=(1 - beta1**step).unbind(),
        bias_correction2_sqrt=torch.sqrt(1 - beta2**step).unbind(),
    )


@kernel(step_factors=adam_bias_corrections)
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
    bias_correction1: Sequence[Tensor],
    bias_correction2_sqrt: Sequence[Tensor],
) -> None:
    """One AdamW step, in place. ``steps`` already count this step (1 on the first);
    the bias corrections derived from them arrive from :func:`adam_bias_corrections`.

    Math in fp32 whatever the parameter dtype; state is fp32.
    """
    for p, g, m, v, bc1, bc2_sqrt in zip(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
        g32 = g.float()
        # The update's signs are the new first moment's (the denominator is positive).
        direction = torch.lerp(m, g32, 1 - beta1) if cautious else None
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).add_(g32 * g32 * (1 - beta2))
        denom = v.sqrt() / bc2_sqrt + eps
        update = m / bc1 / denom
        if cautious:
            update = update * cautious_mask(update, g32, direction)
        p.copy_(p.float() * (1 - lr * weight_decay) - lr * update)


adamw.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adamw").adamw)
