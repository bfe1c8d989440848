"""What the blockwise compression kernels (int8, sign) share: their arguments, checked, on the common launcher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import triton.language as tl
from torch import Tensor

from lightning_converge.kernels.triton.common import launch_over_tensors

# The operands of a blockwise compression kernel, in the tensor table's order (constexprs: kernels read them).
VALUE, ENCODED, SCALES, RESIDUAL = (tl.constexpr(index) for index in range(4))


def launch_blockwise(
    kernel: Any,
    values: Sequence[Tensor],
    residuals: Sequence[Tensor] | None,
    encoded: Sequence[Tensor],
    scales: Sequence[Tensor],
    block_size: int,
    *,
    encoded_like_values: bool,
) -> None:
    """Run ``kernel`` over every flat tensor of ``values``, one program per ``block_size`` elements
    and one launch per group of tensors (see :func:`.common.launch_over_tensors`).

    The kernel's operands are, in this order (:data:`VALUE`, :data:`ENCODED`,
    :data:`SCALES`, :data:`RESIDUAL`): the value, its encoding (of the value's
    length when ``encoded_like_values``, else its own: packed bits), the per-block
    scales and, with error feedback only, the residual; the constexprs are
    ``BLOCK`` (the block size), ``DTYPES`` and ``FEEDBACK``. Tensors must be flat
    and contiguous, as compressors hand them over.
    """
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"the triton backend needs a power-of-two block_size >= 8, got {block_size}")
    operands = [values, encoded, scales, *([residuals] if residuals is not None else [])]
    if any(t.dim() != 1 or not t.is_contiguous() for tensors in operands for t in tensors):
        raise ValueError("blockwise compression kernels take flat contiguous tensors")
    # The residual must have the value's shape too; it comes last, so it is checked by hand.
    if residuals is not None and any(r.shape != v.shape for v, r in zip(values, residuals)):
        raise ValueError("each residual must have the shape of its value")
    launch_over_tensors(
        kernel,
        operands,
        [],
        updated=[ENCODED.value, SCALES.value, *([RESIDUAL.value] if residuals is not None else [])],
        block=block_size,
        shaped=2 if encoded_like_values else 1,
        FEEDBACK=residuals is not None,
    )
