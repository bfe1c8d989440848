"""Lion ("Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

import importlib

from torch import Tensor

from lightning_converge.kernels.cautious import cautious_mask
from lightning_converge.kernels.dispatch import kernel, math_dtype


@kernel
def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    cautious: bool = False,
) -> None:
    """One Lion step, in place: ``p -= lr * sign(b1*m + (1-b1)*g)``, then ``m = b2*m + (1-b2)*g``."""
    for p, g, m in zip(params, grads, exp_avgs):
        g_ = g.to(math_dtype(p))
        update = m.lerp(g_, 1 - beta1).sign()
        if cautious:
            update = update * cautious_mask(update, g_)
        p.copy_(p.to(g_.dtype) * (1 - lr * weight_decay) - lr * update)
        m.lerp_(g_, 1 - beta2)


lion.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.lion").lion)
