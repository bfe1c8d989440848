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

:func:`save_rank_states`, called by a strategy's ``save_checkpoint`` on every
rank, gathers those states to rank 0 (as CPU copies, so pickling and the
gather never touch an accelerator) and stores them under
``checkpoint["rank_states"]``::

    {"world_size": n, "ranks": [{"strategy": {name: state}, "callbacks": {state_key: state}}, ...]}

(``name`` is the strategy's: ``"diloco"``, ``"compressed_ddp"``, ``"onebit_adam"``).

:func:`load_rank_states`, called by the strategy's ``load_checkpoint`` on every
rank, hands each rank its own entry: the callbacks' states replace rank 0's in
``checkpoint["callbacks"]`` (so Lightning restores each rank's callbacks with
its own state), and the strategy's is returned. Resumed by a different number
of ranks, the per-rank states cannot be matched to ranks: a warning, the
callbacks' per-rank states are dropped (those callbacks start afresh) and the
strategy gets nothing (its per-rank state starts afresh too).

A callback declares that its state follows the gradients with a class
attribute ``state_follows_gradients = True``; a strategy declares that it leaves
gradients local with ``gradients_differ_between_ranks = True``. Only that
combination is saved per rank: averaging callbacks under DiLoCo follow the
global parameters, the same on every rank, and are saved once.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

#: Top-level checkpoint key of the per-rank states.
CHECKPOINT_KEY = "rank_states"


def per_rank_callbacks(trainer: "pl.Trainer") -> list["pl.Callback"]:
    """The callbacks whose state differs between ranks under ``trainer``'s strategy."""
    if not getattr(trainer.strategy, "gradients_differ_between_ranks", False):
        return []
    return [callback for callback in trainer.callbacks if getattr(callback, "state_follows_gradients", False)]


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor replaced by a detached copy on the CPU."""
    return apply_to_collection(state, Tensor, lambda tensor: tensor.detach().to("cpu", copy=True))


def save_rank_states(
    strategy: "pl.strategies.Strategy", checkpoint: dict[str, Any], strategy_states: dict[str, Any]
) -> None:
    """Collective, on every rank when a full checkpoint is saved: gather every rank's ``strategy_states``
    (by name) and the states of its :func:`per_rank_callbacks` (taken from this rank's
    ``checkpoint["callbacks"]``) into ``checkpoint["rank_states"]`` on rank 0. Other ranks' checkpoints get
    nothing (they are not written)."""
    callback_states = checkpoint.get("callbacks", {})
    callbacks = {
        callback.state_key: callback_states[callback.state_key]
        for callback in per_rank_callbacks(strategy.lightning_module.trainer)
        if callback.state_key in callback_states
    }
    mine = cpu_copy({"strategy": strategy_states, "callbacks": callbacks})
    world_size = strategy.world_size
    if world_size == 1:
        ranks: Optional[list[Any]] = [mine]
    else:
        ranks = [None] * world_size if strategy.global_rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
    if strategy.global_rank == 0:
        checkpoint[CHECKPOINT_KEY] = {"world_size": world_size, "ranks": ranks}


def load_rank_states(strategy: "pl.strategies.Strategy", checkpoint: dict[str, Any]) -> dict[str, Any]:
    """On every rank, when ``fit`` resumes: put this rank's callback states into ``checkpoint["callbacks"]``
    and return this rank's strategy states by name (empty if the checkpoint has none, or was saved by a
    different number of ranks: then a warning, and the per-rank callback states are dropped)."""
    saved = checkpoint.pop(CHECKPOINT_KEY, None)
    if saved is None:
        return {}
    callback_states = checkpoint.setdefault("callbacks", {})
    if saved["world_size"] != strategy.world_size:
        dropped = sorted(saved["ranks"][0]["callbacks"])
        for state_key in dropped:
            callback_states.pop(state_key, None)
        rank_zero_warn(
            f"{type(strategy).__name__}: the checkpoint's per-rank state was saved by {saved['world_size']} ranks and "
            f"is resumed by {strategy.world_size}: it starts afresh"
            + (f" (also the state of the callbacks {dropped})" if dropped else "")
            + "."
        )
        return {}
    mine = saved["ranks"][strategy.global_rank]
    callback_states.update(mine["callbacks"])
    return mine["strategy"]
