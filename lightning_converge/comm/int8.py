"""Blockwise absmax int8 quantization: 8 bits per element and one fp32 scale per block."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_converge.comm.base import ceil_div, check_block_size
from lightning_converge.comm.chunked import ChunkedCompressor
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.kernels.int8_quantize import int8_quantize


class Int8Compressor(ChunkedCompressor):
    """Each block of ``block_size`` values is sent as int8 ``round(x / scale)`` with
    ``scale = max|x| / 127`` (the pass is the fused :func:`~lightning_converge.kernels.int8_quantize.int8_quantize`
    kernel, on ``backend``). Every value is off by at most half a step, ``scale / 2``.

    Payload: ``numel`` bytes and ``4 * ceil(numel / block_size)`` bytes of scales. It
    cannot be all-reduced (int8 sums overflow, and each rank's blocks have their own
    scales). On three ranks or more it is averaged in two phases
    (:class:`~lightning_converge.comm.chunked.ChunkedCompressor`): each rank averages
    one chunk of blocks and quantizes it again (with a server error of its own), so
    a rank receives about two payloads, not one per rank; on two, all-gathered.
    """

    name = "int8"

    def __init__(self, error_feedback: bool = True, block_size: int = 256, backend: str = "auto") -> None:
        check_block_size(block_size, 8)
        self.block_size = block_size
        self.backend = validate_backend(backend)
        super().__init__(error_feedback)

    def payload_sizes(self, numel: int) -> list[int]:
        return [numel, ceil_div(numel, self.block_size)]

    def quantize(self, values: Tensor, residual: Tensor | None) -> list[Tensor]:
        """The int8 values and block scales of ``values`` (+ ``residual``, which is updated)."""
        numel = values.numel()
        quantized = torch.empty(numel, dtype=torch.int8, device=values.device)
        scales = torch.empty(ceil_div(numel, self.block_size), device=values.device)
        int8_quantize(
            [values],
            None if residual is None else [residual],
            [quantized],
            [scales],
            block_size=self.block_size,
            backend=self.backend,
        )
        return [quantized, scales]

    def dequantize(self, payload: list[Tensor], numel: int) -> Tensor:
        quantized, scales = payload
        padded = torch.nn.functional.pad(quantized.float(), (0, -numel % self.block_size))
        return (padded.view(-1, self.block_size) * scales[:, None]).view(-1)[:numel]
