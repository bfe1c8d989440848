"""Step -> value schedules for every coefficient that changes over training.

A schedule is a small, picklable object with ``__call__(step: int) -> float``: a
pure function of the step, so there is nothing to checkpoint and every rank
computes the same value. Wherever this pack takes a schedule it also takes a
plain number, meaning :class:`Constant`.

Every schedule is built from plain, type-hinted ``__init__`` arguments, each
kept under its own name, so a LightningCLI YAML can configure it::

    schedule:
      class_path: lightning_converge.schedules.Warmup
      init_args:
        warmup_steps: 100
        schedule:
          class_path: lightning_converge.schedules.Cosine
          init_args: {start: 1.0e-3, end: 1.0e-5, steps: 10000}

Arguments are checked when the schedule is built; a bad one raises a
``ValueError`` naming the argument and its allowed range. Steps are 0-based
(``trainer.global_step``); :class:`Interval` also takes a float, such as a
sampler's noise level.
"""

from __future__ import annotations

import bisect
import inspect
import math
from typing import Callable, Optional, Sequence, Union


class Schedule:
    """Base class: a pure function from the (0-based) step to a value."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def _require(self, ok: bool, name: str, allowed: str, value: object) -> None:
        """Raise a ValueError naming the argument and its allowed range unless ``ok``."""
        if not ok:
            raise ValueError(f"{type(self).__name__}: {name} must be {allowed}, got {value!r}")

    def _require_finite(self, **values: float) -> None:
        for name, value in values.items():
            self._require(math.isfinite(value), name, "a finite number", value)

    def _require_count(self, name: str, value: int, minimum: int) -> None:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        self._require(is_int and value >= minimum, name, f"an integer >= {minimum}", value)


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


def _lerp(start: float, end: float, fraction: float) -> float:
    # Written this way so fraction 0 gives exactly start and fraction 1 exactly end.
    return start * (1.0 - fraction) + end * fraction


class Constant(Schedule):
    """The same ``value`` at every step."""

    def __init__(self, value: float) -> None:
        self._require_finite(value=value)
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value


class Ramp(Schedule):
    """Goes from ``start`` at step 0 to ``end`` at step ``steps``, then stays at ``end``.

    Subclasses give the curve's shape: :meth:`shape` maps the progress
    ``min(step / steps, 1)`` to the fraction of the way from start to end.
    """

    def __init__(self, start: float, end: float, steps: int) -> None:
        self._require_finite(start=start, end=end)
        self._require_count("steps", steps, minimum=1)
        self.start = float(start)
        self.end = float(end)
        self.steps = steps

    def shape(self, progress: float) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        progress = min(max(step / self.steps, 0.0), 1.0)
        return _lerp(self.start, self.end, self.shape(progress))


class Linear(Ramp):
    """Straight line from ``start`` to ``end`` over ``steps``: ``start + (end - start) * step / steps``."""

    def shape(self, progress: float) -> float:
        return progress


class Cosine(Ramp):
    """Half a cosine from ``start`` to ``end`` over ``steps``:
    ``end + (start - end) * (1 + cos(pi * step / steps)) / 2``."""

    def shape(self, progress: float) -> float:
        return (1.0 - math.cos(math.pi * progress)) / 2.0


class Power(Ramp):
    """``start + (end - start) * (step / steps) ** power``, then ``end``.

    With ``end > start`` this is the family of increasing guidance-weight schedules
    studied in "Analysis of Classifier-Free Guidance Weight Schedulers" (Wang et
    al., 2024): ``power`` 1 is their linear schedule, larger powers keep the weight
    low for longer.
    """

    def __init__(self, start: float, end: float, steps: int, power: float = 2.0) -> None:
        super().__init__(start, end, steps)
        self._require(math.isfinite(power) and power > 0, "power", "a finite number > 0", power)
        self.power = float(power)

    def shape(self, progress: float) -> float:
        return progress**self.power


class Exponential(Schedule):
    """``start * rate ** step``; with ``end`` given, it stops at ``end`` once it gets there.

    ``rate`` < 1 decays towards 0, ``rate`` > 1 grows; ``end`` must lie on the
    side the values move towards.
    """

    def __init__(self, start: float, rate: float, end: Optional[float] = None) -> None:
        self._require_finite(start=start, rate=rate)
        self._require(rate > 0, "rate", "a number > 0", rate)
        if end is not None:
            self._require_finite(end=end)
            # The sign of start * (rate - 1) is the direction the values move.
            moves_towards_end = (end - start) * start * (rate - 1.0) > 0
            self._require(moves_towards_end, "end", f"beyond start={start} in the direction rate={rate} moves", end)
        self.start = float(start)
        self.rate = float(rate)
        self.end = None if end is None else float(end)

    def __call__(self, step: int) -> float:
        try:
            value = self.start * self.rate**step
        except OverflowError:  # a growing schedule beyond the float range
            value = math.copysign(math.inf, self.start)
        if self.end is not None and (value - self.end) * (self.start - self.end) <= 0:
            return self.end
        return value


class Step(Schedule):
    """Step decay: ``value * gamma ** (step // step_size)``, like ``torch.optim.lr_scheduler.StepLR``."""

    def __init__(self, value: float, gamma: float, step_size: int) -> None:
        self._require_finite(value=value, gamma=gamma)
        self._require(gamma > 0, "gamma", "a number > 0", gamma)
        self._require_count("step_size", step_size, minimum=1)
        self.value = float(value)
        self.gamma = float(gamma)
        self.step_size = step_size

    def __call__(self, step: int) -> float:
        return self.value * self.gamma ** (step // self.step_size)


class Piecewise(Schedule):
    """``values[i]`` from ``boundaries[i - 1]`` (inclusive) up to ``boundaries[i]``.

    ``values`` holds one more entry than ``boundaries``. An entry may itself be a
    schedule, which then counts its steps from the boundary where its piece
    starts (like ``torch.optim.lr_scheduler.SequentialLR``), so pieces chain::

        Piecewise(boundaries=[1000], values=[Linear(0.0, 1.0, 1000), Cosine(1.0, 0.0, 9000)])
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[Union[float, Schedule]]) -> None:
        boundaries = list(boundaries)
        values = list(values)
        increasing = all(a < b for a, b in zip(boundaries, boundaries[1:]))
        self._require(increasing, "boundaries", "strictly increasing", boundaries)
        pieces = len(boundaries) + 1
        self._require(len(values) == pieces, "values", f"a list of {pieces} entries (len(boundaries) + 1)", values)
        self.boundaries = boundaries
        self.values = [as_schedule(value, name="values") for value in values]

    def __call__(self, step: int) -> float:
        piece = bisect.bisect_right(self.boundaries, step)
        piece_start = self.boundaries[piece - 1] if piece > 0 else 0
        return self.values[piece](step - piece_start)


class Warmup(Schedule):
    """Linear warm-up from ``start`` to the wrapped schedule, then the wrapped schedule.

    For ``step < warmup_steps`` the value goes in a straight line from ``start``
    towards ``schedule(0)``; from ``warmup_steps`` on it is
    ``schedule(step - warmup_steps)``: the wrapped schedule starts counting when
    the warm-up ends.
    """

    def __init__(self, schedule: Union[float, Schedule], warmup_steps: int, start: float = 0.0) -> None:
        self._require_count("warmup_steps", warmup_steps, minimum=0)
        self._require_finite(start=start)
        self.schedule = as_schedule(schedule, name="schedule")
        self.warmup_steps = warmup_steps
        self.start = float(start)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _lerp(self.start, self.schedule(0), step / self.warmup_steps)
        return self.schedule(step - self.warmup_steps)


class Interval(Schedule):
    """``inside`` for ``lo <= step < hi``, ``outside`` elsewhere.

    The 'step' may be a float. For guidance in a limited interval (Kynkäänniemi
    et al., 2024) it is the sampler's noise level: ``Interval(inside=w,
    outside=1.0, lo=sigma_lo, hi=sigma_hi)``. ``lo``/``hi`` may be infinite.
    """

    def __init__(self, inside: float, outside: float, lo: float, hi: float) -> None:
        self._require_finite(inside=inside, outside=outside)
        self._require(not math.isnan(lo), "lo", "a number or -inf", lo)
        self._require(not math.isnan(hi) and hi > lo, "hi", f"a number > lo={lo}", hi)
        self.inside = float(inside)
        self.outside = float(outside)
        self.lo = float(lo)
        self.hi = float(hi)

    def __call__(self, step: float) -> float:
        return self.inside if self.lo <= step < self.hi else self.outside


class EMAWarmup(Schedule):
    """Decay of a weight average that warms up: ``1 - (1 + step / gamma) ** -power``,
    clamped to ``[min_decay, max_decay]``.

    This is the warm-up of timm's ``ModelEmaV3`` and k-diffusion's EMA.
    ``gamma=1, power=1`` gives the plain running mean of all weights so far;
    ``power=2/3`` suits runs of a million steps or more, ``3/4`` shorter ones.
    """

    def __init__(
        self, gamma: float = 1.0, power: float = 2 / 3, max_decay: float = 0.9999, min_decay: float = 0.0
    ) -> None:
        self._require(math.isfinite(gamma) and gamma > 0, "gamma", "a finite number > 0", gamma)
        self._require(math.isfinite(power) and power > 0, "power", "a finite number > 0", power)
        self._require(0.0 <= max_decay <= 1.0, "max_decay", "in [0, 1]", max_decay)
        self._require(0.0 <= min_decay <= max_decay, "min_decay", f"in [0, max_decay={max_decay}]", min_decay)
        self.gamma = float(gamma)
        self.power = float(power)
        self.max_decay = float(max_decay)
        self.min_decay = float(min_decay)

    def __call__(self, step: int) -> float:
        decay = 1.0 - (1.0 + step / self.gamma) ** -self.power
        return min(max(decay, self.min_decay), self.max_decay)


def takes_lr(schedule: Callable[..., float]) -> bool:
    """Whether calling ``schedule`` accepts an ``lr=`` keyword (as :class:`QSR` does), so that a caller
    that owns the optimizer can hand it the live learning rate."""
    try:
        parameters = inspect.signature(schedule).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return "lr" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class QSR(Schedule):
    """Quadratic Synchronization Rule (Gu et al., ICLR 2024): the number of local
    steps between synchronizations, ``H = max(base, floor((alpha / lr) ** 2))``,
    at most ``max_inner_steps``.

    The rule reads the *current* learning rate. Choice made here: the lr is an
    argument, not state, so the schedule stays a pure, picklable function.

    - ``qsr(step, lr=optimizer.param_groups[0]["lr"])``: the caller passes the
      live learning rate (what a strategy that owns the optimizer does: any
      inner-steps schedule whose ``__call__`` takes ``lr`` is given it);
    - ``qsr(step)``: the learning rate is ``lr(step)`` from the schedule (or
      number) given at construction, e.g. the same ``Cosine`` the optimizer
      follows; this is how :class:`~lightning_converge.callbacks.anneal.Anneal`
      and other callers that only know the step use it.

    A learning rate <= 0 (a warm-up that starts from 0, a schedule that ends at
    0) gives ``base``: the rule is meant for the decaying phase, and a period
    read from a zero learning rate would never end. As the learning rate decays
    towards 0 the period grows as ``1 / lr ** 2``; ``max_inner_steps`` caps it,
    so a run whose learning rate decays to 0 keeps synchronizing. Without a cap,
    a learning rate so small that the period exceeds any integer raises.

    Returns an ``int``.
    """

    def __init__(
        self,
        base: int,
        alpha: float,
        lr: Union[float, Schedule, None] = None,
        max_inner_steps: Optional[int] = None,
    ) -> None:
        self._require_count("base", base, minimum=1)
        self._require(math.isfinite(alpha) and alpha > 0, "alpha", "a finite number > 0", alpha)
        if max_inner_steps is not None:
            self._require_count("max_inner_steps", max_inner_steps, minimum=base)
        self.base = base
        self.alpha = float(alpha)
        self.lr = None if lr is None else as_schedule(lr, name="lr")
        self.max_inner_steps = max_inner_steps

    def __call__(self, step: int, lr: Optional[float] = None) -> int:
        if lr is None:
            if self.lr is None:
                raise ValueError("QSR needs the learning rate: call qsr(step, lr=...) or build QSR(..., lr=schedule)")
            lr = self.lr(step)
        if not math.isfinite(lr):
            raise ValueError(f"QSR: lr must be a finite number, got {lr!r}")
        if lr <= 0:
            return self.base
        try:
            period = (self.alpha / lr) ** 2
        except OverflowError:
            period = math.inf
        if self.max_inner_steps is not None and period >= self.max_inner_steps:
            return self.max_inner_steps
        if math.isinf(period):
            raise ValueError(
                f"QSR: at lr={lr!r} the period (alpha / lr) ** 2 is unbounded; set max_inner_steps to cap it"
            )
        return max(self.base, math.floor(period))
