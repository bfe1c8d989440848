"""State that differs between ranks, in checkpoints: one mechanism for every strategy of this pack.

Lightning assembles a checkpoint on every rank and writes rank 0's. That is
enough for state every rank holds alike (the model under DDP, the optimizer,
most callbacks), and loses the rest:

* a strategy's own per-rank state: DiLoCo's local parameters and inner-optimizer
  state, the compressors' error-feedback residuals;
* the state of callbacks that filter the gradients each rank sees
  (:class:`~lightning_converge.callbacks.Grokfast`), under the strategies that
  leave gradients local: DiLoCo (no gradient all-reduce at all) and 1-bit Adam
  (after ``freeze_step`` each rank's momentum comes from its own gradient).

Every rank writes its own state itself, beside the checkpoint, in one file per
rank::

    <checkpoint>.rank_states/rank{r}.pt:
        {"rank": r, "world_size": n, "strategy": {name: state}, "callbacks": {state_key: state}}

(``name`` is the strategy's: ``"diloco"``, ``"compressed_ddp"``, ``"onebit_adam"``).
The states are CPU copies, written through the strategy's ``checkpoint_io``
(so a remote filesystem works as it does for the checkpoint), and hold only
tensors and plain values (``torch.load(weights_only=True)`` reads them). No
rank sends its state to another: saving is no collective. The checkpoint that
rank 0 writes records what was written, under ``checkpoint["rank_states"]``::

    {"world_size": n, "directory": "<checkpoint file name>.rank_states",
     "files": ["rank0.pt", ...], "callbacks": [state_key, ...]}

``directory`` is relative to the checkpoint's folder, so a checkpoint moved with
its directory, or reached through a link in the same folder (``ModelCheckpoint``'s
``save_last="link"``), still finds it. Like the checkpoint itself, the files must
be on a filesystem every rank can read when resuming.

When each function fires (each called by the strategy's hook of the same name):

* :func:`save_rank_states`, on every rank whenever the Trainer saves a full
  checkpoint (not ``save_weights_only``), during and after ``fit``: writes this
  rank's file and adds the record. ``Trainer.save_checkpoint`` waits at a barrier
  afterwards, so every file is written when it returns.
* :func:`load_rank_states`, on every rank when ``fit`` resumes from ``ckpt_path``:
  reads only this rank's file; its callbacks' states replace rank 0's in
  ``checkpoint["callbacks"]`` (so Lightning restores each rank's callbacks with
  its own state), and the strategy's are returned. Resumed by a different number
  of ranks, the per-rank states cannot be matched to ranks: a warning, the
  callbacks' per-rank states are dropped (those callbacks start afresh) and the
  strategy gets nothing (its per-rank state starts afresh too).
* :func:`remove_rank_states`, when a checkpoint is removed
  (``ModelCheckpoint``'s ``save_top_k`` rotation calls ``strategy.remove_checkpoint``):
  rank 0 removes the checkpoint's directory of per-rank files, as it removes the
  checkpoint.

A callback declares that its state follows the gradients with a class
attribute ``state_follows_gradients = True``; a strategy declares that it leaves
gradients local with ``gradients_differ_between_ranks = True``. Only that
combination is saved per rank: averaging callbacks under DiLoCo follow the
global parameters, the same on every rank, and are saved once.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

#: Top-level checkpoint key of the record of the per-rank files.
CHECKPOINT_KEY = "rank_states"

#: Suffix that names a checkpoint's directory of per-rank files.
DIRECTORY_SUFFIX = ".rank_states"


def per_rank_callbacks(trainer: "pl.Trainer") -> list["pl.Callback"]:
    """The callbacks whose state differs between ranks under ``trainer``'s strategy."""
    if not getattr(trainer.strategy, "gradients_differ_between_ranks", False):
        return []
    return [callback for callback in trainer.callbacks if getattr(callback, "state_follows_gradients", False)]


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor replaced by a detached copy on the CPU."""
    return apply_to_collection(state, Tensor, lambda tensor: tensor.detach().to("cpu", copy=True))


def rank_states_directory(checkpoint_path: _PATH) -> str:
    """The directory beside ``checkpoint_path`` that holds its per-rank files."""
    return str(checkpoint_path) + DIRECTORY_SUFFIX


def rank_file_name(rank: int) -> str:
    """The name of rank ``rank``'s file in a checkpoint's directory of per-rank files."""
    return f"rank{rank}.pt"


def save_rank_states(
    strategy: "pl.strategies.Strategy",
    checkpoint: dict[str, Any],
    filepath: _PATH,
    strategy_states: dict[str, Any],
    storage_options: Optional[Any] = None,
) -> None:
    """On every rank, from the strategy's ``save_checkpoint`` before the checkpoint is written: write this
    rank's ``strategy_states`` (by name) and the states of its :func:`per_rank_callbacks` (taken from this
    rank's ``checkpoint["callbacks"]``) to ``<filepath>.rank_states/rank{r}.pt`` through the strategy's
    ``checkpoint_io`` (with ``storage_options``), and record the files in ``checkpoint["rank_states"]``."""
    callback_states = checkpoint.get("callbacks", {})
    callbacks = {
        callback.state_key: callback_states[callback.state_key]
        for callback in per_rank_callbacks(strategy.lightning_module.trainer)
        if callback.state_key in callback_states
    }
    rank, world_size = strategy.global_rank, strategy.world_size
    directory = rank_states_directory(filepath)
    mine = {"rank": rank, "world_size": world_size, "strategy": strategy_states, "callbacks": callbacks}
    strategy.checkpoint_io.save_checkpoint(
        cpu_copy(mine), os.path.join(directory, rank_file_name(rank)), storage_options=storage_options
    )
    checkpoint[CHECKPOINT_KEY] = {
        "world_size": world_size,
        "directory": os.path.basename(directory),
        "files": [rank_file_name(r) for r in range(world_size)],
        "callbacks": sorted(callbacks),
    }


def load_rank_states(
    strategy: "pl.strategies.Strategy",
    checkpoint: dict[str, Any],
    checkpoint_path: _PATH,
    weights_only: Optional[bool] = None,
) -> dict[str, Any]:
    """On every rank, from the strategy's ``load_checkpoint`` when ``fit`` resumes from ``checkpoint_path``:
    read this rank's file (through the strategy's ``checkpoint_io``, with ``weights_only``), put its callback
    states into ``checkpoint["callbacks"]`` and return its strategy states by name. Returns nothing if the
    checkpoint has no per-rank state, or was saved by a different number of ranks: then a warning, and the
    per-rank callback states are dropped."""
    record = checkpoint.pop(CHECKPOINT_KEY, None)
    if record is None:
        return {}
    callback_states = checkpoint.setdefault("callbacks", {})
    if record["world_size"] != strategy.world_size:
        dropped = record["callbacks"]
        for state_key in dropped:
            callback_states.pop(state_key, None)
        rank_zero_warn(
            f"{type(strategy).__name__}: the checkpoint's per-rank state was saved by {record['world_size']} ranks "
            f"and is resumed by {strategy.world_size}: it starts afresh"
            + (f" (also the state of the callbacks {dropped})" if dropped else "")
            + "."
        )
        return {}
    path = os.path.join(
        os.path.dirname(str(checkpoint_path)), record["directory"], record["files"][strategy.global_rank]
    )
    try:
        mine = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{type(strategy).__name__}: the checkpoint {checkpoint_path} keeps rank {strategy.global_rank}'s state "
            f"in {path}, which is missing: copy the directory {record['directory']} along with the checkpoint"
        ) from error
    callback_states.update(mine["callbacks"])
    return mine["strategy"]


def remove_rank_states(strategy: "pl.strategies.Strategy", filepath: _PATH) -> None:
    """On every rank, from the strategy's ``remove_checkpoint``: rank 0 removes the directory of
    ``filepath``'s per-rank files, if there is one (through the strategy's ``checkpoint_io``)."""
    if strategy.is_global_zero:
        strategy.checkpoint_io.remove_checkpoint(rank_states_directory(filepath))


class RankStateFiles:
    """Mixin for a strategy that writes per-rank files beside its checkpoints (put it before the
    Lightning strategy among the bases): when ``ModelCheckpoint`` rotates a checkpoint out
    (``save_top_k``), its per-rank files go with it."""

    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)  # type: ignore[misc]
        remove_rank_states(self, filepath)  # type: ignore[arg-type]
