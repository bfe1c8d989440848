"""The round schedule: when each fragment synchronizes.

Training is cut into *rounds* of H inner steps (H is ``inner_steps``, evaluated
when the round starts). Fragment ``f`` (0-based, of F) synchronizes
``(f + 1) * H // F`` steps into each round, so the last fragment syncs when the
round ends; with one fragment that is every H steps. "Synchronizes" means: its
pseudo-gradient is taken and its all-reduce starts after that inner step; the
result is applied ``overlap_steps`` steps later (at once when 0), or with
``delay=1`` when the fragment next syncs. Steps count the inner optimizer's
steps since the start of training (``trainer.global_step`` with one optimizer
and no resets).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from lightning_converge.schedules import Schedule, takes_lr


class RoundSchedule:
    """The position in the rounds of inner steps, and the rule that places each fragment's sync in a round.

    Args:
        inner_steps: H, a schedule of the step (a constant is one too); one that takes ``lr`` (such as
            :class:`~lightning_converge.schedules.QSR`) is given the inner optimizer's learning rate.
        num_fragments: F, the fragments that sync in turn in each round.
        overlap_steps: the inner steps between a fragment's sync and the application of its average.
    """

    def __init__(self, inner_steps: Schedule, num_fragments: int = 1, overlap_steps: int = 0) -> None:
        self.inner_steps = inner_steps
        self.inner_steps_takes_lr = takes_lr(inner_steps)
        self.num_fragments = num_fragments
        self.overlap_steps = overlap_steps
        # Inner steps taken since training started, and the current round: its first step and length.
        self.inner_step = 0
        self.round_start = 0
        self.round_length = 0

    def check_round_length(self, length: Any) -> int:
        """Return ``length`` as the number of inner steps of a round, or raise naming what is wrong with it."""
        if not (isinstance(length, (int, float)) and not isinstance(length, bool) and math.isfinite(length)):
            raise ValueError(f"inner_steps must be an integer >= 1 or a schedule of the step, got {length!r}")
        length = round(length)
        if length < 1:
            raise ValueError(f"inner_steps must be >= 1, got {length}")
        if length < self.num_fragments:
            raise ValueError(
                f"inner_steps={length} is smaller than num_fragments={self.num_fragments}: "
                "each fragment needs a sync step of its own in every round"
            )
        period = length // self.num_fragments
        if self.overlap_steps >= period:
            raise ValueError(
                f"overlap_steps={self.overlap_steps} must be smaller than the per-fragment period "
                f"inner_steps // num_fragments = {length} // {self.num_fragments} = {period}: a fragment's "
                "all-reduce has to be applied before the next fragment's starts"
            )
        return length

    def start_round(self, lr: Optional[float]) -> None:
        """Begin a round at the current step; its length is ``inner_steps`` now (given ``lr`` if it takes it:
        the inner optimizer's learning rate)."""
        if self.inner_steps_takes_lr:
            length = self.inner_steps(self.inner_step, lr=lr)
        else:
            length = self.inner_steps(self.inner_step)
        self.round_start = self.inner_step
        self.round_length = self.check_round_length(length)

    def sync_step(self, fragment_index: int) -> int:
        """The inner step of the current round after which fragment ``fragment_index`` syncs."""
        return self.round_start + (fragment_index + 1) * self.round_length // self.num_fragments

    @property
    def round_ends(self) -> bool:
        """Whether the current round ends with the current step."""
        return self.inner_step == self.round_start + self.round_length

    def state_dict(self) -> dict[str, int]:
        return {"inner_step": self.inner_step, "round_start": self.round_start, "round_length": self.round_length}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (other keys in ``state`` are ignored)."""
        self.inner_step = state["inner_step"]
        self.round_start = state["round_start"]
        self.round_length = state["round_length"]
