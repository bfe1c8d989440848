"""DiLoCo's outer step ("DiLoCo: Distributed Low-Communication Training of Language Models").

Every ``inner_steps`` steps the workers average their pseudo-gradients (global
parameters minus local parameters) and the global parameters take one SGD step
on that average, with Nesterov momentum in the paper (lr 0.7, momentum 0.9).
"""

from __future__ import annotations

import importlib

from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def diloco_outer_step(
    global_params: list[Tensor],
    pseudo_grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Tensor,
    momentum: Tensor,
    nesterov: bool = True,
) -> None:
    """One outer SGD step on the global parameters and their momentum buffers, in place.

    ``buf = momentum * buf + g``, then ``p -= lr * (g + momentum * buf)`` with
    ``nesterov``, else ``p -= lr * buf``: the update of
    ``torch.optim.SGD(momentum=momentum, dampening=0, nesterov=nesterov)``, whose
    first step (buffer set to the gradient) is the same as starting from a zero
    buffer, which is what the buffers hold before the first outer step.
    ``momentum = 0`` is plain SGD. Global parameters, pseudo-gradients and
    buffers are fp32 (the strategy keeps the outer state in fp32 whatever the
    model's dtype); the math is fp32.
    """
    for param, grad, buf in zip(global_params, pseudo_grads, momentum_buffers):
        grad32 = grad.float()
        buf.mul_(momentum).add_(grad32)
        update = grad32 + momentum * buf if nesterov else buf
        param.sub_(lr * update)


diloco_outer_step.register_triton(
    lambda: importlib.import_module("lightning_converge.kernels.triton.diloco").diloco_outer_step
)
