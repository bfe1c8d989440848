"""What every triton kernel shares: the one launcher, the multi-tensor tables and small ``@triton.jit`` helpers.

**Launching.** Every triton kernel of the pack is started by :func:`launch`, so a
hook registered with :func:`register_launch_hook` sees each launch (the tests
count launches per optimizer step with it), and every one of them goes through
:func:`launch_over_tensors`: the update rules (through :func:`launch_update_rule`),
1-bit Adam's update, weight EMA, Grokfast, DiLoCo's outer step and the blockwise
compressors (int8, sign). It runs a kernel over *all* tensors of a list at once, as torch's fused
optimizers do (multi-tensor apply): tensors are grouped by device and dtypes, and
each group takes one launch (two with cautious masking), however many tensors it
holds. A kernel finds its tensors through two int64 tables:

* the tensor table, one row per tensor: the address of each operand
  (``data_ptr()``), then the tensor's number of elements;
* the block table, one row per program: the tensor it works on and the offset of
  its first element in that tensor (programs cover ``BLOCK`` elements: 1024 for
  the elementwise passes, the compressors' block size for theirs).

Inside the kernel :func:`tensor_block` reads this program's row and
:func:`operand` turns an address into a typed pointer
(``.to(tl.pointer_type(dtype))``, with the dtypes given as the constexpr tuple
``DTYPES``); per-tensor scalars (step counts) are operands too, read with a plain
``tl.load``, and so are outputs of another length than the first operand (a
compressor's per-block scales, its packed bits), which a program indexes by its
block's number in the tensor (:func:`block_in_tensor`). The block table depends
only on the tensors' sizes and is cached.

**Precision.** The update rules compute in fp32 for fp32, bf16 and fp16 tensors
and in fp64 for fp64 tensors (:func:`load_math`); their hyperparameters arrive as
float64, so ``1 - beta`` and the bias corrections are formed before they are
rounded to that precision. The helpers avoid what the interpreter
(``TRITON_INTERPRET=1``, how the tests run on CPU) cannot do: libdevice calls,
inline asm, and arithmetic on bf16, which it stores as raw 16-bit integers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_converge.kernels.dispatch import scalar

# Elements per program. Large blocks also keep the interpreter fast (it runs each
# program as one vectorized numpy pass).
BLOCK = 1024

# In the ``scalars`` of :func:`launch_over_tensors`: replaced, for each launched group,
# by an int32 table of one zeroed counter per tensor (cautious masking's counts).
COUNTS = object()

# The constexprs of each launch over a group: cautious masking counts first, then updates.
UPDATE_PASSES = ({"CAUTIOUS": False, "COUNT_PASS": False},)
CAUTIOUS_PASSES = ({"CAUTIOUS": True, "COUNT_PASS": True}, {"CAUTIOUS": True, "COUNT_PASS": False})

_TRITON_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int64: tl.int64,
    torch.int32: tl.int32,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
}

# An OrderedDict, as torch keeps its hooks: RemovableHandle holds a weak reference to it.
_launch_hooks: OrderedDict[int, Callable[[Any, tuple[int, ...]], None]] = OrderedDict()

# Block tables by (device, block size, sizes of the tensors), tensor tables by (device, addresses and sizes):
# both are the same from step to step.
_block_tables: OrderedDict[tuple[torch.device, int, tuple[int, ...]], Tensor] = OrderedDict()
_tensor_tables: OrderedDict[tuple[torch.device, tuple[tuple[int, ...], ...]], Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 64


def register_launch_hook(hook: Callable[[Any, tuple[int, ...]], None]) -> RemovableHandle:
    """Register ``hook(kernel, grid)``, called before every triton launch of the pack.

    Returns a handle whose ``remove()`` unregisters the hook, as torch's hooks do.
    """
    handle = RemovableHandle(_launch_hooks)
    _launch_hooks[handle.id] = hook
    return handle


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
    """Launch ``kernel`` over ``grid``: the one place every triton kernel of the pack is started."""
    for hook in list(_launch_hooks.values()):
        hook(kernel, grid)
    kernel[grid](*args, **constexprs)


def _triton_dtype(dtype: torch.dtype) -> Any:
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"the triton kernels take tensors of {sorted(map(str, _TRITON_DTYPES))}, got {dtype}")
    return _TRITON_DTYPES[dtype]


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    """Copy a host table to ``device`` without blocking the host (pinned, asynchronous copy on CUDA)."""
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def _block_table(numels: Sequence[int], device: torch.device, block: int) -> Tensor:
    """One row per program: (tensor index, offset of its first element), ``block`` elements apart."""
    key = (device, block, tuple(numels))
    table = _block_tables.get(key)
    if table is None:
        blocks_per_tensor = torch.tensor([triton.cdiv(numel, block) for numel in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks_per_tensor)
        first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        start = (torch.arange(len(tensor)) - first_block[tensor]) * block
        table = _to_device(torch.stack([tensor, start], dim=1), device)
        _block_tables[key] = table
        if len(_block_tables) > _TABLE_CACHE_SIZE:
            _block_tables.popitem(last=False)
    else:
        _block_tables.move_to_end(key)
    return table


def _tensor_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """The tensor table on ``device``, cached by its contents: parameters and states keep their
    addresses from step to step (gradients mostly too, through the caching allocator), so a step
    usually builds and copies no table; a new one is an asynchronous pinned copy, no host sync."""
    key = (device, rows)
    table = _tensor_tables.get(key)
    if table is None:
        table = _tensor_tables[key] = _to_device(torch.tensor(rows, dtype=torch.int64), device)
        if len(_tensor_tables) > _TABLE_CACHE_SIZE:
            _tensor_tables.popitem(last=False)
    else:
        _tensor_tables.move_to_end(key)
    return table


def launch_over_tensors(
    kernel: Any,
    operands: Sequence[Sequence[Tensor]],
    scalars: Sequence[Any],
    *,
    updated: Sequence[int],
    per_tensor_scalars: Sequence[Sequence[Tensor]] = (),
    passes: Sequence[dict[str, Any]] = ({},),
    block: int = BLOCK,
    shaped: int | None = None,
    **constexprs: Any,
) -> None:
    """Run the elementwise ``kernel`` over every tensor of ``operands``, one launch per group and pass.

    ``operands`` holds one list per operand (parameters, gradients, each state...),
    tensor ``i`` of the first ``shaped`` of them (all by default) having the shape of
    ``operands[0][i]``; the others are outputs of their own length that the kernel
    indexes by block (per-block scales, packed bits). Each program covers ``block``
    elements of the first operand (a power of two). The operands whose
    indices are in ``updated`` are written in place (a non-contiguous one through a
    contiguous copy that is written back). ``per_tensor_scalars`` holds lists of 0-d
    tensors, one per tensor (step counts). ``scalars`` are the same for every
    tensor (0-d hyperparameter tensors, or :data:`COUNTS`).

    Tensors are grouped by device and dtypes; empty ones are skipped. For each
    group, each dict of ``passes`` gives one launch (cautious masking: a count
    pass, then the update pass), of the kernel called as
    ``kernel(tensors, blocks, *scalars, BLOCK=, DTYPES=, **pass, **constexprs)``,
    where ``tensors`` is the tensor table (the addresses of the operands, then of
    the per-tensor scalars, then the number of elements; one row per tensor),
    ``blocks`` the block table and ``DTYPES`` the dtypes of the table's columns.
    """
    rows = list(zip(*operands, *per_tensor_scalars))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, row in enumerate(rows):
        tensors, first = row[: len(operands) if shaped is None else shaped], row[0]
        if any(t.shape != first.shape for t in tensors):
            raise ValueError(
                f"tensor {index}: every operand must have the shape {tuple(first.shape)} of the first, "
                f"got {[tuple(t.shape) for t in tensors]}"
            )
        if any(t.device != first.device for t in row):
            raise ValueError(f"tensor {index}: operands on several devices: {[str(t.device) for t in row]}")
        if first.numel() > 0:
            groups.setdefault((first.device, *(t.dtype for t in row)), []).append(index)

    for (device, *dtypes), indices in groups.items():
        dense_rows = [[t.contiguous() for t in rows[index]] for index in indices]
        numels = [rows[index][0].numel() for index in indices]
        table = _tensor_table(
            tuple(tuple(t.data_ptr() for t in row) + (numel,) for row, numel in zip(dense_rows, numels)), device
        )
        blocks = _block_table(numels, device, block)
        group_scalars = [
            torch.zeros(len(indices), dtype=torch.int32, device=device) if value is COUNTS else value
            for value in scalars
        ]
        args = (table, blocks, *group_scalars)
        dtype_constexpr = tuple(_triton_dtype(dtype) for dtype in dtypes)
        for constexprs_of_pass in passes:
            launch(
                kernel, (len(blocks),), *args, BLOCK=block, DTYPES=dtype_constexpr, **constexprs_of_pass, **constexprs
            )
        for index, dense_row in zip(indices, dense_rows):
            for position in updated:
                if dense_row[position] is not rows[index][position]:
                    rows[index][position].copy_(dense_row[position])


def launch_update_rule(
    kernel: Any,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    hyperparameters: Sequence[Tensor | float],
    *,
    cautious: bool,
    **options: Any,
) -> None:
    """Run an update rule's ``kernel`` over all parameters with their gradients, states and steps.

    The kernel takes the tables of :func:`launch_over_tensors`, whose operands are
    the parameter, the gradient, each of ``states``, then (when ``steps`` is given)
    the step; then the ``hyperparameters`` as float64 0-d tensors (read inside the
    kernel, so a schedule costs neither a host sync nor a recompile); then the
    table of cautious counters (None without ``cautious``); then the constexprs
    ``BLOCK``, ``DTYPES``, ``CAUTIOUS``, ``COUNT_PASS`` and ``options``.

    With ``cautious`` each group takes two launches, because the mask is scaled by
    a count over each whole tensor: a ``COUNT_PASS`` that writes nothing and only
    adds up, per tensor, where the update agrees in sign with the gradient, then
    the update pass, which reads those counts.
    """
    if not params:
        return
    device = params[0].device
    launch_over_tensors(
        kernel,
        [params, grads, *states],
        [*(scalar(value, device, torch.float64) for value in hyperparameters), COUNTS if cautious else None],
        updated=[0, *range(2, 2 + len(states))],
        per_tensor_scalars=[steps] if steps is not None else [],
        passes=CAUTIOUS_PASSES if cautious else UPDATE_PASSES,
        **options,
    )


@triton.jit
def tensor_block(tensors, blocks, DTYPES: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor (its row in the tensor table), its element offsets in that
    tensor, the mask of those inside it, and the tensor's number of elements."""
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(blocks + 2 * block)
    offsets = tl.load(blocks + 2 * block + 1) + tl.arange(0, BLOCK)
    numel = tl.load(tensors + tensor * (len(DTYPES) + 1) + len(DTYPES))
    return tensor, offsets, offsets < numel, numel


@triton.jit
def operand(tensors, tensor, INDEX: tl.constexpr, DTYPES: tl.constexpr):
    """The typed pointer to operand ``INDEX`` of ``tensor``, from its address in the tensor table."""
    address = tl.load(tensors + tensor * (len(DTYPES) + 1) + INDEX)
    return address.to(tl.pointer_type(DTYPES[INDEX]))


@triton.jit
def block_in_tensor(blocks, BLOCK: tl.constexpr):
    """The number of this program's block within its tensor (0 for the tensor's first ``BLOCK`` elements)."""
    return tl.load(blocks + 2 * tl.program_id(0).to(tl.int64) + 1) // BLOCK


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
