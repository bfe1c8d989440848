"""PowerSGD ("PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
Vogels et al., 2019): each gradient matrix sent as a rank-r product."""

from __future__ import annotations

import zlib
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor, check_int
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout


class PowerSGDCompressor(Compressor):
    """Approximate each gradient matrix ``M`` (n x m; a conv kernel is viewed as
    ``out_channels x rest``) by ``P Q^T`` of rank ``rank``, with one step of power
    iteration per training step:

    1. ``P = M Q`` with the previous step's ``Q`` (warm start); all-reduce the ``P``s.
    2. Orthonormalize each summed ``P``; ``Q = M^T P``; all-reduce the ``Q``s.
    3. The average is ``P Q^T / world_size``; the new ``Q`` starts the next step.

    Vectors (biases, norms) and matrices too small to gain (``rank * (n + m) >= n * m``)
    go uncompressed in the first all-reduce. With error feedback (the default, as
    in the paper) each rank keeps ``M - P Q_local^T``, what its own matrix lost to
    the projection. The first ``Q`` of a matrix is drawn from a generator seeded
    with ``seed`` and the parameter's name, so every rank starts from the same one.

    Payload: ``4 rank (n + m)`` bytes per compressed matrix and 4 bytes per
    uncompressed value, in two all-reduces per bucket. torch's own
    ``batched_powerSGD_hook`` fails on gloo; this one runs on any backend.
    """

    name = "powersgd"
    summable = True
    point_to_point = False  # the factors are all-reduced, and every rank shares the warm start

    def __init__(self, error_feedback: bool = True, rank: int = 2, seed: int = 0) -> None:
        check_int("rank", rank, 1)
        check_int("seed", seed, 0)
        self.rank = rank
        self.seed = seed
        self._warm_starts: dict[str, Tensor] = {}  # parameter name -> the last averaged Q
        super().__init__(error_feedback)

    def reduce(self, grad: Tensor, layout: Layout, exchange: Exchange, step: int = 0) -> Tensor:
        residual = self.elements.buffers(layout, grad.device).get("residual")
        values = grad if residual is None else grad.add_(residual)
        names, matrices, uncompressed = [], [], []
        for name, piece in zip(layout.names, layout.split(values)):
            matrix = piece.reshape(piece.shape[0], -1) if piece.dim() > 1 else None
            if matrix is not None and self.rank * sum(matrix.shape) < matrix.numel():
                names.append(name)
                matrices.append(matrix)
            else:
                uncompressed.append(piece)
        ps = [matrix @ self._warm_start(name, matrix) for name, matrix in zip(names, matrices)]
        # Vectors travel with the Ps: summed in place, inside ``values``.
        exchange.all_reduce(ps + [piece.reshape(-1) for piece in uncompressed])
        ps = [torch.linalg.qr(p).Q for p in ps]
        qs = [matrix.T @ p for matrix, p in zip(matrices, ps)]
        if residual is not None:
            residual.zero_()
            residual_pieces = dict(zip(layout.names, layout.split(residual)))
            for name, matrix, p, q in zip(names, matrices, ps, qs):
                residual_pieces[name].view_as(matrix).copy_(matrix - p @ q.T)
        exchange.all_reduce(qs)
        averaged = values.div_(exchange.world_size)  # averages the uncompressed pieces
        for name, matrix, p, q in zip(names, matrices, ps, qs):
            self._warm_starts[name] = q.div_(exchange.world_size)
            matrix.copy_(p @ q.T)  # matrix is a view of ``averaged``
        return averaged

    def _warm_start(self, name: str, matrix: Tensor) -> Tensor:
        q = self._warm_starts.get(name)
        if q is None or q.shape != (matrix.shape[1], self.rank):
            generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            q = torch.randn(matrix.shape[1], self.rank, generator=generator)
        return q.to(device=matrix.device, dtype=matrix.dtype)

    def snapshot(self, layout: Layout, device: torch.device) -> Callable[[], None]:
        restore_elements = super().snapshot(layout, device)
        # A step replaces the warm starts (new tensors), so keeping the old ones is enough.
        saved = {name: self._warm_starts.get(name) for name in layout.names}

        def restore() -> None:
            restore_elements()
            for name, q in saved.items():
                if q is None:
                    self._warm_starts.pop(name, None)
                else:
                    self._warm_starts[name] = q

        return restore

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warm_starts": {name: q.clone() for name, q in self._warm_starts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warm_starts = {name: q.clone() for name, q in state_dict["warm_starts"].items()}
