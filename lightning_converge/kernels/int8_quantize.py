"""Blockwise absmax int8 quantization with error feedback (the int8 gradient compressor's pass)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.blocks import block_rows
from lightning_converge.kernels.dispatch import kernel


@kernel
def int8_quantize(
    values: list[Tensor],
    residuals: list[Tensor] | None,
    quantized: list[Tensor],
    scales: list[Tensor],
    *,
    block_size: int,
) -> None:
    """Quantize each flat tensor to int8 with one scale per block, in one pass.

    ``x = value + residual`` (just ``value`` when ``residuals`` is None); per block of
    ``block_size`` elements (the last one may be shorter) ``scale = max|x| / 127``
    and ``q = round(x / scale)`` (half to even; 0 for an all-zero block). Writes
    ``q`` to ``quantized`` (int8, one per element), ``scale`` to ``scales`` (fp32,
    one per block) and, with residuals, ``residual = x - q * scale``: what was
    not sent, to be added to the next step's value. Each element is off by at most
    half a quantization step, ``scale / 2``. An empty tensor has no blocks: nothing is written.
    """
    for index, (value, q_out, scale_out) in enumerate(zip(values, quantized, scales)):
        if value.numel() == 0:
            continue
        x = value.float() if residuals is None else value.float() + residuals[index]
        q_rows, scale_rows, sent_rows = [], [], []
        for blocks in block_rows(x, block_size):
            scale = blocks.abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(blocks / torch.where(scale > 0, scale, 1.0))  # an all-zero block stays zero
            q_rows.append(q.view(-1))
            scale_rows.append(scale.view(-1))
            sent_rows.append((q * scale).view(-1))
        q_out.copy_(torch.cat(q_rows))
        scale_out.copy_(torch.cat(scale_rows))
        if residuals is not None:
            residuals[index].copy_(x - torch.cat(sent_rows))

int8_quantize.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.int8_quantize").int8_quantize
)
