"""Sharded checkpoints of callback state under FSDP2, saved by 2 gloo processes and loaded by 1, 2 or 4.

Run by tests/test_fsdp2_checkpoint.py as ``python fsdp2_checkpoint.py OUT_DIR PHASE DEVICES``:

* ``save`` (2 devices; Lightning's launcher starts rank 1): for each ``save_distributed_checkpoint`` setting, a
  two-epoch fit with every callback that keeps per-element state, a checkpoint during fit (after the first
  epoch) and one after fit. Every save runs under ``CommDebugMode`` (its collectives counted by name); right
  after it each rank records the callbacks' state and the model's weights, gathered into full tensors. After
  fit, PostHocEMA's reconstruction and the shapes of the snapshots each rank keeps.
* ``load`` (1 or 4 devices): for each setting and checkpoint (4 devices: the one after fit), a fit resumed
  from it that records, when
  training starts (every callback restored), the callbacks' state and the model's weights as full tensors,
  then stops; from the checkpoint after fit, PostHocEMA's reconstruction from the saved run's snapshots.

Each rank writes what it recorded to ``OUT_DIR/<phase>_<devices>_rank<r>.pt``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, str(Path(__file__).parent))
from fsdp2_fit import TwoBlocks, full, full_state

from lightning_converge.callbacks import EMA, LAWA, Grokfast, PostHocEMA

EPOCHS = 2  # 3 steps an epoch on 2 ranks (6 on 1, 2 on 4: the data is split by ranks)
SIGMA_REL = 0.15  # between the tracked 0.1 and 0.2


def make_callbacks(distributed: bool, out_dir: Path) -> list:
    """Every callback with per-element state; the distributed setting uses Grokfast's EMA filter and
    PostHocEMA snapshots on disk, the other the MA filter and snapshots in memory."""
    snapshot_dir = out_dir / "snapshots" if distributed else None
    return [
        Grokfast(alpha=0.9, lamb=1.0) if distributed else Grokfast(filter="ma", window_size=2, lamb=1.0),
        EMA(decay=0.8),
        LAWA(k=2, every_n_steps=2, validate_with="live", keep_average_on_train_end=False),
        PostHocEMA(sigma_rels=(0.1, 0.2), every_n_steps=2, snapshot_dir=snapshot_dir, validate_with="live"),
    ]


def record(trainer, model, callbacks) -> dict:
    """The callbacks' state and the model's live weights as full tensors (collectives: every rank)."""
    ema = next(cb for cb in callbacks if isinstance(cb, EMA))
    # After fit the model holds EMA's average; the live weights are those it kept.
    live = ema._kept_live if ema._kept_live is not None else dict(model.named_parameters())
    return {
        "callbacks": {type(cb).__name__: full_state(cb.state_dict()) for cb in callbacks},
        "live": {name: full(tensor) for name, tensor in live.items() if name in dict(model.named_parameters())},
        "step": trainer.global_step,
    }


class CountingSaves(L.Callback):
    """Wraps ``trainer.save_checkpoint`` (which ModelCheckpoint and the script call) to count the collectives of
    each save by name and record the state saved, gathered after the save."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks = callbacks
        self.saves: list[dict] = []

    def setup(self, trainer, pl_module, stage):
        save_checkpoint = trainer.save_checkpoint

        def counted(filepath, weights_only=False, storage_options=None):
            with CommDebugMode() as comms:
                save_checkpoint(filepath, weights_only, storage_options)
            counts = {str(op): n for op, n in comms.get_comm_counts().items()}
            self.saves.append({"path": str(filepath), "counts": counts, **record(trainer, pl_module, self.callbacks)})

        trainer.save_checkpoint = counted


class RecordAtTrainStart(L.Callback):
    """Listed after the callbacks: records their restored state when training starts, and stops there (new
    snapshots would overwrite the saved run's, which later loads read)."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks = callbacks
        self.restored: dict = {}

    def on_train_start(self, trainer, pl_module):
        self.restored = record(trainer, pl_module, self.callbacks)
        trainer.should_stop = True


def strategy(devices: int, distributed: bool) -> ModelParallelStrategy:
    return ModelParallelStrategy(
        data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=distributed
    )


def trainer_for(devices: int, distributed: bool, max_epochs: int, callbacks: list, checkpoint_dir=None) -> L.Trainer:
    extra = [] if checkpoint_dir is None else [ModelCheckpoint(checkpoint_dir, save_top_k=-1, every_n_epochs=1)]
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy(devices, distributed),
        max_epochs=max_epochs,
        callbacks=callbacks + extra,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )


def save(out_dir: Path, distributed: bool) -> dict:
    callbacks = make_callbacks(distributed, out_dir / str(int(distributed)))
    saves = CountingSaves(callbacks)
    trainer = trainer_for(2, distributed, EPOCHS, [saves, *callbacks], out_dir / f"checkpoints_{int(distributed)}")
    model = TwoBlocks(sharded=True)
    trainer.fit(model)
    trainer.save_checkpoint(out_dir / f"after_{int(distributed)}.ckpt")
    posthoc = next(cb for cb in callbacks if isinstance(cb, PostHocEMA))
    with CommDebugMode() as comms, posthoc.swap_in(model, SIGMA_REL):
        swapped = {name: p.to_local().clone() for name, p in model.named_parameters()}
    return {
        "saves": saves.saves,
        "reconstructed": posthoc.reconstruct(SIGMA_REL),
        "swapped_in_shards": swapped,
        "swap_in_counts": {str(op): n for op, n in comms.get_comm_counts().items()},
        "snapshot_steps": posthoc.snapshot_steps,
        "snapshot_shapes": [
            {name: tuple(t.shape) for name, t in profile.items()}
            for snapshot in posthoc._snapshots
            for profile in posthoc._snapshot_profiles(snapshot)
        ],
        "param_shard_shapes": {name: tuple(p.to_local().shape) for name, p in model.named_parameters()},
    }


def load(out_dir: Path, devices: int, distributed: bool, checkpoint: Path) -> dict:
    callbacks = make_callbacks(distributed, out_dir / str(int(distributed)))
    probe = RecordAtTrainStart(callbacks)
    trainer = trainer_for(devices, distributed, EPOCHS + 1, [*callbacks, probe])
    model = TwoBlocks(sharded=True)
    trainer.fit(model, ckpt_path=checkpoint)
    posthoc = next(cb for cb in callbacks if isinstance(cb, PostHocEMA))
    after_fit = "after" in checkpoint.name
    return {**probe.restored, "reconstructed": posthoc.reconstruct(SIGMA_REL) if after_fit else None}


def main(out_dir: Path, phase: str, devices: int) -> None:
    results, rank = {}, 0
    for distributed in (True, False):
        if phase == "save":
            results[distributed] = save(out_dir, distributed)
        else:
            after = out_dir / f"after_{int(distributed)}.ckpt"
            results[distributed] = {"after": load(out_dir, devices, distributed, after)}
            if devices == 1:  # 4 processes cost more: one checkpoint each
                during = next((out_dir / f"checkpoints_{int(distributed)}").glob("epoch=0*"))
                results[distributed]["during"] = load(out_dir, devices, distributed, during)
        rank = torch.distributed.get_rank()
    torch.save(results, out_dir / f"{phase}_{devices}_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
