"""DiLoCo with dynamic local updates (``DiLoCoStrategy(dynamic_inner_steps=True)``): each worker's inner steps
follow the speeds measured in the last round, the average is the uniform one written out, every rank ends with
the same parameters after the same rounds, a resumed run continues exactly, bad combinations are refused.

The two-worker runs are ``tests/scripts/diloco_dynamic_fit.py`` (started as ``tests/test_diloco.py`` starts
its own). In one, rank 1 sleeps in its real steps; in the others the speeds are forced by a table, so the
inner steps, and the parameters, can be written out here (:func:`simulate`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_converge.strategies import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_converge.strategies.diloco import dynamic_inner_steps
from lightning_converge.strategies.diloco.dynamic import DynamicInnerSteps

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from diloco_dynamic_fit import FORCED_SPEEDS  # noqa: E402
from diloco_fit import Regression, batch_indices, dataset  # noqa: E402

sys.path.remove(str(SCRIPTS))
from test_diloco import run_two_workers  # noqa: E402

H = 4
SCENARIOS = ["measured", "forced", "forced_fp16", "forced_accumulate_bf16", "resumed", "after_fit"]


# ---------------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DiLoCoStrategy, dict(dynamic_inner_steps=1), "dynamic_inner_steps must be False or True"),
        (DiLoCoStrategy, dict(dynamic_inner_steps=True, delay=1), "dynamic_inner_steps=True needs delay=0"),
        (StreamingDiLoCoStrategy, dict(dynamic_inner_steps=True), "does not support dynamic_inner_steps"),
    ],
)
def test_bad_combinations_are_refused_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


class ManualOptimization(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


@pytest.mark.usefixtures("single_process_group")
def test_manual_optimization_is_refused_before_training():
    model = ManualOptimization()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        strategy=DiLoCoStrategy(inner_steps=2, dynamic_inner_steps=True, backend="reference"),
    )
    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer.fit(model)
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))


DYNAMIC_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  strategy:
    class_path: lightning_converge.strategies.DiLoCoStrategy
    init_args:
      inner_steps: 8
      dynamic_inner_steps: true
"""


def test_dynamic_inner_steps_is_set_from_yaml(tmp_path, monkeypatch):
    from lightning_converge.cli import ConvergeCLI

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the demo config's class_paths resolve from the project root
    monkeypatch.setattr(sys, "argv", ["lightning-converge"])
    config = tmp_path / "strategy.yaml"
    config.write_text(DYNAMIC_YAML)
    args = ["--config", str(root / "configs" / "demo.yaml"), "--config", str(config)]
    strategy = ConvergeCLI(args=args, run=False).trainer.strategy
    assert type(strategy) is DiLoCoStrategy and isinstance(strategy._dynamic, DynamicInnerSteps)


def _fit_one_worker(strategy) -> Regression:
    model = Regression("AdamW")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, strategy=strategy,
    )
    trainer.fit(model)
    return model


@pytest.mark.usefixtures("single_process_group")
def test_one_worker_with_a_qsr_schedule_trains_as_diloco_without_dynamic_steps():
    """A single worker is always the fastest: its inner steps are the schedule's, and it trains as plain DiLoCo
    (with H from QSR, which reads the inner learning rate at each round's start)."""
    from lightning_converge.schedules import QSR

    def strategy(dynamic):
        schedule = QSR(base=3, alpha=0.02, max_inner_steps=5)  # (0.02 / lr 1e-2) ** 2 = 4 steps
        return DiLoCoStrategy(inner_steps=schedule, dynamic_inner_steps=dynamic, backend="reference")

    plain, dynamic = _fit_one_worker(strategy(False)), _fit_one_worker(strategy(True))
    for a, b in zip(plain.parameters(), dynamic.parameters()):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("single_process_group")
def test_an_idle_step_builds_no_host_tensors_and_reads_nothing_back(monkeypatch):
    from test_gpu_path import _assert_steady_and_sync_free, no_host_reads

    strategy = DiLoCoStrategy(inner_steps=4, dynamic_inner_steps=True, backend="reference")
    start_round = strategy._dynamic.start_round

    def one_real_step(round_length, rank):  # a single worker is the fastest: make it train 1 step of 4
        start_round(round_length, rank)
        strategy._dynamic.inner_steps = 1

    monkeypatch.setattr(strategy._dynamic, "start_round", one_real_step)
    optimizer_step, per_step = strategy.optimizer_step, []

    def guarded(*args, **kwargs):
        """The idle steps inside a round (not before a sync), from the second round on, without the logging."""
        schedule = strategy._schedule
        inside = schedule.inner_step + 1 < schedule.round_start + schedule.round_length
        if not (strategy._is_idle_step() and inside and schedule.inner_step >= 4):
            return optimizer_step(*args, **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(strategy.lightning_module, "log", lambda *a, **k: None)
            with no_host_reads(monkeypatch) as ops:
                output = optimizer_step(*args, **kwargs)
        per_step.append(ops)
        return output

    monkeypatch.setattr(strategy, "optimizer_step", guarded)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, strategy=strategy,
    )
    trainer.fit(Regression("SGD"))
    assert len(per_step) == 4  # steps 2 and 3 of the second and third rounds
    _assert_steady_and_sync_free(per_step)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_speed_is_timed_over_the_real_steps_without_validation_or_the_sync():
    clock = FakeClock()
    dynamic = DynamicInnerSteps(clock)
    dynamic.start_round(round_length=5, rank=0)
    assert dynamic.inner_steps == 5 and dynamic.measured_speed() is None
    # A round of 5 steps, each taking 2 s, with a 7 s validation between steps 2 and 3; the 5th step's
    # interval holds the sync and is never closed within the round.
    for steps_done in range(5):
        dynamic.batch_starts(steps_done)
        clock.now += 2.0
        if steps_done == 2:
            dynamic.pause()
            clock.now += 7.0
            dynamic.resume()
    assert (dynamic.steps, dynamic.seconds) == (4, 8.0)
    assert dynamic.measured_speed() == 0.5
    # The next round's inner steps come from the gathered speeds (0: not measured), H for the unmeasured.
    dynamic._gathered = [0.5, 2.0, None]
    dynamic.start_round(round_length=8, rank=0)
    assert dynamic.inner_steps == 2 and dynamic.speeds == [0.5, 2.0, None]
    # Idle steps (after the 2 real ones) are not timed: the 2nd real step's interval ends at the first idle one.
    for steps_done in range(8):
        dynamic.batch_starts(steps_done)
        clock.now += 1.0 if steps_done < 2 else 100.0
    assert (dynamic.steps, dynamic.seconds) == (2, 2.0)
    assert [dynamic.is_idle(done) for done in range(8)] == [False, False] + [True] * 6


# ---------------------------------------------------------------------------------------- two workers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-worker run of diloco_dynamic_fit.py, every scenario: name -> [rank 0's record, rank 1's]."""
    out = tmp_path_factory.mktemp("diloco_dynamic")
    exits = run_two_workers("diloco_dynamic_fit.py", [str(out), *SCENARIOS], out, timeout=600)
    records = {}
    for name in [*(name for name in SCENARIOS if name != "after_fit"), "resumed_resumed", "after_fit_resumed"]:
        paths = [out / f"{name}_rank{rank}.pt" for rank in (0, 1)]
        if not all(path.exists() for path in paths):
            logs = f"{exits[0][1][-4000:]}\n{exits[1][1][-4000:]}"
            pytest.fail(f"scenario {name} left no results; the ranks' logs:\n{logs}")
        records[name] = [torch.load(path) for path in paths]
    return records


def expected_inner_steps(speeds: list[float], inner_steps: int) -> list[int]:
    """Liu et al.'s rule written out: the fastest runs H, the others H times their share of its speed."""
    return [max(1, round(inner_steps * speed / max(speeds))) for speed in speeds]


def simulate(max_steps: int, round_inner_steps: list[list[int]]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Two workers, inner SGD lr 0.05, rounds of H steps in which worker w trains on its batch of the step for
    the first ``round_inner_steps[round][w]`` steps and then idles; at the end of each round (and of fit)
    the uniform average of the pseudo-gradients takes one torch.optim.SGD Nesterov step (lr 0.7, momentum 0.9)
    on the global parameters, which every worker then takes. Returns the global parameters after every
    outer step and the final ones."""
    x, y = dataset().tensors
    workers = [Regression("SGD") for _ in range(2)]
    inner = [torch.optim.SGD(w.parameters(), lr=0.05) for w in workers]
    global_params = [p.detach().clone() for p in workers[0].parameters()]
    outer = torch.optim.SGD(global_params, lr=0.7, momentum=0.9, nesterov=True)
    updates = []

    def sync():
        for k, g in enumerate(global_params):
            g.grad = sum(g - list(w.parameters())[k].detach() for w in workers) / 2
        outer.step()
        updates.append([g.clone() for g in global_params])
        with torch.no_grad():
            for w in workers:
                for p, g in zip(w.parameters(), global_params):
                    p.copy_(g)

    for step in range(max_steps):
        round_index, in_round = divmod(step, H)
        for rank, (worker, optimizer) in enumerate(zip(workers, inner)):
            if in_round < round_inner_steps[round_index][rank]:
                index = batch_indices(step, rank)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(worker.net(x[index]), y[index]).backward()
                optimizer.step()
        if in_round == H - 1 or step == max_steps - 1:
            sync()
    return updates, [g.clone() for g in global_params]


FORCED_INNER_STEPS = [[H, H]] + [expected_inner_steps(FORCED_SPEEDS[k], H) for k in (0, 1)]  # [4,4], [4,2], [1,4]


@pytest.mark.distributed
def test_measured_inner_steps_follow_the_gathered_speeds_of_every_worker(runs):
    rank0, rank1 = runs["measured"]
    assert rank0["rounds"][0][2] == rank1["rounds"][0][2] == H  # the first round: H for all
    for index, ((_, speeds, mine0), (_, speeds1, mine1)) in enumerate(zip(rank0["rounds"][1:], rank1["rounds"][1:])):
        # every worker's own measured speed reached both, and each took its share of it
        assert speeds == speeds1 == [rank0["sent_speeds"][index], rank1["sent_speeds"][index]]
        assert [mine0, mine1] == dynamic_inner_steps(speeds, H) == expected_inner_steps(speeds, H)
        assert mine0 == H and mine1 < H  # rank 1 sleeps in its real steps
    for record in (rank0, rank1):  # each really stepped for its inner steps of every round, 12 steps in all
        expected = [s for start, _, mine in record["rounds"][:3] for s in range(start, start + mine)]
        assert record["real_steps"] == expected
        assert record["global_step"] == 12 and record["outer_steps"] == 3
    assert len(rank1["real_steps"]) < len(rank0["real_steps"])
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["forced", "forced_fp16", "forced_accumulate_bf16"])
def test_forced_speeds_give_the_inner_steps_of_the_rule(runs, name):
    for rank, record in enumerate(runs[name]):
        assert [mine for _, _, mine in record["rounds"]] == [steps[rank] for steps in FORCED_INNER_STEPS]
        real = [s for (start, _, _), steps in zip(record["rounds"], FORCED_INNER_STEPS)
                for s in range(start, min(start + steps[rank], 10))]
        assert record["real_steps"] == real
        assert record["outer_steps"] == 3  # two rounds and the last sync of the cut third
    for a, b in zip(runs[name][0]["params"], runs[name][1]["params"]):
        assert torch.equal(a, b)


@pytest.mark.distributed
def test_the_average_is_the_uniform_one_written_out(runs):
    updates, final = simulate(10, FORCED_INNER_STEPS)
    for record in runs["forced"]:
        assert len(record["globals_after_update"]) == len(updates) == 3
        for actual, expected in zip(record["globals_after_update"], updates):
            for a, b in zip(actual, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(record["params"], final):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # fp16 pseudo-gradients: the same rounds, close to the fp32 run
    for a, b in zip(runs["forced_fp16"][0]["params"], final):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


@pytest.mark.distributed
def test_resuming_inside_a_round_during_or_after_fit_continues_with_each_workers_inner_steps(runs):
    # Resumed at step 6, where rank 1 had done its 2 real steps of the second round and idles until step 8;
    # from a checkpoint saved there during fit, and from one saved after a fit that stopped there.
    for resumed_name in ("resumed_resumed", "after_fit_resumed"):
        for straight, resumed in zip(runs["resumed"], runs[resumed_name]):
            assert resumed["real_steps"] == [s for s in straight["real_steps"] if s >= 6], resumed_name
            assert resumed["outer_steps"] == straight["outer_steps"] == 3, resumed_name
            for a, b in zip(resumed["params"], straight["params"]):
                assert torch.equal(a, b), resumed_name
