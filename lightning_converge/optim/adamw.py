from __future__ import annotations

from typing import Any

from lightning_converge.kernels import adamw
from lightning_converge.optim.base import FusedOptimizer, beta_tuple, flag, non_negative, only


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
    hyperparameters = dict(
        lr=non_negative,
        betas=beta_tuple(2),
        eps=non_negative,
        weight_decay=non_negative,
        cautious=flag,
        # Options of torch.optim.AdamW, whose state dicts load here, that this update does not have.
        amsgrad=only(False, "torch.optim.AdamW"),
        maximize=only(False, "torch.optim.AdamW"),
        decoupled_weight_decay=only(True, "torch.optim.AdamW"),
    )

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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious)
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2 = group["betas"]
        changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return changing, dict(cautious=group["cautious"])
