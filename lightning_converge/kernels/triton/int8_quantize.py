"""Triton implementation of :func:`lightning_converge.kernels.int8_quantize.int8_quantize`: one program per block."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.blockwise import ENCODED, RESIDUAL, SCALES, VALUE, launch_blockwise
from lightning_converge.kernels.triton.common import block_in_tensor, load_f32, operand, store, tensor_block


@triton.jit
def round_half_even(x):
    """``torch.round`` (ties to even) without libdevice's ``rint``. ``x - floor(x)`` is exact in fp32."""
    floor = tl.floor(x)
    fraction = x - floor
    floor_is_odd = (floor - 2.0 * tl.floor(floor * 0.5)) != 0.0
    return tl.where((fraction > 0.5) | ((fraction == 0.5) & floor_is_odd), floor + 1.0, floor)


@triton.jit
def _int8_quantize_kernel(tensors, blocks, BLOCK: tl.constexpr, DTYPES: tl.constexpr, FEEDBACK: tl.constexpr):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    x = load_f32(operand(tensors, tensor, VALUE, DTYPES), offsets, mask)
    if FEEDBACK:
        x = x + load_f32(operand(tensors, tensor, RESIDUAL, DTYPES), offsets, mask)
    scale = tl.max(tl.abs(x), axis=0) / 127
    q = round_half_even(x / tl.where(scale > 0, scale, 1.0))
    tl.store(operand(tensors, tensor, ENCODED, DTYPES) + offsets, q.to(tl.int8), mask=mask)
    tl.store(operand(tensors, tensor, SCALES, DTYPES) + block_in_tensor(blocks, BLOCK), scale)
    if FEEDBACK:
        store(operand(tensors, tensor, RESIDUAL, DTYPES), offsets, x - q * scale, mask)


def int8_quantize(
    values: list[Tensor],
    residuals: list[Tensor] | None,
    quantized: list[Tensor],
    scales: list[Tensor],
    *,
    block_size: int,
) -> None:
    """Same contract as the reference, for flat contiguous tensors and a power-of-two ``block_size``;
    one launch per group of tensors."""
    launch_blockwise(
        _int8_quantize_kernel, values, residuals, quantized, scales, block_size, encoded_like_values=True
    )
