"""Step -> value schedules for every coefficient that changes over training.

A schedule is a small, picklable object with ``__call__(step: int) -> float``: a
pure function of the step, so there is nothing to checkpoint and every rank
computes the same value. Wherever this pack takes a schedule it also takes a
plain number, meaning :class:`Constant`.
"""

from __future__ import annotations

import math
from typing import Callable, Union


class Schedule:
    """Base class: a pure function from the (0-based) step to a value."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """The same ``value`` at every step."""

    def __init__(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value}")
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value


ScheduleLike = Union[float, int, Schedule, Callable[[int], float]]


def as_schedule(value: ScheduleLike, name: str = "value") -> Callable[[int], float]:
    """Accept a number (the constant schedule) or any callable of the step."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a schedule, got {value!r}")
    if isinstance(value, (int, float)):
        return Constant(float(value))
    if callable(value):
        return value
    raise TypeError(f"{name} must be a number or a schedule (a callable of the step), got {value!r}")
