"""Scaled sign compression (EF-SignSGD): one bit per element and one scale per block."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_converge.comm.base import ceil_div, check_block_size
from lightning_converge.comm.chunked import ChunkedCompressor
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.kernels.sign_quantize import sign_quantize


def unpack_signs(packed: Tensor, scales: Tensor, numel: int, block_size: int) -> Tensor:
    """The flat fp32 values ``scale * sign`` that :func:`~lightning_converge.kernels.sign_quantize.sign_quantize`
    packed: bit ``i`` of byte ``j`` is the sign of element ``8 j + i`` (1 for positive)."""
    bits = (packed[:, None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    signs = bits.view(-1)[:numel].float().mul_(2).sub_(1)
    return signs.mul_(scales.repeat_interleave(block_size)[:numel])


class SignCompressor(ChunkedCompressor):
    """Send ``scale * sign(x)`` per block of ``block_size`` values, ``scale = mean|x|``:
    the scaled sign of "Error Feedback Fixes SignSGD" (Karimireddy et al., 2019),
    also 1-bit Adam's compressor. Without error feedback this is a biased estimate;
    with it (the default) the residual makes up for the lost magnitudes.

    Per block, ``||x - scale * sign(x)||^2 = ||x||^2 - ||x||_1^2 / n`` (``n`` values).

    Payload: signs packed 8 per byte (``ceil(numel / 8)`` bytes) and
    ``4 * ceil(numel / block_size)`` bytes of scales. The pass is the fused
    :func:`~lightning_converge.kernels.sign_quantize.sign_quantize` kernel. On three
    ranks or more the average is taken in two phases
    (:class:`~lightning_converge.comm.chunked.ChunkedCompressor`): each rank averages
    one chunk of blocks and compresses it again (with a server error of its own), so
    a rank receives about two payloads, not one per rank; on two, all-gathered.
    ``onebit`` (1-bit Adam's compressed all-reduce) takes two phases on any number.
    """

    name = "sign"

    def __init__(self, error_feedback: bool = True, block_size: int = 1024, backend: str = "auto") -> None:
        check_block_size(block_size, 8)  # a block spans whole bytes of signs
        self.block_size = block_size
        self.backend = validate_backend(backend)
        super().__init__(error_feedback)

    def payload_sizes(self, numel: int) -> list[int]:
        return [ceil_div(numel, 8), ceil_div(numel, self.block_size)]

    def quantize(self, values: Tensor, residual: Tensor | None) -> list[Tensor]:
        """Packed signs and scales of ``values`` (+ ``residual``, which is updated)."""
        numel = values.numel()
        packed = torch.empty(ceil_div(numel, 8), dtype=torch.uint8, device=values.device)
        scales = torch.empty(ceil_div(numel, self.block_size), device=values.device)
        residuals = None if residual is None else [residual]
        sign_quantize([values], residuals, [packed], [scales], block_size=self.block_size, backend=self.backend)
        return [packed, scales]

    def dequantize(self, payload: list[Tensor], numel: int) -> Tensor:
        packed, scales = payload
        return unpack_signs(packed, scales, numel, self.block_size)
