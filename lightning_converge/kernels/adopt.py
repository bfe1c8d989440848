"""ADOPT ("ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate"), clipped variant."""

from __future__ import annotations

import importlib
import math
from typing import Sequence

import torch
from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.adamw import stacked_steps
from lightning_converge.kernels.dispatch import kernel, math_dtype


def adopt_clip_bounds(steps: list[Tensor], clip_exponent: float | None = 0.25) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor, in float64: the clipping bound ``(step-1)**clip_exponent`` (infinite without clipping)."""
    step = stacked_steps(steps)
    bound = (step - 1) ** clip_exponent if clip_exponent is not None else torch.full_like(step, math.inf)
    return dict(clip_bound=bound.unbind())


@kernel(step_factors=adopt_clip_bounds)
def adopt(
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
    decouple: bool = False,
    clip_exponent: float | None = 0.25,
    cautious: bool = False,
    clip_bound: Sequence[Tensor],
) -> None:
    """One ADOPT step, in place. ``steps`` already count this step (1 on the first).

    The first step only initializes the second moment with g**2. Afterwards the
    gradient is normalized by the *previous* second moment, clipped at
    ``(step-1)**clip_exponent`` (None: no clipping), enters the momentum, and the
    parameter moves by the momentum. Weight decay is L2 (added to the gradient)
    unless ``decouple``, then ``p *= 1 - lr*wd`` from the second step on.
    """
    for p, g, m, v, step, bound in zip(params, grads, exp_avgs, exp_avg_sqs, steps, clip_bound):
        first = step == 1
        p_ = p.to(math_dtype(p))
        g_ = g.to(p_.dtype)
        if not decouple:
            g_ = g_ + weight_decay * p_
        normed = torch.clamp(g_ / torch.clamp(v.sqrt(), min=eps), -bound, bound)
        m_new = torch.where(first, m, m.lerp(normed, 1 - beta1))
        update = m_new
        if cautious:
            update = update * cautious_mask(update, g_)
        p_new = p_ * (1 - lr * weight_decay) if decouple else p_
        p.copy_(torch.where(first, p_, p_new - lr * update))
        m.copy_(m_new)
        v.copy_(torch.where(first, g_ * g_, v * beta2 + g_ * g_ * (1 - beta2)))


adopt.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.adopt").adopt)
