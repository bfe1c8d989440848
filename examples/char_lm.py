"""A small character-level GPT on CPython's standard-library sources.

Data (:class:`StdlibText`): the ``.py`` files of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``, on every machine, nothing downloaded)
that match ``files``, glob patterns relative to that directory (``"*.py"``: the
top-level modules; ``"asyncio/**/*.py"``: one package). ``site-packages`` is never
read. The files, in sorted path order, are read as UTF-8 bytes and joined into one
stream; its last ``val_fraction`` validates, the rest trains. A character is a byte
(the sources are nearly all ASCII), so every part of the library shares one
256-symbol vocabulary and a model pretrained on one part fine-tunes on another.
A sample is a window of ``seq_len + 1`` bytes (inputs and next-byte targets); windows
start every ``seq_len`` bytes, so inputs never overlap. Training draws them in a shuffled
order, validation reads them in order.

Model (:class:`CharGPT`): a pre-norm GPT decoder (learned positions, causal
attention, GELU FFN) whose matrices carry GPT-2's names (``attn.c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), so GradES's default patterns find
them. The loss is the mean next-byte cross-entropy in nats (``val_loss``); divide by
ln 2 for bits per character. ``init_checkpoint`` starts from the weights of a
Lightning checkpoint of the same architecture (a pretraining run) instead of a
random initialization.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256  # bytes


def stdlib_files(patterns: Sequence[str]) -> list[Path]:
    """The standard library's ``.py`` files matching any of ``patterns``, sorted, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    matched = {path for pattern in patterns for path in root.glob(pattern)}
    files = sorted(
        path for path in matched
        if path.suffix == ".py" and path.is_file() and "site-packages" not in path.relative_to(root).parts
    )
    if not files:
        raise ValueError(f"no standard-library .py file under {root} matches {list(patterns)}")
    return files


class ByteWindows(Dataset):
    """A stream's windows of ``seq_len + 1`` bytes, one every ``seq_len`` bytes, as (inputs, next-byte targets)."""

    def __init__(self, stream: Tensor, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.count = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        window = self.stream[index * self.seq_len : (index + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


class StdlibText(L.LightningDataModule):
    """Byte windows of the standard-library sources matching ``files``; the stream's tail validates."""

    def __init__(
        self,
        files: Sequence[str] = ("*.py",),
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.files = stdlib_files(files)

    def setup(self, stage: str) -> None:
        stream = torch.frombuffer(bytearray(b"".join(path.read_bytes() for path in self.files)), dtype=torch.uint8)
        n_train = int((1.0 - self.hparams.val_fraction) * len(stream))
        self.train_set = ByteWindows(stream[:n_train], self.hparams.seq_len)
        self.val_set = ByteWindows(stream[n_train:], self.hparams.seq_len)
        if not len(self.val_set):
            raise ValueError(f"the validation part ({len(stream) - n_train} bytes) holds no window of seq_len + 1")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)  # queries, keys and values at once
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.c_attn(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(attended.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def default_optimizer(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class CharGPT(L.LightningModule):
    """A GPT over bytes, trained with a linear warm-up then a cosine decay to ``min_lr_ratio`` of the peak.

    The decay spans the Trainer's ``estimated_stepping_batches``. ``optimizer`` is any
    callable from parameters to an optimizer (in YAML a ``class_path`` such as
    ``torch.optim.AdamW`` with its ``init_args``); ``init_checkpoint`` is the path of a
    Lightning checkpoint whose ``state_dict`` this model loads (None: random weights).
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 4,
        heads: int = 4,
        seq_len: int = 128,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] = default_optimizer,
        init_checkpoint: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.token_embedding = nn.Embedding(VOCAB_SIZE, dim)
        self.position_embedding = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB_SIZE)
        if init_checkpoint is not None:
            checkpoint = torch.load(init_checkpoint, map_location="cpu", weights_only=True)
            self.load_state_dict(checkpoint["state_dict"])

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The mean next-character cross-entropy (nats) of a batch of (inputs, targets)."""
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        warmup = max(1, self.hparams.warmup_steps)
        total = max(warmup + 1, self.trainer.estimated_stepping_batches)
        floor = self.hparams.min_lr_ratio

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
