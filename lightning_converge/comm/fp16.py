"""fp16 gradients on the wire (what torch's ``fp16_compress_hook`` sends), and the cast compressor it is."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor
from lightning_converge.comm.state import Layout


class CastCompressor(Compressor):
    """Send the values cast to ``wire_dtype``: half the bytes of fp32.

    Sums of casts are casts, so the payload is all-reduced in ``wire_dtype``.
    With error feedback, the rounding error of each cast is carried to the next step.
    """

    summable = True
    wire_dtype: ClassVar[torch.dtype]

    def encode(self, values: Tensor, layout: Layout) -> list[Tensor]:
        return [values.to(self.wire_dtype)]

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        return payload[0].float()


class FP16Compressor(CastCompressor):
    """IEEE half precision: 11 significant bits (relative error <= 2**-11), but values
    beyond +-65504 (summed over the ranks) overflow to inf. See also ``bf16``."""

    name = "fp16"
    wire_dtype = torch.float16
