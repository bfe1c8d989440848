from __future__ import annotations

from typing import Any

from lightning_converge.kernels import ademamix
from lightning_converge.optim.base import FusedOptimizer, check_betas, check_lr, check_non_negative


class AdEMAMix(FusedOptimizer):
    """AdEMAMix ("The AdEMAMix Optimizer: Better, Faster, Older"), as in apple/ml-ademamix.

    A fast EMA (beta1, bias-corrected) plus ``alpha`` times a slow EMA (beta3, not
    bias-corrected), over an Adam second moment (beta2). ``alpha_warmup`` and
    ``beta3_warmup`` are step counts for the paper's linear (alpha) and half-life
    (beta3, from beta1) warm-ups; ``None`` means none. Weight decay is added to the
    update, as in the paper's code.
    """

    kernel = ademamix
    state_names = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        alpha_warmup: int | None = None,
        beta3_warmup: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        cautious: bool = False,
        backend: str = "auto",
    ) -> None:
        check_lr(lr)
        check_betas(betas, 3)
        check_non_negative("alpha", alpha)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        for name, value in (("alpha_warmup", alpha_warmup), ("beta3_warmup", beta3_warmup)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            alpha=alpha,
            alpha_warmup=alpha_warmup,
            beta3_warmup=beta3_warmup,
            eps=eps,
            weight_decay=weight_decay,
            cautious=cautious,
        )
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        beta1, beta2, beta3 = group["betas"]
        changing = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        static = dict(
            alpha_warmup=group["alpha_warmup"], beta3_warmup=group["beta3_warmup"], cautious=group["cautious"]
        )
        return changing, static
