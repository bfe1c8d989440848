"""What every triton update rule shares: the per-tensor launcher and small ``@triton.jit`` helpers.

The update rules compute in fp32 for fp32, bf16 and fp16 tensors and in fp64 for
fp64 tensors (:func:`load_math`); their hyperparameters arrive as float64, so
``1 - beta`` and the bias corrections are formed before they are rounded to that
precision. The helpers avoid what the interpreter (``TRITON_INTERPRET=1``, how the tests run on CPU) cannot do:
libdevice calls, inline asm, and arithmetic on bf16, which it stores as raw
16-bit integers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.dispatch import scalar

# Elements per program. Large blocks also keep the interpreter fast (it runs each
# program as one vectorized numpy pass).
BLOCK = 1024


def launch_per_tensor(
    kernel: Any,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    hyperparameters: Sequence[Tensor],
    *,
    cautious: bool,
    hyperparameter_dtype: torch.dtype = torch.float32,
    **options: Any,
) -> None:
    """Run an update-rule ``kernel`` over each parameter with its gradient, state and step.

    The kernel takes, in this order: pointers to the parameter, the gradient, each
    of ``states`` and (when ``steps`` is given) the step; pointers to the
    ``hyperparameters`` (0-d tensors of ``hyperparameter_dtype``, read inside the
    kernel; the optimizer rules ask for float64); the pointer to
    this tensor's cautious counter (None without ``cautious``); the number of
    elements; then the constexprs ``BLOCK``, ``CAUTIOUS``, ``COUNT_PASS`` and ``options``.

    With ``cautious`` every tensor takes two launches, because the mask is scaled
    by a count over the whole tensor: a ``COUNT_PASS`` that writes nothing and
    only adds up where the update agrees in sign with the gradient, then the
    update pass, which reads that count.

    Parameters and states are updated in place; a non-contiguous one is updated
    through a contiguous copy that is written back.
    """
    if not params:
        return
    device = params[0].device
    hyperparameters = [scalar(value, device, hyperparameter_dtype) for value in hyperparameters]
    counts = torch.zeros(len(params), dtype=torch.int32, device=device) if cautious else None
    per_tensor_steps = steps if steps is not None else [None] * len(params)
    for index, (param, grad, state, step) in enumerate(zip(params, grads, zip(*states), per_tensor_steps)):
        if any(t.shape != param.shape for t in (grad, *state)):
            raise ValueError(
                f"tensor {index}: gradient and state must have the parameter's shape {tuple(param.shape)}, "
                f"got {[tuple(t.shape) for t in (grad, *state)]}"
            )
        if param.numel() == 0:
            continue
        updated = [param, *state]
        dense = [t.contiguous() for t in updated]  # the tensors themselves when already contiguous
        step_args = () if step is None else (scalar(step, device),)
        count = None if counts is None else counts[index]
        args = (dense[0], grad.contiguous(), *dense[1:], *step_args, *hyperparameters, count, param.numel())
        grid = (triton.cdiv(param.numel(), BLOCK),)
        if cautious:
            kernel[grid](*args, BLOCK=BLOCK, CAUTIOUS=True, COUNT_PASS=True, **options)
        kernel[grid](*args, BLOCK=BLOCK, CAUTIOUS=cautious, COUNT_PASS=False, **options)
        for original, copy in zip(updated, dense):
            if copy is not original:
                original.copy_(copy)


@triton.jit
def block_offsets(numel, BLOCK: tl.constexpr):
    """This program's element offsets, and the mask of those inside the tensor."""
    # int64, so tensors of more than 2**31 elements are addressed correctly.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < numel


@triton.jit
def load_f32(ptr, offsets, mask):
    """Load and convert to fp32 at once (the interpreter only emulates bf16 through casts)."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_math(ptr, offsets, mask):
    """Load in the precision the update rules compute in: fp64 stays fp64, any other
    dtype becomes fp32 (converted right after the load, for the interpreter's sake)."""
    value = tl.load(ptr + offsets, mask=mask, other=0.0)
    if ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    return value


@triton.jit
def store(ptr, offsets, value, mask):
    """Store an fp32 ``value`` in the pointer's dtype, cast explicitly (bf16 parameters)."""
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def scalar_pow(base, exponent):
    """``base ** exponent`` as an fp64 scalar, for base > 0 (or 0 with exponent > 0).

    Computed as exp(log(base) * exponent) in fp64, and left in fp64 for the caller
    to form ``1 - beta**step`` before rounding: in fp32 (approximate exp2/log2 on
    GPUs) an error of an ulp or two would be magnified a thousandfold by
    ``1 - beta2**step``, which is about 1e-3 at step 1.
    """
    return tl.exp(tl.log(tl.cast(base, tl.float64)) * exponent)


@triton.jit
def bias_correction(beta, step):
    """``1 - beta**step`` in fp64, as the reference's step factors form it."""
    return 1 - scalar_pow(beta, step)


@triton.jit
def lerp(start, end, weight):
    """``torch.lerp``'s formula (exact at both ends), so state EMAs match the reference to the ulp."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def sign(x):
    """``torch.sign`` without libdevice: -1, 0 or 1 (0 for NaN, as torch)."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def count_agreeing(update, grad, mask, count_ptr):
    """Cautious first pass: add this block's number of entries where ``update * grad > 0``."""
    agreeing = (update * grad > 0) & mask
    tl.atomic_add(count_ptr, tl.sum(agreeing.to(tl.int32), axis=0))


@triton.jit
def cautious_masked(update, grad, count_ptr, numel):
    """Cautious second pass: ``update * cautious_mask(update, grad)`` given the tensor's count.

    The scale is ``numel / (count + 1)`` evaluated as torch evaluates ``int / tensor``
    (reciprocal, then multiply), so it matches the reference to the bit.
    """
    scale = (1.0 / (tl.load(count_ptr).to(update.dtype) + 1.0)) * numel
    return update * tl.where(update * grad > 0, scale, 0.0)
