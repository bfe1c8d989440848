"""The triton kernels launch once per group of tensors (device and dtypes), not once per tensor.

Launches are counted with :func:`register_launch_hook`, which sees every triton
launch of the pack. Under ``TRITON_INTERPRET=1`` (conftest) the tensors stay tiny;
the multi-tensor launches are also checked against the reference on tensors that
span several blocks, in several dtype groups in one call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from lightning_converge.kernels import (
    adamw,
    diloco_outer_step,
    ema_update,
    grokfast_ema,
    int8_quantize,
    onebit_adam_update,
    sign_quantize,
)
from lightning_converge.kernels.triton.common import BLOCK, register_launch_hook
from lightning_converge.optim import ADOPT, AdamW, Adan, AdEMAMix, Lion

OPTIMIZERS = [AdamW, Lion, Adan, ADOPT, AdEMAMix]


@contextlib.contextmanager
def counting_launches():
    """Yield a list that collects the grid of every triton launch made inside the block."""
    grids: list[tuple[int, ...]] = []
    handle = register_launch_hook(lambda kernel, grid: grids.append(grid))
    try:
        yield grids
    finally:
        handle.remove()


def _params(count: int, dtypes: tuple[torch.dtype, ...]) -> list[torch.nn.Parameter]:
    """``count`` small parameters of odd sizes, their dtypes taken in turn from ``dtypes``, with gradients."""
    generator = torch.Generator().manual_seed(count)
    params = []
    for index in range(count):
        dtype = dtypes[index % len(dtypes)]
        param = torch.nn.Parameter(torch.randn(3 + index % 5, generator=generator).to(dtype))
        param.grad = torch.randn(param.shape, generator=generator).to(dtype)
        params.append(param)
    return params


def _launches_per_step(optimizer_class, count: int, dtypes: tuple[torch.dtype, ...], cautious: bool) -> list[int]:
    optimizer = optimizer_class(_params(count, dtypes), lr=1e-3, cautious=cautious, backend="triton")
    launches = []
    for _ in range(2):  # the first step also creates the state
        with counting_launches() as grids:
            optimizer.step()
        launches.append(len(grids))
    return launches


# ADOPT's clip (step - 1) ** clip_exponent is exp(log(0) * e) = 0 at step 1: right, but numpy warns.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_optimizer_step_launches_per_group_not_per_tensor(optimizer_class, cautious):
    """3 and 30 tensors in two dtype groups take the same launches: one per group, two with
    cautious masking (a count pass, then the update pass). Before, it was one per tensor."""
    dtypes = (torch.float32, torch.bfloat16)
    passes = 2 if cautious else 1
    expected = [len(dtypes) * passes] * 2
    assert _launches_per_step(optimizer_class, 3, dtypes, cautious) == expected
    assert _launches_per_step(optimizer_class, 30, dtypes, cautious) == expected


def test_elementwise_kernels_launch_once_for_all_tensors():
    for count in (3, 30):
        tensors = [[torch.randn(2 + index % 3) for index in range(count)] for _ in range(3)]
        with counting_launches() as grids:
            ema_update(tensors[0], tensors[1], decay=torch.tensor(0.9), backend="triton")
            grokfast_ema(tensors[0], tensors[1], alpha=torch.tensor(0.9), lamb=torch.tensor(2.0), backend="triton")
            diloco_outer_step(*tensors, lr=torch.tensor(0.7), momentum=torch.tensor(0.9), backend="triton")
            steps = [torch.tensor(3.0)] * count
            hyperparameters = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
            onebit_adam_update(
                tensors[0], tensors[1], [t.abs() for t in tensors[2]], steps, steps, backend="triton",
                **{name: torch.tensor(value, dtype=torch.float64) for name, value in hyperparameters.items()},
            )
        assert len(grids) == 4


def test_removed_hook_sees_no_launch():
    grids = []
    handle = register_launch_hook(lambda kernel, grid: grids.append(grid))
    handle.remove()
    ema_update([torch.zeros(3)], [torch.ones(3)], decay=torch.tensor(0.5), backend="triton")
    assert grids == []


def test_one_launch_matches_the_reference_across_blocks_and_dtype_groups():
    """Tensors larger than a block (programs that start inside a tensor), a one-element and an
    empty tensor, in fp32, bf16 and fp64 in one call, with cautious masking (per-tensor counts)
    and each tensor at its own step: the triton step equals the reference step."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(BLOCK + 1,), (3,), (2, BLOCK // 2 + 7), (1,), (0,), (BLOCK * 2 + 5,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float32, torch.bfloat16]
    params = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in zip(shapes, dtypes)]
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in zip(shapes, dtypes)]
    state_dtypes = [torch.float64 if dtype == torch.float64 else torch.float32 for dtype in dtypes]
    exp_avgs = [torch.randn(shape, generator=generator, dtype=d) for shape, d in zip(shapes, state_dtypes)]
    exp_avg_sqs = [torch.rand(shape, generator=generator, dtype=d) for shape, d in zip(shapes, state_dtypes)]
    steps = [torch.tensor(float(step)) for step in (1, 2, 7, 3, 1, 1000)]
    inputs = [params, grads, exp_avgs, exp_avg_sqs, steps]
    hyperparameters = {
        name: torch.tensor(value, dtype=torch.float64)
        for name, value in {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}.items()
    }
    expected = [[t.clone() for t in tensors] for tensors in inputs]
    adamw.reference(*expected, **hyperparameters, cautious=True)
    with counting_launches() as grids:
        adamw(*inputs, backend="triton", **hyperparameters, cautious=True)
    # Three dtype groups (the empty tensor is skipped), two passes each.
    assert len(grids) == 3 * 2
    for actual_list, expected_list in zip(inputs, expected):
        for index, (actual, wanted) in enumerate(zip(actual_list, expected_list)):
            if actual.dtype == torch.bfloat16:  # the interpreter truncates where torch rounds
                torch.testing.assert_close(actual, wanted, rtol=2**-7, atol=1e-6, msg=f"tensor {index}")
            else:
                torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6, msg=f"tensor {index}")


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="triton kernels take tensors of .*got torch.int16"):
        ema_update(
            [torch.zeros(3, dtype=torch.int16)],
            [torch.ones(3, dtype=torch.int16)],
            decay=torch.tensor(0.5),
            backend="triton",
        )


# The compressors: (kernel, dtype of the encoding, elements per encoded element).
COMPRESSORS = [(int8_quantize, torch.int8, 1), (sign_quantize, torch.uint8, 8)]


def _compress(kernel, values, residuals, encoded_dtype, per_encoded, block_size, backend):
    """Run a blockwise compressor on copies of ``residuals``; return its outputs, residuals last."""
    encoded = [torch.full((-(-v.numel() // per_encoded),), 7, dtype=encoded_dtype) for v in values]
    scales = [torch.full((-(-v.numel() // block_size),), -1.0) for v in values]
    residuals = None if residuals is None else [r.clone() for r in residuals]
    kernel(values, residuals, encoded, scales, block_size=block_size, backend=backend)
    return encoded, scales, residuals


@pytest.mark.parametrize("feedback", [False, True], ids=["plain", "feedback"])
@pytest.mark.parametrize("kernel, encoded_dtype, per_encoded", COMPRESSORS, ids=["int8", "sign"])
def test_compressors_launch_once_per_group_and_match_the_reference(kernel, encoded_dtype, per_encoded, feedback):
    """Several flat tensors of odd sizes (several blocks, a partial last block and byte, one element,
    an empty one) in fp32 and bf16 take one launch per dtype group, however many tensors, and
    write what the reference writes (sign compression's scales are means, summed in another order:
    they, and the residuals made from them, agree to an ulp of the scale)."""
    block_size = 32
    generator = torch.Generator().manual_seed(5)
    for count in (3, 9):
        sizes = [(3 * block_size + 5, 13, 1, 0, block_size)[index % 5] for index in range(count)]
        dtypes = [(torch.float32, torch.bfloat16)[index % 2] for index in range(count)]
        values = [torch.randn(size, generator=generator).to(dtype) for size, dtype in zip(sizes, dtypes)]
        residuals = [0.1 * torch.randn(size, generator=generator) for size in sizes] if feedback else None
        expected = _compress(kernel, values, residuals, encoded_dtype, per_encoded, block_size, "reference")
        with counting_launches() as grids:
            actual = _compress(kernel, values, residuals, encoded_dtype, per_encoded, block_size, "triton")
        assert len(grids) == 2  # fp32 and bf16 values; the empty tensor is skipped
        for name, actual_list, expected_list in zip(("encoded", "scales", "residuals"), actual, expected):
            for index, (got, wanted) in enumerate(zip(actual_list or [], expected_list or [])):
                torch.testing.assert_close(got, wanted, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}[{index}]: {m}")


def test_compressor_arguments_are_checked_before_launching():
    values = [torch.randn(10)]
    outputs = dict(quantized=[torch.empty(10, dtype=torch.int8)], scales=[torch.empty(2)])
    with counting_launches() as grids:
        with pytest.raises(ValueError, match="each residual must have the shape of its value"):
            int8_quantize(values, [torch.zeros(9)], *outputs.values(), block_size=8, backend="triton")
        with pytest.raises(ValueError, match="flat contiguous tensors"):
            int8_quantize([torch.randn(2, 5)], None, *outputs.values(), block_size=8, backend="triton")
        with pytest.raises(ValueError, match="power-of-two block_size >= 8, got 12"):
            int8_quantize(values, None, *outputs.values(), block_size=12, backend="triton")
    assert grids == []
