"""Triton Muon passes: :func:`lightning_converge.kernels.muon.muon_momentum` and
:func:`~lightning_converge.kernels.muon.muon_apply`, each one launch per group of tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.dispatch import scalar
from lightning_converge.kernels.triton.common import launch_over_tensors, lerp, load_math, operand, store, tensor_block


@triton.jit
def bf16_bits(value):
    """The bits of fp32 ``value`` rounded to bf16 to nearest, ties to even, as torch rounds
    (NaN stays NaN): integer arithmetic, so the interpreter, which truncates in its casts,
    rounds as the GPU does."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _muon_momentum_kernel(
    tensors,
    blocks,
    momentum_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
    NESTEROV: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    grad_ptr = operand(tensors, tensor, 0, DTYPES)
    buffer_ptr = operand(tensors, tensor, 1, DTYPES)
    direction_ptr = operand(tensors, tensor, 2, DTYPES)
    buffer = load_math(buffer_ptr, offsets, mask)
    grad = load_math(grad_ptr, offsets, mask).to(buffer.dtype)
    # float64 scalar: 1 - momentum is formed first, then rounded to the math dtype.
    momentum = tl.load(momentum_ptr)
    buffer = lerp(buffer, grad, (1 - momentum).to(buffer.dtype))
    store(buffer_ptr, offsets, buffer, mask)
    direction = lerp(grad, buffer, momentum.to(buffer.dtype)) if NESTEROV else buffer
    if direction_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(direction_ptr.to(tl.pointer_type(tl.uint16)) + offsets, bf16_bits(direction.to(tl.float32)), mask=mask)
    else:
        store(direction_ptr, offsets, direction, mask)


@triton.jit
def _muon_apply_kernel(
    tensors,
    blocks,
    lr_ptr,
    weight_decay_ptr,
    lr_ratio_ptr,
    BLOCK: tl.constexpr,
    DTYPES: tl.constexpr,
):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    param_ptr = operand(tensors, tensor, 0, DTYPES)
    orthogonal_ptr = operand(tensors, tensor, 1, DTYPES)
    param = load_math(param_ptr, offsets, mask)
    dtype = param.dtype
    orthogonal = load_math(orthogonal_ptr, offsets, mask).to(dtype)
    lr = tl.load(lr_ptr)
    decay = (1 - lr * tl.load(weight_decay_ptr)).to(dtype)
    store(param_ptr, offsets, param * decay - (lr * tl.load(lr_ratio_ptr)).to(dtype) * orthogonal, mask)


def muon_momentum(
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    directions: list[Tensor],
    *,
    momentum: Tensor,
    nesterov: bool = True,
) -> None:
    """The reference's contract, run as triton kernels."""
    if not grads:
        return
    launch_over_tensors(
        _muon_momentum_kernel,
        [grads, momentum_buffers, directions],
        [scalar(momentum, grads[0].device, torch.float64)],
        updated=[1, 2],
        NESTEROV=nesterov,
    )


def muon_apply(
    params: list[Tensor],
    orthogonalized: list[Tensor],
    *,
    lr: Tensor,
    weight_decay: Tensor,
    lr_ratio: Tensor,
) -> None:
    """The reference's contract, run as triton kernels."""
    if not params:
        return
    device = params[0].device
    launch_over_tensors(
        _muon_apply_kernel,
        [params, orthogonalized],
        [scalar(value, device, torch.float64) for value in (lr, weight_decay, lr_ratio)],
        updated=[0],
    )
