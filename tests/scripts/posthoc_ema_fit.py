"""Fit a tiny regression under two-process DDP with two PostHocEMA callbacks (snapshots on disk and in
memory), evaluate a sweep of reconstructions, and save what each rank saw.

Run by tests as ``python posthoc_ema_fit.py OUT_DIR`` (Lightning's launcher starts rank 1).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_converge.callbacks import PostHocEMA


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def loader(self, data):
        # rank r takes samples r, r+2, ... in order.
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=8, sampler=sampler)

    def train_dataloader(self):
        return self.loader(dataset(0))

    def val_dataloader(self):
        return self.loader(dataset(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def dataset(seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    saved = []  # the snapshot files this rank wrote
    original_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        if "step=" in str(f):
            saved.append(Path(f).name)
        return original_save(obj, f, *args, **kwargs)

    torch.save = recording_save
    on_disk = PostHocEMA(every_n_steps=2, snapshot_dir=out_dir / "snapshots")
    in_memory = PostHocEMA(every_n_steps=2, validate_with="live")
    model = Regression()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,  # 2 steps an epoch: 32 samples, 16 per rank, batches of 8
        callbacks=[on_disk, in_memory],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    evaluated = on_disk.evaluate(trainer, model, [0.07, 0.12], metric="val_loss")
    torch.save = original_save
    torch.save(
        {
            "rank": trainer.global_rank,
            "saved": saved,
            "snapshot_steps": on_disk.snapshot_steps,
            "profiles": on_disk.state_dict()["profiles"][1],
            "reconstructed_on_disk": on_disk.reconstruct(0.07),
            "reconstructed_in_memory": in_memory.reconstruct(0.07),
            "params": {name: p.detach() for name, p in model.named_parameters()},
            "evaluated": {key: float(value) for key, value in evaluated.items()},
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )
