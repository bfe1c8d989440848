"""The optimizers inside Lightning: fit, bf16-mixed, and two-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge import optim

SCRIPTS = Path(__file__).parent / "scripts"


class Classifier(L.LightningModule):
    def __init__(self, optimizer_cls, **optimizer_kwargs) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.optimizer_cls, self.optimizer_kwargs = optimizer_cls, optimizer_kwargs
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), **self.optimizer_kwargs)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)


def _fit(model: L.LightningModule, **trainer_kwargs) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, _loader())


LEARNING_RATES = {"AdamW": 1e-2, "Adan": 1e-2, "Lion": 1e-2, "AdEMAMix": 1e-2, "ADOPT": 1e-2}


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_fit_lowers_the_loss(name):
    torch.manual_seed(0)
    model = Classifier(getattr(optim, name), lr=LEARNING_RATES[name])
    _fit(model)
    first, last = sum(model.losses[:8]) / 8, sum(model.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_fit_with_bf16_mixed_precision():
    torch.manual_seed(0)
    model = Classifier(optim.AdamW, lr=1e-2, cautious=True)
    _fit(model, precision="bf16-mixed")
    assert model.net[0].weight.dtype == torch.float32
    state = model.trainer.optimizers[0].state[model.net[0].weight]
    assert state["exp_avg"].dtype == torch.float32
    assert sum(model.losses[-8:]) < 0.7 * sum(model.losses[:8])


@pytest.mark.distributed
def test_two_process_ddp_equals_single_process_full_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_fit.py"), str(tmp_path), "AdamW"], check=True, env=env, timeout=300
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)

    # The same five steps in one process: DDP averages the two ranks' gradients,
    # which equals the gradient of the 16-sample batch the two ranks share.
    sys.path.insert(0, str(SCRIPTS))
    try:
        from ddp_fit import Regression, dataset
    finally:
        sys.path.pop(0)
    model = Regression("AdamW")
    reference = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = dataset().tensors
    for step in range(5):
        start = 16 * (step % 4)  # 64 samples: four steps an epoch
        batch = torch.cat([torch.arange(start + r, start + 16, 2) for r in (0, 1)])
        reference.zero_grad()
        torch.nn.functional.mse_loss(model.net(x[batch]), y[batch]).backward()
        reference.step()
    for a, b in zip(rank0, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
