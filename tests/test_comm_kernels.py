"""The compression kernels' compiled and triton backends against the reference.

Triton runs on the CPU under its interpreter (conftest sets ``TRITON_INTERPRET=1``).
Sizes are odd (a partial last block, a partial last byte of signs); values are
fp32 or bf16, with and without an error-feedback residual. int8 quantization is
exact on every backend (a max is order-independent); sign scales are means, whose
summation order differs between backends by an ulp.
"""

from __future__ import annotations

import pytest
import torch

from lightning_converge.kernels import int8_quantize, sign_quantize

SIZES = [13, 200]
BLOCK_SIZE = 64


def inputs(numel: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator).to(dtype)
    if numel > BLOCK_SIZE:
        values[:BLOCK_SIZE] = 0.0  # an all-zero block
    return values, 0.1 * torch.randn(numel, generator=generator)


def run(kernel, backend: str, values, residual, out_dtype: torch.dtype, per_byte: int):
    numel = values.numel()
    out = torch.empty(-(-numel // per_byte), dtype=out_dtype)
    scales = torch.empty(-(-numel // BLOCK_SIZE))
    residuals = None if residual is None else [residual.clone()]
    kernel([values], residuals, [out], [scales], block_size=BLOCK_SIZE, backend=backend)
    return out, scales, None if residuals is None else residuals[0]


# Every case under triton; one case per kernel under torch.compile (each new case is a new compilation).
CASES = [
    pytest.param("triton", dtype, feedback, id=f"triton-{dtype}-feedback={feedback}")
    for dtype in (torch.float32, torch.bfloat16)
    for feedback in (False, True)
] + [pytest.param("compiled", torch.bfloat16, True, id="compiled-bf16-feedback")]


@pytest.mark.parametrize(("backend", "dtype", "feedback"), CASES)
def test_int8_quantize_backends_match_the_reference_exactly(backend, dtype, feedback):
    if backend == "triton":
        pytest.importorskip("triton")
    for numel in SIZES:
        values, residual = inputs(numel, dtype)
        residual = residual if feedback else None
        expected = run(int8_quantize, "reference", values, residual, torch.int8, 1)
        actual = run(int8_quantize, backend, values, residual, torch.int8, 1)
        for a, e in zip(actual, expected):
            assert (a is None and e is None) or torch.equal(a, e)


@pytest.mark.parametrize(("backend", "dtype", "feedback"), CASES)
def test_sign_quantize_backends_match_the_reference(backend, dtype, feedback):
    if backend == "triton":
        pytest.importorskip("triton")
    for numel in SIZES:
        values, residual = inputs(numel, dtype)
        residual = residual if feedback else None
        packed, scales, new_residual = run(sign_quantize, backend, values, residual, torch.uint8, 8)
        expected_packed, expected_scales, expected_residual = run(
            sign_quantize, "reference", values, residual, torch.uint8, 8
        )
        assert torch.equal(packed, expected_packed)
        torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
        if feedback:
            torch.testing.assert_close(new_residual, expected_residual, rtol=1e-6, atol=1e-6)


def test_sign_packing_order_and_padding_bits():
    values = torch.tensor([1.0, -1.0, 0.0, -2.0, 3.0, -0.5, 0.25, -4.0, -1.0, 2.0])
    packed = torch.empty(2, dtype=torch.uint8)
    sign_quantize([values], None, [packed], [torch.empty(1)], block_size=16, backend="reference")
    # Bit i of byte j is element 8 j + i >= 0; the six bits past the end are 1.
    assert packed.tolist() == [0b01010101, 0b11111110]


@pytest.mark.parametrize("numel, block_size", [(1000, 256), (200, 64)])
def test_compiled_int8_writes_the_last_partial_block_of_a_multi_block_tensor(numel, block_size):
    # A first compile at a static multi-block size once left the padded tail unwritten.
    torch._dynamo.reset()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for backend in ("reference", "compiled"):
        q = torch.full((numel,), -99, dtype=torch.int8)
        scales = torch.empty(-(-numel // block_size))
        int8_quantize([x.clone()], [torch.zeros(numel)], [q], [scales], block_size=block_size, backend=backend)
        outputs[backend] = (q, scales)
    torch.testing.assert_close(outputs["compiled"][0], outputs["reference"][0])
    torch.testing.assert_close(outputs["compiled"][1], outputs["reference"][1])


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("kernel, out_dtype", [(int8_quantize, torch.int8), (sign_quantize, torch.uint8)])
def test_empty_tensors_are_accepted_beside_others(kernel, out_dtype, backend):
    """A rank's chunk of the 1-bit all-reduce can be empty (a bucket smaller than the ranks' blocks)."""
    if backend == "triton":
        pytest.importorskip("triton")
    values, residual = inputs(13, torch.float32)
    per_byte = 1 if out_dtype == torch.int8 else 8
    expected = run(kernel, "reference", values, residual, out_dtype, per_byte)
    outputs = [torch.empty(0, dtype=out_dtype), torch.empty(-(-13 // per_byte), dtype=out_dtype)]
    scales = [torch.empty(0), torch.empty(1)]
    residuals = [torch.empty(0), residual.clone()]
    kernel([torch.empty(0), values], residuals, outputs, scales, block_size=BLOCK_SIZE, backend=backend)
    assert torch.equal(outputs[1], expected[0])
    torch.testing.assert_close(scales[1], expected[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(residuals[1], expected[2], rtol=1e-6, atol=1e-6)
