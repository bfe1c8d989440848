"""Weight averaging: the ema_update kernel's backends, and the EMA / LAWA callbacks in tiny Lightning fits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import EMA, LAWA
from lightning_converge.kernels import ema_update

# -- the kernel -------------------------------------------------------------------------

# Odd sizes; 1025 spans two triton blocks.
SHAPES = [(7,), (3, 5), (1025,), (1,), (0,)]
# (average dtype, current dtype): fp32 averages for fp32 or bf16 weights, and all-bf16.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


def random_lists(seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Averages and currents of every dtype pair and shape, in one list each (one fused call)."""
    generator = torch.Generator().manual_seed(seed)
    averages, currents = [], []
    for average_dtype, current_dtype in DTYPE_PAIRS:
        for shape in SHAPES:
            averages.append(torch.randn(shape, generator=generator).to(average_dtype))
            currents.append(torch.randn(shape, generator=generator).to(current_dtype))
    return averages, currents


def run_kernel(backend: str, decay: float) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of one ``ema_update`` call on fresh random lists."""
    averages, currents = random_lists()
    inputs = [average.clone() for average in averages]
    ema_update(averages, currents, decay=torch.tensor(decay), backend=backend)
    return inputs, averages


@pytest.mark.parametrize("backend", ["compiled", "triton"])
@pytest.mark.parametrize("decay", [0.0, 0.9, 1.0])
def test_ema_update_backends_match_reference(backend: str, decay: float) -> None:
    _, expected = run_kernel("reference", decay)
    _, actual = run_kernel(backend, decay)
    for want, got in zip(expected, actual):
        assert got.dtype == want.dtype
        # bf16 averages round once, in one backend or the other: one bf16 ulp apart at most.
        tolerance = 1e-2 if got.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_ema_update_is_exact_at_both_ends(backend: str) -> None:
    inputs, kept = run_kernel(backend, decay=1.0)
    for before, after in zip(inputs, kept):
        assert torch.equal(before, after)
    _, copied = run_kernel(backend, decay=0.0)
    _, currents = random_lists()
    for average, current in zip(copied, currents):
        assert torch.equal(average, current.to(average.dtype))


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_ema_update_leaves_non_finite_currents_out(backend: str) -> None:
    averages, currents = random_lists()
    for current in currents:
        flat = current.view(-1)
        flat[0::3] = float("nan")
        flat[1::5] = float("inf")
        flat[2::7] = -float("inf")
    before = [average.clone() for average in averages]
    ema_update(averages, currents, decay=torch.tensor(0.75), backend=backend)
    for old, new, current in zip(before, averages, currents):
        finite = torch.isfinite(current)
        # The elementwise recurrence written out, in fp32, then rounded to the average's dtype.
        expected = torch.where(finite, 0.75 * old.float() + 0.25 * current.float(), old.float()).to(old.dtype)
        tolerance = 1e-2 if old.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(new, expected, rtol=tolerance, atol=tolerance)
        assert torch.equal(new[~finite], old[~finite])


def test_ema_update_compiled_does_not_recompile_for_a_new_decay() -> None:
    averages, currents = random_lists()
    ema_update(averages, currents, decay=torch.tensor(0.5), backend="compiled")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for decay in (0.9, 0.99):
        ema_update(averages, currents, decay=torch.tensor(decay), backend="compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# -- tiny Lightning runs ----------------------------------------------------------------

STEPS_PER_EPOCH = 2  # 4 batches of 4 samples, accumulate_grad_batches=2


class TinyModel(pl.LightningModule):
    """Linear -> BatchNorm (floating and integer buffers) -> Linear, SGD with momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tiny_model_hook_ran"] = True


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    train = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4)
    val = DataLoader(TensorDataset(x[16:], y[16:]), batch_size=4)
    return train, val


def fit(
    tmp_path, callbacks: list[Callback], max_epochs: int, ckpt_path: str | None = None, seed: int = 0
) -> tuple[TinyModel, pl.Trainer]:
    torch.manual_seed(seed)
    model = TinyModel()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, trainer


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_weights_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, msg=lambda m: f"{name}: {m}")


def assert_weights_differ(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert any(not torch.equal(actual[name], tensor) for name, tensor in expected.items())


class Recorder(Callback):
    """Copies of the model's weights at the moments the tests look at."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, Tensor]] = []  # [0]: before training; [n]: after optimizer step n
        self.last_train_batch: list[dict[str, Tensor]] = []  # per epoch, at the end of its last batch
        self.in_validation: list[dict[str, Tensor]] = []  # per validation run, at its first batch
        self.epoch_end: list[dict[str, Tensor]] = []  # per epoch, at on_train_epoch_end

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after_step.append(weights(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == len(self.after_step):
            self.after_step.append(weights(pl_module))
        if trainer.is_last_batch:
            self.last_train_batch.append(weights(pl_module))

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.in_validation.append(weights(pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_end.append(weights(pl_module))


def ema_averages(ema: EMA) -> dict[str, Tensor]:
    return {name: average.clone() for name, average in ema.state_dict()["averages"].items()}


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_ema_follows_the_recurrence_under_gradient_accumulation(tmp_path, backend: str) -> None:
    def warmup(update: int) -> float:  # EMAWarmup-style: 1 - (1 + update) ** -power, capped
        return min(0.95, 1 - (1 + update) ** -0.75)

    start_step, every_n_steps = 1, 2
    ema = EMA(
        decay=warmup,
        every_n_steps=every_n_steps,
        start_step=start_step,
        include_buffers=True,
        keep_average_on_train_end=False,
        backend=backend,
    )
    recorder = Recorder()
    _, trainer = fit(tmp_path, [recorder, ema], max_epochs=3)

    assert trainer.global_step == 3 * STEPS_PER_EPOCH == len(recorder.after_step) - 1
    averaged = ema_averages(ema)
    assert "net.1.running_mean" in averaged and "net.1.num_batches_tracked" not in averaged
    expected = {name: recorder.after_step[0][name].float() for name in averaged}
    updates = 0
    for step, live in enumerate(recorder.after_step[1:], start=1):
        if step <= start_step:
            expected = {name: live[name].float() for name in averaged}
        elif step % every_n_steps == 0:
            decay = warmup(updates)
            expected = {name: decay * expected[name] + (1 - decay) * live[name] for name in averaged}
            updates += 1
    assert_weights_equal(averaged, expected)
    assert ema.state_dict()["num_updates"] == updates == 3
    assert trainer.callback_metrics["ema/decay"].item() == pytest.approx(warmup(updates - 1))


def test_validation_sees_the_average_and_training_resumes_live(tmp_path) -> None:
    ema = EMA(decay=0.5, backend="reference")

    class AverageAtValidation(Callback):
        def __init__(self) -> None:
            self.averages: list[dict[str, Tensor]] = []

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.averages.append(ema_averages(ema))

    recorder, at_validation = Recorder(), AverageAtValidation()
    model, _ = fit(tmp_path, [ema, recorder, at_validation], max_epochs=2)

    assert len(recorder.in_validation) == 2
    for epoch in range(2):
        seen = {name: recorder.in_validation[epoch][name] for name in at_validation.averages[epoch]}
        assert_weights_equal(seen, at_validation.averages[epoch])
        assert_weights_differ(seen, recorder.last_train_batch[epoch])
        assert_weights_equal(recorder.epoch_end[epoch], recorder.last_train_batch[epoch])
    # keep_average_on_train_end: the fitted model holds the average.
    assert_weights_equal(dict(model.named_parameters()), ema_averages(ema))


def test_resumed_run_continues_exactly(tmp_path) -> None:
    def ema() -> EMA:
        return EMA(decay=0.7, start_step=1, include_buffers=True, keep_average_on_train_end=False, backend="reference")

    uninterrupted = ema()
    full_model, _ = fit(tmp_path / "full", [uninterrupted], max_epochs=4)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", [ema(), checkpoint], max_epochs=2)
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert saved["global_step"] == 2 * STEPS_PER_EPOCH and "ema_state_dict" in saved

    resumed = ema()
    resumed_model, _ = fit(tmp_path / "second", [resumed], max_epochs=4, ckpt_path=checkpoint.last_model_path)
    assert_weights_equal(weights(resumed_model), weights(full_model))
    assert_weights_equal(ema_averages(resumed), ema_averages(uninterrupted))
    assert resumed.state_dict()["num_updates"] == uninterrupted.state_dict()["num_updates"] == 4 * STEPS_PER_EPOCH - 1


AVERAGING_CALLBACKS = {
    "ema": lambda: EMA(decay=0.7, include_buffers=True, backend="reference"),
    "sema": lambda: EMA(decay=0.7, switch_every_epoch=True, backend="reference"),
    "lawa": lambda: LAWA(k=2, every_n_steps=1, include_buffers=True),
}


def averaged_weights(callback: EMA | LAWA) -> dict[str, Tensor]:
    return {name: tensor.clone() for name, tensor in zip(callback._names, callback._average())}


@pytest.mark.parametrize("saved_after_fit", [True, False], ids=["after_fit", "during_fit"])
@pytest.mark.parametrize("name", AVERAGING_CALLBACKS)
def test_checkpoint_resumes_live_weights_and_loads_the_average(tmp_path, name: str, saved_after_fit: bool) -> None:
    # keep_average_on_train_end (the default): the fitted model is the average. A checkpoint taken by
    # hand after fit, or by ModelCheckpoint at the end of the last epoch, must resume from the live weights.
    make = AVERAGING_CALLBACKS[name]
    uninterrupted, recorder = make(), Recorder()
    full_model, _ = fit(tmp_path / "full", [uninterrupted, recorder], max_epochs=4)

    callbacks = [make()]
    if not saved_after_fit:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    first_model, trainer = fit(tmp_path / "first", callbacks, max_epochs=2)
    path = tmp_path / "ckpt" / "last.ckpt"
    if saved_after_fit:
        trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    # for inference: the averaged weights, as Lightning loads them
    loaded = TinyModel.load_from_checkpoint(path)
    assert_weights_equal(weights(loaded), {**saved["live_state_dict"], **averaged_weights(callbacks[0])})
    if name != "sema":  # SEMA switched the live weights to the average at the last epoch end
        assert_weights_differ(saved["state_dict"], saved["live_state_dict"])
    if saved_after_fit:
        assert_weights_equal(weights(loaded), weights(first_model))  # the fitted model

    resumed, resumed_recorder = make(), Recorder()
    resumed_model, _ = fit(tmp_path / "second", [resumed, resumed_recorder], max_epochs=4, ckpt_path=str(path))
    assert_weights_equal(resumed_recorder.epoch_end[-1], recorder.epoch_end[-1])  # the live weights
    assert_weights_equal(averaged_weights(resumed), averaged_weights(uninterrupted))
    assert_weights_equal(weights(resumed_model), weights(full_model))  # the average, in the fitted model


def test_validating_a_checkpoint_evaluates_its_model_not_the_live_weights(tmp_path) -> None:
    # Saved after fit with keep_average_on_train_end: state_dict is the average. validate(ckpt_path=...)
    # evaluates it, even with validate_with="live" (the live weights are for resuming fit only).
    _, trainer = fit(tmp_path, [EMA(decay=0.5, validate_with="live", backend="reference")], max_epochs=2)
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    recorder = Recorder()
    validator = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMA(decay=0.5, validate_with="live", backend="reference"), recorder],
    )
    validator.validate(TinyModel(), loaders()[1], ckpt_path=path)
    assert_weights_equal(recorder.in_validation[0], saved["state_dict"])
    assert_weights_differ(recorder.in_validation[0], saved["live_state_dict"])


def test_only_one_averaging_callback_can_keep_its_average_on_train_end(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep_average_on_train_end=False"):
        fit(tmp_path, [EMA(backend="reference"), LAWA(validate_with="live")], max_epochs=1)


def test_save_weights_only_checkpoint_holds_the_average(tmp_path) -> None:
    ema = EMA(decay=0.6, keep_average_on_train_end=False, backend="reference")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=True)
    model, trainer = fit(tmp_path, [ema, checkpoint], max_epochs=2)

    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert "callbacks" not in saved and "optimizer_states" not in saved
    assert saved["tiny_model_hook_ran"]  # the module's own on_save_checkpoint still runs
    assert_weights_equal(saved["ema_state_dict"], ema_averages(ema))
    # the model evaluation uses is the one Lightning loads; weights-only: no live weights to resume from
    assert_weights_equal(saved["state_dict"], ema_averages(ema))
    assert_weights_differ(saved["state_dict"], weights(model))
    assert "live_state_dict" not in saved
    TinyModel().load_state_dict(saved["ema_state_dict"])  # a complete, strictly loadable state dict
    assert "on_save_checkpoint" not in vars(model)  # the stand-in hook is gone after fit...
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")  # ...and the callback's own hook serves full checkpoints
    after_fit = torch.load(tmp_path / "after_fit.ckpt", weights_only=True)
    assert_weights_equal(after_fit["ema_state_dict"], ema_averages(ema))


def test_checkpoint_saved_during_validation_keeps_live_weights_beside_the_average(tmp_path) -> None:
    ema = EMA(decay=0.5, keep_average_on_train_end=False, backend="reference")
    path = tmp_path / "during_validation.ckpt"

    class SaveDuringValidation(Callback):
        def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            trainer.save_checkpoint(path)

    recorder = Recorder()
    fit(tmp_path, [ema, recorder, SaveDuringValidation()], max_epochs=1)
    saved = torch.load(path, weights_only=True)
    assert_weights_equal(saved["state_dict"], ema_averages(ema))
    assert_weights_equal(saved["ema_state_dict"], ema_averages(ema))
    assert_weights_equal(saved["live_state_dict"], recorder.last_train_batch[0])


def test_each_fit_starts_a_new_average(tmp_path) -> None:
    ema = EMA(decay=1.0, keep_average_on_train_end=False, backend="reference")  # decay 1: the average stays put
    for seed in (0, 1):
        recorder = Recorder()
        fit(tmp_path, [ema, recorder], max_epochs=1, seed=seed)
        assert_weights_equal(ema_averages(ema), {name: recorder.after_step[0][name] for name in ema_averages(ema)})


def test_switch_ema_copies_the_average_into_the_model_every_epoch(tmp_path) -> None:
    ema = EMA(decay=0.5, switch_every_epoch=True, keep_average_on_train_end=False, backend="reference")

    class AverageAtEpochEnd(Callback):
        def __init__(self) -> None:
            self.averages: list[dict[str, Tensor]] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.averages.append(ema_averages(ema))

    recorder, at_epoch_end = Recorder(), AverageAtEpochEnd()
    fit(tmp_path, [ema, recorder, at_epoch_end], max_epochs=2)
    for epoch in range(2):
        switched = {name: recorder.epoch_end[epoch][name] for name in at_epoch_end.averages[epoch]}
        assert_weights_equal(switched, at_epoch_end.averages[epoch])
        assert_weights_differ(switched, recorder.last_train_batch[epoch])


def test_ema_leaves_non_finite_weights_out_and_warns(tmp_path) -> None:
    ema = EMA(decay=0.5, keep_average_on_train_end=False, validate_with="live", backend="reference")

    class PoisonAtSecondStep(Callback):
        """Puts a NaN in one weight after the second optimizer step, before the EMA sees it."""

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2 and pl_module.net[0].weight[0, 0].isfinite():
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    class AverageAfterStep(Callback):
        """The average after each optimizer step (runs after the EMA)."""

        def __init__(self) -> None:
            self.averages: dict[int, dict[str, Tensor]] = {}

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.averages[trainer.global_step] = ema_averages(ema)

    after = AverageAfterStep()
    with pytest.warns(UserWarning, match="inf or NaN"):
        fit(tmp_path, [PoisonAtSecondStep(), ema, after], max_epochs=2)
    final = ema_averages(ema)
    assert all(torch.isfinite(average).all() for average in final.values())
    # The poisoned element stopped at its value after step 1; NaN spread to every weight at step 3,
    # so from then on nothing moved: the average after step 2 is the final one.
    assert final["net.0.weight"][0, 0] == after.averages[1]["net.0.weight"][0, 0]
    assert_weights_equal(final, after.averages[2])
    assert_weights_differ(after.averages[2], after.averages[1])


def test_lawa_evaluates_the_mean_of_the_latest_epoch_snapshots(tmp_path) -> None:
    k = 2
    lawa = LAWA(k=k)
    recorder = Recorder()
    model, _ = fit(tmp_path, [lawa, recorder], max_epochs=3)

    def mean(snapshots: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {name: torch.stack([s[name] for s in snapshots]).mean(dim=0) for name, _ in model.named_parameters()}

    for epoch in range(3):
        # The epoch's own snapshot is taken at its last batch, before its validation.
        expected = mean(recorder.epoch_end[max(0, epoch - k + 1) : epoch + 1])
        assert_weights_equal(recorder.in_validation[epoch], expected)
    snapshots = lawa.state_dict()["snapshots"]
    assert len(snapshots) == k
    for snapshot, live in zip(snapshots, recorder.epoch_end[-k:]):
        assert_weights_equal(snapshot, {name: live[name] for name in snapshot})
    assert_weights_equal(dict(model.named_parameters()), mean(recorder.epoch_end[-k:]))


def test_lawa_snapshots_every_n_optimizer_steps(tmp_path) -> None:
    lawa = LAWA(k=3, every_n_steps=3, device=None, validate_with="live", keep_average_on_train_end=False)
    recorder = Recorder()
    fit(tmp_path, [lawa, recorder], max_epochs=4)  # 8 optimizer steps: snapshots after steps 3 and 6
    snapshots = lawa.state_dict()["snapshots"]
    assert len(snapshots) == 2
    for snapshot, step in zip(snapshots, (3, 6)):
        assert_weights_equal(snapshot, {name: recorder.after_step[step][name] for name in snapshot})


def test_lawa_snapshots_every_n_epochs(tmp_path) -> None:
    lawa = LAWA(k=3, every_n_epochs=2, device=None, validate_with="live", keep_average_on_train_end=False)
    recorder = Recorder()
    fit(tmp_path, [lawa, recorder], max_epochs=5)  # snapshots at the ends of epochs 2 and 4 (1-based)
    snapshots = lawa.state_dict()["snapshots"]
    assert len(snapshots) == 2
    for snapshot, epoch in zip(snapshots, (1, 3)):  # 0-based
        assert_weights_equal(snapshot, {name: recorder.epoch_end[epoch][name] for name in snapshot})


def test_only_one_averaging_callback_can_evaluate_with_its_average(tmp_path) -> None:
    with pytest.raises(ValueError, match="validate_with='live'"):
        fit(tmp_path, [EMA(backend="reference"), LAWA()], max_epochs=1)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: EMA(decay=1.5), "decay"),
        (lambda: EMA(decay=-0.1), "decay"),
        (lambda: EMA(decay=float("nan")), "decay"),
        (lambda: EMA(every_n_steps=0), "every_n_steps"),
        (lambda: EMA(start_step=-1), "start_step"),
        (lambda: EMA(validate_with="best"), "validate_with"),
        (lambda: EMA(backend="cuda"), "backend"),
        (lambda: LAWA(k=0), "k"),
        (lambda: LAWA(every_n_steps=0), "every_n_steps"),
        (lambda: LAWA(every_n_epochs=0), "every_n_epochs"),
        (lambda: LAWA(every_n_epochs="epoch"), "every_n_epochs"),
        (lambda: LAWA(every_n_steps=3, every_n_epochs=1), "every_n_steps"),
        (lambda: LAWA(validate_with="both"), "validate_with"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{argument} must be"):
        make()
