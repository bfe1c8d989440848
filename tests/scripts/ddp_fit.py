"""Fit a tiny regression under two-process DDP and save each rank's final parameters.

Run by tests as ``python ddp_fit.py OUT_DIR OPTIMIZER`` (Lightning's launcher starts rank 1).
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_converge import optim


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


if __name__ == "__main__":
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
