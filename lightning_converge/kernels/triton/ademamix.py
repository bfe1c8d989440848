"""Triton AdEMAMix: :func:`lightning_converge.kernels.ademamix.ademamix` in one launch per group of tensors."""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import (
    bias_correction,
    cautious_masked,
    count_agreeing,
    launch_update_rule,
    lerp,
    load_math,
    operand,
    scalar_pow,
    store,
    tensor_block,
)

LOG_HALF = tl.constexpr(math.log(0.5))


@triton.jit
def _half_life(beta):
    # Number of steps for beta**t to fall to one half, minus one (the paper's f).
    return LOG_HALF / tl.log(beta + 1e-8) - 1


@triton.jit
def _warmed_up_alpha_beta3(step, alpha, beta1, beta3, ALPHA_WARMUP: tl.constexpr, BETA3_WARMUP: tl.constexpr):
    """The reference's ``warmed_up_alpha_beta3`` on scalars: alpha rises linearly from 0,
    beta3 from beta1 linearly in half-life; a warm-up of None (or 0) means none."""
    if ALPHA_WARMUP:
        alpha = alpha * tl.minimum(step / ALPHA_WARMUP, 1.0)
    if BETA3_WARMUP:
        frac = tl.minimum(step / BETA3_WARMUP, 1.0)
        half_life = (1 - frac) * _half_life(beta1) + frac * _half_life(beta3)
        beta3 = tl.where(frac < 1, scalar_pow(0.5, 1 / (half_life + 1)), beta3)
    return alpha, beta3


@triton.jit
def _ademamix_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    beta3_ptr,
    alpha_ptr,
    eps_ptr,
    weight_decay_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
    ALPHA_WARMUP: tl.constexpr,
    BETA3_WARMUP: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    grad_ptr = operand(tensors, tensor, 1, DTYPES)
    exp_avg_fast_ptr = operand(tensors, tensor, 2, DTYPES)
    exp_avg_slow_ptr = operand(tensors, tensor, 3, DTYPES)
    exp_avg_sq_ptr = operand(tensors, tensor, 4, DTYPES)
    # float64 scalars: the warm-ups, 1 - beta and the bias corrections are formed
    # first, then rounded to the math dtype (for beta3 = 0.99999, fp32 1 - beta3 is 1.4e-3 off).
    step = tl.load(operand(tensors, tensor, 5, DTYPES)).to(tl.float64)
    beta1 = tl.load(beta1_ptr)
    beta2 = tl.load(beta2_ptr)
    alpha, beta3 = _warmed_up_alpha_beta3(
        step, tl.load(alpha_ptr), beta1, tl.load(beta3_ptr), ALPHA_WARMUP, BETA3_WARMUP
    )

    grad = load_math(grad_ptr, offsets, mask)
    dtype = grad.dtype
    exp_avg_fast = lerp(load_math(exp_avg_fast_ptr, offsets, mask), grad, (1 - beta1).to(dtype))
    exp_avg_slow = lerp(load_math(exp_avg_slow_ptr, offsets, mask), grad, (1 - beta3).to(dtype))
    exp_avg_sq = load_math(exp_avg_sq_ptr, offsets, mask) * beta2.to(dtype) + grad * grad * (1 - beta2).to(dtype)
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction(beta2, step)).to(dtype) + tl.load(eps_ptr).to(dtype)
    update = (exp_avg_fast / bias_correction(beta1, step).to(dtype) + alpha.to(dtype) * exp_avg_slow) / denom

    if COUNT_PASS:
        count_agreeing(update, grad, mask, counts_ptr + tensor)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, counts_ptr + tensor, numel)
        param = load_math(param_ptr, offsets, mask)
        # Weight decay enters the update, so it is scaled by lr only (as in apple/ml-ademamix).
        param = param - tl.load(lr_ptr).to(dtype) * (update + tl.load(weight_decay_ptr).to(dtype) * param)
        store(param_ptr, offsets, param, mask)
        store(exp_avg_fast_ptr, offsets, exp_avg_fast, mask)
        store(exp_avg_slow_ptr, offsets, exp_avg_slow, mask)
        store(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)


def ademamix(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_fasts: list[Tensor],
    exp_avg_slows: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    alpha: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    cautious: bool = False,
) -> None:
    """One AdEMAMix step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _ademamix_kernel,
        params,
        grads,
        [exp_avg_fasts, exp_avg_slows, exp_avg_sqs],
        steps,
        [lr, beta1, beta2, beta3, alpha, eps, weight_decay],
        cautious=cautious,
        ALPHA_WARMUP=alpha_warmup,
        BETA3_WARMUP=beta3_warmup,
    )
