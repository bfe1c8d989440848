"""Whether a list of tensors is free of inf and NaN, in one read of each tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel


@kernel
def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: True when no tensor holds an inf or NaN.

    Eager, this is a mask and a reduction per tensor; compiled, one fused
    reduction over all of them (eager ``isfinite(t).all()`` is several times
    slower than the EMA update it guards).
    """
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
