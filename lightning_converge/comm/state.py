"""Where compressors keep per-element state: a flat buffer per bucket, saved per parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """What a flat buffer holds: the names and shapes of its tensors, in order.

    A DDP bucket is the concatenation of its parameters' flattened gradients;
    compressors that work per tensor (layer-wise scales, low-rank matrices) read
    the boundaries from here. Names identify state across re-bucketing and resumes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> list[int]:
        return [shape.numel() for shape in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat``, one per tensor, in its shape."""
        return [piece.view(shape) for piece, shape in zip(flat.split(self.numels), self.shapes)]


class FlatState:
    """Named per-element buffers (error-feedback residuals, momenta), flat per bucket.

    A compressor works on one flat bucket at a time, so its per-element state is
    kept as one flat fp32 tensor per kind and bucket, allocated as zeros on first
    use. DDP regroups parameters into buckets after the first step, and a resumed
    run starts again from the initial grouping, so the state is saved per
    parameter name and a bucket with new contents assembles its buffers from the
    per-parameter pieces of the buckets it replaces.
    """

    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = tuple(kinds)
        # Keyed by the bucket's parameter names: the bucket's layout and its flat buffer of each kind.
        self._buckets: dict[tuple[str, ...], tuple[Layout, dict[str, Tensor]]] = {}
        # name -> kind -> tensor: loaded from a checkpoint, or left over from a regrouped bucket.
        self._pieces: dict[str, dict[str, Tensor]] = {}

    def buffers(self, layout: Layout, device: torch.device) -> dict[str, Tensor]:
        """This bucket's flat buffers by kind (an empty dict when there are no kinds)."""
        if not self.kinds:
            return {}
        if layout.names not in self._buckets:
            self._release(set(layout.names))
            named_numels = list(zip(layout.names, layout.numels))
            flats = {
                kind: torch.cat([self._take_piece(name, kind, numel, device) for name, numel in named_numels])
                for kind in self.kinds
            }
            self._buckets[layout.names] = (layout, flats)
        return self._buckets[layout.names][1]

    def _release(self, names: set[str]) -> None:
        """Break the buckets holding any of ``names`` into per-parameter pieces."""
        for key in [key for key in self._buckets if names.intersection(key)]:
            layout, flats = self._buckets.pop(key)
            for kind, flat in flats.items():
                for name, piece in zip(layout.names, flat.split(layout.numels)):
                    self._pieces.setdefault(name, {})[kind] = piece

    def _take_piece(self, name: str, kind: str, numel: int, device: torch.device) -> Tensor:
        pieces = self._pieces.get(name, {})
        piece = pieces.pop(kind, None)
        if not pieces:
            self._pieces.pop(name, None)
        if piece is None:
            return torch.zeros(numel, device=device)
        if piece.numel() != numel:
            raise ValueError(f"saved {kind!r} state of {name!r} has {piece.numel()} elements, the parameter {numel}")
        return piece.reshape(-1).to(device=device, dtype=torch.float32)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{kind: {parameter name: flat tensor}}``, copies, independent of the bucketing."""
        saved: dict[str, dict[str, Tensor]] = {kind: {} for kind in self.kinds}
        for name, pieces in self._pieces.items():
            for kind, piece in pieces.items():
                saved[kind][name] = piece.clone()
        for layout, flats in self._buckets.values():
            for kind, flat in flats.items():
                for name, piece in zip(layout.names, flat.split(layout.numels)):
                    saved[kind][name] = piece.clone()
        return saved

    def load_state_dict(self, state_dict: dict[str, dict[str, Tensor]]) -> None:
        """Replace all state; each bucket picks up its parameters' pieces on first use."""
        self._buckets.clear()
        self._pieces = {}
        for kind, by_name in state_dict.items():
            if kind not in self.kinds:
                raise ValueError(f"unexpected state {kind!r}; this compressor keeps {self.kinds}")
            for name, tensor in by_name.items():
                self._pieces.setdefault(name, {})[kind] = tensor.detach().clone()
