"""``benchmarks/sharded.py``'s bookkeeping, on made-up rank records (no training, no processes).

The benchmark itself is run by hand (``--quick`` in about 3 minutes, mostly compiling); these check what
turns its measurements into the tables: the state bytes it counts, and the per-rank figures, quartiles and
ratios of the summaries.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sharded_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tensor_bytes_counts_every_tensor_of_a_callback_state(bench):
    average = torch.nn.Linear(3, 5)  # an AveragedModel-like module: 15 + 5 fp32 parameters, one int64 buffer
    average.register_buffer("n_averaged", torch.tensor(0, dtype=torch.int64))
    state = {"a": torch.zeros(4, 2), "snapshots": [{"b": torch.zeros(3, dtype=torch.bfloat16)}, (torch.zeros(0),)],
             "module": average, "count": 7}
    assert bench.tensor_bytes(state) == 8 * 4 + 3 * 2 + 0 + (15 + 5) * 4 + 8


def rank_records(rank: int) -> dict:
    """Two rounds of each configuration (iteration seconds), one memory fit each, on ``rank``."""
    iterations = {
        "ddp no averaging": [[0.10, 0.12], [0.11, 0.13]],
        "ddp ours EMA": [[0.12, 0.14], [0.13, 0.15]],
        "fsdp2 no averaging": [[0.20, 0.22], [0.21, 0.23]],
        "fsdp2 ours EMA": [[0.21, 0.23], [0.22, 0.24]],
    }
    state = {"ddp no averaging": 0, "ddp ours EMA": 400, "fsdp2 no averaging": 0, "fsdp2 ours EMA": 200 + rank}
    return dict(
        records={name: [dict(iterations_s=fit, cpu_iterations_s=[t / 2 for t in fit]) for fit in fits]
                 for name, fits in iterations.items()},
        memory={name: dict(callback_state_bytes=state[name], parameter_bytes=400, optimizer_state_bytes=800,
                           start_rss_kb=1024 * (100 + rank), peak_rss_kb=1024 * (150 + rank) + state[name])
                for name in iterations},
        unsupported={"fsdp2 Lightning EMAWeightAveraging": dict(error="AssertionError: no deepcopy")},
    )


def test_callbacks_summary_times_rank_0_and_charges_each_method_against_its_strategy(bench):
    summary = bench.summarize_callbacks([rank_records(0), rank_records(1)])
    rows = summary["rows"]
    ema = rows["fsdp2 ours EMA"]
    times = [0.21, 0.23, 0.22, 0.24]
    p25, median, p75 = statistics.quantiles(times, n=4)
    assert ema["median_ms"] == pytest.approx(median * 1e3) and ema["samples"] == 4
    assert (ema["p25_ms"], ema["p75_ms"]) == pytest.approx((p25 * 1e3, p75 * 1e3))
    # Against FSDP2 without averaging, not DDP's.
    fsdp_baseline = statistics.quantiles([0.20, 0.22, 0.21, 0.23], n=4)[1]
    assert ema["added_ms"] == pytest.approx((median - fsdp_baseline) * 1e3)
    assert ema["cpu_median_ms"] == pytest.approx(statistics.median(times) / 2 * 1e3)
    assert ema["cpu_added_ms"] == pytest.approx((statistics.median(times) - statistics.median([0.20, 0.22, 0.21, 0.23]))
                                                / 2 * 1e3)
    assert rows["ddp ours EMA"]["added_ms"] == pytest.approx(
        (statistics.quantiles([0.12, 0.14, 0.13, 0.15], n=4)[1] - statistics.quantiles([0.10, 0.12, 0.11, 0.13],
                                                                                         n=4)[1]) * 1e3)
    assert ema["callback_state_bytes"] == [200, 201]  # one figure per rank
    assert ema["peak_above_start_mb"] == pytest.approx([50 + 200 / 1024, 50 + 201 / 1024])
    assert ema["peak_rss_mb"] == pytest.approx([150 + 200 / 1024, 151 + 201 / 1024])
    assert summary["unsupported"] == {"fsdp2 Lightning EMAWeightAveraging": dict(error="AssertionError: no deepcopy")}
    table = bench.callbacks_tables(summary, bench.argparse.Namespace(
        blocks=2, width=8, rounds=2, timed_epochs=1, steps_per_epoch=3))
    assert "AssertionError: no deepcopy" in table and "| fsdp2 ours EMA |" in table


def test_optimizer_summary_relative_to_ours_and_largest_difference_over_ranks(bench):
    ours, peer = bench.REFERENCE_OPTIMIZER, "torch AdamW default (DTensor)"

    def record(rank: int, peer_seconds: list[float], difference: float) -> dict:
        return dict(n_params=100, n_tensors=3, local_params=50 + rank, steps_each=9,
                    step_times_s={ours: [0.01, 0.02, 0.03], peer: peer_seconds},
                    cpu_times_s={ours: [0.01, 0.02, 0.03], peer: peer_seconds},
                    max_abs_diff_vs_ours={ours: 0.0, peer: difference},
                    errors={"torch AdamW fused (DTensor)": "RuntimeError: no"})

    summary = bench.summarize_optimizer([record(0, [0.05, 0.10, 0.15], 1e-8), record(1, [0.5, 0.5, 0.5], 3e-8)])
    row = summary["rows"][peer]
    assert row["time_vs_ours"] == pytest.approx(statistics.median([0.05, 0.10, 0.15]) / statistics.median(
        [0.01, 0.02, 0.03]))
    assert row["per_rank_median_ms"] == pytest.approx([100.0, 500.0])
    assert row["max_abs_diff_vs_ours"] == 3e-8
    assert summary["local_params_per_rank"] == [50, 51]
    assert summary["refused"] == {"torch AdamW fused (DTensor)": "RuntimeError: no"}
    assert "Refused: torch AdamW fused (DTensor)" in bench.optimizer_table(summary)
