"""1-bit Adam's error-compensated compressed all-reduce ("1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed", Tang et al., 2021, Algorithm 2)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_converge.comm.base import ceil_div
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.sign import SignCompressor, unpack_signs
from lightning_converge.comm.state import Layout


class OneBitCompressor(SignCompressor):
    """Average over the ranks with two scaled-sign compressions, each with its own error feedback.

    The flat buffer is cut into one chunk per rank (whole blocks), and every rank
    serves one chunk:

    1. worker: compress ``values + worker_error`` to signs and block scales
       (:class:`~lightning_converge.comm.sign.SignCompressor`); the worker error keeps
       what was lost. An all-to-all sends chunk ``j`` to rank ``j``.
    2. server: rank ``j`` averages the chunks it received, compresses
       ``average + server_error`` the same way and keeps its own server error.
       An all-gather hands every rank every compressed chunk; all ranks decode the
       same bytes, so they hold the same average.

    Each rank sends ``(1 + 1 / world_size) * numel / 8`` bytes of signs and receives
    ``2 * numel / 8`` (plus the block scales) however many ranks there are, where
    an all-gather of signs (:class:`~lightning_converge.comm.sign.SignCompressor`)
    receives ``world_size * numel / 8``. The worker error is per element (saved per
    parameter); the server error belongs to this rank's chunk of a bucket and is
    kept per bucket contents and world size (a chunk that changes starts from zero).
    """

    name = "onebit"

    def __init__(self, error_feedback: bool = True, block_size: int = 1024, backend: str = "auto") -> None:
        super().__init__(error_feedback, block_size, backend)
        self._server_errors: dict[tuple[str, ...], Tensor] = {}

    def reduce(self, grad: Tensor, layout: Layout, exchange: Exchange, step: int = 0) -> Tensor:
        world_size, block = exchange.world_size, self.block_size
        numel = grad.numel()
        blocks_per_chunk = ceil_div(ceil_div(numel, block), world_size)
        chunk = blocks_per_chunk * block

        def valid(rank: int) -> int:  # elements of rank's chunk inside the buffer
            return min(max(numel - rank * chunk, 0), chunk)

        packed, scales = self.compress(grad, layout, self.elements.buffers(layout, grad.device), exchange, step)
        rows = [
            torch.nn.functional.pad(packed, (0, world_size * chunk // 8 - packed.numel())).view(world_size, -1),
            torch.nn.functional.pad(scales, (0, world_size * blocks_per_chunk - scales.numel())).view(world_size, -1),
        ]
        received = exchange.all_to_all(rows)

        own = valid(exchange.rank)
        average = sum(unpack_signs(p, s, own, block) for p, s in received) / world_size
        server_packed = grad.new_zeros(chunk // 8, dtype=torch.uint8)
        server_scales = grad.new_zeros(blocks_per_chunk)
        packed_part, scales_part = self.quantize(average, self._server_error(layout, own, grad.device))
        server_packed[: packed_part.numel()] = packed_part
        server_scales[: scales_part.numel()] = scales_part

        gathered = exchange.all_gather([server_packed, server_scales])
        return torch.cat([unpack_signs(p, s, valid(rank), block) for rank, (p, s) in enumerate(gathered)])

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
        self._server_errors = {tuple(names): error.clone() for names, error in state_dict["server_errors"]}
