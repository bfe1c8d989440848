"""Schedule-Free SGD and AdamW ("The Road Less Scheduled", Defazio et al., 2024), as in the
authors' package ``schedulefree`` (``SGDScheduleFree``, ``AdamWScheduleFree``).

Three sequences: the fast iterate ``z`` (kept as state), the average ``x`` of the ``z`` and
the point ``y = (1 - beta1) * z + beta1 * x`` where gradients are taken. In training the
parameters hold ``y``; ``x`` is never stored: it is ``lerp(y, z, 1 - 1/beta1)`` (what the
optimizers' ``eval()`` writes into the parameters). One step, with ``c`` the weight of the
new point in the average (``ckp1``, from the optimizer's running weight sum)::

    d = direction(g) + weight_decay * y         # weight decay taken at y, as the reference
    y = lerp(y, z, c) + lr * (beta1 * (1 - c) - 1) * d
    z = z - lr * d

which updates ``y`` in place without forming ``x``. ``direction`` is ``g`` for SGD and
``g / (sqrt(v / bias_correction2) + eps)`` for AdamW, with ``v`` its second moment.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel, math_dtype


def _interpolate_and_step(
    p: Tensor, z: Tensor, direction: Tensor, lr: Tensor, beta1: Tensor, weight_decay: Tensor, ckp1: Tensor
) -> None:
    """The step both rules share, given the update direction (in the math dtype)."""
    y = p.to(direction.dtype)
    direction = direction + weight_decay * y
    p.copy_(torch.lerp(y, z, ckp1) + direction * (lr * (beta1 * (1 - ckp1) - 1)))
    z.sub_(direction * lr)


@kernel
def schedule_free_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    *,
    lr: Tensor,
    momentum: Tensor,
    weight_decay: Tensor,
    ckp1: Tensor,
) -> None:
    """One Schedule-Free SGD step, in place on the parameters (``y``) and ``zs``.

    ``lr`` is the learning rate after warm-up, ``ckp1`` the weight of this step in the
    average. Math in fp32 for fp32, bf16 and fp16 parameters (``z`` is fp32), fp64 for fp64.
    """
    for p, g, z in zip(params, grads, zs):
        _interpolate_and_step(p, z, g.to(math_dtype(p)), lr, momentum, weight_decay, ckp1)


@kernel
def schedule_free_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    ckp1: Tensor,
    bias_correction2: Tensor,
) -> None:
    """One Schedule-Free AdamW step, in place on the parameters (``y``), ``zs`` and ``exp_avg_sqs``.

    ``lr`` is the learning rate after warm-up, ``ckp1`` the weight of this step in the
    average, ``bias_correction2`` is ``1 - beta2**k`` for the optimizer's step ``k`` (the
    schedule-free step count is per group, as in the reference). Math in fp32 for fp32,
    bf16 and fp16 parameters (state is fp32), fp64 for fp64.
    """
    for p, g, z, v in zip(params, grads, zs, exp_avg_sqs):
        g_ = g.to(math_dtype(p))
        v.mul_(beta2).add_(g_ * g_ * (1 - beta2))
        direction = g_ / ((v / bias_correction2).sqrt() + eps)
        _interpolate_and_step(p, z, direction, lr, beta1, weight_decay, ckp1)


def _triton(name: str):
    return lambda: getattr(importlib.import_module("lightning_converge.kernels.triton.schedule_free"), name)


schedule_free_sgd.register_triton(_triton("schedule_free_sgd"))
schedule_free_adamw.register_triton(_triton("schedule_free_adamw"))
