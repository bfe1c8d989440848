"""Scaled sign compression with error feedback, bit-packed (EF-SignSGD, 1-bit Adam)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


# Compiled for one static size, torch 2.13 leaves the padded last block of a
# multi-block tensor unwritten; the dynamic-shape graph is correct.
@kernel(dynamic=True)
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
    ``residual = x - scale * sign(x)``.
    """
    bit_weights = 2 ** torch.arange(8, device=packed[0].device) if packed else None
    for index, (value, packed_out, scale_out) in enumerate(zip(values, packed, scales)):
        x = value.float() if residuals is None else value.float() + residuals[index]
        numel = x.numel()
        blocks = torch.nn.functional.pad(x, (0, -numel % block_size)).view(-1, block_size)
        counts = (numel - torch.arange(blocks.shape[0], device=x.device) * block_size).clamp(max=block_size)
        scale = blocks.abs().sum(dim=1) / counts
        positive = blocks >= 0
        packed_out.copy_((positive.view(-1, 8).long() * bit_weights).sum(dim=1)[: packed_out.numel()])
        scale_out.copy_(scale)
        if residuals is not None:
            signs = torch.where(positive, 1.0, -1.0) * scale[:, None]
            residuals[index].copy_(x - signs.view(-1)[:numel])


sign_quantize.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.sign_quantize").sign_quantize
)
