"""Cautious masking ("Cautious Optimizers: Improving Training with One Line of Code")."""

from __future__ import annotations

from torch import Tensor


def cautious_mask(update: Tensor, grad: Tensor) -> Tensor:
    """Keep the update only where it agrees in sign with the gradient.

    The kept entries are rescaled by ``numel / (count + 1)`` so the mask's mean
    stays about one, as in the paper's code. The count is a reduction over the
    whole tensor, so a fused kernel needs it before the update pass.
    """
    mask = (update * grad > 0).to(update.dtype)
    return mask * (mask.numel() / (mask.sum() + 1))
