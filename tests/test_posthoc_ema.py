"""Post-hoc EMA (Karras et al., EDM2): the power-function EMA against its closed form, sigma_rel <-> gamma and the
least-squares coefficients against the paper's equations and ema-pytorch, reconstruction against a directly
tracked profile, no host sync per update, resume, evaluation of a sweep, DiLoCo, DDP with two processes, YAML,
bad arguments."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ema_pytorch import post_hoc_ema as ema_pytorch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_gpu_path import _assert_steady_and_sync_free, no_host_reads
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import EMA, PostHocEMA
from lightning_converge.callbacks.posthoc_ema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_weights
from lightning_converge.strategies import DiLoCoStrategy

SCRIPTS = Path(__file__).parent / "scripts"


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    return DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4), DataLoader(TensorDataset(x[8:], y[8:]), batch_size=8)


STEPS_PER_EPOCH = 2  # 2 batches of 4 samples


def make_trainer(tmp_path, callbacks: list[Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=0 if kwargs.pop("validate", False) is False else None,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def fit(tmp_path, callbacks: list[Callback], max_epochs: int, ckpt_path: Optional[str] = None, **kwargs: Any):
    torch.manual_seed(0)
    model = Regression()
    trainer = make_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(model, *loaders(), ckpt_path=ckpt_path)
    return model, trainer


class Recorder(Callback):
    """The live parameters after every optimizer step, in fp64: ``after_step[tau - 1]`` after step ``tau``."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > len(self.after_step):
            self.after_step.append({name: p.detach().double().clone() for name, p in pl_module.named_parameters()})


def profile_weights(t: int, gamma: float, steps: int) -> Tensor:
    """The weight of the parameters after each step tau = 1..steps in the power-function EMA after t updates,
    unrolled from beta_tau = (1 - 1/tau) ** (gamma + 1): (tau**(gamma+1) - (tau-1)**(gamma+1)) / t**(gamma+1),
    zero past t (the paper's equation for the discrete profile)."""
    tau = torch.arange(1, steps + 1, dtype=torch.float64)
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return torch.where(tau <= t, weights, torch.zeros(()))


def combine(weights: Tensor, trajectory: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {name: sum(w * step[name] for w, step in zip(weights.tolist(), trajectory)) for name in trajectory[0]}


def profile(callback: PostHocEMA, index: int) -> dict[str, Tensor]:
    return {name: tensor.clone() for name, tensor in callback.state_dict()["profiles"][index].items()}


# -- the math -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.15, 0.25, 0.30])
def test_sigma_rel_to_gamma_matches_the_paper_and_ema_pytorch(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(ema_pytorch.sigma_rel_to_gamma(sigma_rel), rel=1e-12)
    # The paper's equation 3 written out: sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3)).
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-10)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    # The paper's own example: sigma_rel 0.10 <-> gamma 6.94.
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


def test_least_squares_coefficients_match_ema_pytorch() -> None:
    steps = [10.0, 20.0, 30.0, 40.0]
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.15)]
    t_i = [t for t in steps for _ in gammas]
    gamma_i = [g for _ in steps for g in gammas]
    ours = solve_weights(t_i, gamma_i, 40.0, sigma_rel_to_gamma(0.10))
    theirs = ema_pytorch.solve_weights(
        torch.tensor(t_i), torch.tensor(gamma_i), torch.tensor([40.0]), torch.tensor([sigma_rel_to_gamma(0.10)])
    ).squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_profiles_follow_the_power_function_ema_under_gradient_accumulation(tmp_path, precision: str) -> None:
    posthoc, recorder = PostHocEMA(sigma_rels=(0.05, 0.2), every_n_steps=3, backend="reference"), Recorder()
    model, trainer = fit(tmp_path, [recorder, posthoc], max_epochs=4, accumulate_grad_batches=2, precision=precision)
    steps = trainer.global_step
    assert steps == 4 == len(recorder.after_step)  # one optimizer step per 2 batches
    assert {p.dtype for p in model.parameters()} == {torch.float32 if precision == "32-true" else torch.bfloat16}
    for index, sigma_rel in enumerate((0.05, 0.2)):
        tracked = profile(posthoc, index)
        assert {tensor.dtype for tensor in tracked.values()} == {torch.float32}
        expected = combine(profile_weights(steps, sigma_rel_to_gamma(sigma_rel), steps), recorder.after_step)
        for name, tensor in expected.items():
            torch.testing.assert_close(tracked[name].double(), tensor, rtol=1e-5, atol=1e-6)
    # every_n_steps=3: a snapshot after step 3, and one when training ended, after step 4.
    assert posthoc.snapshot_steps == [3, 4]
    assert posthoc.state_dict()["num_updates"] == 4
    # The fitted model keeps its live weights (keep_average_on_train_end=False by default).
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().double(), recorder.after_step[-1][name])


def test_an_update_builds_no_host_tensors_and_reads_nothing_back(tmp_path, monkeypatch) -> None:
    """Every profile's update between snapshots (beta_t changes every step): no tensor made from a Python
    number, nothing read back to the host, the same aten calls every step (the checks of test_gpu_path)."""
    posthoc = PostHocEMA(every_n_steps=1000, backend="reference")
    per_step = []
    hook = posthoc.on_train_batch_end

    def guarded(trainer, pl_module, *args):
        if trainer.global_step <= 1:  # the first update also collects the tracked tensors
            return hook(trainer, pl_module, *args)
        with monkeypatch.context() as patch:
            patch.setattr(pl_module, "log", lambda *a, **k: None)  # Lightning's logging is not the update
            with no_host_reads(monkeypatch) as ops:
                hook(trainer, pl_module, *args)
        per_step.append(ops)

    monkeypatch.setattr(posthoc, "on_train_batch_end", guarded)
    fit(tmp_path, [posthoc], max_epochs=3)
    assert len(per_step) == 3 * STEPS_PER_EPOCH - 1
    _assert_steady_and_sync_free(per_step)


def test_non_finite_live_weights_are_left_out_and_warned_about(tmp_path) -> None:
    class PoisonAtSecondStep(Callback):
        """Puts a NaN in one weight after the second optimizer step, before PostHocEMA sees it."""

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2 and pl_module.net[0].weight[0, 0].isfinite():
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    posthoc = PostHocEMA(every_n_steps=1, backend="reference")
    with pytest.warns(UserWarning, match="inf or NaN"):
        fit(tmp_path, [PoisonAtSecondStep(), posthoc], max_epochs=2)
    for index in range(2):
        assert all(torch.isfinite(tensor).all() for tensor in profile(posthoc, index).values())
        # The poisoned element kept its value after step 1 (the snapshot then) from step 2 on.
        after_step_1 = posthoc.state_dict()["snapshots"][0]["profiles"][index]["net.0.weight"][0, 0]
        assert profile(posthoc, index)["net.0.weight"][0, 0] == after_step_1


def test_reconstruction_equals_a_directly_tracked_profile_within_the_fit_error(tmp_path) -> None:
    every, epochs = 2, 20
    snapshots = PostHocEMA(sigma_rels=(0.05, 0.20), every_n_steps=every, validate_with="live", backend="reference")
    on_disk = PostHocEMA(
        sigma_rels=(0.05, 0.20),
        every_n_steps=every,
        snapshot_dir=tmp_path / "snapshots",
        validate_with="live",
        backend="reference",
    )
    direct = PostHocEMA(sigma_rels=(0.10, 0.15), every_n_steps=1000, validate_with="live", backend="reference")
    recorder = Recorder()
    fit(tmp_path, [recorder, snapshots, on_disk, direct], max_epochs=epochs)
    steps = epochs * STEPS_PER_EPOCH
    assert snapshots.snapshot_steps == list(range(every, steps + 1, every))

    reconstructed = snapshots.reconstruct(0.10)
    tracked = profile(direct, 0)
    # Snapshots on disk (written by this rank 0) give the same reconstruction as snapshots in memory.
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == sorted(
        f"step={t}.pt" for t in snapshots.snapshot_steps
    )
    for name, tensor in on_disk.reconstruct(0.10).items():
        assert torch.equal(tensor, reconstructed[name])

    # The method's error: the reconstruction is sum_j x_j snapshot_j, whose weight on the parameters after
    # step tau is p_hat(tau) = sum_j x_j w_j(tau); the profile tracked directly weighs them by w(tau). So
    # |reconstructed - tracked| <= sum_tau |p_hat(tau) - w(tau)| |theta_tau| elementwise, plus fp32 rounding
    # of the updates and of the sum (sum_j |x_j| times a few ulps of the largest weight). x from ema-pytorch.
    t_i = [float(t) for t in snapshots.snapshot_steps for _ in range(2)]
    gamma_i = [sigma_rel_to_gamma(s) for _ in snapshots.snapshot_steps for s in (0.05, 0.20)]
    x = ema_pytorch.solve_weights(
        torch.tensor(t_i), torch.tensor(gamma_i), torch.tensor([float(steps)]), torch.tensor([sigma_rel_to_gamma(0.10)])
    ).squeeze(-1)
    p_hat = sum(xj * profile_weights(int(t), g, steps) for xj, t, g in zip(x.tolist(), t_i, gamma_i))
    p_direct = profile_weights(steps, sigma_rel_to_gamma(0.10), steps)
    profile_error = (p_hat - p_direct).abs()
    assert profile_error.sum() < 0.01  # the fit itself is good (0.1% here): within 1% of the profile's mass
    rounding = x.abs().sum().item() * 1e-6
    for name, tensor in tracked.items():
        largest = max(step[name].abs().max() for step in recorder.after_step)
        bound = sum(e * step[name].abs() for e, step in zip(profile_error.tolist(), recorder.after_step))
        error = (reconstructed[name].double() - tensor.double()).abs()
        assert (error <= bound + rounding * largest).all(), name

    # ... and it is much closer to the directly tracked 0.10 than either tracked profile is.
    def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        return sum((a[n].double() - b[n].double()).norm() ** 2 for n in a).sqrt().item()

    for index in range(2):
        assert distance(reconstructed, tracked) < 0.1 * distance(profile(snapshots, index), tracked)


@pytest.mark.parametrize(
    "saved_after_fit, on_disk", [(False, False), (True, False), (True, True)], ids=["during_fit", "after_fit", "disk"]
)
def test_resumed_run_continues_exactly(tmp_path, saved_after_fit: bool, on_disk: bool) -> None:
    def posthoc(name: str) -> PostHocEMA:
        directory = tmp_path / name / "snapshots" if on_disk else None
        return PostHocEMA(every_n_steps=4, snapshot_dir=directory, backend="reference")

    uninterrupted = posthoc("full")
    full_model, _ = fit(tmp_path / "full", [uninterrupted], max_epochs=6, validate=True)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = posthoc("first")
    _, trainer = fit(
        tmp_path / "first", [first] if saved_after_fit else [first, checkpoint], max_epochs=3, validate=True
    )
    path = str(tmp_path / "after_fit.ckpt") if saved_after_fit else checkpoint.last_model_path
    if saved_after_fit:
        trainer.save_checkpoint(path)
        assert first.snapshot_steps == [4, 6]  # the last one where training ended, off the grid
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 6 and "posthoc_ema_state_dict" in saved

    resumed = posthoc("first")
    resumed_model, _ = fit(tmp_path / "second", [resumed], max_epochs=6, ckpt_path=path, validate=True)
    for (name, a), b in zip(resumed_model.named_parameters(), full_model.parameters()):
        assert torch.equal(a, b), name
    assert resumed.snapshot_steps == uninterrupted.snapshot_steps == [4, 8, 12]
    for index in range(2):
        for name, tensor in profile(uninterrupted, index).items():
            assert torch.equal(profile(resumed, index)[name], tensor), name
    expected = uninterrupted.reconstruct(0.07)
    for name, tensor in resumed.reconstruct(0.07).items():
        assert torch.equal(tensor, expected[name]), name


def test_evaluate_validates_each_reconstruction_and_puts_the_live_weights_back(tmp_path) -> None:
    posthoc = PostHocEMA(every_n_steps=2, backend="reference")
    model, trainer = fit(tmp_path, [posthoc], max_epochs=5, validate=True)
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, val = loaders()
    sweep = (0.03, 0.08, 0.2)
    results = posthoc.evaluate(trainer, model, sweep, metric="val_loss", dataloaders=val)

    assert list(results) == list(sweep)
    x, y = next(iter(val))
    for sigma_rel in sweep:
        by_hand = copy.deepcopy(model)
        by_hand.load_state_dict(posthoc.reconstruct(sigma_rel), strict=False)
        assert results[sigma_rel] == pytest.approx(F.mse_loss(by_hand.net(x), y).item(), rel=1e-6)
    assert len(set(results.values())) == len(sweep)
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name]), name
    # Inside swap_in, the module itself holds the reconstruction.
    with posthoc.swap_in(model, 0.08):
        assert F.mse_loss(model.net(x), y).item() == pytest.approx(results[0.08], rel=1e-6)
    with pytest.raises(ValueError, match="metric must be one of"):
        posthoc.evaluate(trainer, model, [0.1], metric="val_acc", dataloaders=val)


def test_validation_during_fit_sees_the_first_profile_and_composes_with_ema(tmp_path) -> None:
    seen: list[dict[str, Tensor]] = []

    class AtValidation(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append({name: p.detach().clone() for name, p in pl_module.named_parameters()})

    posthoc = PostHocEMA(sigma_rels=(0.1, 0.2), backend="reference")
    ema = EMA(decay=0.9, validate_with="live", keep_average_on_train_end=False, backend="reference")
    fit(tmp_path, [posthoc, ema, AtValidation()], max_epochs=1, validate=True)
    for name, tensor in profile(posthoc, 0).items():
        assert torch.equal(seen[-1][name], tensor), name


@pytest.mark.usefixtures("single_process_group")
def test_under_diloco_the_profiles_follow_the_global_parameters(tmp_path) -> None:
    class GlobalRecorder(Callback):
        """The strategy's global parameters after every optimizer step (outer steps every 3)."""

        def __init__(self) -> None:
            self.after_step: list[dict[str, Tensor]] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            names = [name for name, _ in pl_module.named_parameters()]
            agreed = trainer.strategy.agreed_parameters()
            self.after_step.append({name: p.detach().double().clone() for name, p in zip(names, agreed)})

    strategy = DiLoCoStrategy(inner_steps=3, outer_lr=0.7, outer_momentum=0.9)
    posthoc, recorder = PostHocEMA(sigma_rels=(0.05, 0.2), every_n_steps=3, backend="reference"), GlobalRecorder()
    _, trainer = fit(tmp_path, [recorder, posthoc], max_epochs=4, strategy=strategy)
    steps = trainer.global_step
    assert steps == 8
    # What the profiles followed moved only at the outer steps, after steps 3 and 6 (the worker's own
    # parameters move at every step): the global parameters.
    changed = [
        tau + 1
        for tau in range(1, steps)
        if any(not torch.equal(recorder.after_step[tau][n], t) for n, t in recorder.after_step[tau - 1].items())
    ]
    assert changed == [3, 6]
    for index, sigma_rel in enumerate((0.05, 0.2)):
        expected = combine(profile_weights(steps, sigma_rel_to_gamma(sigma_rel), steps), recorder.after_step)
        for name, tensor in profile(posthoc, index).items():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_ddp_two_processes_agree_and_rank_zero_writes_the_snapshots(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "posthoc_ema_fit.py"), str(tmp_path)], check=True, env=env, timeout=600
    )
    ranks = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob("rank*.pt"))]
    assert [rank["rank"] for rank in ranks] == [0, 1]
    # Snapshot files: written by rank 0 only, read by both.
    assert ranks[0]["saved"] == ["step=2.pt", "step=4.pt", "step=6.pt"] and ranks[1]["saved"] == []
    for rank in ranks:
        assert rank["snapshot_steps"] == [2, 4, 6]
        for name, tensor in rank["reconstructed_in_memory"].items():  # the same from disk as from memory
            assert torch.equal(rank["reconstructed_on_disk"][name], tensor), name
    for key in ("profiles", "reconstructed_on_disk", "params"):
        for name, tensor in ranks[0][key].items():
            assert torch.equal(ranks[1][key][name], tensor), (key, name)
    assert ranks[0]["evaluated"] == ranks[1]["evaluated"]
    assert len(ranks[0]["evaluated"]) == 2


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: PostHocEMA(sigma_rels=(0.1,)), "sigma_rels"),
        (lambda: PostHocEMA(sigma_rels=0.1), "sigma_rels"),
        (lambda: PostHocEMA(sigma_rels=(0.1, 0.1)), "sigma_rels"),
        (lambda: PostHocEMA(sigma_rels=(0.1, 0.4)), "sigma_rels"),
        (lambda: PostHocEMA(sigma_rels=(0.0, 0.1)), "sigma_rels"),
        (lambda: PostHocEMA(sigma_rels=(0.1, "0.2")), "sigma_rels"),
        (lambda: PostHocEMA(every_n_steps=0), "every_n_steps"),
        (lambda: PostHocEMA(snapshot_dtype="int8"), "snapshot_dtype"),
        (lambda: PostHocEMA(validate_with="best"), "validate_with"),
        (lambda: PostHocEMA(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{argument} must be"):
        make()


def test_reconstruct_rejects_bad_requests(tmp_path) -> None:
    posthoc = PostHocEMA(every_n_steps=2, backend="reference")
    with pytest.raises(RuntimeError, match="no snapshots"):
        posthoc.reconstruct(0.1)
    fit(tmp_path, [posthoc], max_epochs=2)
    with pytest.raises(ValueError, match=r"\bsigma_rel must be"):
        posthoc.reconstruct(0.5)
    for step in (1, 5):  # snapshots at steps 2 and 4
        with pytest.raises(ValueError, match=r"\bstep must be an integer in \[2, 4\]"):
            posthoc.reconstruct(0.1, step=step)
    resumed = PostHocEMA(sigma_rels=(0.05, 0.2))
    with pytest.raises(ValueError, match="same sigma_rels"):
        resumed.load_state_dict(posthoc.state_dict())


def test_evaluate_refuses_another_callback_that_evaluates_with_its_average(tmp_path) -> None:
    posthoc = PostHocEMA(every_n_steps=2, validate_with="live", backend="reference")
    model, trainer = fit(tmp_path, [posthoc, EMA(decay=0.9, keep_average_on_train_end=False)], max_epochs=1)
    with pytest.raises(ValueError, match="validate_with='live'"):
        posthoc.evaluate(trainer, model, [0.1], dataloaders=loaders()[1])


def test_yaml_config_builds_the_callback(tmp_path, monkeypatch) -> None:
    from lightning_converge.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples.digits resolves from the project root
    monkeypatch.setattr(sys, "argv", ["lightning-converge"])
    config = tmp_path / "posthoc.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  limit_val_batches: 1
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_converge.callbacks.PostHocEMA
      init_args:
        sigma_rels: [0.04, 0.12]
        every_n_steps: 2
        snapshot_dir: {tmp_path / "snapshots"}
        snapshot_dtype: bfloat16
model:
  class_path: examples.digits.DigitsClassifier
data:
  class_path: examples.digits.Digits
""")
    main(["fit", "--config", str(config)])
    snapshot = torch.load(tmp_path / "snapshots" / "step=4.pt", weights_only=True)
    assert snapshot["sigma_rels"] == [0.04, 0.12] and sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "step=2.pt",
        "step=4.pt",
    ]
    assert {tensor.dtype for profile in snapshot["profiles"] for tensor in profile.values()} == {torch.bfloat16}
