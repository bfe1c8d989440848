"""Triton Lion: :func:`lightning_converge.kernels.lion.lion` in one launch per group of tensors."""

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
    sign,
    store,
    tensor_block,
)


@triton.jit
def _lion_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
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
    grad = load_math(grad_ptr, offsets, mask)
    dtype = grad.dtype
    exp_avg = load_math(exp_avg_ptr, offsets, mask)
    # float64 scalars: 1 - beta is formed first, then rounded to the math dtype.
    update = sign(lerp(exp_avg, grad, (1 - tl.load(beta1_ptr)).to(dtype)))

    if COUNT_PASS:
        count_agreeing(update, grad, mask, counts_ptr + tensor)
    else:
        if CAUTIOUS:
            update = cautious_masked(update, grad, counts_ptr + tensor, numel)
        lr = tl.load(lr_ptr)
        param = load_math(param_ptr, offsets, mask)
        decay = (1 - lr * tl.load(weight_decay_ptr)).to(dtype)
        store(param_ptr, offsets, param * decay - lr.to(dtype) * update, mask)
        store(exp_avg_ptr, offsets, lerp(exp_avg, grad, (1 - tl.load(beta2_ptr)).to(dtype)), mask)


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    cautious: bool = False,
) -> None:
    """One Lion step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _lion_kernel,
        params,
        grads,
        [exp_avgs],
        None,
        [lr, beta1, beta2, weight_decay],
        cautious=cautious,
    )
