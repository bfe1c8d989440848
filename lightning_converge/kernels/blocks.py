"""Flat tensors as rows of blocks, for the blockwise quantizers (one scale per block)."""

from __future__ import annotations

from torch import Tensor


def block_rows(x: Tensor, block_size: int) -> list[Tensor]:
    """``x`` (flat) as rows of ``block_size`` elements: a ``(blocks, block_size)`` view of the whole
    blocks, then, if the last block is partial, a ``(1, rest)`` view of it. Views, no copy.

    Padding ``x`` to whole blocks would read the same, but torch 2.13 compiles a padded
    multi-block tensor wrongly for a static size (the padded last block is left unwritten),
    and for dynamic sizes 25x slower than this.
    """
    whole = x.numel() - x.numel() % block_size
    rows = [x[:whole].view(-1, block_size)] if whole else []
    if whole < x.numel():
        rows.append(x[whole:].view(1, -1))
    return rows
