"""Triton implementation of :func:`lightning_converge.kernels.grokfast.grokfast_ema`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import BLOCK, block_offsets, load_f32, store


@triton.jit
def _grokfast_ema_kernel(grad_ptr, slow_ptr, alpha_ptr, lamb_ptr, numel, BLOCK: tl.constexpr):
    offsets, mask = block_offsets(numel, BLOCK)
    alpha = tl.load(alpha_ptr)
    lamb = tl.load(lamb_ptr)
    grad = load_f32(grad_ptr, offsets, mask)
    old_slow = load_f32(slow_ptr, offsets, mask)
    # An inf/NaN gradient element leaves its slow alone, as in the reference.
    slow = tl.where(grad - grad == 0, alpha * old_slow + (1 - alpha) * grad, old_slow)
    store(slow_ptr, offsets, slow, mask)
    store(grad_ptr, offsets, grad + lamb * slow, mask)


def grokfast_ema(grads: list[Tensor], slows: list[Tensor], *, alpha: Tensor, lamb: Tensor) -> None:
    """Same contract as the reference: both lists updated in place, one launch per tensor.

    ``alpha`` and ``lamb`` are 0-d tensors on the gradients' device, read inside the
    kernel so that a schedule costs neither a host sync nor a recompile.
    """
    for grad, slow in zip(grads, slows):
        if grad.shape != slow.shape:
            raise ValueError(f"gradient and slow state shapes differ: {tuple(grad.shape)} vs {tuple(slow.shape)}")
        if grad.numel() == 0:
            continue
        # The kernel walks flat memory: update non-contiguous tensors through contiguous copies.
        dense_grad, dense_slow = grad.contiguous(), slow.contiguous()
        grid = (triton.cdiv(grad.numel(), BLOCK),)
        _grokfast_ema_kernel[grid](dense_grad, dense_slow, alpha, lamb, grad.numel(), BLOCK=BLOCK)
        for original, dense in ((grad, dense_grad), (slow, dense_slow)):
            if dense is not original:
                original.copy_(dense)
