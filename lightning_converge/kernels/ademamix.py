"""AdEMAMix ("The AdEMAMix Optimizer: Better, Faster, Older"), as in apple/ml-ademamix (PyTorch)."""

from __future__ import annotations

import importlib
import math
from typing import Sequence

import torch
from torch import Tensor

from lightning_converge.kernels.adamw import adam_bias_corrections, stacked_steps
from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel, math_dtype


def _half_life(beta: Tensor) -> Tensor:
    # Number of steps for beta**t to fall to one half, minus one (the paper's f).
    return math.log(0.5) / torch.log(beta + 1e-8) - 1


def warmed_up_alpha_beta3(
    step: Tensor,
    alpha: Tensor,
    beta1: Tensor,
    beta3: Tensor,
    alpha_warmup: int | None,
    beta3_warmup: int | None,
) -> tuple[Tensor, Tensor]:
    """The paper's schedulers: alpha rises linearly from 0; beta3 rises from beta1
    linearly in half-life. Both reach their final values at their warm-up step count."""
    if alpha_warmup:
        alpha = alpha * torch.clamp(step / alpha_warmup, max=1.0)
    if beta3_warmup:
        frac = torch.clamp(step / beta3_warmup, max=1.0)
        half_life = (1 - frac) * _half_life(beta1) + frac * _half_life(beta3)
        beta3 = torch.where(frac < 1, torch.pow(0.5, 1 / (half_life + 1)), beta3)
    return alpha, beta3


def ademamix_step_factors(
    steps: list[Tensor],
    alpha: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor, in float64: Adam's two bias corrections, the warmed-up alpha and
    beta3, and ``1 - beta3`` (for beta3 = 0.99999, fp32 would be 1.4e-3 off)."""
    step = stacked_steps(steps)
    alpha, beta1, beta3 = (value.to(torch.float64) for value in (alpha, beta1, beta3))
    alpha_t, beta3_t = warmed_up_alpha_beta3(step, alpha, beta1, beta3, alpha_warmup, beta3_warmup)
    return dict(
        **adam_bias_corrections(steps, beta1, beta2),
        alpha_t=alpha_t.expand_as(step).unbind(),
        one_minus_beta3_t=(1 - beta3_t).expand_as(step).unbind(),
    )


@kernel(step_factors=ademamix_step_factors)
def ademamix(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_fasts: list[Tensor],
    exp_avg_slows: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    alpha: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    cautious: bool = False,
    bias_correction1: Sequence[Tensor],
    bias_correction2_sqrt: Sequence[Tensor],
    alpha_t: Sequence[Tensor],
    one_minus_beta3_t: Sequence[Tensor],
) -> None:
    """One AdEMAMix step, in place; per-tensor factors from :func:`ademamix_step_factors`.

    Bias correction on the fast EMA and the second moment only; the slow EMA
    enters scaled by alpha; weight decay is added to the update (scaled by lr).
    """
    for p, g, m1, m2, nu, bc1, bc2_sqrt, alpha_i, one_minus_beta3_i in zip(
        params,
        grads,
        exp_avg_fasts,
        exp_avg_slows,
        exp_avg_sqs,
        bias_correction1,
        bias_correction2_sqrt,
        alpha_t,
        one_minus_beta3_t,
    ):
        g_ = g.to(math_dtype(p))
        m1.lerp_(g_, 1 - beta1)
        m2.lerp_(g_, one_minus_beta3_i)
        nu.mul_(beta2).add_(g_ * g_ * (1 - beta2))
        denom = nu.sqrt() / bc2_sqrt + eps
        update = (m1 / bc1 + alpha_i * m2) / denom
        if cautious:
            update = update * cautious_mask(update, g_)
        p_ = p.to(g_.dtype)
        p.copy_(p_ - lr * (update + weight_decay * p_))


ademamix.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.ademamix").ademamix)
