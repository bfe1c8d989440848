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
A checkpoint holds one model to use, the one evaluation uses, and what
training needs to continue exactly, as Lightning's own ``WeightAveraging`` does:

- ``checkpoint["state_dict"]`` is the model evaluation sees: the average when
  the callback evaluates with it (``validate_with="average"``), and after ``fit``
  with ``keep_average_on_train_end`` (the model then holds the average), so
  ``LightningModule.load_from_checkpoint`` loads the averaged weights;
- ``checkpoint["live_state_dict"]`` (full checkpoints, whenever ``state_dict`` is
  not the live weights) holds the live weights, which the callback puts back into
  the model when ``fit`` resumes (``on_load_checkpoint``): a run resumed from a
  checkpoint taken during or after ``fit`` continues exactly. Resumed without the
  callback, training would continue from the average;
- ``checkpoint[<callback>.checkpoint_key]`` (``"ema_state_dict"``,
  ``"lawa_state_dict"``) always holds the callback's average, a complete state
  dict of the module (``torch.save`` stores tensors shared with ``state_dict`` once).

Full checkpoints get them from the callback's ``on_save_checkpoint``, next to the
callback's ``state_dict()`` (averages and counters, for an exact resume).
Lightning writes a ``ModelCheckpoint(save_weights_only=True)`` checkpoint
without calling any callback hook (``on_save_checkpoint`` and ``state_dict`` are
both skipped), but it calls the LightningModule's ``on_save_checkpoint`` for
every checkpoint. So between ``setup`` and ``teardown`` an averaging callback
puts a small stand-in for that method on the module instance
(:class:`_SaveCheckpointHook`): it writes the averaged weights unless the
callback's hook already did, then calls the module's own hook. It is removed at
``teardown`` so the module holds no reference to the callback after ``fit``; a
weights-only checkpoint saved by hand after ``fit`` therefore has no
``checkpoint_key``, but with ``keep_average_on_train_end`` (the default) its
``state_dict`` is the average by then. A weights-only checkpoint cannot resume
training (Lightning needs the optimizer state): it gets no ``live_state_dict``.

Strategies whose workers train local copies
-------------------------------------------
Under DiLoCo and Streaming DiLoCo each worker's parameters are its own between
synchronizations; the model the workers agree on is the strategy's global
parameters (``strategy.agreed_parameters()``). There the callbacks average the
global parameters, once after each outer step that changed them (EMA) or when
a snapshot is due (LAWA), so the average is the same on every worker; before
writing into the model at the end of ``fit`` they make the strategy end its
local training (``strategy.finish_local_training()``), so every worker ends with
the same model; Switch EMA switches the global parameters
(``strategy.move_global_parameters``). Validation inside ``fit`` evaluates the
average (or the global parameters until there is one), the same on every worker.
``include_buffers`` is refused there: the workers' buffers are not synchronized.

Sharded parameters (FSDP2)
--------------------------
Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) the parameters
are DTensors. The callbacks track each rank's local shard
(:mod:`lightning_converge.sharding`): the average has the shard's shape, an update
moves no bytes between ranks, and evaluation copies the averaged shards into the
parameters' storage in place (and back), gathering nothing. Checkpoints differ in
one point: ``checkpoint["state_dict"]`` stays what Lightning writes (the model's
weights as they are, sharded through the distributed checkpoint or gathered on
rank 0: the live weights, or the average while evaluation holds it, the live
weights then under ``"live_state_dict"``), never replaced by the average. The
average under :attr:`checkpoint_key`, the live weights under ``"live_state_dict"``
and the callback's ``state_dict()`` hold DTensor views of each rank's shards: a
distributed checkpoint writes them sharded, a single-file one gathers them, and a
resumed fit (on any number of ranks) takes each rank's shards of them
(:mod:`lightning_converge.sharding`).
DeepSpeed is not supported.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_converge.checks import check_choice, is_count  # noqa: F401  (is_count: the averaging callbacks')
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.kernels.finite import all_finite
from lightning_converge.sharding import (
    any_sharded,
    attach,
    load_module_state,
    local,
    reshard,
    restored_state,
    saved_state,
    saved_states,
)

VALIDATE_WITH = ("average", "live")
#: Top-level checkpoint key of the live weights, when ``state_dict`` holds the average.
LIVE_STATE_DICT_KEY = "live_state_dict"

Writer = Callable[[pl.LightningModule, dict[str, Any]], None]


def agreed_parameters(pl_module: pl.LightningModule) -> Optional[list[Tensor]]:
    """The parameters the workers agree on, in ``module.parameters()`` order, while the strategy's workers
    train local copies (DiLoCo: its global parameters); None when the module's own parameters are those."""
    agreed = getattr(pl_module.trainer.strategy, "agreed_parameters", None)
    return None if agreed is None else agreed()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to average in: fp32 for bf16/fp16 tensors (their 8- or 11-bit
    mantissas would round small updates away), else the tensor's own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


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
    - ``on_train_end`` (after the last epoch, before the strategy's): with
      ``keep_average_on_train_end``, keeps a copy of the live weights (for
      checkpoints saved after ``fit``) and copies the average into the model,
      which then holds it for good.
    - ``on_save_checkpoint`` (full checkpoints, during or after a run): writes
      the averaged weights under :attr:`checkpoint_key`, and into ``state_dict``
      with the live weights under ``"live_state_dict"`` (module docstring).
    - ``on_load_checkpoint`` (when a checkpoint is restored, after Lightning loaded
      ``state_dict`` into the model): when ``fit`` resumes, puts the live weights back.
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
        self.include_buffers = include_buffers
        self.validate_with = check_choice("validate_with", validate_with, VALIDATE_WITH, owner=self._name)
        self.keep_average_on_train_end = keep_average_on_train_end
        self.device = None if device is None else torch.device(device)
        self.backend = validate_backend(backend)
        self._module: Optional[pl.LightningModule] = None  # whose tensors are tracked (None: collect again)
        self._names: list[str] = []
        # The module's tracked parameters and buffers, in `_names` order, as the module holds them ...
        self._tracked: dict[str, Tensor] = {}
        # ... and this rank's shards of them (the tensors themselves when not sharded).
        self._live: list[Tensor] = []
        self._sharded = False  # whether some tracked parameter is a DTensor
        # What the average follows, in `_names` order: `_live`, or the global parameters under DiLoCo.
        self._followed: list[Tensor] = []
        # DiLoCo: its outer steps when the average last followed the global parameters (None: not yet set).
        self._followed_version: Optional[int] = None
        self._kept_live: Optional[dict[str, Tensor]] = None  # the live weights, after fit wrote the average in
        self._stash: Optional[list[Tensor]] = None  # the live storages while the average is swapped in
        self._last_step = 0  # trainer.global_step at the previous training batch end

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def evaluates_with_average(self) -> bool:
        """Whether validation and test see the average: a strategy that would swap in weights of its own
        for evaluation (DiLoCo's global parameters) leaves the model to this callback."""
        return self.validate_with == "average"

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
        self._tracked = {}

    def _restored(self, name: str, state: Tensor) -> Tensor:
        """A restored state of the tracked tensor ``name`` (a full tensor, or a DTensor when sharded), as the
        callback keeps it: this rank's shard when the tensor is sharded, on the state's device."""
        tracked = self._tracked[name]
        return restored_state(state, tracked).to(self._state_device(local(tracked)))

    def _saved(self, states: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-tensor states by name, as ``state_dict`` saves them: DTensor views of this rank's shards where
        the tensor is sharded (no gather; the checkpoint's strategy writes them, :mod:`lightning_converge.sharding`)."""
        return saved_states(states, self._tracked)

    def _sharded_state_with(self, state: Mapping[str, Tensor], shards: list[Tensor]) -> dict[str, Tensor]:
        """A module state dict ``state`` (sharded) with ``shards`` (this rank's, in ``_names`` order, cast to the
        tensors' dtypes) as the tracked tensors, as DTensors: nothing is gathered."""
        replaced = {
            name: saved_state(shard.to(live.dtype), self._tracked[name])
            for name, shard, live in zip(self._names, shards, self._live)
        }
        return {**state, **replaced}

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
        self._tracked = dict(named)
        self._live = [local(tensor) for _, tensor in named]
        self._sharded = any_sharded(self._tracked.values())
        agreed = agreed_parameters(pl_module)
        if agreed is None:
            self._followed = self._live
        else:
            if self.include_buffers:
                strategy = type(pl_module.trainer.strategy).__name__
                raise ValueError(
                    f"{self._name}: include_buffers=True is not supported under {strategy}: its workers do not "
                    "synchronize buffers, so there is no agreed value to average"
                )
            self._followed = list(agreed)
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

    def _followed_moved(self, trainer: pl.Trainer) -> bool:
        """Whether what the average follows can have changed since the previous call: always, unless it is
        the global parameters of a strategy whose workers train local copies, which change at outer steps."""
        if self._followed is self._live:
            return True
        version = trainer.strategy.outer_steps
        moved = version != self._followed_version
        self._followed_version = version
        return moved

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
        finite = bool(all_finite(self._followed, backend=self.backend))
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            rank_zero_warn(f"{self._name}: the live weights hold inf or NaN; {otherwise}")
        return finite

    # -- evaluation with the average -----------------------------------------------------

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        """Make the module hold the average; keep the live storages aside.

        The tensors keep their identity (optimizers, DDP and hooks still see the
        same objects); only their ``.data`` changes. An average of the tensor's
        dtype and device is handed over without a copy. Sharded parameters are
        written in place instead (FSDP2 gathers from the storage it owns), each
        rank its own shards: nothing is gathered.
        """
        if self._stash is not None:
            return
        self._track(pl_module)
        average = self._average()
        if average is None:  # nothing averaged yet: evaluate what the average follows
            if self._followed is self._live:
                return
            average = self._followed
        if self._sharded:
            reshard(pl_module)
            with torch.no_grad():
                self._stash = [tensor.clone() for tensor in self._live]
                torch._foreach_copy_(self._live, average)
            return
        self._stash = [tensor.data for tensor in self._live]
        for tensor, averaged in zip(self._live, average):
            tensor.data = averaged.to(device=tensor.device, dtype=tensor.dtype)

    def _swap_out(self) -> None:
        """Give the module its live weights back (a no-op unless swapped in)."""
        if self._stash is None:
            return
        if self._sharded:
            if self._module is not None:
                reshard(self._module)
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._stash)
        else:
            for tensor, live in zip(self._live, self._stash):
                tensor.data = live
        self._stash = None

    @torch.no_grad()
    def _copy_average_into_model(self, pl_module: pl.LightningModule) -> None:
        """Make the model hold the average (train end; Switch EMA): overwrite the live weights, or, while
        the workers of the strategy train local copies, switch its global parameters to the average."""
        self._track(pl_module)
        average = self._average()
        if average is None:
            return
        if agreed_parameters(pl_module) is not None:
            pl_module.trainer.strategy.move_global_parameters(average)
            return
        if self._sharded:
            reshard(pl_module)
        for tensor, averaged in zip(self._live, average):
            tensor.copy_(averaged)

    def _write_averaged_weights(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store the averaged weights under :attr:`checkpoint_key`; when this callback decides what the model
        is (it evaluates with its average, or wrote it into the model at train end), make ``state_dict`` the
        average and keep the live weights under ``"live_state_dict"`` (module docstring)."""
        if self.checkpoint_key in checkpoint:  # full checkpoint: on_save_checkpoint, called first, wrote it
            return
        swapped = self._stash is not None  # saved during evaluation, the average swapped in
        self._track(pl_module)
        if self._sharded:
            # DTensors of this rank's shards, nothing gathered. Lightning's state_dict holds the model as it
            # is: the live weights, or the average while it is swapped in for evaluation, and then the live
            # weights go beside it.
            state = {name: tensor.detach() for name, tensor in pl_module.state_dict().items()}
            averaged = self._average()
            average = self._sharded_state_with(state, self._followed if averaged is None else averaged)
            live = self._sharded_state_with(state, self._stash) if swapped else None
        else:
            self._swap_in(pl_module)
            average = pl_module.state_dict()
            self._swap_out()
            # The strategy's view of the live weights: under DiLoCo the global parameters, not this worker's.
            live = pl_module.trainer.strategy.lightning_module_state_dict()
            if swapped:
                self._swap_in(pl_module)
        checkpoint[self.checkpoint_key] = average
        full = "optimizer_states" in checkpoint  # not weights-only: it can resume training
        if self._kept_live is not None:  # the model holds the average since train end
            if full:
                checkpoint[LIVE_STATE_DICT_KEY] = dict(self._kept_live)
        elif self.validate_with == "average":
            if not self._sharded:
                checkpoint["state_dict"] = average
            if full and live is not None:
                checkpoint.setdefault(LIVE_STATE_DICT_KEY, live)  # a callback that kept them knows better

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
        keepers = [cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback) and cb.keep_average_on_train_end]
        if len(keepers) > 1:
            raise ValueError(
                f"{self._name}: {[type(cb).__name__ for cb in keepers]} all copy their average into the model when "
                "training ends (each over the other's): set keep_average_on_train_end=False on all but one"
            )
        if stage == "fit":
            self._reset()
            self._untrack()
            self._kept_live = None
            self._followed_version = None
        _SaveCheckpointHook.add(pl_module, self._write_averaged_weights)
        attach(trainer.strategy)  # sharded state: saved through the distributed checkpoint, or gathered

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._track(pl_module)
        if self._followed_version is None:  # a new average starts from the global parameters as they are
            self._followed_version = getattr(trainer.strategy, "outer_steps", None)

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

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.keep_average_on_train_end:
            return
        finish_local_training = getattr(trainer.strategy, "finish_local_training", None)
        if finish_local_training is not None:  # DiLoCo: every worker holds the global parameters from here
            finish_local_training()
        self._track(pl_module)
        if self._average() is None:
            return
        self._kept_live = {name: tensor.detach().clone() for name, tensor in pl_module.state_dict().items()}
        self._copy_average_into_model(pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        live = checkpoint.get(LIVE_STATE_DICT_KEY)
        # state_dict, which Lightning has just loaded, is the average: training goes on from the live weights,
        # validate/test/predict(ckpt_path=...) evaluate the checkpoint's model.
        if live is not None and trainer.state.fn == TrainerFn.FITTING:
            load_module_state(pl_module, live)

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
