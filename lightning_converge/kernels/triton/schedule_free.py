"""Triton Schedule-Free SGD and AdamW: :mod:`lightning_converge.kernels.schedule_free` in one
launch per group of tensors."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import launch_update_rule, lerp, load_math, operand, store, tensor_block


@triton.jit
def _interpolate_and_step(param_ptr, z_ptr, offsets, mask, direction, lr_ptr, beta1_ptr, weight_decay_ptr, ckp1_ptr):
    """The step both rules share, given the update direction (in the math dtype)."""
    dtype = direction.dtype
    lr = tl.load(lr_ptr)
    ckp1 = tl.load(ckp1_ptr)
    y = load_math(param_ptr, offsets, mask)
    z = load_math(z_ptr, offsets, mask)
    direction = direction + tl.load(weight_decay_ptr).to(dtype) * y
    # float64 scalars: the coefficient of the direction is formed first, then rounded.
    coefficient = (lr * (tl.load(beta1_ptr) * (1 - ckp1) - 1)).to(dtype)
    store(param_ptr, offsets, lerp(y, z, ckp1.to(dtype)) + direction * coefficient, mask)
    store(z_ptr, offsets, z - direction * lr.to(dtype), mask)


@triton.jit
def _schedule_free_sgd_kernel(
    tensors,
    blocks,
    lr_ptr,
    momentum_ptr,
    weight_decay_ptr,
    ckp1_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    grad = load_math(operand(tensors, tensor, 1, DTYPES), offsets, mask)
    _interpolate_and_step(
        operand(tensors, tensor, 0, DTYPES),
        operand(tensors, tensor, 2, DTYPES),
        offsets,
        mask,
        grad,
        lr_ptr,
        momentum_ptr,
        weight_decay_ptr,
        ckp1_ptr,
    )


@triton.jit
def _schedule_free_adamw_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    eps_ptr,
    weight_decay_ptr,
    ckp1_ptr,
    bias_correction2_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    exp_avg_sq_ptr = operand(tensors, tensor, 3, DTYPES)
    grad = load_math(operand(tensors, tensor, 1, DTYPES), offsets, mask)
    dtype = grad.dtype
    beta2 = tl.load(beta2_ptr)
    exp_avg_sq = load_math(exp_avg_sq_ptr, offsets, mask) * beta2.to(dtype) + grad * grad * (1 - beta2).to(dtype)
    denom = tl.sqrt(exp_avg_sq / tl.load(bias_correction2_ptr).to(dtype)) + tl.load(eps_ptr).to(dtype)
    store(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)
    _interpolate_and_step(
        operand(tensors, tensor, 0, DTYPES),
        operand(tensors, tensor, 2, DTYPES),
        offsets,
        mask,
        grad / denom,
        lr_ptr,
        beta1_ptr,
        weight_decay_ptr,
        ckp1_ptr,
    )


def schedule_free_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    *,
    lr: Tensor,
    momentum: Tensor,
    weight_decay: Tensor,
    ckp1: Tensor,
) -> None:
    """One Schedule-Free SGD step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _schedule_free_sgd_kernel, params, grads, [zs], None, [lr, momentum, weight_decay, ckp1], cautious=False
    )


def schedule_free_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    weight_decay: Tensor,
    ckp1: Tensor,
    bias_correction2: Tensor,
) -> None:
    """One Schedule-Free AdamW step, in place: the reference's contract, run as triton kernels."""
    launch_update_rule(
        _schedule_free_adamw_kernel,
        params,
        grads,
        [zs, exp_avg_sqs],
        None,
        [lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2],
        cautious=False,
    )
