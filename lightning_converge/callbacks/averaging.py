"""What the weight-averaging callbacks (:class:`~lightning_converge.callbacks.ema.EMA`,
:class:`~lightning_converge.callbacks.lawa.LAWA`) share, written once:

- which tensors are averaged: every parameter, plus (``include_buffers``) the
  floating-point buffers saved with the model, such as BatchNorm statistics;
- whether an optimizer step really happened: ``trainer.global_step`` moved
  (under gradient accumulation most batches end without one);
- the check for inf/NaN live weights, decided the same way on every rank;
- evaluation with the average: swapped in for validation and test, the live
  weights put back afterwards;
- the averaged weights in every checkpoint, weights-only ones included.

Checkpoints
-----------
``checkpoint["state_dict"]`` keeps the live weights, so Lightning resumes
training exactly and ``load_from_checkpoint`` loads it strictly, as without the
callback. The weights that evaluation uses go to a top-level key,
``checkpoint[<callback>.checkpoint_key]`` (``"ema_state_dict"``,
``"lawa_state_dict"``): a complete state dict of the module, loadable with
``model.load_state_dict(torch.load(path, weights_only=True)["ema_state_dict"])``.
A prefix inside ``checkpoint["state_dict"]`` was the alternative; it was turned
down because those extra keys break strict loading of every such checkpoint
without the callback attached.

Full checkpoints get the key from the callback's ``on_save_checkpoint``, next
to the callback's ``state_dict()`` (averages and counters, for an exact resume);
``torch.save`` stores the tensors the two entries share once. Lightning writes a
``ModelCheckpoint(save_weights_only=True)`` checkpoint without calling any
callback hook (``on_save_checkpoint`` and ``state_dict`` are both skipped), but
it calls the LightningModule's ``on_save_checkpoint`` for every checkpoint. So
between ``setup`` and ``teardown`` an averaging callback puts a small stand-in
for that method on the module instance (:class:`_SaveCheckpointHook`): it writes
the key unless the callback's hook already did, then calls the module's own
hook. It is removed at ``teardown`` so the module holds no reference to the
callback after ``fit``; a weights-only checkpoint saved by hand after ``fit``
therefore has no key, but with ``keep_average_on_train_end`` (the default) its
``state_dict`` is the average by then. A weights-only checkpoint cannot resume
training (Lightning needs the optimizer state): the averaged weights are all it
needs.

Sharded strategies (FSDP, DeepSpeed) are not supported: the tensors are swapped
and averaged as the module holds them.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.kernels.finite import all_finite

VALIDATE_WITH = ("average", "live")

Writer = Callable[[pl.LightningModule, dict[str, Any]], None]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to average in: fp32 for bf16/fp16 tensors (their 8- or 11-bit
    mantissas would round small updates away), else the tensor's own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) >= ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class AveragingCallback(Callback):
    """Base of the weight-averaging callbacks: keeps an average of a LightningModule's
    weights, evaluates with it and stores it in checkpoints.

    Subclasses keep the average's state and implement :meth:`_reset` (forget it),
    :meth:`_align` (fit the state to the tracked tensors), :meth:`_average` (the
    averaged tensors, or None while there is nothing to average), ``state_dict``
    and ``load_state_dict`` (which ends with :meth:`_untrack`). They decide when
    to update in their own training hooks, with :meth:`_optimizer_stepped` and
    :meth:`_live_is_finite`.

    Hooks implemented here:

    - ``setup`` (start of fit/validate/test/predict, before checkpoint restore):
      a fit starts a new average (a resumed fit then restores the saved one);
      puts the stand-in ``on_save_checkpoint`` on the module. Raises ``ValueError`` if
      another averaging callback also evaluates with its average.
    - ``on_train_start`` (after checkpoint restore and the sanity check, before
      the first training batch): collects the tracked tensors; a new average
      starts as a copy of the live weights.
    - ``on_validation_start`` / ``on_test_start`` (before the first evaluation
      batch): with ``validate_with="average"``, swaps the average in.
    - ``on_validation_end`` / ``on_test_end`` (after the last evaluation batch and
      the epoch-end hooks, before checkpoint callbacks save): swaps the live
      weights back.
    - ``on_train_end`` (after the last epoch): with ``keep_average_on_train_end``,
      copies the average into the model, which then holds it for good.
    - ``on_save_checkpoint`` (full checkpoints, during or after a run): writes
      the averaged weights under :attr:`checkpoint_key`.
    - The module's ``on_save_checkpoint``, stood in for between ``setup`` and
      ``teardown`` (every checkpoint, weights-only included; after the
      callbacks' hook): writes them if the callback's hook did not.
    - ``on_exception`` and ``teardown``: put the live weights back if an error
      interrupted evaluation; ``teardown`` also removes the module's stand-in hook.
    """

    #: Top-level checkpoint key of the averaged weights.
    checkpoint_key: ClassVar[str]

    def __init__(
        self,
        *,
        include_buffers: bool,
        validate_with: str,
        keep_average_on_train_end: bool,
        device: Optional[Union[str, torch.device]],
        backend: str,
    ) -> None:
        if validate_with not in VALIDATE_WITH:
            raise ValueError(f"{self._name}: validate_with must be one of {VALIDATE_WITH}, got {validate_with!r}")
        self.include_buffers = include_buffers
        self.validate_with = validate_with
        self.keep_average_on_train_end = keep_average_on_train_end
        self.device = None if device is None else torch.device(device)
        self.backend = validate_backend(backend)
        self._module: Optional[pl.LightningModule] = None  # whose tensors are tracked (None: collect again)
        self._names: list[str] = []
        self._live: list[Tensor] = []  # the module's tracked parameters and buffers, in `_names` order
        self._stash: Optional[list[Tensor]] = None  # the live storages while the average is swapped in
        self._last_step = 0  # trainer.global_step at the previous training batch end

    @property
    def _name(self) -> str:
        return type(self).__name__

    # -- for subclasses ------------------------------------------------------------------

    def _reset(self) -> None:
        """Forget the average: the next fit starts a new one."""
        raise NotImplementedError

    def _align(self) -> None:
        """Fit the state to ``_names``/``_live``: a restored average moves to its
        device, a missing one starts from the live weights."""
        raise NotImplementedError

    def _average(self) -> Optional[list[Tensor]]:
        """The averaged tensors in ``_names`` order, or None when nothing has been averaged yet."""
        raise NotImplementedError

    def _untrack(self) -> None:
        """Collect the tracked tensors again on next use (after a restore, or for a new fit)."""
        self._module = None

    def _track(self, pl_module: pl.LightningModule) -> None:
        """Collect the tensors to average from ``pl_module``, once per module and restore."""
        if self._module is pl_module:
            return
        named = list(pl_module.named_parameters())
        if self.include_buffers:
            saved = pl_module.state_dict().keys()  # persistent buffers only: others are derived, not learned
            named += [(name, b) for name, b in pl_module.named_buffers() if b.is_floating_point() and name in saved]
        if not named:
            raise ValueError(f"{self._name}: {type(pl_module).__name__} has no parameters to average")
        self._names = [name for name, _ in named]
        self._live = [tensor for _, tensor in named]
        self._align()
        self._module = pl_module

    def _state_device(self, tensor: Tensor) -> torch.device:
        """Where the average of ``tensor`` lives: ``device``, or the tensor's own."""
        return self.device or tensor.device

    def _check_restored(self, state: Mapping[str, Tensor]) -> None:
        """Raise if a restored average lacks a tracked tensor (it was saved from another model)."""
        missing = [name for name in self._names if name not in state]
        if missing:
            raise ValueError(
                f"{self._name}: the restored average has no {missing[:3]} "
                f"({len(missing)} tracked tensors missing): was it saved from another model, "
                "or with another include_buffers?"
            )

    def _optimizer_stepped(self, trainer: pl.Trainer) -> bool:
        """Whether an optimizer step happened since the previous training batch ended.

        Call once per ``on_train_batch_end``. ``global_step`` counts optimizer
        steps, so under gradient accumulation it stays put on most batches.
        """
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        return stepped

    @torch.no_grad()
    def _live_is_finite(self, trainer: pl.Trainer, *, otherwise: str) -> bool:
        """Whether every tracked tensor is finite on every rank, so all ranks decide alike;
        if not, warns that the live weights hold inf/NaN and ``otherwise``."""
        finite = bool(all_finite(self._live, backend=self.backend))
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            rank_zero_warn(f"{self._name}: the live weights hold inf or NaN; {otherwise}")
        return finite

    # -- evaluation with the average -----------------------------------------------------

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        """Make the module hold the average; keep the live storages aside.

        The tensors keep their identity (optimizers, DDP and hooks still see the
        same objects); only their ``.data`` changes. An average of the tensor's
        dtype and device is handed over without a copy.
        """
        self._track(pl_module)
        average = self._average()
        if average is None:  # nothing averaged yet: evaluate the live weights
            return
        self._stash = [tensor.data for tensor in self._live]
        for tensor, averaged in zip(self._live, average):
            tensor.data = averaged.to(device=tensor.device, dtype=tensor.dtype)

    def _swap_out(self) -> None:
        """Give the module its live weights back (a no-op unless swapped in)."""
        if self._stash is None:
            return
        for tensor, live in zip(self._live, self._stash):
            tensor.data = live
        self._stash = None

    @torch.no_grad()
    def _copy_average_into_model(self, pl_module: pl.LightningModule) -> None:
        """Overwrite the live weights with the average (train end; Switch EMA)."""
        self._track(pl_module)
        average = self._average()
        if average is not None:
            for tensor, averaged in zip(self._live, average):
                tensor.copy_(averaged)

    def _write_averaged_weights(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store the weights evaluation uses, as the module's full state dict, under :attr:`checkpoint_key`."""
        if self.checkpoint_key in checkpoint:  # full checkpoint: on_save_checkpoint, called first, wrote it
            return
        if self._stash is not None:
            # Saved during evaluation: Lightning has just stored the swapped-in
            # average as "state_dict"; the live weights belong there.
            checkpoint[self.checkpoint_key] = checkpoint["state_dict"]
            self._swap_out()
            checkpoint["state_dict"] = pl_module.state_dict()
            self._swap_in(pl_module)
            return
        self._swap_in(pl_module)
        try:
            checkpoint[self.checkpoint_key] = pl_module.state_dict()
        finally:
            self._swap_out()

    # -- Lightning hooks -----------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        evaluators = [
            cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback) and cb.validate_with == "average"
        ]
        if len(evaluators) > 1:
            raise ValueError(
                f"{self._name}: {[type(cb).__name__ for cb in evaluators]} all evaluate with their average; "
                "only one can (they would swap weights over each other): set validate_with='live' on the others"
            )
        if stage == "fit":
            self._reset()
            self._untrack()
        _SaveCheckpointHook.add(pl_module, self._write_averaged_weights)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._track(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_with == "average":
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_with == "average":
            self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep_average_on_train_end:
            self._copy_average_into_model(pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._write_averaged_weights(pl_module, checkpoint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_out()
        _SaveCheckpointHook.remove(pl_module, self._write_averaged_weights)


class _SaveCheckpointHook:
    """Stands in for a LightningModule's ``on_save_checkpoint`` while averaging callbacks are attached.

    Set on the module instance, it shadows the class's method: Lightning looks the
    hook up by name on the instance, for full and weights-only checkpoints alike.
    Each call runs the callbacks' writers, then the module's own hook, which thus
    sees (and may change) what they wrote.
    """

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.module_hook = module.on_save_checkpoint
        self.hook_was_on_instance = "on_save_checkpoint" in vars(module)
        self.writers: list[Writer] = []

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        for write in self.writers:
            write(self.module, checkpoint)
        return self.module_hook(checkpoint)

    @classmethod
    def add(cls, module: pl.LightningModule, writer: Writer) -> None:
        hook = vars(module).get("on_save_checkpoint")
        if not isinstance(hook, cls):
            hook = cls(module)
            module.on_save_checkpoint = hook
        if writer not in hook.writers:
            hook.writers.append(writer)

    @classmethod
    def remove(cls, module: pl.LightningModule, writer: Writer) -> None:
        hook = vars(module).get("on_save_checkpoint")
        if not isinstance(hook, cls) or writer not in hook.writers:
            return
        hook.writers.remove(writer)
        if hook.writers:
            return
        if hook.hook_was_on_instance:
            module.on_save_checkpoint = hook.module_hook
        else:
            del module.on_save_checkpoint
