"""Triton Adan: :func:`lightning_converge.kernels.adan.adan` in one launch per group of tensors."""

from __future__ import annotations

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
    store,
    tensor_block,
)


@triton.jit
def _adan_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    beta3_ptr,
    eps_ptr,
    weight_decay_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
    NO_PROX: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    grad_ptr = operand(tensors, tensor, 1, DTYPES)
    exp_avg_ptr = operand(tensors, tensor, 2, DTYPES)
    exp_avg_diff_ptr = operand(tensors, tensor, 3, DTYPES)
    exp_avg_sq_ptr = operand(tensors, tensor, 4, DTYPES)
    prev_grad_ptr = operand(tensors, tensor, 5, DTYPES)
    step = tl.load(operand(tensors, tensor, 6, DTYPES))
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
        count_agreeing(update, grad, mask, counts_ptr + tensor)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, counts_ptr + tensor, numel)
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
    launch_update_rule(
        _adan_kernel,
        params,
        grads,
        [exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads],
        steps,
        [lr, beta1, beta2, beta3, eps, weight_decay],
        cautious=cautious,
        NO_PROX=no_prox,
    )
