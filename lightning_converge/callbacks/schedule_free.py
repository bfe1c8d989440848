"""Train and eval modes of the Schedule-Free optimizers under Lightning, without touching the
LightningModule: :class:`ScheduleFreeMode`, which Lightning adds to every ``Trainer``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_converge.callbacks.averaging import LIVE_STATE_DICT_KEY, AveragingCallback, _SaveCheckpointHook
from lightning_converge.optim.schedule_free import _ScheduleFree


def callbacks_factory() -> list[Callback]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point (``pyproject.toml``): every
    ``Trainer`` gets a :class:`ScheduleFreeMode`, which does nothing without a Schedule-Free optimizer."""
    return [ScheduleFreeMode()]


class ScheduleFreeMode(Callback):
    """Training steps see y; validation, test, prediction and checkpoints see x.

    The Schedule-Free optimizers (:class:`~lightning_converge.optim.ScheduleFreeAdamW`,
    :class:`~lightning_converge.optim.ScheduleFreeSGD`) take gradients at y and evaluate at the
    average x. Lightning adds this callback to every ``Trainer`` through the entry point group
    ``lightning.pytorch.callbacks_factory`` (installed with the package); passing one
    explicitly is the same (only the first one of a Trainer acts). Without a Schedule-Free
    optimizer among ``trainer.optimizers`` it does nothing.

    When each hook fires and what it does:

    - ``on_train_start`` (once per ``fit``, after a resumed checkpoint is restored): the
      parameters hold y (``optimizer.train()``).
    - ``on_validation_start`` / ``on_validation_end`` (around each validation, the sanity
      check included): x for validation, y again afterwards when inside ``fit``: exactly the
      y training left (kept aside during validation, one copy of the parameters), so
      validating, and how often, changes nothing in training.
    - ``on_test_start``, ``on_predict_start``: x.
    - ``on_train_end``: x, so the fitted model is the average; y is kept aside for a checkpoint
      saved afterwards.
    - every checkpoint, weights-only ones included (from ``on_fit_start``, a stand-in for the
      module's ``on_save_checkpoint``, as the averaging callbacks use): ``state_dict`` holds x, computed
      beside the parameters (saving does not change them, so training goes on bit for bit);
      full checkpoints hold y under ``"live_state_dict"`` (one more copy of the parameters)
      with the optimizer state in train mode, and ``on_load_checkpoint`` puts y back when
      ``fit`` resumes: the resumed run continues exactly. A checkpoint without
      ``"live_state_dict"`` (saved in eval mode by other means) resumes from
      ``train()`` of its x: y up to rounding.

    With an averaging callback (:class:`~lightning_converge.callbacks.EMA`, ``LAWA``) that
    evaluates with its average, that average is what validation, test and ``state_dict``
    hold, and it averages the training weights y, the tensors the optimizer updates (x is
    itself an average of z; averaging x would cost a pass over z each step). This callback
    then leaves evaluation and the end of training to it and only keeps y in checkpoints.
    """

    def __init__(self) -> None:
        self._kept_live: dict[str, torch.Tensor] | None = None  # y, after train end made the model x
        self._averaged_at_train_end = False  # an averaging callback put its average in the model
        self._y_during_validation: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its y)

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[_ScheduleFree]:
        return [optimizer for optimizer in trainer.optimizers if isinstance(optimizer, _ScheduleFree)]

    def _acts(self, trainer: pl.Trainer) -> bool:
        """Whether this is the first ScheduleFreeMode of the Trainer (the entry point's and a user's may meet)."""
        return next(cb for cb in trainer.callbacks if isinstance(cb, ScheduleFreeMode)) is self

    @staticmethod
    def _averaging_decides(trainer: pl.Trainer, what: str) -> bool:
        """Whether an averaging callback swaps its average in for evaluation (``"evaluation"``) or
        copies it into the model at train end (``"train_end"``): the model is then its to change."""
        averaging = [cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback)]
        if what == "evaluation":
            return any(cb.validate_with == "average" for cb in averaging)
        return any(cb.keep_average_on_train_end for cb in averaging)

    def _switch(self, trainer: pl.Trainer, train: bool) -> None:
        if not self._acts(trainer):
            return
        for optimizer in self._optimizers(trainer):
            optimizer.train() if train else optimizer.eval()

    # -- Lightning hooks -----------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._kept_live = None
            self._averaged_at_train_end = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizers exist from here on; a Trainer without a Schedule-Free one is left as it is.
        if self._acts(trainer) and self._optimizers(trainer):
            _SaveCheckpointHook.add(pl_module, self._write_average)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _SaveCheckpointHook.remove(pl_module, self._write_average)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(trainer, train=True)

    @torch.no_grad()
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._averaging_decides(trainer, "evaluation") or not self._acts(trainer):
            return
        if trainer.state.fn == TrainerFn.FITTING:
            # y, to give back exactly: train() after eval() is y only up to rounding.
            self._y_during_validation = [
                (p, p.detach().clone())
                for optimizer in self._optimizers(trainer)
                if optimizer.train_mode
                for group in optimizer.param_groups
                for p in group["params"]
                if "z" in optimizer.state.get(p, {})
            ]
        self._switch(trainer, train=False)

    @torch.no_grad()
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not self._averaging_decides(trainer, "evaluation"):
            self._switch(trainer, train=True)
            for p, y in self._y_during_validation:
                p.copy_(y)
            self._y_during_validation = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._averaging_decides(trainer, "evaluation"):
            self._switch(trainer, train=False)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(trainer, train=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._acts(trainer):
            return
        if self._averaging_decides(trainer, "train_end"):
            self._averaged_at_train_end = True
            return
        optimizers = [optimizer for optimizer in self._optimizers(trainer) if optimizer.train_mode]
        if optimizers:
            self._kept_live = {name: t.detach().clone() for name, t in pl_module.state_dict().items()}
            for optimizer in optimizers:
                optimizer.eval()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._acts(trainer):
            self._write_average(pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has just loaded state_dict (x); training goes on from y. An averaging callback
        # may load the same live weights: loading them twice changes nothing.
        live = checkpoint.get(LIVE_STATE_DICT_KEY)
        schedule_free = any(
            "train_mode" in group and "weight_sum" in group
            for state in checkpoint.get("optimizer_states", [])
            for group in state.get("param_groups", [])
        )
        if live is not None and schedule_free and trainer.state.fn == TrainerFn.FITTING and self._acts(trainer):
            pl_module.load_state_dict(live)

    # -- checkpoints ---------------------------------------------------------------------

    def _write_average(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Make ``state_dict`` hold x and, in a full checkpoint, ``"live_state_dict"`` hold y (see the class)."""
        if LIVE_STATE_DICT_KEY in checkpoint or self._averaged_at_train_end:
            # Written already, by this callback or an averaging one; or the model is that one's average.
            return
        trainer = pl_module.trainer
        optimizers = self._optimizers(trainer)
        full = "optimizer_states" in checkpoint
        if self._kept_live is not None:  # the model holds x since train end
            if full:
                checkpoint[LIVE_STATE_DICT_KEY] = self._kept_live
                # The optimizer state goes with the live weights: train mode.
                for optimizer in optimizers:
                    saved = checkpoint["optimizer_states"][trainer.optimizers.index(optimizer)]
                    for group in saved["param_groups"]:
                        group["train_mode"] = True
            return
        averaged: dict[torch.Tensor, torch.Tensor] = {}
        for optimizer in optimizers:
            if optimizer.train_mode:
                averaged.update(optimizer.averaged_parameters())
        if not averaged:
            return
        live = checkpoint["state_dict"]
        state_dict = dict(live)
        for name, parameter in pl_module.named_parameters():
            if parameter in averaged and name in state_dict:
                state_dict[name] = averaged[parameter]
        checkpoint["state_dict"] = type(live)(state_dict)
        if full:
            checkpoint[LIVE_STATE_DICT_KEY] = live
