"""Averaging blockwise-compressed payloads in two phases, so that no rank receives every rank's payload.

The scheme of 1-bit Adam's compressed all-reduce ("1-bit Adam: Communication
Efficient Large-Scale Training with Adam's Convergence Speed", Tang et al., 2021,
Algorithm 2), for any compressor whose payload is a sequence of independent blocks:
a reduce-scatter of compressed chunks (an all-to-all), then an all-gather of
re-compressed chunks.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor, ceil_div
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout


class ChunkedCompressor(Compressor):
    """A compressor of independent blocks whose :meth:`reduce` receives ``O(numel)`` bytes per rank.

    The flat buffer is cut into one chunk per rank, each a whole number of blocks
    (the last chunks may be short or empty), and every rank serves one chunk:

    1. worker: compress ``values + residual`` (the residual keeps what was lost);
       an all-to-all sends the compressed chunk ``j`` to rank ``j``.
    2. server: rank ``j`` decodes the ``world_size`` versions of its chunk, averages
       them, and compresses ``average + server_error`` again; the server error (with
       ``error_feedback``) keeps what this second compression lost and belongs to the
       chunk's owner. An all-gather hands every rank every compressed chunk; all ranks
       decode the same bytes, so they hold the same average.

    Each rank receives about two payloads and decodes ``2 world_size`` chunks (two
    payloads' worth), whatever the number of ranks, where gathering every rank's
    whole payload receives ``world_size`` payloads and decodes them all. The
    collectives are handed about ``1 + 1 / world_size`` payloads (its own chunk of
    the all-to-all included); on the wire, a ring all-gather makes each rank pass on
    ``world_size - 1`` payloads, the two phases ``2 (world_size - 1) / world_size``.
    The price is the second compression of the average, which error feedback makes
    up for over the steps.

    Below ``two_phase_from`` ranks (3 by default) :meth:`reduce` all-gathers the
    payloads instead (:meth:`Compressor.reduce`): with two ranks both exchanges put
    the same bytes on the wire and receive two payloads, and the all-gather's average
    is exact (no second compression). 1-bit Adam's compressor sets it to 1, its
    paper's algorithm at every size.

    The worker error is per element (saved per parameter); the server error is kept
    per bucket contents and world size (a chunk whose size changes starts from zero).

    Subclasses set ``block_size`` and implement :meth:`payload_sizes`,
    :meth:`quantize` and :meth:`dequantize`; a payload of ``n`` values must be the
    prefix of the payload of any longer buffer that starts with them, block for block.
    """

    block_size: int
    # The smallest number of ranks averaged in two phases; fewer are all-gathered.
    two_phase_from: ClassVar[int] = 3

    def __init__(self, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        self._server_errors: dict[tuple[str, ...], Tensor] = {}

    def payload_sizes(self, numel: int) -> list[int]:
        """The number of elements of each payload tensor for ``numel`` values."""
        raise NotImplementedError

    def quantize(self, values: Tensor, residual: Tensor | None) -> list[Tensor]:
        """The payload of ``values`` (+ ``residual``, which is updated to what the payload does not carry)."""
        raise NotImplementedError

    def dequantize(self, payload: list[Tensor], numel: int) -> Tensor:
        """The ``numel`` flat fp32 values a payload stands for."""
        raise NotImplementedError

    def compress(
        self, grad: Tensor, layout: Layout, state: dict[str, Tensor], exchange: Exchange, step: int
    ) -> list[Tensor]:
        return self.quantize(grad, state.get("residual"))

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        return self.dequantize(payload, layout.numel)

    def reduce(self, grad: Tensor, layout: Layout, exchange: Exchange, step: int = 0) -> Tensor:
        world_size, numel = exchange.world_size, grad.numel()
        if world_size < self.two_phase_from:
            return super().reduce(grad, layout, exchange, step)
        chunk = chunk_size(numel, world_size, self.block_size)
        chunk_sizes = self.payload_sizes(chunk)
        # Rank j's chunk of every payload tensor is row j (zero padding past the buffer's end).
        payload = self.compress(grad, layout, self.elements.buffers(layout, grad.device), exchange, step)
        rows = [_pad(part, world_size * size).view(world_size, -1) for part, size in zip(payload, chunk_sizes)]
        received = exchange.all_to_all(rows)

        own = valid_chunk_numel(numel, chunk, exchange.rank)
        average = sum(self._dequantize_chunk(row, own) for row in received) / world_size
        reduced = self.quantize(average, self._server_error(layout, own, grad.device))
        gathered = exchange.all_gather([_pad(part, size) for part, size in zip(reduced, chunk_sizes)])
        return torch.cat(
            [self._dequantize_chunk(row, valid_chunk_numel(numel, chunk, rank)) for rank, row in enumerate(gathered)]
        )

    def _dequantize_chunk(self, row: list[Tensor], numel: int) -> Tensor:
        return self.dequantize([part[:size] for part, size in zip(row, self.payload_sizes(numel))], numel)

    def _server_error(self, layout: Layout, numel: int, device: torch.device) -> Tensor | None:
        if not self.error_feedback:
            return None
        error = self._server_errors.get(layout.names)
        if error is None or error.numel() != numel:
            error = torch.zeros(numel, device=device)
        self._server_errors[layout.names] = error = error.to(device)
        return error

    def snapshot(self, layout: Layout, device: torch.device) -> Callable[[], None]:
        restore_elements = super().snapshot(layout, device)
        error = self._server_errors.get(layout.names)
        saved = None if error is None else error.clone()

        def restore() -> None:
            restore_elements()
            if saved is None:
                self._server_errors.pop(layout.names, None)
            else:
                self._server_errors[layout.names] = saved

        return restore

    def state_dict(self) -> dict[str, Any]:
        # Keys are lists of names (plain values), so the checkpoint loads with weights_only=True.
        server = [[list(names), error.clone()] for names, error in self._server_errors.items()]
        return {**super().state_dict(), "server_errors": server}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # A checkpoint from before the two-phase exchange has no server errors: they start from zero.
        self._server_errors = {tuple(names): error.clone() for names, error in state_dict.get("server_errors", [])}


def chunk_size(numel: int, world_size: int, block_size: int) -> int:
    """Elements per rank's chunk of a ``numel``-element buffer: whole blocks, ``world_size`` chunks covering it."""
    return ceil_div(ceil_div(numel, block_size), world_size) * block_size


def valid_chunk_numel(numel: int, chunk: int, rank: int) -> int:
    """How many elements of rank ``rank``'s chunk lie inside the buffer (the last chunks may be short or empty)."""
    return min(max(numel - rank * chunk, 0), chunk)


def _pad(tensor: Tensor, size: int) -> Tensor:
    return torch.nn.functional.pad(tensor, (0, size - tensor.numel()))
