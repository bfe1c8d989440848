"""The inf/NaN guard the callbacks run before touching their state."""

import pytest
import torch

from lightning_converge.kernels import all_finite


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_against_isfinite(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen).to(dtype) for shape in [(7, 13), (33,), (3, 5, 2)]]
    # Large finite values: a plain sum would overflow to inf here.
    tensors[1].fill_(torch.finfo(dtype).max)
    assert bool(all_finite(tensors, backend=backend))
    for bad in (float("inf"), float("-inf"), float("nan")):
        poisoned = [t.clone() for t in tensors]
        poisoned[2][1, 4, 0] = bad
        expected = all(bool(torch.isfinite(t).all()) for t in poisoned)
        assert bool(all_finite(poisoned, backend=backend)) == expected is False
