"""Triton ADOPT: :func:`lightning_converge.kernels.adopt.adopt` in one launch per group of tensors."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import (
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


@triton.jit
def _adopt_kernel(
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
    DECOUPLE: tl.constexpr,
    CLIP_EXPONENT: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    grad_ptr = operand(tensors, tensor, 1, DTYPES)
    exp_avg_ptr = operand(tensors, tensor, 2, DTYPES)
    exp_avg_sq_ptr = operand(tensors, tensor, 3, DTYPES)
    step = tl.load(operand(tensors, tensor, 4, DTYPES))
    # The first step only initializes the second moment: every other write keeps its old value.
    first = step == 1
    # float64 scalars: every derived one is formed first, then rounded to the math dtype.
    weight_decay = tl.load(weight_decay_ptr)

    param = load_math(param_ptr, offsets, mask)
    dtype = param.dtype
    grad = load_math(grad_ptr, offsets, mask)
    if not DECOUPLE:
        grad = grad + weight_decay.to(dtype) * param
    exp_avg_sq = load_math(exp_avg_sq_ptr, offsets, mask)
    normed = grad / tl.maximum(tl.sqrt(exp_avg_sq), tl.load(eps_ptr).to(dtype))
    if CLIP_EXPONENT is not None:
        clip = scalar_pow(step - 1, CLIP_EXPONENT).to(dtype)
        normed = tl.minimum(tl.maximum(normed, -clip), clip)
    exp_avg = load_math(exp_avg_ptr, offsets, mask)
    exp_avg = tl.where(first, exp_avg, lerp(exp_avg, normed, (1 - tl.load(beta1_ptr)).to(dtype)))
    update = exp_avg

    if COUNT_PASS:
        count_agreeing(update, grad, mask, counts_ptr + tensor)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, counts_ptr + tensor, numel)
        lr = tl.load(lr_ptr)
        beta2 = tl.load(beta2_ptr)
        decayed = param
        if DECOUPLE:
            decayed = param * (1 - lr * weight_decay).to(dtype)
        store(param_ptr, offsets, tl.where(first, param, decayed - lr.to(dtype) * update), mask)
        store(exp_avg_ptr, offsets, exp_avg, mask)
        exp_avg_sq = tl.where(
            first, grad * grad, exp_avg_sq * beta2.to(dtype) + grad * grad * (1 - beta2).to(dtype)
        )
        store(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)


def adopt(
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
    decouple: bool = False,
    clip_exponent: float | None = 0.25,
    cautious: bool = False,
) -> None:
    """One ADOPT step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _adopt_kernel,
        params,
        grads,
        [exp_avgs, exp_avg_sqs],
        steps,
        [lr, beta1, beta2, eps, weight_decay],
        cautious=cautious,
        DECOUPLE=decouple,
        CLIP_EXPONENT=clip_exponent,
    )
