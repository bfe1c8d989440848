"""Triton implementation of :func:`lightning_converge.kernels.diloco.diloco_outer_step`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import launch_over_tensors, load_f32, operand, store, tensor_block


@triton.jit
def _diloco_outer_step_kernel(
    tensors,
    blocks,
    lr_ptr,
    momentum_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    NESTEROV: tl.constexpr,
):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    grad_ptr = operand(tensors, tensor, 1, DTYPES)
    buf_ptr = operand(tensors, tensor, 2, DTYPES)
    grad = load_f32(grad_ptr, offsets, mask)
    momentum = tl.load(momentum_ptr)
    buf = momentum * load_f32(buf_ptr, offsets, mask) + grad
    if NESTEROV:
        update = grad + momentum * buf
    else:
        update = buf
    param = load_f32(param_ptr, offsets, mask)
    store(param_ptr, offsets, param - tl.load(lr_ptr) * update, mask)
    store(buf_ptr, offsets, buf, mask)


def diloco_outer_step(
    global_params: list[Tensor],
    pseudo_grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Tensor,
    momentum: Tensor,
    nesterov: bool = True,
) -> None:
    """One outer SGD step, in place: the reference's contract, one launch per group of tensors."""
    launch_over_tensors(
        _diloco_outer_step_kernel,
        [global_params, pseudo_grads, momentum_buffers],
        [lr, momentum],
        updated=[0, 2],
        NESTEROV=nesterov,
    )
