"""Fit a tiny regression under two-worker DiLoCo / Streaming DiLoCo, once per scenario, and save what
each rank saw.

Run by tests as ``python diloco_fit.py OUT_DIR SCENARIO [SCENARIO ...]`` on both ranks (or on rank 0
alone, and Lightning's launcher starts rank 1). Every scenario is a ``Trainer.fit``; the process group
is opened by the first and reused. Each writes ``OUT_DIR/SCENARIO_rank{r}.pt``: the final
parameters, the global parameters after every outer update, the sync events ``(inner step, fragment,
"start" | "apply")``, the strategy's counters and the last logged metrics. The scenario
``worker_stops``, which must come last, writes nothing: rank 0 stops answering in the middle of it
(and exits later), and rank 1 must then fail with a clear error once the 2 s timeout has passed.
"""

import itertools
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_converge.callbacks import EMA, LAWA, Grokfast
from lightning_converge.comm import Int8Compressor
from lightning_converge.strategies import DiLoCoStrategy, StreamingDiLoCoStrategy


class Regression(L.LightningModule):
    def __init__(self, inner_optimizer: str = "SGD") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.inner_optimizer = inner_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        return DataLoader(StepIndexedBatches(self), batch_size=None)

    def configure_optimizers(self):
        if self.inner_optimizer == "SGD":
            return torch.optim.SGD(self.parameters(), lr=0.05)
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Validated(Regression):
    """With a validation set (8 fixed samples, in 2 batches)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def val_dataloader(self):
        x, y = dataset().tensors
        return DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)


class SeenInValidation(L.Callback):
    """At the first validation batch: the parameters the model evaluates, the global and local parameters,
    and a checkpoint saved right there (``path``)."""

    def __init__(self, path) -> None:
        self.path = path
        self.seen = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            self.seen = {
                "evaluated": [p.detach().clone() for p in pl_module.parameters()],
                "global": [g.clone() for g in trainer.strategy.global_parameters],
            }


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def batch_indices(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s samples at 0-based ``step``: 16 samples a step in order, split r, r+2, ... between the ranks."""
    start = 16 * (step % 4)
    return torch.arange(start + rank, start + 16, 2)


class StepIndexedBatches(IterableDataset):
    """This rank's batches from the step the trainer is at, without end.

    Lightning restarts a plain DataLoader from its first batch when it resumes
    inside an epoch; these batches depend on the step alone, so a resumed run
    sees what an uninterrupted one does.
    """

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module

    def __iter__(self):
        x, y = dataset().tensors
        rank = self.module.trainer.global_rank
        for step in itertools.count(self.module.trainer.global_step):
            index = batch_indices(step, rank)
            yield x[index], y[index]


class Recording:
    """Mixed into a strategy: records every sync start and outer update, and the global parameters after each."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events = []
        self.globals_after_update = []

    def _start_sync(self, fragment, apply_at_step):
        self.events.append((self._schedule.inner_step, fragment.index, "start"))
        super()._start_sync(fragment, apply_at_step)

    def _apply_outer_update(self, fragment, mixing_alpha=None):
        super()._apply_outer_update(fragment, mixing_alpha)
        self.events.append((self._schedule.inner_step, fragment.index, "apply"))
        self.globals_after_update.append([g.clone() for g in self.global_parameters])


class RecordingDiLoCo(Recording, DiLoCoStrategy):
    pass


class RecordingStreamingDiLoCo(Recording, StreamingDiLoCoStrategy):
    pass


# name -> (strategy, inner optimizer, max_steps); the test file holds the expected outcomes. The
# reference kernels spare each process the compiler; tests/test_diloco.py runs the compiled ones.
SCENARIOS = {
    "ddp_identity": (
        lambda: RecordingDiLoCo(
            inner_steps=1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0, backend="reference"
        ),
        "SGD",
        5,
    ),
    "diloco": (lambda: RecordingDiLoCo(inner_steps=3, backend="reference"), "SGD", 10),
    "delayed": (lambda: RecordingDiLoCo(inner_steps=3, delay=1, backend="reference"), "SGD", 10),
    "diloco_fp16": (lambda: RecordingDiLoCo(inner_steps=3, compressor="fp16", backend="reference"), "SGD", 10),
    "streaming": (
        lambda: RecordingStreamingDiLoCo(
            inner_steps=4, num_fragments=2, overlap_steps=1, mixing_alpha=0.5, backend="reference"
        ),
        "SGD",
        10,
    ),
    "streaming_balanced": (
        lambda: RecordingStreamingDiLoCo(
            inner_steps=4,
            num_fragments=2,
            overlap_steps=1,
            mixing_alpha=0.5,
            fragment_assignment="balanced",
            backend="reference",
        ),
        "SGD",
        10,
    ),
}
# Checkpointed every 4 steps (the first: inside the second inner phase, with an update in flight),
# then resumed from the first checkpoint.
CHECKPOINTED = {
    "delayed_adamw": lambda: RecordingDiLoCo(inner_steps=3, delay=1, backend="reference"),
    # int8 pseudo-gradients with error feedback: each worker's residuals are in the checkpoint too
    "streaming_int8_adamw": lambda: RecordingStreamingDiLoCo(
        inner_steps=6,
        num_fragments=3,
        overlap_steps=1,
        mixing_alpha=0.5,
        compressor=Int8Compressor(block_size=64, backend="reference"),
        backend="reference",
    ),
}


# Stopped at step 12 (or 10), saved by hand after fit, resumed to 15: against 15 steps straight. Each:
# (strategy, callbacks, the step it stops at).
AFTER_FIT = {
    "after_fit": (lambda: RecordingDiLoCo(inner_steps=5, backend="reference"), lambda: [], 12),
    "after_fit_ema": (
        lambda: RecordingDiLoCo(inner_steps=5, backend="reference"),
        lambda: [EMA(decay=0.5, backend="reference")],
        12,
    ),
    # stopped right after an outer step whose EMA update is due only at step 6
    "after_fit_ema_every_3": (
        lambda: RecordingDiLoCo(inner_steps=5, backend="reference"),
        lambda: [EMA(decay=0.5, every_n_steps=3, backend="reference")],
        5,
    ),
    "after_fit_lawa": (
        lambda: RecordingDiLoCo(inner_steps=5, backend="reference"),
        lambda: [LAWA(k=2, every_n_steps=2)],
        12,
    ),
    "after_fit_grokfast": (
        lambda: RecordingDiLoCo(inner_steps=5, backend="reference"),
        lambda: [Grokfast(backend="reference")],
        12,
    ),
    # stopped with an overlapped all-reduce in flight (fragment 0 syncs at step 10, is applied at 11)
    "after_fit_streaming_ema_grokfast": (
        lambda: RecordingStreamingDiLoCo(
            inner_steps=4, num_fragments=2, overlap_steps=1, mixing_alpha=0.5, backend="reference"
        ),
        lambda: [EMA(decay=0.5, backend="reference"), Grokfast(backend="reference")],
        10,
    ),
}


class SwitchRecorder(L.Callback):
    """At each epoch end (after Switch EMA switched): the global parameters, the EMA average and this
    worker's local parameters; and the local and global parameters at the epoch's last batch (before)."""

    def __init__(self) -> None:
        self.before, self.after = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_last_batch:
            self.before.append(self._now(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.after.append(self._now(trainer, pl_module))

    @staticmethod
    def _now(trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        return {
            "global": [g.clone() for g in trainer.strategy.global_parameters],
            "local": [p.detach().clone() for p in pl_module.parameters()],
            "average": [a.clone() for a in ema.state_dict()["averages"].values()],
        }


def callback_states(trainer):
    """The state of this rank's EMA, LAWA and Grokfast, where attached."""
    states = {}
    for callback in trainer.callbacks:
        if isinstance(callback, (EMA, LAWA, Grokfast)):
            states[type(callback).__name__] = callback.state_dict()
    return states


class StopAnsweringAtStep(L.Callback):
    """Before inner step ``step``, rank ``rank`` stops answering for ``seconds``, then exits at once,
    as a killed process would."""

    def __init__(self, rank: int, step: int, seconds: float) -> None:
        self.rank, self.step, self.seconds = rank, step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            time.sleep(self.seconds)
            os._exit(17)


def fit(strategy, inner_optimizer, max_steps, callbacks=(), ckpt_path=None, **trainer_options):
    model = Regression(inner_optimizer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def save(out_dir, name, trainer, model, **extra):
    strategy = trainer.strategy
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "globals_after_update": strategy.globals_after_update,
            "events": strategy.events,
            "outer_steps": strategy.outer_steps,
            "bytes_sent": strategy.bytes_sent,
            "wait_seconds": strategy.wait_seconds,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "callbacks": callback_states(trainer),
            **extra,
        },
        Path(out_dir) / f"{name}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    for name in names:
        if name in SCENARIOS:
            make_strategy, inner_optimizer, max_steps = SCENARIOS[name]
            save(out_dir, name, *fit(make_strategy(), inner_optimizer, max_steps))
        elif name in CHECKPOINTED:
            ckpt_dir = out_dir / f"{name}_checkpoints"
            every_4_steps = ModelCheckpoint(ckpt_dir, save_top_k=-1, every_n_train_steps=4)
            save(out_dir, name, *fit(CHECKPOINTED[name](), "AdamW", 12, callbacks=[every_4_steps]))
            resumed = fit(CHECKPOINTED[name](), "AdamW", 12, ckpt_path=ckpt_dir / "epoch=0-step=4.ckpt")
            save(out_dir, f"{name}_resumed", *resumed)
        elif name == "accumulate_bf16_callbacks":  # 2 micro-batches a step, bf16 autocast, EMA and Grokfast
            strategy = RecordingDiLoCo(inner_steps=3, backend="reference")
            # The EMA follows the global parameters; the model is left with DiLoCo's at the end.
            ema = EMA(decay=0.9, keep_average_on_train_end=False, backend="reference")
            callbacks = [ema, Grokfast(backend="reference")]
            run = fit(strategy, "AdamW", 6, callbacks, accumulate_grad_batches=2, precision="bf16-mixed")
            save(out_dir, name, *run)
        elif name in AFTER_FIT:
            make_strategy, make_callbacks, stop = AFTER_FIT[name]
            save(out_dir, name, *fit(make_strategy(), "AdamW", 15, make_callbacks()))
            trainer, model = fit(make_strategy(), "AdamW", stop, make_callbacks())
            checkpoint = out_dir / f"{name}.ckpt"
            trainer.save_checkpoint(checkpoint)
            save(out_dir, f"{name}_stopped", trainer, model)
            resumed = fit(make_strategy(), "AdamW", 15, make_callbacks(), ckpt_path=checkpoint)
            save(out_dir, f"{name}_resumed", *resumed)
        elif name == "delayed_stops_at_sync":  # delay=1, fit ends right after the first sync
            strategy = RecordingDiLoCo(inner_steps=3, delay=1, backend="reference")
            save(out_dir, name, *fit(strategy, "SGD", 3))
        elif name == "ema_ends_at_sync":  # the last step is a sync step
            strategy = RecordingDiLoCo(inner_steps=3, backend="reference")
            save(out_dir, name, *fit(strategy, "SGD", 6, [EMA(decay=0.5, backend="reference")]))
        elif name == "switch_ema":  # epochs of 4 steps, syncs every 3: the switches fall inside inner phases
            strategy = RecordingDiLoCo(inner_steps=3, backend="reference")
            recorder = SwitchRecorder()
            callbacks = [EMA(decay=0.5, switch_every_epoch=True, backend="reference"), recorder]
            run = fit(strategy, "SGD", 10, callbacks, limit_train_batches=4)
            save(out_dir, name, *run, before_switch=recorder.before, after_switch=recorder.after)
        elif name in ("validation", "validation_ema"):  # validation at step 4, inside the second inner phase
            strategy = RecordingDiLoCo(inner_steps=3, backend="reference")
            seen = SeenInValidation(out_dir / f"{name}.ckpt")
            callbacks = [seen] + ([EMA(decay=0.5, backend="reference")] if name == "validation_ema" else [])
            model = Validated("SGD")
            trainer = L.Trainer(
                accelerator="cpu",
                devices=2,
                strategy=strategy,
                max_steps=5,
                val_check_interval=4,
                check_val_every_n_epoch=None,
                logger=False,
                callbacks=callbacks,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(model)
            save(out_dir, name, trainer, model, seen_in_validation=seen.seen)
        elif name == "worker_stops":  # the last scenario: rank 0 hangs in the second inner phase, then dies
            strategy = DiLoCoStrategy(inner_steps=2, backend="reference", timeout=2)
            fit(strategy, "SGD", 8, callbacks=[StopAnsweringAtStep(rank=0, step=3, seconds=8)])
        else:
            raise ValueError(f"unknown scenario {name!r}")
