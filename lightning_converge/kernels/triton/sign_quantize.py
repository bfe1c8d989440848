"""Triton implementation of :func:`lightning_converge.kernels.sign_quantize.sign_quantize`: one program per block."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.blockwise import ENCODED, RESIDUAL, SCALES, VALUE, launch_blockwise
from lightning_converge.kernels.triton.common import block_in_tensor, load_f32, operand, store, tensor_block


@triton.jit
def _sign_quantize_kernel(tensors, blocks, BLOCK: tl.constexpr, DTYPES: tl.constexpr, FEEDBACK: tl.constexpr):
    tensor, offsets, mask, numel = tensor_block(tensors, blocks, DTYPES, BLOCK)
    x = load_f32(operand(tensors, tensor, VALUE, DTYPES), offsets, mask)
    if FEEDBACK:
        x = x + load_f32(operand(tensors, tensor, RESIDUAL, DTYPES), offsets, mask)
    block = block_in_tensor(blocks, BLOCK)
    count = tl.minimum(numel - block * BLOCK, BLOCK)
    scale = tl.sum(tl.abs(x), axis=0) / count.to(tl.float32)
    # Past the end x was loaded as 0, which counts as positive: the reference's padding bits.
    positive = x >= 0
    bits = tl.reshape(positive.to(tl.int32), (BLOCK // 8, 8))
    packed = tl.sum(bits * (1 << tl.arange(0, 8))[None, :], axis=1)
    byte_offsets = block * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    packed_ptr = operand(tensors, tensor, ENCODED, DTYPES)
    tl.store(packed_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets < (numel + 7) // 8)
    tl.store(operand(tensors, tensor, SCALES, DTYPES) + block, scale)
    if FEEDBACK:
        store(operand(tensors, tensor, RESIDUAL, DTYPES), offsets, x - tl.where(positive, scale, -scale), mask)


def sign_quantize(
    values: list[Tensor],
    residuals: list[Tensor] | None,
    packed: list[Tensor],
    scales: list[Tensor],
    *,
    block_size: int,
) -> None:
    """Same contract as the reference, for flat contiguous tensors and a power-of-two ``block_size`` >= 8;
    one launch per group of tensors."""
    launch_blockwise(_sign_quantize_kernel, values, residuals, packed, scales, block_size, encoded_like_values=False)
