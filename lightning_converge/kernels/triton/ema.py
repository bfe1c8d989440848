"""Triton implementation of :func:`lightning_converge.kernels.ema.ema_update`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import launch_over_tensors, lerp, load_f32, operand, store, tensor_block


@triton.jit
def _ema_update_kernel(tensors, blocks, decay_ptr, BLOCK: tl.constexpr, DTYPES: tl.constexpr):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    average_ptr = operand(tensors, tensor, 0, DTYPES)
    average = load_f32(average_ptr, offsets, mask)
    current = load_f32(operand(tensors, tensor, 1, DTYPES), offsets, mask)
    finite = (current - current) == 0
    store(average_ptr, offsets, tl.where(finite, lerp(average, current, 1 - tl.load(decay_ptr)), average), mask)


def ema_update(averages: list[Tensor], currents: list[Tensor], *, decay: Tensor) -> None:
    """Same contract as the reference (``averages`` updated in place, non-finite currents
    skipped), one launch per group of tensors (see :func:`.common.launch_over_tensors`).

    ``decay`` is a 0-d tensor on the averages' device, read inside the kernel, so
    a decay schedule costs neither a host sync nor a recompile. The math is fp32.
    """
    launch_over_tensors(_ema_update_kernel, [averages, currents], [decay], updated=[0])
