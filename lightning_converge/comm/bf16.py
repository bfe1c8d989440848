"""bfloat16 gradients on the wire: fp32's range with 8 significant bits."""

from __future__ import annotations

import torch

from lightning_converge.comm.fp16 import CastCompressor


class BF16Compressor(CastCompressor):
    """bfloat16: no overflow where fp32 has none, relative error <= 2**-8 per element."""

    name = "bf16"
    wire_dtype = torch.bfloat16
