"""The parameter update of 1-bit Adam's compression stage: Adam with a frozen variance."""

from __future__ import annotations

import importlib
from typing import Sequence

from torch import Tensor

from lightning_converge.kernels.adamw import adam_bias_corrections
from lightning_converge.kernels.dispatch import kernel, math_dtype


def onebit_bias_corrections(
    steps: list[Tensor], variance_steps: list[Tensor], beta1: Tensor, beta2: Tensor
) -> dict[str, tuple[Tensor, ...]]:
    """Per tensor, in float64: AdamW's first-moment correction at ``step`` and its
    second-moment correction at the step the variance froze."""
    return dict(
        bias_correction1=adam_bias_corrections(steps, beta1, beta2)["bias_correction1"],
        bias_correction2_sqrt=adam_bias_corrections(variance_steps, beta1, beta2)["bias_correction2_sqrt"],
    )


@kernel(step_factors=onebit_bias_corrections)
def onebit_adam_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    variance_steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    bias_correction1: Sequence[Tensor],
    bias_correction2_sqrt: Sequence[Tensor],
) -> None:
    """Update each parameter in place from its (already averaged) momentum and frozen variance.

    The same step as :func:`~lightning_converge.kernels.adamw.adamw` with the moments
    left untouched: the momentum ``exp_avg`` was updated and exchanged by the
    caller, and ``exp_avg_sq`` stopped changing at step ``variance_step``, so its
    bias correction is that step's (both from :func:`onebit_bias_corrections`).
    ``steps`` count this step. Math in the moments' precision, as AdamW's: fp32 for fp32, bf16
    and fp16 parameters, fp64 for fp64 ones.
    """
    for p, m, v, bc1, bc2_sqrt in zip(params, exp_avgs, exp_avg_sqs, bias_correction1, bias_correction2_sqrt):
        denom = v.sqrt() / bc2_sqrt + eps
        update = m / bc1 / denom
        p.copy_(p.to(math_dtype(p)) * (1 - lr * weight_decay) - lr * update)


onebit_adam_update.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.onebit_adam").onebit_adam_update
)
