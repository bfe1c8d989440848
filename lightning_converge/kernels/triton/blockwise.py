"""The launcher shared by the blockwise compression kernels: one program per block of a flat tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import triton
from torch import Tensor

from lightning_converge.kernels.triton.common import launch


def launch_per_block(
    kernel: Any,
    values: Sequence[Tensor],
    residuals: Sequence[Tensor] | None,
    outputs: Sequence[Sequence[Tensor]],
    block_size: int,
) -> None:
    """Run ``kernel`` over each flat tensor of ``values``, one program per ``block_size`` elements.

    The kernel takes pointers to the value, the residual (None without error
    feedback) and each output, the number of elements, then the constexprs
    ``BLOCK`` (the block size) and ``FEEDBACK``. Tensors must be flat and
    contiguous, as compressors hand them over.
    """
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"the triton backend needs a power-of-two block_size >= 8, got {block_size}")
    per_tensor_residuals = residuals if residuals is not None else [None] * len(values)
    for value, residual, *out in zip(values, per_tensor_residuals, *outputs):
        tensors = [t for t in (value, residual, *out) if t is not None]
        if any(t.dim() != 1 or not t.is_contiguous() for t in tensors):
            raise ValueError("blockwise compression kernels take flat contiguous tensors")
        if value.numel() == 0:
            continue
        grid = (triton.cdiv(value.numel(), block_size),)
        launch(kernel, grid, value, residual, *out, value.numel(), BLOCK=block_size, FEEDBACK=residual is not None)
