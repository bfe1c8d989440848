"""Anneal inside real Trainer runs: the value seen by training_step is the schedule's at that step."""

import math
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import Anneal
from lightning_converge.schedules import Cosine, Linear, Step

BATCHES_PER_EPOCH = 4


class RecordingModule(pl.LightningModule):
    """A linear regression that records, inside every training_step, the values Anneal drives."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.guidance_scale = 1.0
        self.layer.cfg = SimpleNamespace(temperature=1.0)
        self.extra = {"tau": 0.0}
        self.register_buffer("beta", torch.tensor(0.0))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            dict(
                step=self.trainer.global_step,
                epoch=self.current_epoch,
                guidance_scale=self.guidance_scale,
                temperature=self.layer.cfg.temperature,
                tau=self.extra["tau"],
                beta=self.beta.item(),
                weight_decay=[group["weight_decay"] for group in self.optimizers().param_groups],
                lr=[group["lr"] for group in self.optimizers().param_groups],
            )
        )
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        # Two parameter groups: an optimizer.<key> target must set both.
        return torch.optim.AdamW([{"params": [self.layer.weight]}, {"params": [self.layer.bias], "lr": 0.5}], lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4 * BATCHES_PER_EPOCH, 3, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def make_trainer(callbacks, **trainer_args):
    trainer_args = {"max_steps": 6, **trainer_args}
    return pl.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **trainer_args,
    )


def fit(callbacks, module=None, **trainer_args):
    module = module or RecordingModule()
    trainer = make_trainer(callbacks, **trainer_args)
    trainer.fit(module)
    return module, trainer


def test_attribute_follows_the_schedule_at_every_step():
    module, trainer = fit([Anneal(schedule=Linear(start=1.0, end=7.0, steps=4))])
    assert [seen["step"] for seen in module.seen] == list(range(6))  # crosses an epoch boundary
    assert [seen["guidance_scale"] for seen in module.seen] == [1.0, 2.5, 4.0, 5.5, 7.0, 7.0]
    assert trainer.callback_metrics["anneal/guidance_scale"].item() == 7.0


def test_dotted_paths_mappings_and_buffers():
    callbacks = [
        Anneal("layer.cfg.temperature", schedule=Step(value=2.0, gamma=0.5, step_size=2)),
        Anneal("extra.tau", schedule=Linear(start=0.0, end=1.0, steps=5)),
        Anneal("beta", schedule=Linear(start=0.0, end=0.5, steps=5)),
    ]
    module, _ = fit(callbacks)
    steps = range(6)
    assert [seen["temperature"] for seen in module.seen] == [2.0 * 0.5 ** (s // 2) for s in steps]
    assert [seen["tau"] for seen in module.seen] == pytest.approx([min(s, 5) / 5 for s in steps])
    assert [seen["beta"] for seen in module.seen] == pytest.approx([0.1 * min(s, 5) for s in steps])
    assert "beta" in dict(module.named_buffers())  # filled in place, still a buffer


def test_optimizer_hyperparameter_in_every_group():
    module, _ = fit([Anneal("optimizer.weight_decay", schedule=Linear(start=0.0, end=0.05, steps=5))])
    expected = [0.01 * min(s, 5) for s in range(6) for _group in range(2)]
    assert [value for seen in module.seen for value in seen["weight_decay"]] == pytest.approx(expected)


def test_two_anneals_side_by_side():
    scale = Anneal("guidance_scale", schedule=Linear(start=1.0, end=3.0, steps=2))
    lr = Anneal("optimizer.lr", schedule=Cosine(start=0.1, end=0.0, steps=4))
    assert scale.state_key != lr.state_key
    module, trainer = fit([scale, lr])
    assert [seen["guidance_scale"] for seen in module.seen] == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    expected = [0.05 * (1 + math.cos(math.pi * min(s, 4) / 4)) for s in range(6) for _group in range(2)]
    assert [value for seen in module.seen for value in seen["lr"]] == pytest.approx(expected)
    assert set(trainer.callback_metrics) >= {"anneal/guidance_scale", "anneal/optimizer.lr"}


def test_epoch_interval_uses_the_epoch():
    module, trainer = fit(
        [Anneal(schedule=Linear(start=0.0, end=2.0, steps=2), interval="epoch")], max_steps=-1, max_epochs=3
    )
    assert [seen["guidance_scale"] for seen in module.seen] == [min(s // BATCHES_PER_EPOCH, 2) for s in range(12)]
    assert trainer.callback_metrics["anneal/guidance_scale"].item() == 2.0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("guidance_scal", "RecordingModule has no 'guidance_scal'"),
        ("layer.config.temperature", "RecordingModule.layer has no 'config'"),
        ("extra.tua", "RecordingModule.extra has no 'tua'"),
        ("optimizer.momentum", "a parameter group has no 'momentum'"),
    ],
)
def test_missing_target_raises_before_any_training_step(target, message):
    module = RecordingModule()
    trainer = make_trainer([Anneal(target, schedule=1.0)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(module)
    assert module.seen == []
    if not target.startswith("optimizer."):
        assert trainer.optimizers == [], "a module target is checked at setup, before configure_optimizers"


class LazyModule(RecordingModule):
    """Builds its head in configure_model, after the setup hooks ran."""

    def configure_model(self):
        self.head = SimpleNamespace(scale=0.0)

    def training_step(self, batch, batch_idx):
        self.guidance_scale = self.head.scale
        return super().training_step(batch, batch_idx)


def test_target_built_in_configure_model():
    module, _ = fit([Anneal("head.scale", schedule=Linear(start=0.0, end=2.0, steps=2))], LazyModule(), max_steps=3)
    assert [seen["guidance_scale"] for seen in module.seen] == [0.0, 1.0, 2.0]
    module = LazyModule()
    with pytest.raises(ValueError, match="LazyModule.head has no 'scal'"):
        fit([Anneal("head.scal", schedule=1.0)], module)
    assert module.seen == []


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="interval must be"):
        Anneal(schedule=1.0, interval="batch")
    with pytest.raises(ValueError, match="target must be a dotted path"):
        Anneal("optimizer.", schedule=1.0)
    with pytest.raises(ValueError, match="same target"):
        fit([Anneal(schedule=1.0), Anneal(schedule=2.0)])


def test_configured_from_a_lightning_cli_config(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-converge"])
    step_decay = {
        "class_path": "lightning_converge.schedules.Step",
        "init_args": {"value": 0.1, "gamma": 0.5, "step_size": 2},
    }
    anneal = {
        "class_path": "lightning_converge.callbacks.Anneal",
        "init_args": {"target": "optimizer.weight_decay", "schedule": step_decay},
    }
    config = {"seed_everything": False, "trainer": {"logger": False, "callbacks": [anneal]}}
    cli = LightningCLI(RecordingModule, run=False, args=config, save_config_callback=None)
    [built] = [callback for callback in cli.trainer.callbacks if isinstance(callback, Anneal)]
    assert built.target == "optimizer.weight_decay" and isinstance(built.schedule, Step)
    assert [built.schedule(s) for s in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
