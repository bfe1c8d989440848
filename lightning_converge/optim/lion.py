from __future__ import annotations

from typing import Any

from lightning_converge.kernels import lion
from lightning_converge.optim.base import FusedOptimizer, beta_tuple, flag, non_negative


class Lion(FusedOptimizer):
    """Lion ("Symbolic Discovery of Optimization Algorithms"), with decoupled weight decay.

    The update is ``sign(b1*m + (1-b1)*g)``; the momentum then moves with b2.
    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's.
    """

    kernel = lion
    state_names = ("exp_avg",)
    kernel_reads_step = False
    hyperparameters = dict(lr=non_negative, betas=beta_tuple(2), weight_decay=non_negative, cautious=flag)

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        cautious: bool = False,
        backend: str = "auto",
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious=cautious)
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2 = group["betas"]
        changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
        return changing, dict(cautious=group["cautious"])
