"""What the DiLoCo-family benchmarks (``diloco.py``, ``async_diloco.py``) share: the character GPT's runs.

- :func:`add_model_arguments`: the model, data and inner-optimizer options, the same in every script;
- :func:`fit`: one ``Trainer.fit`` of :class:`~examples.char_lm.CharGPT` on :class:`~examples.char_lm.StdlibText`;
- :func:`validation_loss`: the loss of a model on the first validation batches;
- :func:`bytes_so_far`: what a worker has sent or received (the strategy's count, or DDP's gradients);
- :class:`StepRecord`: per step, the training loss, the bytes sent so far and when the step ended;
- :func:`train_on_links` and :func:`read_rank_records`: each rank trains every method on the plain loopback
  and then (in a shaped namespace) the shaped one, writing one JSON a method, link and rank, which the
  launcher reads back.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import lightning as L
import torch

import _dist
from _common import quiet_trainer
from examples.char_lm import CharGPT, StdlibText
from lightning_converge.optim import AdamW

FILES = ("*.py",)  # the standard library's top-level modules, as in benchmarks/compression.py


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model (width 192, 4 blocks, 1.9 M parameters), data and inner AdamW options, with their defaults."""
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per worker and step")
    parser.add_argument("--lr", type=float, default=2e-3, help="the inner AdamW's peak learning rate")
    parser.add_argument("--val-batches", type=int, default=40, help="validation batches of each final loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")


def fit(strategy, devices: int, max_steps: int, args: argparse.Namespace, callbacks: list,
        batch_size: Optional[int] = None, init_checkpoint: Optional[Path] = None) -> tuple:
    """Train the character GPT for ``max_steps`` steps of this process (AdamW, linear warm-up over 10% of
    them, cosine decay) from the seed's initialization or ``init_checkpoint``; returns (model, data, trainer)."""
    L.seed_everything(args.seed, verbose=False)
    optimizer = functools.partial(AdamW, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model = CharGPT(
        dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
        warmup_steps=max(1, max_steps // 10), optimizer=optimizer,
        init_checkpoint=None if init_checkpoint is None else str(init_checkpoint),
    )
    data = StdlibText(FILES, seq_len=args.seq_len, batch_size=batch_size or args.batch_size)
    trainer = quiet_trainer(
        devices=devices, strategy=strategy, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, data)
    return model, data, trainer


@torch.no_grad()
def validation_loss(model: CharGPT, data: StdlibText, batches: int) -> float:
    """Mean loss over the first ``batches`` validation batches (the same bytes for every method)."""
    model.eval()
    return statistics.fmean(model.loss(batch).item() for batch in itertools.islice(data.val_dataloader(), batches))


def ddp_bytes_per_step(model: torch.nn.Module) -> int:
    """What DDP hands its all-reduce every step: every gradient, in the parameters' dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def bytes_so_far(trainer: L.Trainer, direction: str = "sent") -> int:
    """Bytes this worker has ``"sent"`` or ``"received"``: the strategy's own count (its ``bytes_sent`` /
    ``bytes_received``, the DiLoCo family) or, failing that, the ``comm/bytes_{direction}_total`` it logged;
    for plain DDP, which counts nothing, its fp32 gradients once a step (an all-reduce receives as much)."""
    counted = getattr(trainer.strategy, f"bytes_{direction}", None)
    if counted is None:
        counted = trainer.callback_metrics.get(f"comm/bytes_{direction}_total")
    if counted is not None:
        return int(counted)
    return trainer.global_step * ddp_bytes_per_step(trainer.lightning_module)


def bytes_sent_so_far(trainer: L.Trainer) -> int:
    return bytes_so_far(trainer, "sent")


class StepRecord(L.Callback):
    """Per optimizer step on this rank: the training loss, the bytes sent and received so far and the
    seconds from the start of training (``start``, a ``time.perf_counter()`` reading: the same clock in
    every process of this machine) to the step's end. With ``count_loopback``, the loopback qdisc's byte counter when
    training starts (run it on one rank, inside the shaped namespace)."""

    def __init__(self, count_loopback: bool) -> None:
        self.count_loopback = count_loopback
        self.loss: list[float] = []
        self.bytes_sent: list[int] = []
        self.bytes_received: list[int] = []
        self.step_end_seconds: list[float] = []
        self.loopback_bytes: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.count_loopback:
            self.loopback_bytes.append(_dist.loopback_bytes(None))
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end_seconds.append(time.perf_counter() - self.start)
        self.bytes_sent.append(bytes_so_far(trainer, "sent"))
        self.bytes_received.append(bytes_so_far(trainer, "received"))
        self.loss.append(float(outputs["loss"]))


def links(shaped: bool) -> tuple[str, ...]:
    """The links every method trains on, in order: the plain loopback, then (when it can be had) the shaped one."""
    return ("loopback", "shaped") if shaped else ("loopback",)


def record_path(out: Path, index: int, link: str, rank: int) -> Path:
    return out / f"{index}_{link}_rank{rank}.json"


Method = TypeVar("Method")


def train_on_links(methods: Sequence[Method], shaped: bool, rate_mbit: float, rank: int, out: Path,
                   train_one: Callable[[int, Method, str], dict]) -> None:
    """On this rank: ``train_one(index, method, link)`` for every method on the plain loopback, then (when
    ``shaped``, inside a shaped namespace) every method on the loopback shaped to ``rate_mbit``, writing
    each returned record to ``record_path(out, index, link, rank)``.

    All plain-loopback fits come first: after a shaped fit, the next unshaped fit's large transfers ran
    slow on the same gloo connections (see benchmarks/compression.py)."""
    for link in links(shaped):
        if shaped:
            _dist.use_link(link == "shaped", rate_mbit, rank)
        for index, method in enumerate(methods):
            record = train_one(index, method, link)
            record_path(out, index, link, rank).write_text(json.dumps(record))


def read_rank_records(out: Path, index: int, link: str, world_size: int) -> list[dict]:
    """The records :func:`train_on_links` wrote for one method and link, rank 0 first."""
    return [json.loads(record_path(out, index, link, rank).read_text()) for rank in range(world_size)]


def megabytes(value: float) -> str:
    return f"{value / 1e6:.1f} MB" if value >= 1e6 else f"{value / 1e6:.3f} MB"
