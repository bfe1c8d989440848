"""Fit a tiny regression under two-process DDP and save each rank's final parameters.

Run by tests as ``python ddp_fit.py OUT_DIR OPTIMIZER`` (Lightning's launcher starts rank 1).

``python ddp_fit.py OUT_DIR onebit_grokfast WORLD_SIZE [CHECKPOINT]``: 1-bit Adam with Grokfast, whose
filter sees each rank's own gradients after ``freeze_step``: two epochs straight, against one epoch,
a checkpoint saved after fit and a resumed second epoch; with ``CHECKPOINT`` (saved by another number
of ranks) also a run resumed from it. Saves each rank's parameters and Grokfast state per run.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_converge import optim
from lightning_converge.callbacks import Grokfast
from lightning_converge.strategies import OneBitAdamStrategy


class Regression(L.LightningModule):
    def __init__(self, optimizer_name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.optimizer_name = optimizer_name

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        # Lightning's own sampler would shuffle; rank r takes samples r, r+2, ... in order.
        data = dataset()
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=8, sampler=sampler)

    def configure_optimizers(self):
        return getattr(optim, self.optimizer_name)(self.parameters(), lr=1e-2)


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


class FilterSizeAtStart(L.Callback):
    """How many parameters Grokfast's filter holds when training starts (after any checkpoint restore)."""

    def on_train_start(self, trainer, pl_module):
        grokfast = next(cb for cb in trainer.callbacks if isinstance(cb, Grokfast))
        self.filtered = len(grokfast.state_dict()["slow"])


def fit_onebit_grokfast(world_size: int, max_epochs: int, ckpt_path=None, save_to=None) -> dict:
    model = Regression("AdamW")
    grokfast, at_start = Grokfast(backend="reference"), FilterSizeAtStart()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=OneBitAdamStrategy(freeze_step=1, block_size=8),  # 17 blocks: none of 4 ranks left without
        max_epochs=max_epochs,
        callbacks=[grokfast, at_start],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return {
        "rank": trainer.global_rank,
        "params": [p.detach().clone() for p in model.parameters()],
        "grokfast": grokfast.state_dict(),
        "filtered_at_start": at_start.filtered,
    }


def main_onebit_grokfast(out_dir: Path, world_size: int, other_checkpoint: Path = None) -> None:
    runs = {"straight": fit_onebit_grokfast(world_size, 2)}
    checkpoint = out_dir / f"onebit_grokfast_{world_size}.ckpt"
    runs["first"] = fit_onebit_grokfast(world_size, 1, save_to=checkpoint)
    runs["resumed"] = fit_onebit_grokfast(world_size, 2, ckpt_path=checkpoint)
    if other_checkpoint is not None:
        runs["other_world_size"] = fit_onebit_grokfast(world_size, 2, ckpt_path=other_checkpoint)
    torch.save(runs, out_dir / f"onebit_grokfast_{world_size}_rank{runs['first']['rank']}.pt")


if __name__ == "__main__":
    if sys.argv[2] == "onebit_grokfast":
        main_onebit_grokfast(Path(sys.argv[1]), int(sys.argv[3]), *(Path(arg) for arg in sys.argv[4:]))
        sys.exit()
    out_dir, optimizer_name = sys.argv[1], sys.argv[2]
    model = Regression(optimizer_name)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    torch.save([p.detach() for p in model.parameters()], f"{out_dir}/rank{trainer.global_rank}.pt")
