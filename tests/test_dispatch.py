"""The dispatch point: which implementation a kernel call runs, and what importing the pack leaves alone.

"auto" compiles a list of tensors only after the reference has run it
``ceil(n * COMPILE_COST_BYTES_PER_TENSOR / (bytes + n * CALL_OVERHEAD_BYTES_PER_TENSOR))``
times; an explicit backend or ``LIGHTNING_CONVERGE_BACKEND`` overrides it. The
implementations are counted by wrapping them, so nothing here depends on timing.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_converge.kernels import dispatch
from lightning_converge.kernels.dispatch import Kernel
from lightning_converge.optim import AdamW

REPO = Path(__file__).resolve().parents[1]


def _scale(values: list[torch.Tensor], *, factor: torch.Tensor) -> None:
    for value in values:
        value.mul_(factor)


@pytest.fixture
def counted(monkeypatch):
    """A kernel whose reference and compiled implementations record each call's name in ``ran``."""
    kernel = Kernel(_scale)
    ran: list[str] = []

    def counting(name, implementation):
        def run(*args, **kwargs):
            ran.append(name)
            return implementation(*args, **kwargs)

        return run

    monkeypatch.setattr(kernel, "reference", counting("reference", kernel.reference))
    monkeypatch.setattr(kernel, "_compiled", counting("compiled", _scale))  # the dispatch decision, not inductor
    return kernel, ran


def _expected_reference_calls(n: int, arguments: int) -> int:
    """The documented rule for a list of ``n`` tensors and ``arguments`` bytes in all tensor arguments."""
    return math.ceil(
        n * dispatch.COMPILE_COST_BYTES_PER_TENSOR / (arguments + n * dispatch.CALL_OVERHEAD_BYTES_PER_TENSOR)
    )


def _call(kernel, tensors, times, **kwargs):
    for _ in range(times):
        kernel(tensors, factor=torch.tensor(1.0), **kwargs)


def test_auto_runs_small_tensors_on_the_reference(counted):
    kernel, ran = counted
    tensors = [torch.ones(7, 3), torch.ones(5)]
    _call(kernel, tensors, 200)
    assert ran == ["reference"] * 200
    assert _expected_reference_calls(2, (21 + 5) * 4) > 200


def test_auto_compiles_after_the_reference_did_the_work_compiling_costs(counted, monkeypatch):
    kernel, ran = counted
    # A compile that costs what the reference loses on 1 MB per tensor, so that small tensors switch soon.
    monkeypatch.setattr(dispatch, "COMPILE_COST_BYTES_PER_TENSOR", 2**20)
    monkeypatch.setattr(dispatch, "CALL_OVERHEAD_BYTES_PER_TENSOR", 2**12)
    small = [torch.ones(100), torch.ones(200)]
    large = [torch.ones(20_000), torch.ones(30_000)]
    small_calls, large_calls = _expected_reference_calls(2, 300 * 4), _expected_reference_calls(2, 50_000 * 4)
    assert 1 < large_calls < small_calls < 1_000

    _call(kernel, large, large_calls + 3)
    assert ran == ["reference"] * large_calls + ["compiled"] * 3
    # Each list of shapes counts on its own: the large list's calls did not advance the small one.
    ran.clear()
    _call(kernel, small, small_calls + 2)
    assert ran == ["reference"] * small_calls + ["compiled"] * 2
    # A new dtype is a new graph, counted afresh.
    ran.clear()
    _call(kernel, [t.double() for t in large], 1)
    assert ran == ["reference"]


def test_explicit_backend_and_environment_variable_override_the_policy(counted, monkeypatch):
    kernel, ran = counted
    tensors = [torch.ones(3)]
    _call(kernel, tensors, 2, backend="compiled")
    assert ran == ["compiled"] * 2

    ran.clear()
    monkeypatch.setenv("LIGHTNING_CONVERGE_BACKEND", "compiled")
    _call(kernel, tensors, 2)
    _call(kernel, tensors, 1, backend="reference")  # an explicit argument beats the variable
    assert ran == ["compiled", "compiled", "reference"]

    ran.clear()
    monkeypatch.setenv("LIGHTNING_CONVERGE_BACKEND", "reference")
    monkeypatch.setattr(dispatch, "COMPILE_COST_BYTES_PER_TENSOR", 1)
    _call(kernel, tensors, 3)
    assert ran == ["reference"] * 3


def test_auto_adamw_matches_torch_across_the_switch_and_compiles_once(monkeypatch):
    """A real kernel through the policy: reference steps, then compiled ones, all equal to torch.optim.AdamW."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(dispatch, "COMPILE_COST_BYTES_PER_TENSOR", 2**14)
    monkeypatch.setattr(dispatch, "CALL_OVERHEAD_BYTES_PER_TENSOR", 2**10)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    params = [torch.randn(37, 11), torch.randn(11)]
    torch_params = [p.clone() for p in params]
    ours = AdamW(params, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1)
    # AdamW's kernel gets parameters, gradients, both moments (4 fp32 tensors each) and the 0-d steps.
    switch = _expected_reference_calls(2, 4 * (37 * 11 + 11) * 4 + 2 * 4)
    assert 1 < switch < 10
    graphs = []
    for step in range(switch + 3):
        for p, q in zip(params, torch_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [0] * switch + [1] * 3
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compiled_kernels_take_many_lists_without_hitting_the_recompile_limit():
    """Each list length is its own graph; more of them than dynamo's default limit all compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kernel = Kernel(_scale)
    lists = [[torch.ones(3) for _ in range(length)] for length in range(1, torch._dynamo.config.recompile_limit + 3)]
    for tensors in lists:
        kernel(tensors, factor=torch.tensor(2.0), backend="compiled")
    assert counters["stats"]["unique_graphs"] == len(lists)
    assert all(torch.equal(t, torch.full((3,), 2.0)) for tensors in lists for t in tensors)


def test_importing_the_pack_leaves_dynamo_config_alone():
    script = (
        "import torch, torch._dynamo\n"
        "before = torch._dynamo.config.get_config_copy()\n"
        "import lightning_converge\n"
        "after = torch._dynamo.config.get_config_copy()\n"
        "print(sorted(k for k in before if before[k] != after[k]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert result.stdout.strip() == "[]"
