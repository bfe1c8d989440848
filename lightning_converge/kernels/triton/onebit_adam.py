"""Triton implementation of :func:`lightning_converge.kernels.onebit_adam.onebit_adam_update`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.dispatch import scalar
from lightning_converge.kernels.triton.common import (
    bias_correction,
    launch_over_tensors,
    load_math,
    operand,
    store,
    tensor_block,
)


@triton.jit
def _onebit_adam_update_kernel(
    tensors,
    blocks,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    eps_ptr,
    weight_decay_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    exp_avg = load_math(operand(tensors, tensor, 1, DTYPES), offsets, mask)
    exp_avg_sq = load_math(operand(tensors, tensor, 2, DTYPES), offsets, mask)
    step = tl.load(operand(tensors, tensor, 3, DTYPES))
    variance_step = tl.load(operand(tensors, tensor, 4, DTYPES))
    dtype = exp_avg.dtype
    # The variance froze at variance_step: its bias correction is that step's, the momentum's this one's.
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction(tl.load(beta2_ptr), variance_step)).to(dtype)
    denom = denom + tl.load(eps_ptr).to(dtype)
    update = exp_avg / bias_correction(tl.load(beta1_ptr), step).to(dtype) / denom
    lr = tl.load(lr_ptr)
    param = load_math(param_ptr, offsets, mask)
    decay = (1 - lr * tl.load(weight_decay_ptr)).to(dtype)
    store(param_ptr, offsets, param * decay - lr.to(dtype) * update, mask)


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
) -> None:
    """The reference's contract (parameters updated in place, moments only read), one launch per
    group of tensors; the hyperparameters are read as float64 inside the kernel."""
    if not params:
        return
    device = params[0].device
    launch_over_tensors(
        _onebit_adam_update_kernel,
        [params, exp_avgs, exp_avg_sqs],
        [scalar(value, device, torch.float64) for value in (lr, beta1, beta2, eps, weight_decay)],
        updated=[0],
        per_tensor_scalars=[steps, variance_steps],
    )
