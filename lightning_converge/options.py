"""Errors for options a class does not take: say it is unknown, suggest the closest valid name."""

from __future__ import annotations

import difflib
from typing import Iterable


def unknown_options_error(owner: str, unknown: Iterable[str], valid: Iterable[str]) -> TypeError:
    """A ``TypeError`` naming each of ``unknown``, the closest name in ``valid`` where one is close, and ``valid``.

    ``owner`` names what received the options (``"DiLoCoStrategy"``, ``"the 'int8' compressor"``).
    Raise it at construction time, before any training step.
    """
    valid = sorted(set(valid))
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    noun = "option" if len(parts) == 1 else "options"
    return TypeError(f"{owner} got unknown {noun} {', '.join(parts)}; valid options: {valid}")
