"""Triton implementation of :func:`lightning_converge.kernels.grokfast.grokfast_ema`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import launch_over_tensors, load_f32, operand, store, tensor_block


@triton.jit
def _grokfast_ema_kernel(tensors, blocks, alpha_ptr, lamb_ptr, BLOCK: tl.constexpr, DTYPES: tl.constexpr):
    tensor, offsets, mask, _ = tensor_block(tensors, blocks, DTYPES, BLOCK)
    grad_ptr = operand(tensors, tensor, 0, DTYPES)
    slow_ptr = operand(tensors, tensor, 1, DTYPES)
    alpha = tl.load(alpha_ptr)
    lamb = tl.load(lamb_ptr)
    grad = load_f32(grad_ptr, offsets, mask)
    old_slow = load_f32(slow_ptr, offsets, mask)
    # An inf/NaN gradient element leaves its slow alone, as in the reference.
    slow = tl.where(grad - grad == 0, alpha * old_slow + (1 - alpha) * grad, old_slow)
    store(slow_ptr, offsets, slow, mask)
    store(grad_ptr, offsets, grad + lamb * slow, mask)


def grokfast_ema(grads: list[Tensor], slows: list[Tensor], *, alpha: Tensor, lamb: Tensor) -> None:
    """Same contract as the reference: both lists updated in place, one launch per group
    of tensors (see :func:`.common.launch_over_tensors`).

    ``alpha`` and ``lamb`` are 0-d tensors on the gradients' device, read inside the
    kernel so that a schedule costs neither a host sync nor a recompile.
    """
    launch_over_tensors(_grokfast_ema_kernel, [grads, slows], [alpha, lamb], updated=[0, 1])
