"""Blockwise absmax int8 quantization: 8 bits per element and one fp32 scale per block."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor, ceil_div, check_block_size
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.kernels.int8_quantize import int8_quantize


class Int8Compressor(Compressor):
    """Each block of ``block_size`` values is sent as int8 ``round(x / scale)`` with
    ``scale = max|x| / 127`` (the pass is the fused :func:`~lightning_converge.kernels.int8_quantize.int8_quantize`
    kernel, on ``backend``). Every value is off by at most half a step, ``scale / 2``.

    Payload: ``numel`` bytes and ``4 * ceil(numel / block_size)`` bytes of scales. It
    is all-gathered, not all-reduced: int8 sums overflow, and each rank's blocks
    have their own scales.
    """

    name = "int8"

    def __init__(self, error_feedback: bool = True, block_size: int = 256, backend: str = "auto") -> None:
        check_block_size(block_size, 8)
        self.block_size = block_size
        self.backend = validate_backend(backend)
        super().__init__(error_feedback)

    def compress(
        self, grad: Tensor, layout: Layout, state: dict[str, Tensor], exchange: Exchange, step: int
    ) -> list[Tensor]:
        numel = grad.numel()
        quantized = torch.empty(numel, dtype=torch.int8, device=grad.device)
        scales = torch.empty(ceil_div(numel, self.block_size), device=grad.device)
        residual = state.get("residual")
        int8_quantize(
            [grad],
            None if residual is None else [residual],
            [quantized],
            [scales],
            block_size=self.block_size,
            backend=self.backend,
        )
        return [quantized, scales]

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        quantized, scales = payload
        numel = quantized.numel()
        padded = torch.nn.functional.pad(quantized.float(), (0, -numel % self.block_size))
        return (padded.view(-1, self.block_size) * scales[:, None]).view(-1)[:numel]
