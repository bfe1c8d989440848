"""What a DiLoCo checkpoint holds, besides what ``"ddp"`` saves.

``checkpoint["diloco"]``, the state every worker holds alike (:func:`shared_state`)::

    {"inner_step", "round_start", "round_length": the position in the round schedule,
     "outer_steps", "global_params", "outer_optimizer": the outer state,
     "bytes_sent", "bytes_received": the exchange's counters,
     "fragments": [{"pieces", "in_sync", "pending_average", "pending_apply_at_step"}, ...]}

``"pending_average"`` is an averaged pseudo-gradient still to be applied (the
exchanges in flight are waited for when the state is taken), None when there is
none.

Each worker's own state (:func:`worker_state`), written by each worker to its own file beside
the checkpoint by :mod:`~lightning_converge.strategies.rank_state`::

    {"model": its local model state, "optimizer": its inner optimizer's state,
     "compressor": error-feedback residuals (None without a compressor),
     "fragment_origins": where each fragment's inner phase started (None: the global parameters),
     "wait_seconds": its time spent waiting on exchanges}

and, with ``dynamic_inner_steps=True``, ``"dynamic_inner_steps"``: its inner steps of the current round and the
time and steps timed in it (:class:`~lightning_converge.strategies.diloco.dynamic.DynamicInnerSteps`).

The strategy restores the model and inner optimizer itself, and, resumed by
another number of workers (no worker state), restarts the interrupted inner
phase from the global parameters.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lightning_converge.strategies.diloco.exchange import PendingSync, PseudoGradientExchange
from lightning_converge.strategies.diloco.fragments import Fragment
from lightning_converge.strategies.diloco.outer import OuterState
from lightning_converge.strategies.diloco.schedule import RoundSchedule


def shared_state(
    schedule: RoundSchedule, outer: OuterState, exchange: PseudoGradientExchange, fragments: Sequence[Fragment]
) -> dict[str, Any]:
    """``checkpoint["diloco"]``: waits for the exchanges in flight, whose averages it holds."""
    for fragment in fragments:
        if fragment.pending is not None:
            exchange.resolve(fragment.pending, schedule.inner_step)
    return {
        **schedule.state_dict(),
        **outer.state_dict(),
        "bytes_sent": exchange.bytes_sent,
        "bytes_received": exchange.bytes_received,
        "fragments": [
            {
                "pieces": fragment.pieces,
                "in_sync": fragment.in_sync,
                "pending_average": None if fragment.pending is None else fragment.pending.average,
                "pending_apply_at_step": None if fragment.pending is None else fragment.pending.apply_at_step,
            }
            for fragment in fragments
        ],
    }


def restore_shared_state(
    state: Mapping[str, Any],
    schedule: RoundSchedule,
    outer: OuterState,
    exchange: PseudoGradientExchange,
    fragments: Sequence[Fragment],
    device: torch.device,
    owner: str,
) -> None:
    """Restore :func:`shared_state` into this run's pieces; pending averages go to ``device`` (the
    parameters'). Raises if the checkpoint's fragments are not this run's (``owner`` names the strategy)."""
    saved_assignment = [[tuple(piece) for piece in saved["pieces"]] for saved in state["fragments"]]
    if saved_assignment != [fragment.pieces for fragment in fragments]:
        raise ValueError(
            f"{owner}: the checkpoint's fragments {saved_assignment} differ from this run's "
            f"{[fragment.pieces for fragment in fragments]} (num_fragments, fragment_assignment "
            "and the model must be those of the run that saved it)"
        )
    schedule.load_state_dict(state)
    outer.load_state_dict(state)
    exchange.bytes_sent = state["bytes_sent"]
    exchange.bytes_received = state.get("bytes_received", 0)
    for fragment, saved in zip(fragments, state["fragments"]):
        fragment.in_sync = saved["in_sync"]
        average = saved["pending_average"]
        fragment.pending = (
            None if average is None else PendingSync(saved["pending_apply_at_step"], average=average.to(device))
        )


def worker_state(
    model: dict[str, Any],
    optimizer: dict[str, Any],
    fragments: Sequence[Fragment],
    exchange: PseudoGradientExchange,
) -> dict[str, Any]:
    """This worker's own state, given its local ``model`` state and inner-``optimizer`` state."""
    return {
        "model": model,
        "optimizer": optimizer,
        "compressor": None if exchange.compressor is None else exchange.compressor.state_dict(),
        "fragment_origins": [fragment.origin for fragment in fragments],
        "wait_seconds": exchange.wait_seconds,
    }


def restore_worker_state(
    state: Mapping[str, Any],
    fragments: Sequence[Fragment],
    exchange: PseudoGradientExchange,
    outer_device: torch.device,
) -> None:
    """Restore :func:`worker_state` but its ``"model"`` and ``"optimizer"`` (the strategy loads those)."""
    if exchange.compressor is not None:
        exchange.compressor.load_state_dict(state["compressor"])
    for fragment, origin in zip(fragments, state["fragment_origins"]):
        fragment.origin = None if origin is None else [t.to(outer_device) for t in origin]
    exchange.wait_seconds = state["wait_seconds"]
