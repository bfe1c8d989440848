"""Triton implementation of :func:`lightning_converge.kernels.ema.ema_update`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import BLOCK, block_offsets, lerp, load_f32, store


@triton.jit
def _ema_update_kernel(average_ptr, current_ptr, decay_ptr, numel, BLOCK: tl.constexpr):
    offsets, mask = block_offsets(numel, BLOCK)
    average = load_f32(average_ptr, offsets, mask)
    current = load_f32(current_ptr, offsets, mask)
    finite = (current - current) == 0
    store(average_ptr, offsets, tl.where(finite, lerp(average, current, 1 - tl.load(decay_ptr)), average), mask)


def ema_update(averages: list[Tensor], currents: list[Tensor], *, decay: Tensor) -> None:
    """Same contract as the reference (``averages`` updated in place, non-finite currents skipped), one launch per tensor.

    ``decay`` is a 0-d tensor on the averages' device, read inside the kernel, so
    a decay schedule costs neither a host sync nor a recompile. The math is fp32.
    """
    for average, current in zip(averages, currents):
        if average.shape != current.shape:
            raise ValueError(f"average and current shapes differ: {tuple(average.shape)} vs {tuple(current.shape)}")
        if average.numel() == 0:
            continue
        # The kernel walks flat memory: update a non-contiguous average through a contiguous copy.
        dense_average = average.contiguous()
        grid = (triton.cdiv(average.numel(), BLOCK),)
        _ema_update_kernel[grid](dense_average, current.contiguous(), decay, average.numel(), BLOCK=BLOCK)
        if dense_average is not average:
            average.copy_(dense_average)
