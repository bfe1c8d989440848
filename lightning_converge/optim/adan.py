from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_converge.kernels import adan
from lightning_converge.optim.base import FusedOptimizer, beta_tuple, flag, non_negative


class Adan(FusedOptimizer):
    """Adan ("Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models").

    Defaults and update follow the authors' code (sail-sg/Adan): betas
    (0.98, 0.92, 0.99) for the gradient EMA, the gradient-difference EMA and the
    second moment; three bias corrections; the first gradient difference is zero;
    proximal weight decay ``p / (1 + lr*wd)`` unless ``no_prox=True``.
    """

    kernel = adan
    state_names = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")
    hyperparameters = dict(
        lr=non_negative, betas=beta_tuple(3), eps=non_negative, weight_decay=non_negative, no_prox=flag, cautious=flag
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.02,
        no_prox: bool = False,
        cautious: bool = False,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox, cautious=cautious
        )
        super().__init__(params, defaults, backend)

    def init_state(self, param: Tensor, state: dict[str, Tensor]) -> None:
        super().init_state(param, state)
        # The first gradient difference is zero: start from the first gradient.
        state["prev_grad"].copy_(param.grad)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2, beta3 = group["betas"]
        changing = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"], weight_decay=group["weight_decay"]
        )
        return changing, dict(no_prox=group["no_prox"], cautious=group["cautious"])
