from __future__ import annotations

from typing import Any

from lightning_converge.kernels import adopt
from lightning_converge.optim.base import FusedOptimizer, beta_tuple, flag, non_negative, optional_non_negative


class ADOPT(FusedOptimizer):
    """ADOPT ("ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate").

    The gradient is normalized by the previous second moment before it enters
    the momentum; the first step only initializes the second moment. The
    clipped variant (clip at ``step**0.25``) is the default, as in the authors'
    code; ``clip_exponent=None`` gives the original, unclipped rule. Weight decay
    is L2 (coupled) unless ``decouple=True``.
    """

    kernel = adopt
    state_names = ("exp_avg", "exp_avg_sq")
    hyperparameters = dict(
        lr=non_negative,
        betas=beta_tuple(2),
        eps=non_negative,
        weight_decay=non_negative,
        decouple=flag,
        clip_exponent=optional_non_negative,
        cautious=flag,
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
        cautious: bool = False,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decouple=decouple,
            clip_exponent=clip_exponent,
            cautious=cautious,
        )
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2 = group["betas"]
        changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        static = dict(decouple=group["decouple"], clip_exponent=group["clip_exponent"], cautious=group["cautious"])
        return changing, static
