"""Run the compressed data-parallel scenarios under two-process DDP and save what each rank saw.

Run by tests/test_compressed_ddp.py as ``python compressed_ddp_fit.py OUT_DIR [DEVICES]``
(Lightning's launcher starts the other ranks, which run the same scenarios; with
DEVICES=4, a smaller set of scenarios on four ranks). Each scenario
is a short ``fit`` of the same tiny regression from the same initial weights; rank
``r`` saves ``OUT_DIR/rank{r}.pt``: a dict scenario -> {"params", "bytes_sent",
"logged_bytes_sent", "compression_ratio", "ranks_agree", "loss"}, plus the error
message of a fit that must fail.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_converge  # noqa: F401  (registers the strategies by name)
from lightning_converge.optim import AdamW
from lightning_converge.strategies import CompressedDDPStrategy, OneBitAdamStrategy

# 48 samples, 8 per rank and step: an epoch is 3 steps, so a run stopped after 3 steps resumes at an epoch start.
NUM_SAMPLES = 48
BATCH_SIZE = 8


class Regression(L.LightningModule):
    def __init__(self, optimizer: str = "AdamW") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        # Lightning's own sampler would shuffle; rank r takes samples r, r+2, ... in order.
        data = dataset()
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH_SIZE, sampler=sampler)

    def configure_optimizers(self):
        if self.optimizer == "SGD":
            return torch.optim.SGD(self.parameters(), lr=1e-2)
        return AdamW(self.parameters(), lr=1e-2)


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 6, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


class Record(L.Callback):
    """After each optimizer step: whether all ranks hold the same parameters, and the bytes the strategy counted."""

    def __init__(self) -> None:
        self.ranks_agree: list[bool] = []
        self.bytes_sent: list[int] = []
        self.logged_bytes_sent: list[float] = []
        self.compression_ratio: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        self.ranks_agree.append(bool((gathered == gathered[0]).all()))
        stats = getattr(trainer.strategy, "last_comm_stats", None)
        if stats is not None and "comm/bytes_sent" in trainer.callback_metrics:
            self.bytes_sent.append(stats.bytes_sent)
            self.logged_bytes_sent.append(float(trainer.callback_metrics["comm/bytes_sent"]))
            self.compression_ratio.append(float(trainer.callback_metrics["comm/compression_ratio"]))


def fit(strategy, max_steps, ckpt_path=None, save_to=None, optimizer="AdamW", devices=2, **trainer_kwargs):
    model = Regression(optimizer)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return trainer, {
        "params": [p.detach().clone() for p in model.parameters()],
        "bytes_sent": record.bytes_sent,
        "logged_bytes_sent": record.logged_bytes_sent,
        "compression_ratio": record.compression_ratio,
        "ranks_agree": record.ranks_agree,
        "loss": float(trainer.callback_metrics["train_loss"]),
    }


COMPRESSORS = {
    "fp16": {},
    "bf16": {},
    "int8": {},
    "sign": {"block_size": 128},
    "ternary": {},
    "topk": {"ratio": 0.1, "momentum": 0.9, "clip_norm": 1.0},
    "powersgd": {"rank": 2},
    "onebit": {"block_size": 128},
}


def main_four_ranks(out_dir: Path) -> None:
    """DDP, the uncompressed strategy and one compressor of each kind, on four ranks."""
    results = {}
    trainer, results["ddp"] = fit("ddp", 3, devices=4)
    _, results["none"] = fit(CompressedDDPStrategy("none"), 3, devices=4)
    for name in ("int8", "sign", "powersgd", "onebit"):
        _, results[name] = fit(CompressedDDPStrategy(name, **COMPRESSORS[name]), 3, devices=4)
    _, results["onebit_adam"] = fit(OneBitAdamStrategy(freeze_step=1, block_size=128), 3, devices=4)
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


def main(out_dir: Path) -> None:
    results = {}
    trainer, results["ddp"] = fit("ddp", 4)
    _, results["none"] = fit(CompressedDDPStrategy("none"), 4)
    _, results["onebit_warmup"] = fit(OneBitAdamStrategy(freeze_step=10), 4)
    for name, options in COMPRESSORS.items():
        _, results[name] = fit(CompressedDDPStrategy(name, **options), 3)
    _, results["int8_accumulate_bf16"] = fit("ddp_int8", 2, accumulate_grad_batches=2, precision="bf16-mixed")

    # Resumes: two epochs (6 steps) straight, against one epoch, a checkpoint, and one more from it.
    # (Whole epochs: Lightning resumes a run stopped by max_steps mid-way through the epoch.)
    resumable = {
        "onebit_adam": lambda: OneBitAdamStrategy(freeze_step=2, block_size=128),
        "topk_resume": lambda: CompressedDDPStrategy("topk", ratio=0.1, momentum=0.9),
        "powersgd_resume": lambda: CompressedDDPStrategy("powersgd", start_step=1),
    }
    checkpoint = out_dir / "resume.ckpt"
    for name, make_strategy in resumable.items():
        _, results[name] = fit(make_strategy(), -1, max_epochs=2)
        fit(make_strategy(), -1, save_to=checkpoint, max_epochs=1)
        _, results[f"{name}_resumed"] = fit(make_strategy(), -1, ckpt_path=checkpoint, max_epochs=2)

    try:
        fit("onebit_adam", 1, optimizer="SGD")
        results["onebit_sgd_error"] = None
    except ValueError as error:
        results["onebit_sgd_error"] = str(error)
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["4"]:
        main_four_ranks(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
