"""EMA: an exponential moving average of the weights, and Switch EMA ("Switch EMA: A Free
Lunch for Better Flatness and Sharpness", arXiv 2402.09240)."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_converge.callbacks.averaging import AveragingCallback, accumulation_dtype
from lightning_converge.checks import check_in_range, check_int, is_number
from lightning_converge.kernels.dispatch import ScalarSlots
from lightning_converge.kernels.ema import ema_update
from lightning_converge.schedules import ScheduleLike, as_schedule


class EMA(AveragingCallback):
    """Keep ``average = decay * average + (1 - decay) * weights`` after optimizer steps,
    evaluate with it, and store it in checkpoints.

    Args:
        decay: a number in [0, 1] or a schedule, e.g.
            :class:`~lightning_converge.schedules.EMAWarmup`. A schedule is called
            with the number of EMA updates made so far (0 for the first), so a
            warm-up counts from ``start_step`` and in updates, not optimizer steps.
        every_n_steps: update after every ``every_n_steps``-th optimizer step
            (``trainer.global_step`` a multiple of it).
        start_step: until ``trainer.global_step`` passes it, the average is a copy
            of the live weights (refreshed at every optimizer step), so evaluation
            never sees a stale or never-updated average.
        include_buffers: also average the floating-point buffers saved with the
            model (BatchNorm statistics); otherwise the live buffers are used.
        validate_with: ``"average"`` evaluates validation and test with the
            average; ``"live"`` leaves the model alone.
        switch_every_epoch: Switch EMA (SEMA): copy the average into the live
            model at the end of every training epoch; training goes on from there
            (the optimizer state is kept). Under DiLoCo the average replaces the
            global parameters, on every worker alike, and each worker's local
            parameters move with them (the progress of its inner phase carries over).
        keep_average_on_train_end: copy the average into the model when training
            ends, so the fitted model is the averaged one. A checkpoint saved by
            hand after ``fit`` holds it as ``state_dict``, and the live weights
            beside it, so a run resumed from it continues exactly.
        device: where the average lives; None: with each parameter. ``"cpu"``
            saves accelerator memory at the cost of a transfer per update.
        backend: the :func:`~lightning_converge.kernels.ema.ema_update` backend.

    The average is fp32 for bf16/fp16 weights (else the weights' dtype); it is
    updated by one fused ``ema_update`` over all tracked tensors.

    When each hook fires and what it does here (the rest of the hooks, shared
    with LAWA, are described in :class:`~lightning_converge.callbacks.averaging.AveragingCallback`):

    - ``on_train_batch_end`` (after each training batch, after its optimizer step
      if it made one): if ``global_step`` moved, copies the live weights (up to
      ``start_step``) or makes one EMA update (every ``every_n_steps`` steps), and
      logs the decay used as ``ema/decay``. Live elements that are inf/NaN are
      left out: those elements of the average keep their last finite value
      (checked inside the update pass; there is no extra pass or host sync).
    - ``on_train_epoch_end`` (after the epoch's last batch and its epoch-end
      validation): warns if a live weight is inf/NaN on any rank (one
      finiteness pass an epoch); with ``switch_every_epoch``, copies the
      average into the model.

    Under DiLoCo / Streaming DiLoCo the EMA follows the global parameters: an
    update is due as above, and is made only if an outer step has changed them
    since the last one (so with ``every_n_steps=1`` once per outer step).

    Every decision depends on ``global_step``, the update count and the (DDP
    synchronized, or DiLoCo's global) weights, so all ranks take it alike. State (``state_dict``):
    the averages by tensor name, the update count and (DiLoCo) the outer steps
    the average has followed; a resumed run continues exactly.
    """

    checkpoint_key = "ema_state_dict"

    def __init__(
        self,
        decay: ScheduleLike = 0.999,
        every_n_steps: int = 1,
        start_step: int = 0,
        include_buffers: bool = False,
        validate_with: str = "average",
        switch_every_epoch: bool = False,
        keep_average_on_train_end: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            include_buffers=include_buffers,
            validate_with=validate_with,
            keep_average_on_train_end=keep_average_on_train_end,
            device=device,
            backend=backend,
        )
        if is_number(decay):  # a schedule's values are checked as it gives them
            check_in_range("decay", decay, 0, 1, owner="EMA")
        self.decay = as_schedule(decay, name="decay")
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, owner="EMA")
        self.start_step = check_int("start_step", start_step, 0, owner="EMA")
        self.switch_every_epoch = switch_every_epoch
        self._averages: dict[str, Tensor] = {}
        self._num_updates = 0
        self._scalars = ScalarSlots()  # the decay on the averages' device, refilled at each update

    def _reset(self) -> None:
        self._averages = {}
        self._num_updates = 0

    def _align(self) -> None:
        if self._averages:
            self._check_restored(self._averages)
            self._averages = {
                name: self._averages[name].to(self._state_device(live)) for name, live in zip(self._names, self._live)
            }
        else:
            self._averages = {
                name: followed.detach().to(
                    device=self._state_device(live),
                    dtype=accumulation_dtype(live.dtype),
                    memory_format=torch.contiguous_format,
                    copy=True,
                )
                for name, live, followed in zip(self._names, self._live, self._followed)
            }

    def _average(self) -> list[Tensor]:
        return list(self._averages.values())

    def _scheduled_decay(self) -> float:
        decay = float(self.decay(self._num_updates))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], the schedule gave {decay} at update {self._num_updates}")
        return decay

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._optimizer_stepped(trainer):
            return
        copying = trainer.global_step <= self.start_step
        if not copying and trainer.global_step % self.every_n_steps:
            return
        self._track(pl_module)
        if not self._followed_moved(trainer):  # DiLoCo: no outer step since the last update
            return
        # decay 0 makes the update an exact copy: the same fused pass serves both phases.
        decay = 0.0 if copying else self._scheduled_decay()
        averages = self._average()
        currents = [followed.detach().to(average.device) for followed, average in zip(self._followed, averages)]
        decay_slot = self._scalars("decay", decay, averages[0].device)
        ema_update(averages, currents, decay=decay_slot, backend=self.backend)
        if not copying:
            self._num_updates += 1
        pl_module.log("ema/decay", decay)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._track(pl_module)
        # A whole pass over the weights: once an epoch, not in every update.
        self._live_is_finite(
            trainer, otherwise="the average left those elements out (they keep their last finite value)"
        )
        if self.switch_every_epoch:
            self._copy_average_into_model(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "averages": dict(self._averages),
            "num_updates": self._num_updates,
            "outer_steps_followed": self._followed_version,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._averages = dict(state_dict["averages"])
        self._num_updates = int(state_dict["num_updates"])
        self._followed_version = state_dict.get("outer_steps_followed")
        self._untrack()
