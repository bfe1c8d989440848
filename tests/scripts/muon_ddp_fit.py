"""Fit ddp_fit.py's regression with Muon under two-process DDP and save each rank's final parameters.

Run by tests as ``python muon_ddp_fit.py OUT_DIR`` (Lightning's launcher starts rank 1).
"""

import sys

import lightning as L
import torch
from ddp_fit import Regression, dataset  # noqa: F401 (dataset: the test's full-batch reference uses it)

from lightning_converge.optim import Muon


class MuonRegression(Regression):
    """Both weight matrices on Muon (no embedding, no head by name), the biases on AdamW."""

    def __init__(self) -> None:
        super().__init__("Muon")

    def configure_optimizers(self):
        return Muon(self, lr=0.02, adamw_lr=1e-2, backend="reference")


if __name__ == "__main__":
    model = MuonRegression()
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
    torch.save([p.detach() for p in model.parameters()], f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
