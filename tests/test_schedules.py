"""Schedules: each against its formula written out here, YAML configuration, pickling, argument checks."""

import math
import pickle

import pytest
import yaml
from jsonargparse import ArgumentParser

from lightning_converge.schedules import (
    QSR,
    Constant,
    Cosine,
    EMAWarmup,
    Exponential,
    Interval,
    Linear,
    Piecewise,
    Power,
    Schedule,
    Step,
    Warmup,
    as_schedule,
)

STEPS = [0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 30, 59, 60, 99, 100, 101, 1000, 123_456]


def cosine_lr(step):
    """The learning rate that QSR reads in the test below: 0.1 -> 0.001 over 100 steps."""
    t = min(step, 100) / 100
    return 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * t))


CASES = {
    "constant": (Constant(2.5), lambda s: 2.5),
    "linear": (Linear(start=2.0, end=10.0, steps=8), lambda s: 2.0 + 8.0 * min(s, 8) / 8),
    "linear_down": (Linear(start=1.0, end=-1.0, steps=100), lambda s: 1.0 - 2.0 * min(s, 100) / 100),
    "cosine": (
        Cosine(start=1.0, end=0.1, steps=100),
        lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, 100) / 100)),
    ),
    "power": (Power(start=1.0, end=7.0, steps=60, power=3.0), lambda s: 1.0 + 6.0 * (min(s, 60) / 60) ** 3),
    "exponential": (Exponential(start=1.0, rate=1.1), lambda s: 1.1**s if s < 7000 else math.inf),
    "exponential_to_end": (Exponential(start=2.0, rate=0.5, end=0.3), lambda s: max(2.0 * 0.5**s, 0.3)),
    "exponential_up_to_end": (Exponential(start=-1.0, rate=2.0, end=-20.0), lambda s: -(2.0**s) if s < 5 else -20.0),
    "step": (Step(value=1.0, gamma=0.1, step_size=30), lambda s: 0.1 ** (s // 30)),
    "piecewise": (
        Piecewise(boundaries=[10, 60], values=[1.0, 0.5, 0.1]),
        lambda s: 1.0 if s < 10 else (0.5 if s < 60 else 0.1),
    ),
    "piecewise_of_schedules": (
        Piecewise(boundaries=[5], values=[Linear(0.0, 1.0, 5), Exponential(1.0, 0.5)]),
        lambda s: s / 5 if s < 5 else 0.5 ** (s - 5),
    ),
    "warmup": (
        Warmup(Cosine(start=1.0, end=0.0, steps=10), warmup_steps=4, start=0.2),
        lambda s: 0.2 + 0.8 * s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * min(s - 4, 10) / 10)),
    ),
    "warmup_of_number": (Warmup(3.0, warmup_steps=10), lambda s: 3.0 * min(s, 10) / 10),
    "interval": (Interval(inside=7.5, outside=1.0, lo=3.0, hi=60.0), lambda s: 7.5 if 3.0 <= s < 60.0 else 1.0),
    "ema_warmup": (
        EMAWarmup(gamma=1.0, power=2 / 3, max_decay=0.999, min_decay=0.1),
        lambda s: min(0.999, max(0.1, 1 - 1 / (1 + s) ** (2 / 3))),
    ),
    "ema_warmup_gamma": (EMAWarmup(gamma=10.0, power=0.75), lambda s: min(0.9999, 1 - (10 / (10 + s)) ** 0.75)),
    "qsr": (
        QSR(base=2, alpha=0.05, lr=Cosine(start=0.1, end=0.001, steps=100)),
        lambda s: max(2, math.floor(0.05**2 / cosine_lr(s) ** 2)),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_schedule_matches_its_formula(name):
    schedule, formula = CASES[name]
    for step in STEPS:
        assert schedule(step) == pytest.approx(formula(step), rel=1e-12, abs=1e-12), f"{name} at step {step}"


def test_ramps_stay_at_end_exactly():
    assert Cosine(start=0.1, end=0.3, steps=7)(7) == 0.3
    assert Linear(start=0.1, end=0.3, steps=7)(70) == 0.3
    assert Power(start=0.1, end=0.3, steps=7, power=0.5)(0) == 0.1


def test_interval_takes_noise_levels():
    interval = Interval(inside=4.0, outside=1.0, lo=0.28, hi=5.42)
    assert [interval(sigma) for sigma in [0.1, 0.28, 1.7, 5.42, 80.0]] == [1.0, 4.0, 4.0, 1.0, 1.0]
    unbounded_below = Interval(inside=2.0, outside=0.0, lo=-math.inf, hi=1.0)
    assert unbounded_below(-1e9) == 2.0 and unbounded_below(1.0) == 0.0


def test_qsr_reads_the_lr_given_to_the_call():
    qsr = QSR(base=4, alpha=0.2)
    assert qsr(0, lr=0.1) == 4  # (0.2 / 0.1) ** 2 = 4
    assert qsr(0, lr=0.02) == 100
    assert qsr(0, lr=0.03) == 44  # 44.44...
    assert isinstance(qsr(0, lr=0.03), int)
    with pytest.raises(ValueError, match="needs the learning rate"):
        qsr(0)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        qsr(0, lr=math.nan)
    # A live lr passed to the call wins over the schedule given at construction.
    assert QSR(base=1, alpha=1.0, lr=1.0)(0, lr=0.5) == 4


def test_qsr_takes_the_base_period_at_lr_zero_and_caps_the_period():
    qsr = QSR(base=4, alpha=0.2, max_inner_steps=50)
    # A warm-up from lr = 0 and a schedule that ends at 0: the base period, not an error.
    assert qsr(0, lr=0.0) == 4
    assert qsr(0, lr=-1e-3) == 4
    assert qsr(0, lr=0.03) == 44  # floor((0.2 / 0.03) ** 2), under the cap
    for lr in [0.02, 1e-3, 1e-9, 1e-300, 5e-324]:  # (0.2 / lr) ** 2 >= 100 > 50, up to overflow
        assert qsr(0, lr=lr) == 50
    # The lr schedule a run would give it: a 10-step warm-up from 0, then a cosine decay to 0.
    warmup_then_decay = QSR(base=2, alpha=0.05, lr=Warmup(Cosine(0.1, 0.0, 100), warmup_steps=10), max_inner_steps=30)
    expected = [
        2 if lr <= 0 else min(30, max(2, math.floor((0.05 / lr) ** 2)))
        for lr in (Warmup(Cosine(0.1, 0.0, 100), warmup_steps=10)(s) for s in range(120))
    ]
    assert [warmup_then_decay(s) for s in range(120)] == expected
    assert expected[0] == 2 and expected[-1] == 2 and 30 in expected
    # Without a cap, a period beyond any integer says what to do.
    with pytest.raises(ValueError, match="max_inner_steps"):
        QSR(base=4, alpha=0.2)(0, lr=1e-300)


def test_as_schedule():
    assert isinstance(as_schedule(3), Constant) and as_schedule(3)(17) == 3.0
    cosine = Cosine(1.0, 0.0, 10)
    assert as_schedule(cosine) is cosine
    with pytest.raises(TypeError):
        as_schedule(True)
    with pytest.raises(TypeError):
        as_schedule("1e-3")


def to_config(value):
    """The LightningCLI form of a schedule: class_path + init_args, nested schedules included.

    Reading init_args back from the attributes checks that every schedule keeps each
    __init__ argument under its own name."""
    if isinstance(value, Schedule):
        init_args = {name: to_config(arg) for name, arg in vars(value).items()}
        return {"class_path": f"{type(value).__module__}.{type(value).__name__}", "init_args": init_args}
    if isinstance(value, list):
        return [to_config(item) for item in value]
    return value


def schedule_parser():
    parser = ArgumentParser()
    parser.add_argument("--schedule", type=Schedule)
    return parser


@pytest.mark.parametrize("name", CASES)
def test_yaml_round_trip(name):
    schedule, _ = CASES[name]
    parser = schedule_parser()
    config = parser.parse_string(yaml.safe_dump({"schedule": to_config(schedule)}))
    # Dump and parse again, as LightningCLI does with the config.yaml it saves.
    rebuilt = parser.instantiate(parser.parse_string(parser.dump(config))).schedule
    assert type(rebuilt) is type(schedule)
    assert [rebuilt(step) for step in STEPS] == [schedule(step) for step in STEPS]


def test_handwritten_yaml():
    text = """
    schedule:
      class_path: lightning_converge.schedules.Piecewise
      init_args:
        boundaries: [100, 200]
        values:
          - class_path: Warmup
            init_args:
              warmup_steps: 10
              schedule: {class_path: Cosine, init_args: {start: 1.0, end: 0.5, steps: 90}}
          - 0.5
          - {class_path: Step, init_args: {value: 0.5, gamma: 0.5, step_size: 25}}
    """
    schedule = schedule_parser().instantiate(schedule_parser().parse_string(text)).schedule
    assert schedule(5) == pytest.approx(0.5)  # half-way through the warm-up to 1.0
    assert schedule(55) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert schedule(150) == 0.5
    assert schedule(260) == pytest.approx(0.5 * 0.5**2)


@pytest.mark.parametrize("name", CASES)
def test_pickles(name):
    schedule, _ = CASES[name]
    restored = pickle.loads(pickle.dumps(schedule))
    assert [restored(step) for step in STEPS] == [schedule(step) for step in STEPS]


BAD_ARGUMENTS = [
    (Constant, dict(value=math.nan), "value"),
    (Linear, dict(start=0.0, end=1.0, steps=0), "steps"),
    (Linear, dict(start=0.0, end=1.0, steps=2.5), "steps"),
    (Cosine, dict(start=math.inf, end=1.0, steps=10), "start"),
    (Power, dict(start=0.0, end=1.0, steps=10, power=0.0), "power"),
    (Exponential, dict(start=1.0, rate=0.0), "rate"),
    (Exponential, dict(start=1.0, rate=0.9, end=2.0), "end"),
    (Exponential, dict(start=1.0, rate=1.0, end=0.5), "end"),
    (Step, dict(value=1.0, gamma=0.5, step_size=0), "step_size"),
    (Step, dict(value=1.0, gamma=-0.5, step_size=10), "gamma"),
    (Piecewise, dict(boundaries=[10, 5], values=[1.0, 2.0, 3.0]), "boundaries"),
    (Piecewise, dict(boundaries=[10], values=[1.0]), "values"),
    (Warmup, dict(schedule=1.0, warmup_steps=-1), "warmup_steps"),
    (Interval, dict(inside=2.0, outside=1.0, lo=5.0, hi=5.0), "hi"),
    (Interval, dict(inside=2.0, outside=1.0, lo=math.nan, hi=5.0), "lo"),
    (EMAWarmup, dict(gamma=0.0), "gamma"),
    (EMAWarmup, dict(power=-1.0), "power"),
    (EMAWarmup, dict(max_decay=1.5), "max_decay"),
    (EMAWarmup, dict(min_decay=0.5, max_decay=0.4), "min_decay"),
    (QSR, dict(base=0, alpha=0.1), "base"),
    (QSR, dict(base=2, alpha=-0.1), "alpha"),
    (QSR, dict(base=8, alpha=0.1, max_inner_steps=4), "max_inner_steps"),
]


@pytest.mark.parametrize(("cls", "kwargs", "argument"), BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {argument} must be"):
        cls(**kwargs)
