"""Gradient compressors with error feedback, and the byte accounting of every collective.

Each compressor averages a flat fp32 buffer (a DDP bucket, or 1-bit Adam's
momentum) over the ranks through an :class:`Exchange`, which counts the bytes.
Pick one by name with :func:`make_compressor`; the strategies in
:mod:`lightning_converge.strategies` do.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_converge.comm.base import Compressor
from lightning_converge.comm.bf16 import BF16Compressor
from lightning_converge.comm.exchange import CommStats, Exchange
from lightning_converge.comm.fp16 import CastCompressor, FP16Compressor
from lightning_converge.comm.int8 import Int8Compressor
from lightning_converge.comm.onebit import OneBitCompressor
from lightning_converge.comm.powersgd import PowerSGDCompressor
from lightning_converge.comm.sign import SignCompressor
from lightning_converge.comm.state import FlatState, Layout
from lightning_converge.comm.ternary import TernaryCompressor
from lightning_converge.comm.topk import TopKCompressor

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


def make_compressor(name: str, **options: Any) -> Compressor:
    """The compressor called ``name`` (a key of :data:`COMPRESSORS`), built with ``options``.

    An unknown name or option, or an option out of range, raises a ``ValueError``
    that lists what is accepted.
    """
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"the {name!r} compressor has no option {', '.join(map(repr, unknown))}; options: {accepted}")
    return cls(**options)


__all__ = [
    "COMPRESSORS",
    "BF16Compressor",
    "CastCompressor",
    "CommStats",
    "Compressor",
    "Exchange",
    "FP16Compressor",
    "FlatState",
    "Int8Compressor",
    "Layout",
    "OneBitCompressor",
    "PowerSGDCompressor",
    "SignCompressor",
    "TernaryCompressor",
    "TopKCompressor",
    "make_compressor",
]
