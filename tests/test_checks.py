"""The shared argument checks (lightning_converge.checks) and the callbacks and strategies that use them."""

from __future__ import annotations

import math

import pytest

from lightning_converge.callbacks import EMA, LAWA, Anneal, GradES, Grokfast
from lightning_converge.checks import check_choice, check_in_range, check_int, check_probability
from lightning_converge.strategies import (
    CompressedDDPStrategy,
    DiLoCoStrategy,
    OneBitAdamStrategy,
    StreamingDiLoCoStrategy,
)


@pytest.mark.parametrize("value", [0, 3, 2**40])
def test_check_int_returns_a_good_value(value):
    assert check_int("steps", value, 0) == value


@pytest.mark.parametrize("value", [-1, 1.0, True, "1", None])
def test_check_int_names_the_argument_the_allowed_values_and_the_value_given(value):
    with pytest.raises(ValueError, match=rf"^Owner: steps must be an integer >= 0, got {value!r}$"):
        check_int("steps", value, 0, owner="Owner")


def test_check_int_may_allow_none():
    assert check_int("every_n_steps", None, 1, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^every_n_steps must be None or an integer >= 1, got 0$"):
        check_int("every_n_steps", 0, 1, allow_none=True)


@pytest.mark.parametrize(
    "bounds, good, bad, allowed",
    [
        (dict(low=0, high=1), [0, 0.5, 1], [-0.1, 1.1], "in [0, 1]"),
        (dict(low=0, high=1, low_open=True), [1e-9, 1], [0, 1.5], "in (0, 1]"),
        (dict(low=0, high=1, high_open=True), [0, 0.999], [1, -1], "in [0, 1)"),
        (dict(low=0), [0, 1e30], [-1e-9], ">= 0"),
        (dict(low=0, low_open=True), [1e-30], [0], "> 0"),
        (dict(high=2), [-1e30, 2], [2.5], "<= 2"),
    ],
)
def test_check_in_range(bounds, good, bad, allowed):
    for value in good:
        assert check_in_range("x", value, **bounds) == value
    for value in [*bad, True, "0.5", None]:
        with pytest.raises(ValueError) as raised:
            check_in_range("x", value, **bounds)
        assert str(raised.value) == f"x must be a number {allowed}, got {value!r}"
    for value in [math.nan, math.inf, -math.inf]:  # refused whatever the bounds
        with pytest.raises(ValueError) as raised:
            check_in_range("x", value, **bounds)
        assert str(raised.value) == f"x must be a finite number {allowed}, got {value!r}"


def test_check_in_range_without_bounds_asks_for_a_finite_number():
    assert check_in_range("lamb", -1e30) == -1e30
    for value in [math.nan, math.inf, "2"]:
        with pytest.raises(ValueError) as raised:
            check_in_range("lamb", value)
        assert str(raised.value) == f"lamb must be a finite number, got {value!r}"


def test_check_probability():
    assert check_probability("p", 0.25) == 0.25
    with pytest.raises(ValueError, match=r"^p must be a number in \[0, 1\], got 1.5$"):
        check_probability("p", 1.5)


def test_check_choice():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    assert check_choice("delay", 1, (0, 1)) == 1
    with pytest.raises(ValueError, match=r"^Owner: mode must be one of \('a', 'b', 'c'\), got 'd'$"):
        check_choice("mode", "d", ["a", "b", "c"], owner="Owner")
    with pytest.raises(ValueError, match=r"^delay must be 0 or 1, got True$"):
        check_choice("delay", True, (0, 1))  # a bool is not the number it equals


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Anneal(schedule=1.0, interval="batch"), "Anneal: interval must be 'step' or 'epoch', got 'batch'"),
        (lambda: EMA(decay=1.5), "EMA: decay must be a number in [0, 1], got 1.5"),
        (lambda: EMA(every_n_steps=0), "EMA: every_n_steps must be an integer >= 1, got 0"),
        (lambda: EMA(validate_with="best"), "EMA: validate_with must be 'average' or 'live', got 'best'"),
        (lambda: LAWA(every_n_epochs="epoch"), "LAWA: every_n_epochs must be None or an integer >= 1"),
        (lambda: GradES(tau=-1.0), "GradES: tau must be a number >= 0, got -1.0"),
        (lambda: GradES(max_frozen_ratio=0.0), "GradES: max_frozen_ratio must be a number in (0, 1], got 0.0"),
        (lambda: Grokfast(alpha=1.0), "Grokfast: alpha must be a number in [0, 1), got 1.0"),
        (lambda: Grokfast(window_size=True), "Grokfast: window_size must be an integer >= 1, got True"),
        (lambda: CompressedDDPStrategy(start_step=-1), "CompressedDDPStrategy: start_step must be an integer >= 0"),
        (lambda: OneBitAdamStrategy(freeze_step=0), "OneBitAdamStrategy: freeze_step must be an integer >= 1"),
        (lambda: DiLoCoStrategy(delay=True), "DiLoCoStrategy: delay must be 0 or 1, got True"),
        (lambda: DiLoCoStrategy(outer_lr=0.0), "outer_lr must be a number > 0, got 0.0"),
        (lambda: StreamingDiLoCoStrategy(mixing_alpha=2.0), "StreamingDiLoCoStrategy: mixing_alpha must be a number"),
    ],
)
def test_callbacks_and_strategies_check_their_arguments_alike(make, message):
    with pytest.raises(ValueError) as raised:
        make()
    assert str(raised.value).startswith(message)
