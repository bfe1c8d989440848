"""``benchmarks/async_diloco.py``'s bookkeeping, on made-up rank records (no training, no processes).

The benchmark itself is run by hand (``--quick`` in about two minutes); these check what turns its
measurements into the curves and verdicts: how the asynchronous workers share the sample budget, where
each validated copy of the agreed model lands on the steps / samples / bytes / seconds axes when ranks
start at different moments, and the speed-up and loss-gap targets.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "async_diloco.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("async_diloco_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("world_size, slowdown", [(2, 2.0), (4, 2.0), (2, 3.0)])
def test_async_workers_share_the_sync_sample_budget_by_speed(bench, world_size, slowdown):
    steps = 200
    async_steps = [bench.steps_of_rank(bench.Method("async"), rank, world_size, steps, slowdown)
                   for rank in range(world_size)]
    sync_steps = [bench.steps_of_rank(bench.Method("diloco"), rank, world_size, steps, slowdown)
                  for rank in range(world_size)]
    assert sync_steps == [steps] * world_size
    # n fast workers at speed 1 and one at 1/slowdown, finishing together: fast = total / (n - 1 + 1/slowdown).
    fast = world_size * steps / (world_size - 1 + 1 / slowdown)
    assert async_steps[:-1] == [round(fast)] * (world_size - 1)
    assert async_steps[-1] == round(fast / slowdown)
    assert abs(sum(async_steps) - world_size * steps) <= world_size


def rank_record(start, step_ends, sent_per_step, received_per_step, fit_seconds, **extra):
    steps = len(step_ends)
    record = dict(
        parameters=10, steps=steps, loss=[1.0] * steps, start=start, step_end_seconds=step_ends,
        bytes_sent=[sent_per_step * (i + 1) for i in range(steps)],
        bytes_received=[received_per_step * (i + 1) for i in range(steps)],
        bytes_total=(sent_per_step + received_per_step) * steps,
        fit_seconds=fit_seconds, slept_seconds=None, logged={}, loopback_bytes=[], parameter_checksum=1.0,
        trained=[True] * steps,
    )
    return {**record, **extra}


def test_curve_points_count_what_every_rank_had_finished_on_one_clock(bench):
    # Rank 1 starts training 0.5 s after rank 0 (perf_counter is one clock for both) and steps half as often.
    rank0 = rank_record(100.0, [1.0, 2.0, 3.0, 4.0], 0, 10, 4.2,
                        snapshot_seconds=[2.0, 4.0], snapshot_val_loss=[3.0, 2.5], final_val_loss=2.4)
    rank1 = rank_record(100.5, [1.5, 3.5], 100, 100, 4.0, slept_seconds=2.0)
    run = bench.merge_ranks([rank0, rank1], batch_size=8)
    first, second, final = run["curve"]
    # At t = 2.0 (rank 0's clock): rank 0 has 2 steps, rank 1 one (ended at 0.5 + 1.5 = 2.0).
    assert first == dict(seconds=2.0, val_loss=3.0, samples=(2 + 1) * 8, steps_per_worker=3 / 2,
                         bytes_per_worker=(2 * 10 + 1 * 200) / 2)
    # At t = 4.0: rank 0 has 4 steps, rank 1 still one (its second ends at 0.5 + 3.5 = 4.0: included).
    assert second["samples"] == (4 + 2) * 8 and second["bytes_per_worker"] == (4 * 10 + 2 * 200) / 2
    # The final model, when the last rank's fit returned: max(0 + 4.2, 0.5 + 4.0).
    assert final == dict(seconds=4.5, val_loss=2.4, samples=6 * 8, steps_per_worker=3.0,
                         bytes_per_worker=(4 * 10 + 2 * 200) / 2)
    assert run["slow_worker_slept_seconds"] == 2.0 and run["ranks_agree"]
    assert run["seconds_per_step_per_rank"] == [4.0 / 4, 3.5 / 2]


def test_idle_steps_of_synchronous_dynamic_h_count_no_samples_and_no_steps(bench):
    # Both ranks step at the same times; rank 1 (the slow one) trained its first step of each round of 2 only.
    rank0 = rank_record(100.0, [1.0, 2.0, 3.0, 4.0], 10, 10, 4.0,
                        snapshot_seconds=[2.0], snapshot_val_loss=[3.0], final_val_loss=2.4)
    rank1 = rank_record(100.0, [1.0, 2.0, 3.0, 4.0], 10, 10, 4.0, trained=[True, False, True, False])
    run = bench.merge_ranks([rank0, rank1], batch_size=8)
    at_2s, final = run["curve"]
    assert at_2s["samples"] == (2 + 1) * 8 and at_2s["steps_per_worker"] == 3 / 2
    assert final["samples"] == run["samples"] == (4 + 2) * 8
    assert run["steps_per_rank"] == [4, 2]
    assert run["seconds_per_step_per_rank"] == [4.0 / 4, 4.0 / 2]  # seconds per step trained


def test_a_row_is_a_kind_and_the_strategys_options(bench):
    from lightning_converge.strategies import AsyncDiLoCoStrategy, DiLoCoStrategy

    args = SimpleNamespace(outer_lr=0.7, outer_momentum=0.5, delayed_period=None, staleness_penalty=0.5)
    dynamic = bench.Method("diloco", options=(("dynamic_inner_steps", True),))
    assert dynamic.name(20) == "diloco H=20 + dynamic H" and bench.Method("diloco").name(20) == "diloco H=20"
    strategy = dynamic.strategy(20, args)
    assert type(strategy) is DiLoCoStrategy and strategy._dynamic is not None
    penalized = bench.Method("async", options=(("staleness_penalty", 0.5),))
    assert penalized.name(20) == "async Delayed Nesterov + staleness penalty"
    assert type(penalized.strategy(20, args)) is AsyncDiLoCoStrategy
    names = [method.name(20) for method in bench.methods(args)]
    assert len(set(names)) == len(names) and "diloco H=20 + dynamic H" in names


def run_with_curve(points, samples=800):
    curve = [dict(seconds=s, val_loss=v, samples=samples, steps_per_worker=1.0, bytes_per_worker=1.0)
             for s, v in points]
    return dict(curve=curve, final_val_loss=curve[-1]["val_loss"], samples=samples, steps_per_rank=[1, 1],
                bytes_per_worker=1.0, loopback_bytes=None, training_seconds=curve[-1]["seconds"],
                seconds_per_step_per_rank=[0.1, 0.2], logged_per_rank=[{}, {}], ranks_agree=True)


def test_speedup_and_loss_gap_against_sync_diloco(bench):
    # Synchronous DiLoCo's model dips below its final loss on the way: it still took 20 s to its final model.
    sync = run_with_curve([(5.0, 3.0), (10.0, 1.99), (20.0, 2.0)])
    fast = run_with_curve([(4.0, 2.6), (8.0, 1.99), (12.0, 1.95)])  # first at or below 2.0 at 8 s
    unstable = run_with_curve([(4.0, 2.6), (12.0, 2.2)])  # never reaches 2.0, ends 10% above it
    runs = {"diloco H=20": sync, bench.TARGET_METHOD: fast, "async Nesterov": unstable}
    summary = bench.summarize(runs, "diloco H=20")
    assert summary[bench.TARGET_METHOD]["speedup_to_target_vs_sync"] == pytest.approx(20.0 / 8.0)
    assert summary[bench.TARGET_METHOD]["val_loss_gap_vs_sync"] == pytest.approx(1.95 / 2.0 - 1)
    assert summary["async Nesterov"]["seconds_to_target"] is None
    assert summary["async Nesterov"]["val_loss_gap_vs_sync"] == pytest.approx(2.2 / 2.0 - 1)
    assert summary["async Nesterov"]["slow_over_fast_seconds_per_step"] == pytest.approx(2.0)

    verdicts = bench.judge_targets({(2, "loopback"): summary}, {2: "diloco H=20"}, slowdown=2.0)
    assert [v["passed"] for v in verdicts] == [True, True]
    slow_to_target = dict(runs, **{bench.TARGET_METHOD: run_with_curve([(15.0, 2.0), (16.0, 2.07)])})
    verdicts = bench.judge_targets({(2, "shaped"): bench.summarize(slow_to_target, "diloco H=20")},
                                   {2: "diloco H=20"}, slowdown=2.0)
    # 20 / 15 = 1.33x < 1.5x; 2.07 is 3.5% above 2.0.
    assert [v["passed"] for v in verdicts] == [False, False]
    assert verdicts[0]["measured"].startswith("1.33x") and verdicts[1]["measured"] == "+3.50%"


@pytest.mark.parametrize("world_size, slowdown", [(2, 2.0), (4, 2.0), (3, 4.0)])
def test_throughput_ceiling(bench, world_size, slowdown):
    # Never waiting: n - 1 workers at speed 1 and one at 1/slowdown; paced: all n at 1/slowdown.
    assert bench.throughput_ceiling(world_size, slowdown) == pytest.approx(
        (world_size - 1 + 1 / slowdown) / (world_size / slowdown)
    )
