from __future__ import annotations

from typing import Any

from lightning_converge.kernels import adamw
from lightning_converge.optim.base import FusedOptimizer, check_betas, check_lr, check_non_negative


class AdamW(FusedOptimizer):
    """AdamW with decoupled weight decay: the same update as ``torch.optim.AdamW``.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        cautious: apply the update only where it agrees in sign with the gradient
            ("Cautious Optimizers").
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``.
    """

    kernel = adamw
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        cautious: bool = False,
        backend: str = "auto",
    ) -> None:
        check_lr(lr)
        check_betas(betas, 2)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, cautious=cautious)
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2 = group["betas"]
        changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return changing, dict(cautious=group["cautious"])
