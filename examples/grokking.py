"""The grokking task of "Grokfast" (and of Power et al.): x*y mod p with a small transformer.

Data: every pair (x, y) with x in [0, p) and y in [1, p) (9,312 pairs for p = 97),
as the sequence ``[x, op, y, =]``; the label is ``x*y mod p``. A fixed random half
trains, the other half validates. Model: the paper's 2-layer pre-norm decoder
(width 128, 4 heads, causal attention), predicting from the last position.
"""

from __future__ import annotations

from typing import Callable, Iterable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "x*y": lambda x, y, p: (x * y) % p,
    "x+y": lambda x, y, p: (x + y) % p,
    "x-y": lambda x, y, p: (x - y) % p,
}


class ModularArithmetic(L.LightningDataModule):
    """All pairs of ``operation`` mod ``p``, split once with ``seed``."""

    def __init__(
        self, p: int = 97, operation: str = "x*y", train_fraction: float = 0.5, batch_size: int = 512, seed: int = 0
    ) -> None:
        super().__init__()
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.save_hyperparameters()
        x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).unbind(1)
        op_token, eq_token = p, p + 1
        inputs = torch.stack([x, torch.full_like(x, op_token), y, torch.full_like(x, eq_token)], dim=1)
        labels = OPERATIONS[operation](x, y, p)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_train = int(train_fraction * len(labels))
        self.train_set = TensorDataset(inputs[order[:n_train]], labels[order[:n_train]])
        self.val_set = TensorDataset(inputs[order[n_train:]], labels[order[n_train:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    # The Grokfast paper's baseline: Adam, lr 1e-3, betas (0.9, 0.98), no weight decay.
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.98))


class GrokkingTransformer(L.LightningModule):
    """The Grokfast paper's decoder for modular arithmetic, with its 10-step linear lr warm-up.

    ``optimizer`` is any callable from parameters to an optimizer: in YAML, a
    ``class_path`` such as ``lightning_converge.optim.AdamW`` with its ``init_args``.
    """

    def __init__(
        self,
        p: int = 97,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        seq_len: int = 4,
        warmup_steps: int = 10,
        optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer] = default_optimizer,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.token_embedding = nn.Embedding(p + 2, dim)
        self.position_embedding = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, p)
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        # The fraction of correct answers ("micro"; torchmetrics' default "macro" averages per class).
        self.train_acc = MulticlassAccuracy(num_classes=p, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=p, average="micro")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, self.causal_mask)
        return self.head(self.ln_f(x[:, -1]))

    def _logits_and_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = batch
        logits = self(tokens)
        return logits, nn.functional.cross_entropy(logits.float(), labels)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, loss = self._logits_and_loss(batch)
        self.train_acc(logits, batch[1])
        self.log_dict({"train_loss": loss, "train_acc": self.train_acc})
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.val_acc.update(logits, batch[1])  # over the whole validation set, synced across ranks
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
