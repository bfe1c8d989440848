"""TernGrad ("TernGrad: Ternary Gradients to Reduce Communication", Wen et al., 2017)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor, check_in_range, check_int
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout

# 2-bit codes, four to a byte: 0 -> 0, 1 -> +1, 2 -> -1.
_CODE_SHIFTS = (0, 2, 4, 6)


class TernaryCompressor(Compressor):
    """Send each value as ``scale * t`` with ``t`` in {-1, 0, +1}, one ``scale`` per tensor.

    Per tensor (the paper's layer-wise ternarizing): clip the values to
    ``clip * std`` (the paper's gradient clipping, c = 2.5; None disables it; a
    tensor whose values have no spread, such as a scalar, is left unclipped), take
    ``scale = max|x|``, and send ``t = sign(x)`` with probability ``|x| / scale``,
    else 0: an unbiased estimate of the clipped values.

    Error feedback is off by default: the sampling error's variance exceeds the
    values' own (``||x||_1 * max|x| > ||x||^2``), so a residual fed back grows
    step after step instead of staying bounded. With ``error_feedback=True``
    (sensible only with a tight ``clip``) the clipped part and the sampling error
    are carried to the next step.

    The random draws come from a generator seeded with ``seed + rank``, so ranks
    draw independently and a resumed run continues the same sequence.

    Payload: 2-bit codes packed 4 per byte (``ceil(numel / 4)`` bytes) and 4 bytes of
    scale per tensor, all-gathered (each rank has its own scales), so a rank receives
    ``world_size`` payloads. Not the two-phase exchange of
    :class:`~lightning_converge.comm.chunked.ChunkedCompressor`: a chunk owner would
    ternarize the average again, a second random draw whose variance (larger than the
    values' own, see above) no error feedback makes up for by default, and the
    per-tensor scales do not split into chunks.
    """

    name = "ternary"

    def __init__(self, error_feedback: bool = False, clip: float | None = 2.5, seed: int = 0) -> None:
        if clip is not None:
            check_in_range("clip", clip, 0.0, math.inf, low_open=True, high_open=True)
        check_int("seed", seed, 0)
        self.clip = clip
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._saved_generator_state: Tensor | None = None
        super().__init__(error_feedback)

    def compress(
        self, grad: Tensor, layout: Layout, state: dict[str, Tensor], exchange: Exchange, step: int
    ) -> list[Tensor]:
        if self._generator is None:
            self._generator = torch.Generator(grad.device).manual_seed(self.seed + exchange.rank)
            if self._saved_generator_state is not None:
                self._generator.set_state(self._saved_generator_state)
        return super().compress(grad, layout, state, exchange, step)

    def encode(self, values: Tensor, layout: Layout) -> list[Tensor]:
        pieces = values.split(layout.numels)
        if self.clip is not None:
            # A tensor without spread (a scalar, a constant gradient) is not clipped: its limit would be 0.
            stds = [piece.std(correction=0) for piece in pieces]
            limits = [torch.where(std > 0, self.clip * std, math.inf) for std in stds]
            pieces = [piece.clamp(-limit, limit) for piece, limit in zip(pieces, limits)]
        scales = torch.stack([piece.abs().max() for piece in pieces])
        clipped = torch.cat(pieces)
        per_element_scale = self._per_element(scales, layout)
        magnitude = clipped.abs() / torch.where(per_element_scale > 0, per_element_scale, 1.0)
        keep = torch.rand(clipped.shape, generator=self._generator, device=clipped.device) < magnitude
        codes = torch.where(keep, torch.where(clipped > 0, 1, 2), 0).to(torch.uint8)
        codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 4)).view(-1, 4)
        shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=codes.device)
        packed = (codes << shifts).sum(dim=1, dtype=torch.uint8)
        return [packed, scales]

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        packed, scales = payload
        shifts = torch.tensor(_CODE_SHIFTS, dtype=torch.uint8, device=packed.device)
        codes = ((packed[:, None] >> shifts) & 3).view(-1)[: layout.numel]
        ternary = (codes == 1).float() - (codes == 2).float()
        return ternary.mul_(self._per_element(scales, layout))

    @staticmethod
    def _per_element(scales: Tensor, layout: Layout) -> Tensor:
        # Not repeat_interleave with a tensor of counts: on CPU it is a thousand times slower.
        return torch.cat([scale.expand(numel) for scale, numel in zip(scales, layout.numels)])

    def snapshot(self, layout: Layout, device: torch.device) -> Callable[[], None]:
        restore_elements = super().snapshot(layout, device)
        generator = self._generator
        generator_state = None if generator is None else generator.get_state()

        def restore() -> None:
            restore_elements()
            self._generator = generator
            if generator is not None:
                generator.set_state(generator_state)

        return restore

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        generator_state = self._generator.get_state() if self._generator is not None else self._saved_generator_state
        if generator_state is not None:
            state["generator"] = generator_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._saved_generator_state = state_dict.get("generator")
        self._generator = None
