"""Argument checks shared by the callbacks, strategies and compressors.

Each check raises a ``ValueError`` that names the argument, what it may be and
the value given (``"EMA: decay must be a number in [0, 1], got 1.5"``), and
returns the value, so a constructor checks and stores in one line. ``owner``,
when given, prefixes the message with the class the argument belongs to. The
optimizers keep their own check tables (:mod:`lightning_converge.optim.base`).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Optional


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (an int or a float, not a bool), e.g. rather than a schedule."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) >= ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _fail(name: str, allowed: str, value: Any, owner: Optional[str]) -> ValueError:
    prefix = f"{owner}: " if owner else ""
    return ValueError(f"{prefix}{name} must be {allowed}, got {value!r}")


def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False, owner: Optional[str] = None) -> Any:
    """``value`` must be an integer (not a bool) >= ``minimum``, or None where ``allow_none``."""
    if allow_none and value is None:
        return value
    if not is_count(value, minimum):
        allowed = f"an integer >= {minimum}"
        raise _fail(name, f"None or {allowed}" if allow_none else allowed, value, owner)
    return value


def check_in_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    owner: Optional[str] = None,
) -> Any:
    """``value`` must be a finite number in the interval from ``low`` to ``high``; ``*_open`` excludes that
    end. An infinite end is no bound: ``check_in_range("tau", tau, 0)`` asks for a finite number >= 0."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        # "finite" where it is the point: no bounds, or an infinite or NaN value
        unbounded = math.isinf(low) and math.isinf(high)
        number = "a finite number" if unbounded or (is_number(value) and not math.isfinite(value)) else "a number"
        if unbounded:
            bounds = ""
        elif math.isinf(high):
            bounds = f" {'>' if low_open else '>='} {low}"
        elif math.isinf(low):
            bounds = f" {'<' if high_open else '<='} {high}"
        else:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise _fail(name, number + bounds, value, owner)
    return value


def check_probability(name: str, value: Any, *, owner: Optional[str] = None) -> Any:
    """``value`` must be a number in [0, 1] (a probability, a fraction, a mixing weight)."""
    return check_in_range(name, value, 0, 1, owner=owner)


def check_choice(name: str, value: Any, choices: Collection[Any], *, owner: Optional[str] = None) -> Any:
    """``value`` must be one of ``choices`` (``True`` is not the choice ``1``)."""
    if not any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in choices):
        choices = tuple(choices)
        allowed = " or ".join(map(repr, choices)) if len(choices) <= 2 else f"one of {choices}"
        raise _fail(name, allowed, value, owner)
    return value
