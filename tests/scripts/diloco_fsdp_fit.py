"""DiLoCo over FSDP2 replicas (4 gloo processes, 2 replicas x 2 shards) against DiLoCo over DDP (2 processes).

Run by tests/test_diloco_fsdp.py as ``python diloco_fsdp_fit.py OUT_DIR MODE`` (Lightning's launcher starts the
other ranks). MODE ``sharded``: on 4 processes, a straight ShardedDiLoCoStrategy fit with checkpoints taken inside
an inner phase (distributed and full) and after it (distributed), each save's collectives counted and the outer
state it saved recorded, the fits resumed from them (and refused as 4 replicas x 1 shard), the same for
ShardedStreamingDiLoCoStrategy (its checkpoint holds an average in flight), ``delay=1``, EMA and LAWA fits, and
the errors of a model not sharded within its replica and of the strategies that cannot train a sharded one.
MODE ``ddp`` (after ``sharded``): on 2 processes, the sharded checkpoints resumed as 2 replicas x 1 shard and
1 x 2 (the outer state recorded when training starts), then DiLoCo (``delay`` 0 and 1, with EMA, with LAWA) and
Streaming DiLoCo fits over DDP. Every rank writes ``OUT_DIR/MODE_rank{r}.pt``.

Data: 16 samples a step, each of the 4 sharded ranks takes every 4th; each DDP worker takes the samples of the
two ranks of its replica (ranks 2r and 2r+1), so a DDP worker's batch is the union of its replica's batches.
Batches depend on the step alone, so a resumed fit sees what the straight one saw. Validation, after steps 4 and
8, takes the samples of step 0, split the same way.
"""

import itertools
import sys
from pathlib import Path

import lightning as L
import torch
from fsdp2_fit import WIDTH, Block  # the two-block model of the FSDP2 callback tests (this script's folder)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_converge import optim
from lightning_converge.callbacks import EMA, LAWA
from lightning_converge.strategies import (
    DiLoCoStrategy,
    ShardedDiLoCoStrategy,
    ShardedStreamingDiLoCoStrategy,
    StreamingDiLoCoStrategy,
)

INNER_STEPS = 3
MAX_STEPS = 3 * INNER_STEPS  # three outer steps
SAVE_AT = INNER_STEPS + 1  # a checkpoint inside the second inner phase
VALIDATE_EVERY = 4  # after steps 4 and 8: inside inner phases, where the model evaluates the global parameters
# Streaming: 2 fragments, rounds of 4 steps; fragment 0 syncs after step 2 and its average is applied after step 3,
# so a checkpoint after step 2 holds an average in flight.
STREAMING = dict(inner_steps=4, num_fragments=2, overlap_steps=1, mixing_alpha=0.5, backend="reference")
STREAMING_SAVE_AT = 2
# Averaging callbacks, which average the global parameters and write the average into the model when fit ends.
AVERAGING = {"ema": lambda: EMA(decay=0.8), "lawa": lambda: LAWA(k=2, every_n_steps=2, device=None)}


class TwoBlocks(L.LightningModule):
    def __init__(self, shard: str = "no") -> None:
        """``shard``: "no", "replica" (over ``device_mesh["data_parallel"]``), "world" (over every rank)."""
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(WIDTH, 1)  # a (1, 8) weight: one rank's shard of it is empty
        self.shard = shard

    def configure_model(self):
        if self.shard == "no":
            return
        mesh = self.device_mesh["data_parallel"] if self.shard == "replica" else None
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.head(self.blocks(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def train_dataloader(self):
        return DataLoader(StepIndexedBatches(self.trainer), batch_size=None)

    def val_dataloader(self):
        x, y = data()
        index = samples(0, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(TensorDataset(x[index], y[index]), batch_size=len(index))

    def configure_optimizers(self):
        return optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def samples(step: int, world_size: int, rank: int) -> torch.Tensor:
    """The sample indices of ``rank`` at ``step``: with 4 ranks every 4th of the step's 16, with 2 the union of
    the two ranks of its replica."""
    start = 16 * (step % 4)
    if world_size == 4:
        return torch.arange(start + rank, start + 16, 4)
    return torch.cat([samples(step, 4, 2 * rank), samples(step, 4, 2 * rank + 1)]).sort().values


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, WIDTH, generator=gen)
    return x, x.sum(1, keepdim=True).sin()


class StepIndexedBatches(IterableDataset):
    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer

    def __iter__(self):
        x, y = data()
        for step in itertools.count(self.trainer.global_step):
            index = samples(step, self.trainer.world_size, self.trainer.global_rank)
            yield x[index], y[index]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


class ValidationLosses(L.Callback):
    """The validation loss of every validation in ``fit`` (each inside an inner phase: global parameters)."""

    def __init__(self) -> None:
        self.losses = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.losses.append(trainer.callback_metrics["val_loss"].item())


def outer_state(strategy) -> dict:
    """The strategy's outer state as full tensors, gathered from every rank's shards (collectives: every rank):
    the global parameters, the outer momentum and each fragment's average in flight (by piece, or None)."""
    params = strategy._params
    pending = []
    for fragment in strategy._fragments:
        if fragment.pending is None or fragment.pending.average is None:
            pending.append(None)
            continue
        shards = [strategy._local_params[index] for index, _, _ in fragment.pieces]
        parts = fragment.pending.average.split([shard.numel() for shard in shards])
        pending.append(
            [
                gathered(part.view_as(shard), params[index])
                for part, shard, (index, _, _) in zip(parts, shards, fragment.pieces)
            ]
        )
    return {
        "global_params": [gathered(g, p) for g, p in zip(strategy.global_parameters, params)],
        "momentum_buffers": [gathered(m, p) for m, p in zip(strategy._outer.momentum_buffers, params)],
        "pending_averages": pending,
    }


def gathered(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``shard``, sharded like ``like``: torch's own DTensor gather, not the pack's."""
    placed = DTensor.from_local(
        shard.to(like.device), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
    return placed.full_tensor().cpu()


class SaveAt(L.Callback):
    """Saves a checkpoint after training step ``step`` (inside an inner phase); records the collectives the save
    ran (by name) and the outer state it saved, gathered after the save."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path
        self.record: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with CommDebugMode() as comms:
                trainer.save_checkpoint(self.path)
            counts = {str(op): n for op, n in comms.get_comm_counts().items()}
            self.record = {"counts": counts, "outer": outer_state(trainer.strategy)}


class SaveAfterFit(L.Callback):
    """Saves a checkpoint when ``fit`` has ended (as after ``trainer.fit`` returns); records the collectives the
    save ran and the outer state when training ended, which the checkpoint keeps (taken in ``on_train_end``,
    which Lightning runs before the strategy's ends the local training)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict = {}

    def on_train_end(self, trainer, pl_module):
        self.record["outer"] = outer_state(trainer.strategy)

    def on_fit_end(self, trainer, pl_module):
        with CommDebugMode() as comms:
            trainer.save_checkpoint(self.path)
        self.record["counts"] = {str(op): n for op, n in comms.get_comm_counts().items()}


class OuterStateAtTrainStart(L.Callback):
    """Records the restored outer state when training starts, and stops there."""

    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.record = outer_state(trainer.strategy)
        trainer.should_stop = True


def fit(strategy, shard: str = "replica", devices: int = 4, ckpt_path=None, callbacks=()) -> dict:
    model = TwoBlocks(shard)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    validation = ValidationLosses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=MAX_STEPS,
        val_check_interval=VALIDATE_EVERY,
        check_val_every_n_epoch=None,
        callbacks=[validation, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    strategy = trainer.strategy
    return {
        "rank": trainer.global_rank,
        "records": [callback.record for callback in callbacks if hasattr(callback, "record")],
        "initial": initial,
        "params": {name: full(p) for name, p in model.named_parameters()},
        "val_losses": validation.losses,
        "outer_steps": strategy.outer_steps,
        "bytes_sent": strategy.bytes_sent,
        "local_shapes": [
            tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape) for p in model.parameters()
        ],
        "global_shapes": [tuple(g.shape) for g in strategy.global_parameters],
        "momentum_shapes": [tuple(m.shape) for m in strategy._outer.momentum_buffers],
    }


def sharded_diloco(save_distributed: bool = True, replicas: int = 2) -> ShardedDiLoCoStrategy:
    return ShardedDiLoCoStrategy(
        replicas=replicas, inner_steps=INNER_STEPS, backend="reference", save_distributed_checkpoint=save_distributed
    )


def error_of(strategy, shard: str, ckpt_path=None) -> str:
    try:
        fit(strategy, shard=shard, ckpt_path=ckpt_path)
    except ValueError as error:
        return str(error)
    return "no error"


def main(out_dir: Path, mode: str) -> None:
    if mode == "ddp":
        # The sharded run's checkpoints (2 replicas x 2 shards) resumed on 2 ranks: 2 x 1 and 1 x 2.
        runs = {
            f"{checkpoint}_on_{replicas}x{2 // replicas}": fit(
                sharded_diloco(replicas=replicas),
                devices=2,
                ckpt_path=out_dir / f"during_{checkpoint}.ckpt",
                callbacks=[OuterStateAtTrainStart()],
            )
            for checkpoint in ("distributed", "full")
            for replicas in (2, 1)
        }
        runs["straight"] = fit(DiLoCoStrategy(inner_steps=INNER_STEPS, backend="reference"), shard="no", devices=2)
        runs["streaming"] = fit(StreamingDiLoCoStrategy(**STREAMING), shard="no", devices=2)
        runs["delayed"] = fit(
            DiLoCoStrategy(inner_steps=INNER_STEPS, delay=1, backend="reference"), shard="no", devices=2
        )
        for name, averaging in AVERAGING.items():
            runs[name] = fit(
                DiLoCoStrategy(inner_steps=INNER_STEPS, backend="reference"),
                shard="no",
                devices=2,
                callbacks=[averaging()],
            )
    else:
        distributed, whole = out_dir / "during_distributed.ckpt", out_dir / "during_full.ckpt"
        after = out_dir / "after_distributed.ckpt"
        runs = {"straight": fit(sharded_diloco(True), callbacks=[SaveAt(SAVE_AT, distributed), SaveAfterFit(after)])}
        runs["resumed_distributed"] = fit(sharded_diloco(True), ckpt_path=distributed)
        runs["other_mesh_error"] = error_of(sharded_diloco(True, replicas=4), shard="replica", ckpt_path=distributed)
        runs["straight_full"] = fit(sharded_diloco(False), callbacks=[SaveAt(SAVE_AT, whole)])
        runs["resumed_full"] = fit(sharded_diloco(False), ckpt_path=whole)
        streaming = out_dir / "streaming.ckpt"
        runs["streaming"] = fit(
            ShardedStreamingDiLoCoStrategy(replicas=2, **STREAMING), callbacks=[SaveAt(STREAMING_SAVE_AT, streaming)]
        )
        runs["streaming_resumed"] = fit(ShardedStreamingDiLoCoStrategy(replicas=2, **STREAMING), ckpt_path=streaming)
        runs["delayed"] = fit(ShardedDiLoCoStrategy(replicas=2, inner_steps=INNER_STEPS, delay=1, backend="reference"))
        for name, averaging in AVERAGING.items():
            runs[name] = fit(sharded_diloco(), callbacks=[averaging()])
        runs["unsharded_error"] = error_of(sharded_diloco(), shard="no")
        runs["sharded_over_world_error"] = error_of(sharded_diloco(), shard="world")
        runs["async_error"] = error_of("async_diloco", shard="world")
        runs["ddp_diloco_error"] = error_of("diloco", shard="world")
    torch.save(runs, out_dir / f"{mode}_rank{runs['straight']['rank']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
