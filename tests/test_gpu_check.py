"""``benchmarks/gpu_check.py --dry-run``: the GPU check's own plumbing, on CPU.

The script runs in a subprocess as a user runs it. Without CUDA it checks every
Triton kernel against its reference under the interpreter on tiny sizes, skips the
timed sections with a reason, and writes its JSON where ``--out`` says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_converge import kernels

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def exported_kernels() -> dict[str, kernels.Kernel]:
    return {
        name: getattr(kernels, name) for name in kernels.__all__ if isinstance(getattr(kernels, name), kernels.Kernel)
    }


def has_triton(kernel: kernels.Kernel) -> bool:
    try:
        getattr(kernel, "triton")  # noqa: B009 -- the property loads the implementation
    except NotImplementedError:
        return False
    return True


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # the dry run on CPU, GPU or not
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "nested" / "check.json"
    result = run_script("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text()), out


def test_dry_run_checks_every_exported_kernel(dry_run):
    _, report, _ = dry_run
    rows = report["kernels"]
    assert {row["kernel"] for row in rows} == set(exported_kernels())
    triton_installed = importlib.util.find_spec("triton") is not None
    for name, kernel in exported_kernels().items():
        kernel_rows = [row for row in rows if row["kernel"] == name]
        if not has_triton(kernel):
            assert [row["status"] for row in kernel_rows] == ["no triton version"]
            continue
        # Both dtypes, under the defaults and each boolean option flipped.
        assert {row["dtype"] for row in kernel_rows} == ({"float32", "bfloat16"} if triton_installed else {None})
        assert {} in [row["options"] for row in kernel_rows]
        expected_status = "pass" if triton_installed else "skipped"
        assert all(row["status"] == expected_status for row in kernel_rows), kernel_rows
        if triton_installed:  # several tensors, one launch (two with cautious masking): the pack's launcher
            for row in kernel_rows:
                assert row["tensors"] > 1
                assert row["launches"] == row["expected_launches"] == (2 if row["options"].get("cautious") else 1)


def test_dry_run_skips_the_timings_and_leaves_targets_unchecked(dry_run):
    result, report, out = dry_run
    assert report["dry_run"] is True
    assert report["kernel_device"] == "cpu (TRITON_INTERPRET=1)"
    for section in ("optimizers", "callbacks"):
        assert report[section] == {"skipped": "--dry-run"}
    # The timed targets are not checked; the launch counts are, under the interpreter too.
    launch_targets = [t for t in report["targets"] if t["target"].startswith("one triton launch per group")]
    assert [t["met"] for t in launch_targets] == [True if importlib.util.find_spec("triton") else None]
    assert all(target["met"] is None for target in report["targets"] if target not in launch_targets)
    assert {"torch", "triton", "lightning", "device"} <= report["machine"].keys()
    # The printed tables: every kernel, the skipped sections, the targets, and where the JSON went.
    for name in exported_kernels():
        assert f"| {name} |" in result.stdout
    assert "Timings skipped (--dry-run, no CUDA device)" in result.stdout
    assert "| target | measured | met |" in result.stdout
    assert str(out) in result.stdout


def test_dry_run_compares_against_the_reference(monkeypatch):
    """The comparison itself: a wrong result in one element, or one int8 code, fails the check."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    expected = [[torch.ones(5, dtype=torch.bfloat16), torch.zeros(3)], torch.tensor(True)]
    same = [[t.clone() for t in expected[0]], expected[1].clone()]
    assert gpu_check.compare(same, expected)[1] == 0.0
    off_by_an_ulp = [[torch.full((5,), 1.0 - 2**-8, dtype=torch.bfloat16), torch.zeros(3)], expected[1]]
    assert gpu_check.compare(off_by_an_ulp, expected)[1] <= 1.0
    wrong = [[torch.ones(5, dtype=torch.bfloat16), torch.tensor([0.0, 1e-3, 0.0])], expected[1]]
    assert gpu_check.compare(wrong, expected)[1] > 1.0
    codes = [torch.tensor([1, 2, 3], dtype=torch.int8)]
    assert gpu_check.compare([torch.tensor([1, 2, 4], dtype=torch.int8)], codes)[1] > 1.0


def test_without_cuda_a_full_run_measures_nothing_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    result = run_script("--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "No CUDA device here: nothing measured" in result.stdout
    assert not out.exists()


def test_bad_arguments_are_refused():
    result = run_script("--dry-run", "--rounds", "0")
    assert result.returncode == 2
    assert "--rounds must be >= 1, got 0" in result.stderr


def test_the_timed_sections_run_end_to_end_on_tiny_sizes(monkeypatch):
    """What only a GPU run reaches, on CPU: the optimizer and callback sections on 50 k
    parameters in 15 tensors (two of our rules, under the Triton interpreter, which is slow),
    their targets and tables. CPU has no host syncs to count or GPU kernels to profile:
    those say "not available"."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "RULES", ("AdamW", "Lion"))

    args = gpu_check.parse_args(["--skip-compiled", "--rounds", "1", "--steps-per-round", "1"])
    cpu = torch.device("cpu")
    report = dict(
        kernel_device="cpu",
        kernels=[],
        optimizers=gpu_check.measure_optimizers(args, cpu, parameter_sets=[(2e4, 15)], copy_mb=1),
        callbacks=gpu_check.measure_callbacks(args, cpu, parameter_set=(2e4, 15), steps=8),
    )
    report["targets"] = gpu_check.targets(report)

    sets = report["optimizers"]["sets"]
    assert [measured["tensors"] for measured in sets] == [15]
    for measured in sets:
        rows = measured["rows"]
        assert set(rows) == {"torch AdamW fused", *(f"ours {rule} triton" for rule in gpu_check.RULES)}
        fused = rows["torch AdamW fused"]["median_ms"]
        for row in rows.values():
            assert row["ratio_vs_torch_fused"] == pytest.approx(row["median_ms"] / fused)
            assert row["host_syncs"] is None and row["launches"]["kernels"] is None
    callbacks = report["callbacks"]["rows"]
    assert {"no callback", "ours EMA", "ours Grokfast", "ours Grokfast MA", "Lightning EMAWeightAveraging"} <= (
        callbacks.keys()
    )
    assert all(row["hook_ms"] > 0 for name, row in callbacks.items() if name != "no callback")

    # Each target is decided by its measured value against its threshold.
    by_name = {target["target"]: target for target in report["targets"]}
    adamw = sets[-1]["rows"]["ours AdamW triton"]
    assert by_name["ours AdamW triton <= 1.1x torch fused AdamW at 15 tensors"]["met"] == (
        adamw["ratio_vs_torch_fused"] <= 1.1
    )
    assert by_name["ours AdamW compiled <= 1.1x torch fused AdamW at 15 tensors"]["met"] is None  # skipped
    megaparams = f"{sets[-1]['params'] / 1e6:.0f} M"
    for rule in gpu_check.RULES:
        fraction = sets[-1]["rows"][f"ours {rule} triton"]["bandwidth_fraction"]
        target = by_name[f"ours {rule} triton >= 80% of copy bandwidth at {megaparams} parameters"]
        assert target["met"] == (fraction >= 0.8)
    assert all(t["met"] is None for t in report["targets"] if t["target"].startswith("zero host syncs"))

    table = gpu_check.markdown(report)
    for name in [*sets[0]["rows"], *callbacks]:
        assert f"| {name} |" in table


def test_a_kernel_call_with_more_launches_than_groups_fails_the_check(monkeypatch):
    """A kernel that launched per tensor would show more launches than expected: its rows fail, and so
    does the launch target (here the expectation is lowered below what the one-group launch makes)."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "exported_kernels", lambda: {"ema_update": kernels.ema_update})
    rows = gpu_check.check_kernels(torch.device("cpu"), gpu_check.DRY_RUN_SHAPES)
    assert [row["launches"] for row in rows] == [1, 1] and all(row["status"] == "pass" for row in rows)
    monkeypatch.setattr(gpu_check, "expected_launches", lambda options: 0)
    rows = gpu_check.check_kernels(torch.device("cpu"), gpu_check.DRY_RUN_SHAPES)
    assert all(row["status"] == "FAIL" for row in rows)
    report = dict(kernels=rows, optimizers=dict(skipped="--dry-run"), callbacks=dict(skipped="--dry-run"))
    launch_target = [t for t in gpu_check.targets(report) if t["target"].startswith("one triton launch")]
    assert [(t["measured"], t["met"]) for t in launch_target] == [("0 of 2 calls", False)]
