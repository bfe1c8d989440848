"""Triton implementation of :func:`lightning_converge.kernels.diloco.diloco_outer_step`."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import block_offsets, launch_per_tensor, load_f32, store


@triton.jit
def _diloco_outer_step_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,
    lr_ptr,
    momentum_ptr,
    count_ptr,
    numel,
    BLOCK: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNT_PASS: tl.constexpr,
    NESTEROV: tl.constexpr,
):
    # CAUTIOUS, COUNT_PASS and count_ptr belong to the shared launcher's calling
    # convention; the outer step has no cautious variant, so they are never set.
    offsets, mask = block_offsets(numel, BLOCK)
    grad = load_f32(grad_ptr, offsets, mask)
    momentum = tl.load(momentum_ptr)
    buf = momentum * load_f32(buf_ptr, offsets, mask) + grad
    if NESTEROV:
        update = grad + momentum * buf
    else:
        update = buf
    param = load_f32(param_ptr, offsets, mask)
    store(param_ptr, offsets, param - tl.load(lr_ptr) * update, mask)
    store(buf_ptr, offsets, buf, mask)


def diloco_outer_step(
    global_params: list[Tensor],
    pseudo_grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Tensor,
    momentum: Tensor,
    nesterov: bool = True,
) -> None:
    """One outer SGD step, in place: the reference's contract, one launch per tensor."""
    launch_per_tensor(
        _diloco_outer_step_kernel,
        global_params,
        pseudo_grads,
        [momentum_buffers],
        None,
        [lr, momentum],
        cautious=False,
        NESTEROV=nesterov,
    )
