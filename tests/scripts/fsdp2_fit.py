"""Fit a small two-block model under FSDP2 (Lightning's ModelParallelStrategy, 2 gloo processes) and under DDP.

Run by tests/test_fsdp2.py as ``python fsdp2_fit.py OUT_DIR SAVE_DISTRIBUTED`` (0 or 1: the
ModelParallelStrategy's ``save_distributed_checkpoint``; Lightning's launcher starts rank 1). With every
callback attached (Grokfast's EMA filter with 1, its MA filter and Switch EMA with 0): DDP for two epochs,
FSDP2 for two epochs (a checkpoint taken during fit, after the first epoch), FSDP2 resumed from it, FSDP2 for
one epoch saved after fit, and FSDP2 resumed from that. Each rank saves, per run, the full parameters after
fit and its callbacks' state (full tensors); then the errors of the strategies that cannot shard.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_converge import optim
from lightning_converge.callbacks import EMA, LAWA, Anneal, GradES, Grokfast, PostHocEMA
from lightning_converge.sharding import read_checkpoint, reshard

WIDTH = 8


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(WIDTH, WIDTH)
        self.ffn = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + self.ffn(torch.tanh(self.attn(x)))


class TwoBlocks(L.LightningModule):
    def __init__(self, optimizer_name: str = "AdamW", sharded: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(WIDTH, 1)  # a (1, 8) weight: rank 1's shard is empty
        self.optimizer_name = optimizer_name
        self.sharded = sharded
        self.scale = 1.0  # annealed by Anneal

    def configure_model(self):
        if not self.sharded:
            return
        # Under ModelParallelStrategy its data-parallel mesh; under a DDP strategy (refused) all ranks.
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.head(self.blocks(x)) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def train_dataloader(self):
        # rank r takes samples r, r+2, ... in order, under both strategies
        data = dataset()
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=4, sampler=sampler)

    def val_dataloader(self):
        data = dataset()
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=8, sampler=sampler)

    def configure_optimizers(self):
        return getattr(optim, self.optimizer_name)(self.parameters(), lr=1e-2, weight_decay=0.01)


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, WIDTH, generator=gen)  # 3 steps an epoch on each of 2 ranks
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def make_callbacks(save_distributed: bool) -> list:
    freeze_below = 0.0066 if save_distributed else 0.0059
    return [
        Grokfast(alpha=0.9, lamb=1.0) if save_distributed else Grokfast(filter="ma", window_size=2, lamb=1.0),
        EMA(decay=0.8, switch_every_epoch=not save_distributed),
        LAWA(k=2, every_n_steps=2, device=None, validate_with="live", keep_average_on_train_end=False),
        PostHocEMA(sigma_rels=(0.1, 0.2), every_n_steps=2, validate_with="live"),
        Anneal("scale", schedule=lambda step: 1.0 + 0.01 * step),
        # Judges from step 2 (grace period 0.3 of 6 steps), freezes at step 2 only: the threshold lies between
        # the four matrices' mean update sizes there (measured under DDP), so some freeze and training goes on.
        GradES(tau=lambda step: freeze_below if step == 2 else 0.0, normalize=True, patterns=["attn", "ffn"]),
    ]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def full_state(state):
    if isinstance(state, torch.Tensor):
        return full(state)
    if isinstance(state, dict):
        return {key: full_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [full_state(value) for value in state]
    return state


class SaveDuringValidation(L.Callback):
    """Saves a checkpoint at the first validation batch (EMA's average swapped in), recording the full
    weights the model holds before validation (listed before EMA: its hook runs first) and during it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict = {}

    def on_validation_start(self, trainer, pl_module):
        if not self.record:
            self.record["live"] = {name: full(p) for name, p in pl_module.named_parameters()}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if "held" not in self.record:
            self.record["held"] = {name: full(p) for name, p in pl_module.named_parameters()}
            trainer.save_checkpoint(self.path)


def fit(
    sharded: bool,
    max_epochs: int,
    save_distributed: bool,
    ckpt_path=None,
    save_to=None,
    checkpoint_dir=None,
    callbacks=None,
    optimizer_name="AdamW",
    probe_swap=False,
    strategy=None,
    save_during_validation=None,
) -> dict:
    model = TwoBlocks(optimizer_name, sharded)
    callbacks = make_callbacks(save_distributed) if callbacks is None else callbacks
    saver = None if save_during_validation is None else SaveDuringValidation(save_during_validation)
    extra = [] if checkpoint_dir is None else [ModelCheckpoint(checkpoint_dir, save_top_k=-1, every_n_epochs=1)]
    if strategy is None:
        strategy = (
            ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed
            )
            if sharded
            else "ddp"
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=max_epochs,
        callbacks=([] if saver is None else [saver]) + callbacks + extra,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    result = {
        "val_loss": trainer.callback_metrics["val_loss"].clone(),
        "rank": trainer.global_rank,
        "params": {name: full(p) for name, p in model.named_parameters()},
        "callbacks": {type(cb).__name__: full_state(cb.state_dict()) for cb in callbacks},
    }
    if saver is not None:
        saved = read_checkpoint(saver.path)  # a distributed checkpoint's sharded state read as full tensors
        result["during_validation"] = {
            **saver.record,
            "saved_live": saved["live_state_dict"],
            "saved_average": saved["ema_state_dict"],
        }
    if probe_swap:  # last: it changes the model
        result.update(swap_probe(model, next(cb for cb in callbacks if isinstance(cb, EMA))))
    return result


def swap_probe(model: TwoBlocks, ema: EMA) -> dict:
    """Swap EMA's average in and out as evaluation does, counting collectives (and, for comparison, those of
    a forward pass, which all-gathers the shards); what the shards hold while swapped in and after."""
    x = dataset().tensors[0][:4]
    reshard(model)
    with torch.no_grad():  # after fit the model holds the average: move the live weights off it
        for p in model.parameters():
            p.to_local().add_(1.0)
    live = [p.to_local().clone() for p in model.parameters()]
    with CommDebugMode() as forward_comms:
        model(x)  # with gradients enabled: FSDP2's root keeps its gathered parameters afterwards
    with CommDebugMode() as swap_comms:
        ema._swap_in(model)
        swapped = [p.to_local().clone() for p in model.parameters()]
        ema._swap_out()
    return {
        "forward_collectives": forward_comms.get_total_counts(),
        "swap_collectives": swap_comms.get_total_counts(),
        "live_shards": live,
        "swapped_in_shards": swapped,
        "swapped_out_shards": [p.to_local().clone() for p in model.parameters()],
        "average_shards": [average.clone() for average in ema._average()],
    }


def main(out_dir: Path, save_distributed: bool) -> None:
    runs = {"ddp": fit(False, 2, save_distributed)}
    ckpt_dir = out_dir / f"checkpoints_{save_distributed}"
    runs["fsdp"] = fit(
        True,
        2,
        save_distributed,
        checkpoint_dir=ckpt_dir,
        probe_swap=True,
        save_during_validation=out_dir / f"during_validation_{save_distributed}.ckpt",
    )
    during = next(ckpt_dir.glob("epoch=0*"))
    runs["resumed_during"] = fit(True, 2, save_distributed, ckpt_path=during)
    after = out_dir / f"after_{save_distributed}.ckpt"
    runs["first"] = fit(True, 1, save_distributed, save_to=after)
    runs["resumed_after"] = fit(True, 2, save_distributed, ckpt_path=after)
    for name in ("ddp_compressed", "onebit_adam"):  # strategies that cannot shard, given a sharded model
        try:
            fit(True, 1, save_distributed, callbacks=[], strategy=name)
        except ValueError as error:
            runs[f"{name}_error"] = str(error)
    torch.save(runs, out_dir / f"{int(save_distributed)}_rank{runs['ddp']['rank']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "1")
