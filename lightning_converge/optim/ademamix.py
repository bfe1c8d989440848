from __future__ import annotations

from typing import Any

from lightning_converge.kernels import ademamix
from lightning_converge.optim.base import FusedOptimizer, beta_tuple, flag, non_negative, optional_step_count


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
    hyperparameters = dict(
        lr=non_negative,
        betas=beta_tuple(3),
        alpha=non_negative,
        alpha_warmup=optional_step_count,
        beta3_warmup=optional_step_count,
        eps=non_negative,
        weight_decay=non_negative,
        cautious=flag,
    )

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
        defaults = dict(
            lr=lr,
            betas=betas,
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
