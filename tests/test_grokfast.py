"""Grokfast: the kernel's backends agree, and the callback applies the paper's filter equations
to the gradients Lightning hands to the optimizer, and survives a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict, deque
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import Grokfast
from lightning_converge.kernels import grokfast_ema, scalar
from trainers import make_trainer


class SometimesUnused(pl.LightningModule):
    """``always`` gets a gradient at every optimizer step, ``sometimes`` only at even ones."""

    def __init__(self, samples: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.always = nn.Linear(3, 4)
        self.sometimes = nn.Linear(4, 2)
        self.samples = samples

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = torch.tanh(self.always(x))
        if self.global_step % 2 == 0:
            h = self.sometimes(h)
        return h.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        x = torch.randn(self.samples, 3, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x), batch_size=2)


class RecordGrads(pl.Callback):
    """Copies of the gradients each optimizer step sees at this callback's place in the list."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


# ---------------------------------------------------------------------------
# The filters as the paper's code states them, per parameter name, one optimizer step at a time.


def ema_equations(raw_steps, alpha, lamb):
    mu, filtered = {}, []
    for step, grads in enumerate(raw_steps):
        out = {}
        for name, g in grads.items():
            mu.setdefault(name, g)  # mu starts at the first gradient
            mu[name] = alpha(step) * mu[name] + (1 - alpha(step)) * g
            out[name] = g + lamb(step) * mu[name]
        filtered.append(out)
    return filtered


def ma_equations(raw_steps, window_size, lamb, filter_type, warmup):
    windows, filtered = defaultdict(lambda: deque(maxlen=window_size)), []
    for step, grads in enumerate(raw_steps):
        out = {}
        for name, g in grads.items():
            windows[name].append(g)
            avg = sum(windows[name])
            if filter_type == "mean":
                avg = avg / len(windows[name])
            applies = not warmup or len(windows[name]) == window_size
            out[name] = g + lamb(step) * avg if applies else g
        filtered.append(out)
    return filtered


def lamb_schedule(step: int) -> float:
    return 1.0 + 0.25 * step


@pytest.mark.parametrize(
    "options, equations",
    [
        (
            dict(filter="ema", alpha=0.8, lamb=lamb_schedule),
            lambda raw: ema_equations(raw, lambda s: 0.8, lamb_schedule),
        ),
        (
            dict(filter="ma", window_size=3, lamb=2.0),
            lambda raw: ma_equations(raw, 3, lambda s: 2.0, "mean", warmup=True),
        ),
        (
            dict(filter="ma", window_size=3, lamb=lamb_schedule, filter_type="sum", warmup=False),
            lambda raw: ma_equations(raw, 3, lamb_schedule, "sum", warmup=False),
        ),
    ],
    ids=["ema", "ma-mean-warmup", "ma-sum-no-warmup"],
)
def test_callback_applies_the_filter_equations(options, equations):
    raw, filtered = RecordGrads(), RecordGrads()
    trainer = make_trainer(
        max_steps=8,
        accumulate_grad_batches=2,
        callbacks=[raw, Grokfast(backend="reference", **options), filtered],
    )
    trainer.fit(SometimesUnused())

    assert len(raw.steps) == 8
    assert "sometimes.weight" not in raw.steps[1] and "sometimes.weight" in raw.steps[2]
    expected = equations(raw.steps)
    for step, (got, want) in enumerate(zip(filtered.steps, expected)):
        assert got.keys() == want.keys(), step
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"step {step}, {name}")
    assert trainer.callback_metrics["grokfast/slow_norm"] > 0


def _kernel_inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    grads = [torch.randn(7, dtype=dtype), torch.randn(5, 3, dtype=dtype).t(), torch.randn(33, dtype=dtype)]
    slows = [torch.randn(g.shape) for g in grads]
    return grads, slows


def _run_kernel(backend, dtype, alpha, lamb):
    grads, slows = _kernel_inputs(dtype)
    grokfast_ema(grads, slows, alpha=scalar(alpha, "cpu"), lamb=scalar(lamb, "cpu"), backend=backend)
    return grads, slows


@pytest.mark.parametrize("backend", ["compiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backends_match_reference(backend, dtype):
    expected_grads, expected_slows = _run_kernel("reference", dtype, 0.9, 2.0)
    grads, slows = _run_kernel(backend, dtype, 0.9, 2.0)
    for got, want in zip(grads + slows, expected_grads + expected_slows):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def test_compiled_kernel_does_not_recompile_for_new_hyperparameters():
    _run_kernel("compiled", torch.float32, 0.9, 2.0)
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    _run_kernel("compiled", torch.float32, 0.5, 3.0)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames_before


@pytest.mark.parametrize("options", [dict(filter="ema"), dict(filter="ma", window_size=3)], ids=["ema", "ma"])
def test_resumed_run_continues_exactly(tmp_path, options):
    def fit(max_epochs, ckpt_path=None):
        callback = Grokfast(backend="reference", **options)
        trainer = make_trainer(max_epochs=max_epochs, callbacks=[callback])
        model = SometimesUnused(samples=8)
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, model, callback

    _, straight, straight_callback = fit(max_epochs=2)
    first_half, _, _ = fit(max_epochs=1)
    checkpoint = tmp_path / "half.ckpt"
    first_half.save_checkpoint(checkpoint)
    _, resumed, resumed_callback = fit(max_epochs=2, ckpt_path=checkpoint)

    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert _flatten(straight_callback.state_dict()) == _flatten(resumed_callback.state_dict())

    saved = torch.load(checkpoint, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("Grokfast")]
    names = {name for name, _ in straight.named_parameters()}
    assert set(state["slow" if options["filter"] == "ema" else "window"]) == names


def _flatten(state):
    """A comparable form of a state dict: tensors as lists."""
    if isinstance(state, dict):
        return {k: _flatten(v) for k, v in state.items()}
    return state.tolist() if isinstance(state, torch.Tensor) else state


def test_non_finite_gradients_leave_state_and_gradients_alone(monkeypatch):
    model = SometimesUnused()
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = Grokfast(backend="reference")
    callback.on_train_start(None, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    callback.on_before_optimizer_step(SimpleNamespace(global_step=0), model, optimizer)
    before = {name: slow.clone() for name, slow in callback.state_dict()["slow"].items()}

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.always.weight.grad[0, 0] = float("inf")
    callback.on_before_optimizer_step(SimpleNamespace(global_step=1), model, optimizer)

    for name, slow in callback.state_dict()["slow"].items():
        assert torch.equal(slow, before[name])
    assert torch.equal(model.always.bias.grad, torch.ones_like(model.always.bias))


def test_state_is_a_copy_not_the_live_gradient(monkeypatch):
    model = SometimesUnused()
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    callback = Grokfast(backend="reference")
    callback.on_train_start(None, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    callback.on_before_optimizer_step(SimpleNamespace(global_step=0), model, torch.optim.SGD(model.parameters()))
    before = {name: slow.clone() for name, slow in callback.state_dict()["slow"].items()}
    model.zero_grad(set_to_none=False)
    for name, slow in callback.state_dict()["slow"].items():
        assert torch.equal(slow, before[name])


def test_loading_state_of_another_filter_raises():
    with pytest.raises(ValueError, match="filter="):
        Grokfast(filter="ma").load_state_dict(Grokfast(filter="ema").state_dict())


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=lambda step: 1.5), "alpha"),
        (dict(lamb=lambda step: float("inf")), "lamb"),
        (dict(window_size=0), "window_size"),
        (dict(filter="median"), "filter"),
        (dict(filter_type="max"), "filter_type"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Grokfast(**kwargs)


SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def onebit_grokfast_runs(tmp_path_factory):
    """tests/scripts/ddp_fit.py's 1-bit Adam + Grokfast runs on 4 ranks, then on 2 (which also resume
    the 4-rank checkpoint): world size -> each rank's runs, and the 2-rank launch's output."""
    out_dir = tmp_path_factory.mktemp("onebit_grokfast")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    runs = {}
    for world_size, extra in ((4, []), (2, [str(out_dir / "onebit_grokfast_4.ckpt")])):
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "ddp_fit.py"), str(out_dir), "onebit_grokfast", str(world_size), *extra],
            env=env, timeout=600, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        runs[world_size] = [torch.load(out_dir / f"onebit_grokfast_{world_size}_rank{r}.pt") for r in range(world_size)]
        runs[f"log{world_size}"] = done.stdout + done.stderr
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_per_rank_state_under_onebit_adam_resumes_exactly(onebit_grokfast_runs, world_size):
    # After freeze_step each rank filters its own gradients: the filters differ between ranks, and a
    # checkpoint saved after the first epoch gives every rank its own back.
    ranks = onebit_grokfast_runs[world_size]
    for rank in ranks:
        assert rank["resumed"]["filtered_at_start"] == len(rank["straight"]["grokfast"]["slow"]) > 0
        for p, q in zip(rank["resumed"]["params"], rank["straight"]["params"]):
            assert torch.equal(p, q)
        assert _flatten(rank["resumed"]["grokfast"]) == _flatten(rank["straight"]["grokfast"])
        assert all(torch.equal(p, q) for p, q in zip(rank["straight"]["params"], ranks[0]["straight"]["params"]))
    slows = [rank["straight"]["grokfast"]["slow"] for rank in ranks]
    assert all(_flatten(slow) != _flatten(slows[0]) for slow in slows[1:])


@pytest.mark.distributed
def test_per_rank_state_saved_by_another_number_of_ranks_starts_afresh_with_a_warning(onebit_grokfast_runs):
    assert "saved by 4 ranks and is resumed by 2: it starts afresh" in onebit_grokfast_runs["log2"]
    for rank in onebit_grokfast_runs[2]:
        assert rank["other_world_size"]["filtered_at_start"] == 0  # Grokfast's filter starts afresh
