"""The interface every gradient compressor implements, and the checks their options share."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from lightning_converge.checks import check_in_range, check_int  # noqa: F401  (the compressors import them here)
from lightning_converge.comm.exchange import Exchange
from lightning_converge.comm.state import FlatState, Layout


class Compressor:
    """Average a flat fp32 buffer over the ranks while putting fewer bytes on the wire.

    One call of :meth:`reduce` per DDP bucket and step: :meth:`compress` this rank's
    values into payload tensors, exchange them with :class:`~lightning_converge.comm.exchange.Exchange`
    (summed by an all-reduce when the compressed form is ``summable``, otherwise
    all-gathered and decompressed rank by rank), and :meth:`decode` to the average.
    An all-gather makes every rank receive and decode ``world_size`` payloads;
    blockwise formats avoid it with the two-phase exchange of
    :class:`~lightning_converge.comm.chunked.ChunkedCompressor`.

    With ``error_feedback`` the compressor keeps, per element, a ``residual``: what
    the payload did not carry. It is added to the next step's values before
    compressing, so over many steps everything is sent eventually ("1-bit SGD",
    Seide et al. 2014; "Error Feedback Fixes SignSGD", Karimireddy et al. 2019).

    Subclasses set ``name`` and ``summable`` and implement :meth:`decode` and either
    :meth:`encode` (error feedback is then done here) or :meth:`compress` (a fused
    pass that handles the residual itself). Schemes with several rounds of
    communication override :meth:`reduce`. Per-element state lives in
    ``self.elements`` (kinds named by :meth:`element_state_kinds`); other state is
    added to :meth:`state_dict` by the subclass.
    """

    name: ClassVar[str]
    # Whether payloads of several ranks can be summed as they are (then all-reduced).
    summable: ClassVar[bool] = False
    # Whether one rank's payload (compress) can be decoded by another on its own, as asynchronous DiLoCo
    # sends pseudo-gradients point to point; False where the scheme needs collectives between the ranks.
    point_to_point: ClassVar[bool] = True

    def __init__(self, error_feedback: bool = True) -> None:
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.elements = FlatState(self.element_state_kinds())

    def element_state_kinds(self) -> tuple[str, ...]:
        """Names of the per-element state buffers (flat fp32, like the bucket)."""
        return ("residual",) if self.error_feedback else ()

    def reduce(self, grad: Tensor, layout: Layout, exchange: Exchange, step: int = 0) -> Tensor:
        """This compressor's estimate of the average of ``grad`` over the ranks (flat fp32).

        ``grad`` is this rank's flat fp32 buffer, holding the tensors of ``layout``; it
        may be overwritten. ``step`` counts the optimizer steps since compression started.
        """
        payload = self.compress(grad, layout, self.elements.buffers(layout, grad.device), exchange, step)
        if self.summable:
            exchange.all_reduce(payload)
            return self.decode(payload, layout).div_(exchange.world_size)
        gathered = exchange.all_gather(payload)
        total = self.decode(gathered[0], layout)
        for payload_of_rank in gathered[1:]:
            total += self.decode(payload_of_rank, layout)
        return total.div_(len(gathered))

    def compress(
        self, grad: Tensor, layout: Layout, state: dict[str, Tensor], exchange: Exchange, step: int
    ) -> list[Tensor]:
        """This rank's payload for ``grad`` (which may be overwritten).

        With error feedback (``state["residual"]``) it compresses ``grad + residual``
        and leaves in ``residual`` what the payload does not carry.
        """
        residual = state.get("residual")
        values = grad if residual is None else grad.add_(residual)
        payload = self.encode(values, layout)
        if residual is not None:
            torch.sub(values, self.decode(payload, layout), out=residual)
        return payload

    def encode(self, values: Tensor, layout: Layout) -> list[Tensor]:
        """The payload tensors for ``values`` (used by the default :meth:`compress`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither encode nor compress")

    def decode(self, payload: list[Tensor], layout: Layout) -> Tensor:
        """The flat fp32 values one payload (or, when ``summable``, a sum of payloads) stands for."""
        raise NotImplementedError

    def snapshot(self, layout: Layout, device: torch.device) -> Callable[[], None]:
        """Save what :meth:`reduce` of this bucket may change; the returned function puts it back.

        Taken before a bucket whose step may be skipped (see
        :class:`~lightning_converge.comm.overflow.ScaledReduce`). Subclasses with state
        outside ``self.elements`` extend it.
        """
        buffers = self.elements.buffers(layout, device)
        saved = {kind: buffer.clone() for kind, buffer in buffers.items()}

        def restore() -> None:
            for kind, buffer in saved.items():
                buffers[kind].copy_(buffer)

        return restore

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, by parameter name: it loads with ``weights_only=True``."""
        return {"elements": self.elements.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elements.load_state_dict(state_dict["elements"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(error_feedback={self.error_feedback})"


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def check_block_size(value: Any, minimum: int) -> None:
    """Blocks are a power of two (triton's block shapes), at least ``minimum`` elements."""
    check_int("block_size", value, minimum)
    if value & (value - 1):
        raise ValueError(f"block_size must be a power of two, got {value}")
