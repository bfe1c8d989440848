"""LAWA: Latest Weight Averaging ("Stop Wasting My Time! Saving Days of ImageNet and BERT
Training with Latest Weight Averaging", Kaddour 2022)."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_converge.callbacks.averaging import AveragingCallback, accumulation_dtype
from lightning_converge.checks import check_int


class LAWA(AveragingCallback):
    """Keep the latest ``k`` snapshots of the weights and evaluate with their uniform average.

    Args:
        k: how many snapshots to keep; the oldest is dropped when a new one comes.
        every_n_steps: a snapshot every ``every_n_steps`` optimizer steps
            (``trainer.global_step`` a multiple of it).
        every_n_epochs: a snapshot at the end of every ``every_n_epochs``-th
            training epoch (taken at its last batch, so the epoch-end validation
            already counts it). Set at most one of the two; with neither, a
            snapshot at the end of every epoch (the paper's).
        device: where the snapshots live (``"cpu"`` by default: ``k`` copies of
            the model would crowd an accelerator); None: with each parameter.
        include_buffers: also average the floating-point buffers saved with the
            model (BatchNorm statistics).
        validate_with: ``"average"`` evaluates validation and test with the
            average of the snapshots; ``"live"`` leaves the model alone.
        keep_average_on_train_end: copy the average into the model when training ends.
        backend: the backend of the finiteness check before each snapshot.

    Snapshots keep the weights' dtype; their mean is taken in fp32 (fp64 for
    fp64 weights) when evaluation or a checkpoint needs it. Until the first
    snapshot, evaluation uses the live weights.

    When each hook fires and what it does here (the rest of the hooks, shared
    with EMA, are described in :class:`~lightning_converge.callbacks.averaging.AveragingCallback`):

    - ``on_train_batch_end`` (after each training batch, after its optimizer step
      if it made one): takes a snapshot when one is due (the last batch of an epoch
      due, or ``global_step`` moved to a multiple of ``every_n_steps``). If a live weight is
      inf/NaN on any rank, every rank skips the snapshot.

    Under DiLoCo / Streaming DiLoCo the snapshots are of the global parameters.

    State (``state_dict``): the snapshots, oldest first, by tensor name; a
    resumed run continues exactly.
    """

    checkpoint_key = "lawa_state_dict"

    def __init__(
        self,
        k: int = 6,
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = "cpu",
        include_buffers: bool = False,
        validate_with: str = "average",
        keep_average_on_train_end: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            include_buffers=include_buffers,
            validate_with=validate_with,
            keep_average_on_train_end=keep_average_on_train_end,
            device=device,
            backend=backend,
        )
        self.k = check_int("k", k, 1, owner="LAWA")
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                f"LAWA: every_n_steps must be None when every_n_epochs is set (one snapshot rule), "
                f"got every_n_steps={every_n_steps!r}, every_n_epochs={every_n_epochs!r}"
            )
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, allow_none=True, owner="LAWA")
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1, allow_none=True, owner="LAWA")
        self._snapshots: list[dict[str, Tensor]] = []

    def _reset(self) -> None:
        self._snapshots = []

    def _align(self) -> None:
        for snapshot in self._snapshots:
            self._check_restored(snapshot)
        self._snapshots = [
            {name: snapshot[name].to(self._state_device(live)) for name, live in zip(self._names, self._live)}
            for snapshot in self._snapshots
        ]

    def _average(self) -> Optional[list[Tensor]]:
        if not self._snapshots:
            return None
        return [
            torch.stack([snapshot[name] for snapshot in self._snapshots]).mean(
                dim=0, dtype=accumulation_dtype(live.dtype)
            )
            for name, live in zip(self._names, self._live)
        ]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._optimizer_stepped(trainer)
        if self.every_n_steps is None:
            due = trainer.is_last_batch and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        else:
            due = stepped and trainer.global_step % self.every_n_steps == 0
        if due:
            self._take_snapshot(trainer, pl_module)

    @torch.no_grad()
    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._track(pl_module)
        if not self._live_is_finite(trainer, otherwise="the snapshot is skipped"):
            return
        snapshot = {
            name: followed.detach().to(self._state_device(live), live.dtype, copy=True)
            for name, live, followed in zip(self._names, self._live, self._followed)
        }
        self._snapshots = [*self._snapshots, snapshot][-self.k :]

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": [dict(snapshot) for snapshot in self._snapshots]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = [dict(snapshot) for snapshot in state_dict["snapshots"]]
        self._untrack()
