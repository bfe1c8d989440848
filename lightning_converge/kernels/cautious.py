"""Cautious masking ("Cautious Optimizers: Improving Training with One Line of Code")."""

from __future__ import annotations

from torch import Tensor


def cautious_mask(update: Tensor, grad: Tensor, direction: Tensor | None = None) -> Tensor:
    """Keep the update only where it agrees in sign with the gradient.

    The kept entries are rescaled by ``numel / (count + 1)`` so the mask's mean
    stays about one, as in the paper's code. The count is a reduction over the
    whole tensor, so a fused kernel needs it before the update pass. ``direction``,
    if given, has the update's signs but is computed from the kernel's inputs
    (AdamW: the new first moment, from the old one and the gradient): compiled,
    the count then reads the inputs again instead of the update being stored
    between two passes (AdamW: 2.1x faster).
    """
    count = ((update if direction is None else direction) * grad > 0).sum()
    mask = (update * grad > 0).to(update.dtype)
    return mask * (mask.numel() / (count + 1).to(update.dtype))
