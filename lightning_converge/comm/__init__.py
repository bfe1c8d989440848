"""Gradient compressors with error feedback, and the byte accounting of every collective.

Each compressor averages a flat fp32 buffer (a DDP bucket, or 1-bit Adam's
momentum) over the ranks through an :class:`Exchange`, which counts the bytes.
Pick one by name with :func:`make_compressor` (the strategies in
:mod:`lightning_converge.strategies` take a name or an instance); register your own
:class:`Compressor` subclass under a name with :func:`register_compressor`.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_converge.comm.base import Compressor
from lightning_converge.comm.bf16 import BF16Compressor
from lightning_converge.comm.chunked import ChunkedCompressor
from lightning_converge.comm.exchange import CommStats, Exchange
from lightning_converge.comm.fp16 import CastCompressor, FP16Compressor
from lightning_converge.comm.int8 import Int8Compressor
from lightning_converge.comm.onebit import OneBitCompressor
from lightning_converge.comm.overflow import ScaledReduce
from lightning_converge.comm.powersgd import PowerSGDCompressor
from lightning_converge.comm.sign import SignCompressor
from lightning_converge.comm.state import FlatState, Layout
from lightning_converge.comm.ternary import TernaryCompressor
from lightning_converge.comm.topk import TopKCompressor
from lightning_converge.options import unknown_options_error

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        FP16Compressor,
        BF16Compressor,
        Int8Compressor,
        SignCompressor,
        TernaryCompressor,
        TopKCompressor,
        PowerSGDCompressor,
        OneBitCompressor,
    )
}


def register_compressor(name: str, cls: type[Compressor], *, override: bool = False) -> None:
    """Make ``cls`` (a :class:`Compressor` subclass) available by ``name``: to :func:`make_compressor`, and
    so to every strategy that takes a compressor by name (``CompressedDDPStrategy(compressor=name)``,
    the DiLoCo strategies). ``override=True`` replaces a name already taken."""
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"a compressor name must be a non-empty string other than 'none', got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise TypeError(f"register_compressor needs a subclass of lightning_converge.comm.Compressor, got {cls!r}")
    if name in COMPRESSORS and COMPRESSORS[name] is not cls and not override:
        raise ValueError(
            f"compressor name {name!r} is taken by {COMPRESSORS[name].__qualname__}; pass override=True to replace it"
        )
    COMPRESSORS[name] = cls


def compressor_options(cls: type[Compressor]) -> list[str]:
    """The names of the options ``cls`` takes (its ``__init__`` parameters)."""
    return list(inspect.signature(cls).parameters)


def make_compressor(name: str, **options: Any) -> Compressor:
    """The compressor registered as ``name`` (a key of :data:`COMPRESSORS`), built with ``options``.

    An unknown name raises a ``ValueError`` listing the names, an unknown option a
    ``TypeError`` suggesting the closest one; an option out of range a ``ValueError``.
    """
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[name]
    unknown = set(options) - set(compressor_options(cls))
    if unknown:
        raise unknown_options_error(f"the {name!r} compressor", unknown, compressor_options(cls))
    return cls(**options)


__all__ = [
    "COMPRESSORS",
    "BF16Compressor",
    "CastCompressor",
    "ChunkedCompressor",
    "CommStats",
    "Compressor",
    "Exchange",
    "FP16Compressor",
    "FlatState",
    "Int8Compressor",
    "Layout",
    "OneBitCompressor",
    "PowerSGDCompressor",
    "ScaledReduce",
    "SignCompressor",
    "TernaryCompressor",
    "TopKCompressor",
    "compressor_options",
    "make_compressor",
    "register_compressor",
]
