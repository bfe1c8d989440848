"""Triton AdamW: :func:`lightning_converge.kernels.adamw.adamw` in one launch per group of tensors."""

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
def _adamw_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    eps_ptr,
    weight_decay_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    grad_ptr = operand(tensors, tensor, 1, DTYPES)
    exp_avg_ptr = operand(tensors, tensor, 2, DTYPES)
    exp_avg_sq_ptr = operand(tensors, tensor, 3, DTYPES)
    step = tl.load(operand(tensors, tensor, 4, DTYPES))
    # float64 scalars: every derived one is formed first, then rounded to the math dtype.
    beta1 = tl.load(beta1_ptr)
    beta2 = tl.load(beta2_ptr)

    grad = load_math(grad_ptr, offsets, mask)
    dtype = grad.dtype
    exp_avg = lerp(load_math(exp_avg_ptr, offsets, mask), grad, (1 - beta1).to(dtype))
    exp_avg_sq = load_math(exp_avg_sq_ptr, offsets, mask) * beta2.to(dtype) + grad * grad * (1 - beta2).to(dtype)
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction(beta2, step)).to(dtype) + tl.load(eps_ptr).to(dtype)
    update = exp_avg / bias_correction(beta1, step).to(dtype) / denom

    if COUNT_PASS:
        count_agreeing(update, grad, mask, counts_ptr + tensor)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, counts_ptr + tensor, numel)
        lr = tl.load(lr_ptr)
        param = load_math(param_ptr, offsets, mask)
        decay = (1 - lr * tl.load(weight_decay_ptr)).to(dtype)
        store(param_ptr, offsets, param * decay - lr.to(dtype) * update, mask)
        store(exp_avg_ptr, offsets, exp_avg, mask)
        store(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    cautious: bool = False,
) -> None:
    """One AdamW step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _adamw_kernel,
        params,
        grads,
        [exp_avgs, exp_avg_sqs],
        steps,
        [lr, beta1, beta2, eps, weight_decay],
        cautious=cautious,
    )
