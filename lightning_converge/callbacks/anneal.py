"""Anneal: drive an attribute of the LightningModule, or an optimizer hyperparameter, by a schedule."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_converge.checks import check_choice
from lightning_converge.schedules import Schedule, as_schedule

OPTIMIZER_PREFIX = "optimizer."


class Anneal(Callback):
    """Set ``target`` to ``schedule(step)`` before every training step (or epoch) and log it.

    Args:
        target: what to set.

            - A dotted path from the LightningModule: ``"guidance_scale"``,
              ``"model.cfg.guidance_scale"``; a mapping along the path (a dict,
              ``hparams``, an OmegaConf config) is indexed by key. If the current
              value is a tensor (a buffer, or a 0-d tensor that compiled code
              reads), it is filled in place: it stays a buffer, and compiled
              code does not recompile.
            - ``"optimizer.<key>"``: that hyperparameter in every parameter group
              of every optimizer, e.g. ``"optimizer.weight_decay"``. (Lightning's
              own LR schedulers also write ``lr``: don't drive it from both.)
        schedule: a :class:`~lightning_converge.schedules.Schedule` or a number.
        interval: ``"step"``: the step is ``trainer.global_step``, the number of
            optimizer steps taken; ``"epoch"``: the step is ``trainer.current_epoch``.
        log: log the value as ``anneal/<target>``.

    When each hook fires and what it does here:

    - ``setup`` (start of fit/validate/test/predict): checks that no other Anneal
      drives the same target and that a module target exists; a missing one
      raises ``ValueError``.
    - ``on_fit_start`` (after ``configure_model`` and ``configure_optimizers``,
      before the sanity check and the first training step): checks that every
      parameter group holds an ``optimizer.<key>`` target, and a module target
      of a module that builds its layers in ``configure_model``.
    - ``on_train_batch_start`` (``interval="step"``; before each training batch's
      ``training_step``): sets and logs the value. Under gradient accumulation
      the batches of one optimizer step see the same value.
    - ``on_train_epoch_start`` (``interval="epoch"``; before each training epoch's
      first batch): sets and logs the value.

    The schedule is a pure function of the step, so the callback keeps no state:
    a resumed run continues from its restored ``global_step``. Several Anneal
    callbacks coexist, one per target (``state_key`` holds the target).
    """

    def __init__(
        self,
        target: str = "guidance_scale",
        *,
        schedule: Union[float, Schedule],
        interval: Literal["step", "epoch"] = "step",
        log: bool = True,
    ) -> None:
        if "" in target.split("."):
            raise ValueError(f"Anneal: target must be a dotted path such as 'model.cfg.guidance_scale', got {target!r}")
        self.target = target
        self.schedule = as_schedule(schedule, name="schedule")
        self.interval = check_choice("interval", interval, ("step", "epoch"), owner="Anneal")
        self.log = log

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target)

    @property
    def optimizer_key(self) -> str | None:
        """The hyperparameter name of an ``optimizer.<key>`` target, else None."""
        return self.target[len(OPTIMIZER_PREFIX) :] if self.target.startswith(OPTIMIZER_PREFIX) else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if callback is not self and isinstance(callback, Anneal) and callback.target == self.target:
                raise ValueError(f"Anneal: two Anneal callbacks drive the same target {self.target!r}")
        # Layers built in configure_model do not exist yet: those targets are checked at on_fit_start.
        if self.optimizer_key is None and not is_overridden("configure_model", pl_module):
            self._module_slot(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizer_key is None:
            self._module_slot(pl_module)
        else:
            self._parameter_groups(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            self._apply(trainer, pl_module, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        value = self.schedule(step)
        if self.optimizer_key is None:
            _assign(*self._module_slot(pl_module), value)
        else:
            for group in self._parameter_groups(trainer):
                _assign(group, self.optimizer_key, value)
        if self.log:
            pl_module.log(f"anneal/{self.target}", value)

    def _module_slot(self, pl_module: pl.LightningModule) -> tuple[Any, str]:
        """The object holding the target and the target's name in it; raises if a part is missing."""
        *parents, name = self.target.split(".")
        holder, walked = pl_module, type(pl_module).__name__
        for part in parents:
            self._require_part(holder, part, walked)
            holder, walked = _get(holder, part), f"{walked}.{part}"
        self._require_part(holder, name, walked)
        return holder, name

    def _require_part(self, holder: Any, part: str, walked: str) -> None:
        if not _has(holder, part):
            raise ValueError(f"Anneal: target {self.target!r} does not exist: {walked} has no {part!r}")

    def _parameter_groups(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """Every parameter group of every optimizer; raises if one lacks the key."""
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if not groups:
            raise ValueError(f"Anneal: target {self.target!r} needs an optimizer, but the trainer has none")
        for group in groups:
            if self.optimizer_key not in group:
                raise ValueError(
                    f"Anneal: target {self.target!r} does not exist: a parameter group has no "
                    f"{self.optimizer_key!r}, it has {sorted(key for key in group if key != 'params')}"
                )
        return groups


def _has(holder: Any, name: str) -> bool:
    return name in holder if isinstance(holder, Mapping) else hasattr(holder, name)


def _get(holder: Any, name: str) -> Any:
    return holder[name] if isinstance(holder, Mapping) else getattr(holder, name)


def _assign(holder: Any, name: str, value: float) -> None:
    current = _get(holder, name)
    if isinstance(current, torch.Tensor):
        with torch.no_grad():
            current.fill_(value)
    elif isinstance(holder, MutableMapping):
        holder[name] = value
    else:
        setattr(holder, name, value)
