"""The collectives compressors use, and the byte accounting of what they send.

Every byte the compressed strategies put on the wire while training (gradients,
1-bit Adam's momenta) goes through an :class:`Exchange`, so what is counted is
what is sent. (Gathering their state into a checkpoint is not counted.) The count is the size of the tensors handed to
the collectives, independent of the algorithm the backend runs underneath:

* ``bytes_sent``: the sizes of this rank's input tensors (its payload).
* ``bytes_received``: the sizes of the output tensors it gets back: the sum for an
  all-reduce, every rank's payload (its own included) for an all-gather, and its
  share for an all-to-all.
* ``uncompressed_bytes``: what plain DDP would have sent for the same gradients (the
  buckets' sizes in their own dtype), the numerator of the compression ratio.

A ring all-reduce moves about twice its input over the links, and an all-gather's
received bytes grow with the number of ranks; those are properties of the
collectives, reported through ``bytes_received``, not folded into ``bytes_sent``.

Without an initialized process group an :class:`Exchange` acts as a world of one
rank: collectives return their inputs, and bytes are still counted, which is how
compressors are tested in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Bytes moved since the last :meth:`Exchange.take_stats` (one optimizer step, for the strategies)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    uncompressed_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        """``uncompressed_bytes / bytes_sent``; 1.0 when nothing was sent."""
        return self.uncompressed_bytes / self.bytes_sent if self.bytes_sent else 1.0


def payload_as_bytes(tensors: Sequence[Tensor]) -> Tensor:
    """All ``tensors`` as one flat uint8 buffer, so a multi-tensor payload takes one collective (or message)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _from_bytes(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a uint8 buffer made by :func:`payload_as_bytes` back into tensors shaped and typed like ``like``."""
    pieces = buffer.split([t.numel() * t.element_size() for t in like])
    # clone(): a slice at an odd byte offset cannot be viewed as a wider dtype.
    return [piece.clone().view(t.dtype).view(t.shape) for piece, t in zip(pieces, like)]


#: The dtypes a payload tensor may have where its description travels as numbers (:func:`describe_payload`).
PAYLOAD_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)


def describe_payload(tensors: Sequence[Tensor]) -> list[int]:
    """What a receiver of :func:`payload_as_bytes` needs to rebuild ``tensors`` without having them: per
    tensor, its dtype's index in :data:`PAYLOAD_DTYPES` and its number of elements (point-to-point messages
    send this ahead of the bytes)."""
    description = []
    for tensor in tensors:
        if tensor.dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"a payload tensor's dtype must be one of {PAYLOAD_DTYPES}, got {tensor.dtype}")
        description += [PAYLOAD_DTYPES.index(tensor.dtype), tensor.numel()]
    return description


def described_bytes(description: Sequence[int]) -> int:
    """The size in bytes of the payload that :func:`describe_payload` described."""
    return sum(numel * PAYLOAD_DTYPES[code].itemsize for code, numel in zip(description[0::2], description[1::2]))


def payload_from_bytes(buffer: Tensor, description: Sequence[int]) -> list[Tensor]:
    """The tensors (flat) that :func:`describe_payload` described and ``buffer`` holds the bytes of."""
    like = [
        torch.empty(numel, dtype=PAYLOAD_DTYPES[code], device="meta")
        for code, numel in zip(description[0::2], description[1::2])
    ]
    return _from_bytes(buffer, like)


class Exchange:
    """Counting collectives over ``group`` (the default process group when None).

    A flag (a 0-d bool tensor per rank) can ride along with the next collective
    (:meth:`carry_flag`): one more element in an all-reduce, one more byte in each
    rank's part of an all-gather or all-to-all. :meth:`flag_on_every_rank` then
    tells, without a host synchronization, whether it was True on every rank: the
    same answer on every rank, at no extra collective.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.stats = CommStats()
        self._outgoing_flag: Tensor | None = None
        self._flag_on_every_rank: Tensor | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def take_stats(self) -> CommStats:
        """Return the bytes counted so far and start counting afresh."""
        stats, self.stats = self.stats, CommStats()
        return stats

    def carry_flag(self, flag: Tensor) -> None:
        """Send this rank's ``flag`` (a 0-d bool tensor) with the next collective."""
        self._outgoing_flag = flag.reshape(())
        self._flag_on_every_rank = None

    def flag_on_every_rank(self) -> Tensor:
        """Whether the flag given to :meth:`carry_flag` was True on every rank (a 0-d bool tensor).

        If no collective has carried it since, it is all-reduced on its own now.
        """
        if self._outgoing_flag is not None:
            self.all_reduce([])
        if self._flag_on_every_rank is None:
            raise RuntimeError("flag_on_every_rank() without carry_flag() first")
        return self._flag_on_every_rank

    def _take_outgoing_flag(self) -> Tensor | None:
        flag, self._outgoing_flag = self._outgoing_flag, None
        return flag

    def count_uncompressed(self, tensor: Tensor) -> None:
        """Record that plain DDP would have all-reduced ``tensor``."""
        self.stats.uncompressed_bytes += tensor.numel() * tensor.element_size()

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` (one dtype) over the ranks, in place, in one collective."""
        flag = self._take_outgoing_flag()
        if not tensors and flag is None:
            return
        pieces = [t.reshape(-1) for t in tensors]
        if flag is not None:  # counted as the number of ranks whose flag is False
            dtype = tensors[0].dtype if tensors else torch.float32
            pieces.append(flag.logical_not().to(dtype).reshape(1))
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        nbytes = flat.numel() * flat.element_size()
        self.stats.bytes_sent += nbytes
        self.stats.bytes_received += nbytes
        if self.world_size > 1:
            dist.all_reduce(flat, group=self.group)
        if flag is not None:
            self._flag_on_every_rank = flat[-1] == 0
            flat = flat[:-1]
        if self.world_size > 1 and (len(pieces) > 1 or flat.data_ptr() != tensors[0].data_ptr()):
            for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
                tensor.copy_(piece.view_as(tensor))

    def average(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over the ranks in place, exactly as DDP's own all-reduce does.

        DDP's reducer multiplies each gradient by ``1 / world_size`` and sums across
        ranks; doing the same keeps an uncompressed step bit-identical to plain DDP.
        """
        self.all_reduce([tensor.mul_(1 / self.world_size)])
        return tensor

    def average_async(self, tensor: Tensor) -> torch.futures.Future[Tensor]:
        """:meth:`average` as the future of an asynchronous all-reduce, as torch's own DDP hooks
        return it: on GPU the collective overlaps what follows (the rest of backward). The bytes
        are counted when it starts."""
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.bytes_sent += nbytes
        self.stats.bytes_received += nbytes
        tensor.mul_(1 / self.world_size)
        if not dist.is_initialized():
            future: torch.futures.Future[Tensor] = torch.futures.Future()
            future.set_result(tensor)
            return future
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda done: done.value()[0])

    def all_gather(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Every rank's ``tensors``, indexed ``[rank][i]``; one collective for the whole payload.

        The tensors must have the same shapes and dtypes on every rank.
        """
        rows = self._exchange_rows([payload_as_bytes(tensors)], dist.all_gather_into_tensor)
        return [_from_bytes(row, tensors) for row in rows]

    def all_to_all(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Send row ``j`` of each of ``tensors`` (leading dimension ``world_size``) to rank ``j``.

        Returns what this rank received, indexed ``[source rank][i]``: the source's row
        ``rank`` of its ``tensors[i]``. One collective for the whole payload.
        """
        world_size = self.world_size
        if any(t.shape[0] != world_size for t in tensors):
            raise ValueError(f"all_to_all needs tensors with a leading dimension of {world_size} (the world size)")
        rows = [[t[j] for t in tensors] for j in range(world_size)]
        received = self._exchange_rows([payload_as_bytes(row) for row in rows], dist.all_to_all_single)
        return [_from_bytes(row, rows[0]) for row in received]

    def _exchange_rows(self, rows: list[Tensor], collective: Any) -> list[Tensor]:
        """Run ``collective(output, input)`` on the uint8 ``rows`` (one for an all-gather, one per rank
        for an all-to-all), with the carried flag as one more byte per row; return the rows received."""
        flag = self._take_outgoing_flag()
        if flag is not None:
            rows = [torch.cat([row, flag.to(torch.uint8).reshape(1)]) for row in rows]
        buffer = torch.cat(rows) if len(rows) > 1 else rows[0]
        world_size = self.world_size
        self.stats.bytes_sent += buffer.numel()
        self.stats.bytes_received += rows[0].numel() * world_size
        if world_size == 1:
            received = buffer.view(1, -1)
        else:
            received = buffer.new_empty(world_size * rows[0].numel())
            collective(received, buffer, group=self.group)
            received = received.view(world_size, -1)
        if flag is None:
            return list(received)
        self._flag_on_every_rank = received[:, -1].bool().all()
        return list(received[:, :-1])
