"""Fragments: the parts of the parameters that synchronize together.

Streaming DiLoCo splits the parameter tensors into fragments that synchronize in
turn; DiLoCo is the case of one fragment holding everything. A fragment is a
list of :data:`Piece` s: whole tensors, or (``fragment_assignment="balanced"``)
runs of a tensor's flattened elements.

* :func:`assign_fragments` groups whole tensors by layer (``"strided"`` or
  ``"contiguous"``);
* :func:`split_evenly` cuts the parameters, laid end to end, into equal runs
  (``"balanced"``);
* :func:`build_fragments` turns either into :class:`Fragment` s, which also hold
  each fragment's sync state (its pending exchange, whether it is in sync, where
  its inner phase started).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lightning_converge.comm import Layout
from lightning_converge.strategies.diloco.exchange import PendingSync

FRAGMENT_ASSIGNMENTS = ("strided", "contiguous", "balanced")
# A part of a parameter tensor: (its index, first element, end element) in the flattened tensor.
Piece = tuple[int, int, int]


def _layer_of(name: str) -> Optional[str]:
    """The layer a parameter belongs to: its module path up to the first integer index
    (``"blocks.3.attn.qkv.weight"`` -> ``"blocks.3"``), or None outside any indexed container
    (embeddings, a final norm, the head)."""
    parts = name.split(".")
    for end, part in enumerate(parts[:-1], start=1):
        if part.isdigit():
            return ".".join(parts[:end])
    return None


def assign_fragments(
    names: Sequence[str], numels: Sequence[int], num_fragments: int, assignment: str
) -> list[list[int]]:
    """Split parameter tensors (given by name and size, in model order) into ``num_fragments`` fragments
    of indices, by layer.

    Layers are the entries of indexed containers (``nn.ModuleList``, ``nn.Sequential``):
    ``"strided"`` puts layer ``l`` in fragment ``l % num_fragments`` (each fragment spans the depth
    of the network, as in Streaming DiLoCo), ``"contiguous"`` gives each fragment a run of
    consecutive layers. Tensors outside any layer go, largest first, to the fragment holding the
    fewest elements, which keeps the largest fragment (the peak bytes of a sync) small. A model
    with fewer layers than fragments is split the same way with each tensor as a layer.
    """
    if num_fragments > len(names):
        raise ValueError(f"num_fragments={num_fragments} is larger than the number of parameter tensors ({len(names)})")
    layers: dict[str, list[int]] = {}
    outside: list[int] = []
    for index, name in enumerate(names):
        layer = _layer_of(name)
        if layer is None:
            outside.append(index)
        else:
            layers.setdefault(layer, []).append(index)
    units = list(layers.values())
    if len(units) < num_fragments:
        units, outside = [[index] for index in range(len(names))], []
    if assignment == "strided":
        runs = [units[f::num_fragments] for f in range(num_fragments)]
    else:
        bounds = torch.arange(len(units)).tensor_split(num_fragments)
        runs = [units[int(run[0]) : int(run[-1]) + 1] for run in bounds]
    fragments = [[index for unit in run for index in unit] for run in runs]
    sizes = [sum(numels[index] for index in fragment) for fragment in fragments]
    for index in sorted(outside, key=lambda i: -numels[i]):
        lightest = min(range(num_fragments), key=sizes.__getitem__)
        fragments[lightest].append(index)
        sizes[lightest] += numels[index]
    return [sorted(fragment) for fragment in fragments]


def split_evenly(numels: Sequence[int], num_fragments: int) -> list[list[Piece]]:
    """Cut the parameters, laid end to end in model order, into ``num_fragments`` runs of equal length
    (to one element), each a list of pieces: whole tensors, and parts of the tensors cut at its ends."""
    if num_fragments > len(numels):
        raise ValueError(
            f"num_fragments={num_fragments} is larger than the number of parameter tensors ({len(numels)})"
        )
    total = sum(numels)
    bounds = [round(f * total / num_fragments) for f in range(num_fragments + 1)]
    fragments: list[list[Piece]] = [[] for _ in range(num_fragments)]
    offset = 0
    for index, numel in enumerate(numels):
        for f, fragment in enumerate(fragments):
            start, end = max(bounds[f], offset), min(bounds[f + 1], offset + numel)
            if start < end:
                fragment.append((index, start - offset, end - offset))
        offset += numel
    return fragments


def _piece_of(tensors: Sequence[Tensor], piece: Piece) -> Tensor:
    """The piece of ``tensors[index]``: the tensor itself when whole, else a flat view of its part."""
    index, start, end = piece
    tensor = tensors[index]
    return tensor if end - start == tensor.numel() else tensor.view(-1)[start:end]


def pieces_of(tensors: Sequence[Tensor], pieces: Sequence[Piece]) -> list[Tensor]:
    """The ``pieces`` of ``tensors`` (one per parameter, in model order: the local or global parameters,
    the momentum buffers), as tensors that share their storage."""
    return [_piece_of(tensors, piece) for piece in pieces]


@dataclass
class Fragment:
    """Parameters that synchronize together: pieces of the strategy's parameter tensors, mostly whole."""

    index: int
    pieces: list[Piece]
    # Names and shapes of the pieces, in the order of the flat pseudo-gradient (what compressors read).
    layout: Layout
    pending: Optional[PendingSync] = None
    # True while the local parameters hold nothing unsent: they equal the global ones, or (delay=1,
    # right after the first sync) the origin of the next inner phase.
    in_sync: bool = True
    # Where this worker's inner phase started (fp32, on the outer-state device), when not at the
    # global parameters: with delay=1, between the first sync and the second.
    origin: Optional[list[Tensor]] = None


def build_fragments(
    names: Sequence[str],
    params: Sequence[Tensor],
    num_fragments: int,
    assignment: str,
    layer_sizes: Optional[Sequence[int]] = None,
) -> list[Fragment]:
    """The ``num_fragments`` fragments of ``params`` (named ``names``, in model order) by ``assignment``,
    one of :data:`FRAGMENT_ASSIGNMENTS`, each with the compressors' view of it: its pieces' names and
    shapes (a part of a tensor: flat, named ``"name[start:end]"``). By layer, tensors are weighed by
    ``layer_sizes`` (by default their sizes; shards pass their whole parameters' sizes, so every rank
    assigns alike); ``"balanced"`` cuts ``params`` themselves."""
    numels = [p.numel() for p in params]
    if assignment == "balanced":
        assignment_pieces = split_evenly(numels, num_fragments)
    else:
        by_layer = assign_fragments(names, layer_sizes or numels, num_fragments, assignment)
        assignment_pieces = [[(i, 0, numels[i]) for i in indices] for indices in by_layer]
    fragments = []
    for index, pieces in enumerate(assignment_pieces):
        layout = Layout(
            tuple(names[i] if end - start == numels[i] else f"{names[i]}[{start}:{end}]" for i, start, end in pieces),
            tuple(piece.shape for piece in pieces_of(params, pieces)),
        )
        fragments.append(Fragment(index, pieces, layout))
    return fragments
