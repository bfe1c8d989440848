"""Triton Adan: :func:`lightning_converge.kernels.adan.adan` in one pass per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import (
    bias_correction,
    block_offsets,
    cautious_masked,
    count_agreeing,
    launch_per_tensor,
    lerp,
    load_math,
    store,
)


@triton.jit
def _adan_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_diff_ptr,
    exp_avg_sq_ptr,
    prev_grad_ptr,
    step_ptr,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    beta3_ptr,
    eps_ptr,
    weight_decay_ptr,
    count_ptr,
    numel,
    BLOCK: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
    NO_PROX: tl.constexpr,
):
    offsets, mask = block_offsets(numel, BLOCK)
    step = tl.load(step_ptr)
    # float64 scalars: every derived one is formed first, then rounded to the math dtype.
    beta1 = tl.load(beta1_ptr)
    beta2 = tl.load(beta2_ptr)
    beta3 = tl.load(beta3_ptr)

    grad = load_math(grad_ptr, offsets, mask)
    dtype = grad.dtype
    diff = grad - load_math(prev_grad_ptr, offsets, mask)
    exp_avg = lerp(load_math(exp_avg_ptr, offsets, mask), grad, (1 - beta1).to(dtype))
    exp_avg_diff = lerp(load_math(exp_avg_diff_ptr, offsets, mask), diff, (1 - beta2).to(dtype))
    nesterov = grad + beta2.to(dtype) * diff
    exp_avg_sq = load_math(exp_avg_sq_ptr, offsets, mask) * beta3.to(dtype) + nesterov * nesterov * (1 - beta3).to(dtype)
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction(beta3, step)).to(dtype) + tl.load(eps_ptr).to(dtype)
    corrected_diff = beta2.to(dtype) * exp_avg_diff / bias_correction(beta2, step).to(dtype)
    update = (exp_avg / bias_correction(beta1, step).to(dtype) + corrected_diff) / denom

    if COUNT_PASS:
        count_agreeing(update, grad, mask, count_ptr)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, count_ptr, numel)
        lr = tl.load(lr_ptr)
        weight_decay = tl.load(weight_decay_ptr)
        param = load_math(param_ptr, offsets, mask)
        if NO_PROX:
            param = param * (1 - lr * weight_decay).to(dtype) - lr.to(dtype) * update
        else:
            param = (param - lr.to(dtype) * update) / (1 + lr * weight_decay).to(dtype)
        store(param_ptr, offsets, param, mask)
        store(exp_avg_ptr, offsets, exp_avg, mask)
        store(exp_avg_diff_ptr, offsets, exp_avg_diff, mask)
        store(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)
        store(prev_grad_ptr, offsets, grad, mask)


def adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    no_prox: bool = False,
    cautious: bool = False,
) -> None:
    """One Adan step, in place: the reference's contract, run as triton kernels."""
    launch_per_tensor(
        _adan_kernel,
        params,
        grads,
        [exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads],
        steps,
        [lr, beta1, beta2, beta3, eps, weight_decay],
        cautious=cautious,
        hyperparameter_dtype=torch.float64,
        NO_PROX=no_prox,
    )
