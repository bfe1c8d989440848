"""AdamW ("Decoupled Weight Decay Regularization"), the same update as ``torch.optim.AdamW``."""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel, math_dtype


def stacked_steps(steps: list[Tensor]) -> Tensor:
    """The step counts as one float64 tensor: the per-step scalars derived from them
    (bias corrections, warm-ups) are formed in float64 and rounded only when they
    meet the parameters in the kernel body."""
    return torch.stack(steps).to(torch.float64)


def adam_bias_corrections(steps: list[Tensor], beta1: Tensor, beta2: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor, in float64: ``1 - beta1**step`` and ``sqrt(1 - beta2**step)``."""
    step = stacked_steps(steps)
    beta1, beta2 = beta1.to(torch.float64), beta2.to(torch.float64)
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

    Math in fp32 for fp32, bf16 and fp16 parameters (state is fp32), in fp64 for fp64
    parameters (state is fp64). The scalars are 0-d tensors, float64 from the
    optimizers: ``1 - beta1`` and the like are formed before rounding.
    """
    for p, g, m, v, bc1, bc2_sqrt in zip(params, grads, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
        g_ = g.to(math_dtype(p))
        # The update's signs are the new first moment's (the denominator is positive).
        direction = torch.lerp(m, g_, 1 - beta1) if cautious else None
        m.lerp_(g_, 1 - beta1)
        v.mul_(beta2).add_(g_ * g_ * (1 - beta2))
        denom = v.sqrt() / bc2_sqrt + eps
        update = m / bc1 / denom
        if cautious:
            update = update * cautious_mask(update, g_, direction)
        p.copy_(p.to(g_.dtype) * (1 - lr * weight_decay) - lr * update)


adamw.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adamw").adamw)
