"""Scaled sign compression with error feedback, bit-packed (EF-SignSGD, 1-bit Adam)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.blocks import block_rows
from lightning_converge.kernels.dispatch import kernel


@kernel
def sign_quantize(
    values: list[Tensor],
    residuals: list[Tensor] | None,
    packed: list[Tensor],
    scales: list[Tensor],
    *,
    block_size: int,
) -> None:
    """Compress each flat tensor to one bit per element and one scale per block, in one pass.

    ``x = value + residual`` (just ``value`` when ``residuals`` is None). Per block of
    ``block_size`` elements (a multiple of 8; the last block may be shorter)
    ``scale = mean|x|``, the scale that minimizes ``||x - scale * sign(x)||``
    ("Error Feedback Fixes SignSGD"). Bit ``i`` of ``packed[j]`` (uint8) is
    ``x[8 j + i] >= 0``: zero counts as positive, and the bits past the end of the
    tensor are 1. Writes the scales (fp32, one per block) and, with residuals,
    ``residual = x - scale * sign(x)``. An empty tensor (a rank's empty chunk in the
    1-bit all-reduce) has no blocks: nothing is written.
    """
    for index, (value, packed_out, scale_out) in enumerate(zip(values, packed, scales)):
        if value.numel() == 0:
            continue
        x = value.float() if residuals is None else value.float() + residuals[index]
        packed_rows, scale_rows, sent_rows = [], [], []
        for blocks in block_rows(x, block_size):
            scale = blocks.abs().sum(dim=1, keepdim=True) / blocks.shape[1]
            positive = blocks >= 0
            bits = positive.view(-1)
            if bits.numel() % 8:  # the partial last block: the bits past the end are 1
                bits = torch.cat([bits, bits.new_ones(-bits.numel() % 8)])
            bytes_of_bits = bits.view(-1, 8).to(torch.uint8)
            # Eight shifted columns, not a reduction over rows of 8: compiled, 30x faster.
            packed_rows.append(sum(bytes_of_bits[:, bit] << bit for bit in range(8)))
            scale_rows.append(scale.view(-1))
            # scale * sign, written without Python numbers (no scalar tensors made on the host).
            sent_rows.append(torch.where(positive, scale, -scale).view(-1))
        packed_out.copy_(torch.cat(packed_rows))
        scale_out.copy_(torch.cat(scale_rows))
        if residuals is not None:
            residuals[index].copy_(x - torch.cat(sent_rows))

sign_quantize.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.sign_quantize").sign_quantize
)
