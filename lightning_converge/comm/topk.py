"""Deep Gradient Compression ("Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training", Lin et al., 2018): send only the largest values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_converge.comm.base import Compressor, check_in_range, check_int
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import Layout


class TopKCompressor(Compressor):
    """Send the ``ratio`` fraction of values largest in magnitude, with DGC's four fixes.

    Per bucket and step, in this order:

    * local gradient clipping (``clip_norm``): each tensor's local gradient is scaled
      to an L2 norm of at most ``clip_norm / sqrt(world_size)``, the paper's rule for
      a global threshold ``clip_norm``. None (the default) disables it.
    * momentum correction (``momentum`` > 0): accumulate ``u = momentum * u + grad`` and
      compress ``u`` rather than the gradient, so that the sparse updates follow
      momentum SGD. The optimizer must then run without momentum of its own
      (e.g. ``torch.optim.SGD(momentum=0)``); 0 (the default) sends gradients.
    * error feedback (the accumulation ``v += u`` of the paper): what is not sent
      stays in the residual and grows until it is sent.
    * momentum factor masking: where a value was sent, its momentum is zeroed too,
      so stale momentum does not push it again.
    * warm-up of sparsity: over the first ``warmup_steps`` steps of compression the
      kept fraction falls geometrically from ``warmup_ratio`` to ``ratio`` (the paper
      goes 25%, 6.25%, ... down to 0.1% over four epochs).

    ``k = ceil(kept fraction * numel)`` values per bucket, the same on every rank.
    Payload: ``k`` fp32 values and ``k`` int32 indices (8 k bytes), all-gathered, so a
    rank receives ``world_size`` payloads. Not the two-phase exchange of
    :class:`~lightning_converge.comm.chunked.ChunkedCompressor`: the ranks' largest
    values sit at different indices, so a chunk's average holds the union of up to
    ``world_size * k`` of them, and a chunk owner would have to drop most of them
    again (or send the union, as many bytes as the all-gather).
    """

    name = "topk"

    def __init__(
        self,
        error_feedback: bool = True,
        ratio: float = 0.01,
        momentum: float = 0.0,
        clip_norm: float | None = None,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.25,
    ) -> None:
        check_in_range("ratio", ratio, 0.0, 1.0, low_open=True, high_open=False)
        check_in_range("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
        if clip_norm is not None:
            check_in_range("clip_norm", clip_norm, 0.0, math.inf, low_open=True, high_open=True)
        check_int("warmup_steps", warmup_steps, 0)
        if warmup_steps:
            check_in_range("warmup_ratio", warmup_ratio, ratio, 1.0, low_open=False, high_open=False)
        self.ratio = ratio
        self.momentum = momentum
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        super().__init__(error_feedback)

    def element_state_kinds(self) -> tuple[str, ...]:
        return super().element_state_kinds() + (("momentum",) if self.momentum > 0 else ())

    def kept_ratio(self, step: int) -> float:
        """The fraction of values sent at ``step`` (steps since compression started)."""
        if step >= self.warmup_steps:
            return self.ratio
        return self.warmup_ratio * (self.ratio / self.warmup_ratio) ** (step / self.warmup_steps)

    def num_kept(self, numel: int, step: int) -> int:
        return min(numel, math.ceil(self.kept_ratio(step) * numel))

    def compress(
        self, grad: Tensor, layout: Layout, state: dict[str, Tensor], exchange: Exchange, step: int
    ) -> list[Tensor]:
        if self.clip_norm is not None:
            pieces = list(grad.split(layout.numels))
            limit = self.clip_norm / math.sqrt(exchange.world_size)
            factors = [(limit / (norm + 1e-6)).clamp(max=1.0) for norm in torch._foreach_norm(pieces)]
            torch._foreach_mul_(pieces, factors)
        values = grad
        momentum = state.get("momentum")
        if momentum is not None:
            values = momentum.mul_(self.momentum).add_(values)
        residual = state.get("residual")
        if residual is not None:
            values = residual.add_(values)
        indices = values.abs().topk(self.num_kept(values.numel(), step), sorted=False).indices
        sent = values[indices]
        for accumulator in (residual, momentum):
            if accumulator is not None:
                accumulator[indices] = 0.0
        return [sent, indices.to(torch.int32)]

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        values, indices = payload
        return values.new_zeros(layout.numel).index_put_((indices.long(),), values)
