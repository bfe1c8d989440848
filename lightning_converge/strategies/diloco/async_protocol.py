"""The control plane of asynchronous DiLoCo: messages between the workers and the server, on a gloo group.

Lightning-free. Rank 0 (the *server rank*) owns the global parameters
(:class:`~lightning_converge.strategies.diloco.async_outer.AsyncOuterServer`);
:class:`ServerThread`, a thread on rank 0, answers the other workers, one
message at a time, while rank 0's training thread goes on (rank 0's own worker
calls the server directly, under the same lock). Every message is
point-to-point on a gloo process group of its own, with CPU tensors, so it
works whatever backend the inner work uses (NCCL included). No worker ever waits
for another: a round trip is one worker and the server.

A round trip (:func:`round_trip`), worker ``w`` to rank 0:

1. ``w`` sends a header ``[w, inner steps run, speed (-1: unknown), final,
   payload description]`` (float64, tag :data:`TAG_ARRIVAL`), then its payload's
   bytes (tag :data:`TAG_PSEUDO_GRADIENT`; none when the description counts no
   tensor): its flat fp32 pseudo-gradient, or what its compressor made of it;
2. the server decodes and applies it and answers a header ``[status, version,
   staleness, applied, next inner steps, rounds, missing rank, payload
   description]`` (tag :data:`TAG_REPLY`), then, unless the arrival was
   ``final``, the payload's bytes (tag :data:`TAG_PARAMETERS`): the current global
   parameters, flat fp32, or, with a compressor, the compressed difference from
   the parameters ``w`` holds
   (:meth:`~lightning_converge.strategies.diloco.async_outer.AsyncOuterServer.pull_payload`),
   which ``w`` continues from.

A payload description is ``[count, dtype code, numel, ...]`` for up to
:data:`MAX_PAYLOAD_TENSORS` flat tensors
(:func:`~lightning_converge.comm.exchange.describe_payload`): what the receiver
needs to rebuild a compressor's payload (its tensors' dtypes and sizes change
with the compressor, and top-k's with its warm-up) from one message of bytes.
A ``final`` arrival is a worker's last (when its ``fit`` ends); the server
thread ends once every other worker has sent one.

**Faults.** The server waits for the next message at most until some worker
has been silent for ``timeout``; then it fails, naming the silent workers,
answers every other worker waiting for it with status :data:`STATUS_ABORT` and
the missing rank (so each raises a clear error instead of waiting), and rank 0's
training thread raises the same error at its next round. A worker whose server
does not answer within ``timeout`` raises too. ``timeout`` must therefore exceed
the longest round of any worker.

Bytes: a worker counts the payloads it sends and receives (the headers aside:
``8 * (5 + 2 * MAX_PAYLOAD_TENSORS)`` and ``8 * (8 + 2 * MAX_PAYLOAD_TENSORS)``
bytes, one of each per round); the server's thread counts nothing (rank 0's
worker exchanges nothing over the wire).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_converge.comm import Compressor, Layout
from lightning_converge.comm.exchange import (
    describe_payload,
    described_bytes,
    payload_as_bytes,
    payload_from_bytes,
)
from lightning_converge.strategies.diloco.async_outer import (
    SERVER_RANK,
    Arrival,
    AsyncOuterServer,
    SoleSender,
    WorkerRecord,
)

TAG_ARRIVAL, TAG_PSEUDO_GRADIENT, TAG_REPLY, TAG_PARAMETERS = 11, 12, 13, 14
STATUS_OK, STATUS_ABORT = 0.0, 1.0
#: The most tensors a payload may have (every compressor of this pack sends one or two).
MAX_PAYLOAD_TENSORS = 4
_DESCRIPTION_FIELDS = 1 + 2 * MAX_PAYLOAD_TENSORS
_ARRIVAL_FIELDS, _REPLY_FIELDS = 4 + _DESCRIPTION_FIELDS, 7 + _DESCRIPTION_FIELDS


class AsyncDiLoCoError(RuntimeError):
    """A worker of asynchronous DiLoCo is missing: dead, or silent for longer than the timeout."""


@dataclass
class Reply:
    """The server's answer to one arrival. ``payload``: the global parameters as
    :meth:`~lightning_converge.strategies.diloco.async_outer.AsyncOuterServer.pull_payload` sends them
    (``[flat fp32]`` to rank 0's own worker); None for a final arrival."""

    version: int
    staleness: int
    applied: bool
    inner_steps: int
    rounds: int
    payload: Optional[list[Tensor]] = None


def _description(payload: Optional[list[Tensor]]) -> list[float]:
    """The header fields that describe ``payload`` (None or empty: nothing follows)."""
    payload = payload or []
    if len(payload) > MAX_PAYLOAD_TENSORS:
        raise ValueError(f"a payload may have at most {MAX_PAYLOAD_TENSORS} tensors, got {len(payload)}")
    fields = [len(payload), *describe_payload(payload)]
    return fields + [0] * (_DESCRIPTION_FIELDS - len(fields))


def _send_payload(payload: Optional[list[Tensor]], peer: int, group: dist.ProcessGroup, tag: int) -> None:
    if payload:
        dist.send(payload_as_bytes([t.cpu() for t in payload]), dst=peer, group=group, tag=tag)


def _recv_payload(fields: list[float], peer: int, group: dist.ProcessGroup, tag: int) -> Optional[list[Tensor]]:
    """The payload that the header ``fields`` (from :func:`_description`) announce, received from ``peer``."""
    count = int(fields[0])
    if not count:
        return None
    description = [int(value) for value in fields[1 : 1 + 2 * count]]
    buffer = torch.empty(described_bytes(description), dtype=torch.uint8)
    dist.recv(buffer, src=peer, group=group, tag=tag)
    return payload_from_bytes(buffer, description)


def payload_bytes(payload: Optional[list[Tensor]]) -> int:
    """The bytes a payload puts on the wire (0 for None)."""
    return sum(t.numel() * t.element_size() for t in payload or [])


def encode_pseudo_gradient(
    compressor: Optional[Compressor], pseudo_gradient: Tensor, layout: Layout, rank: int, step: int
) -> list[Tensor]:
    """A worker's payload for its flat fp32 ``pseudo_gradient`` (overwritten): ``[pseudo_gradient]``, or
    ``compressor``'s payload with this worker's error feedback (``step``: its rounds sent before)."""
    if compressor is None:
        return [pseudo_gradient]
    state = compressor.elements.buffers(layout, pseudo_gradient.device)
    return compressor.compress(pseudo_gradient, layout, state, SoleSender(rank), step)


def missing_worker_error(owner: str, missing: list[int], timeout: timedelta, cause: str = "") -> AsyncDiLoCoError:
    return AsyncDiLoCoError(
        f"{owner}: worker(s) {missing} stopped sending to the server (rank {SERVER_RANK}): dead, or silent "
        f"for the timeout ({timeout}). The other workers stop here; resume from the last checkpoint (with any "
        "number of workers)." + (f" Cause: {cause}" if cause else "")
    )


def serve_locally(
    server: AsyncOuterServer,
    lock: threading.Lock,
    worker: int,
    pseudo_gradient: Optional[Tensor],
    inner_steps: int,
    speed: Optional[float],
    final: bool,
) -> Reply:
    """Rank 0's own worker: the round trip without the wire, in fp32 (``pseudo_gradient`` None: nothing to
    apply); the reply's payload is ``[flat fp32 global parameters]``."""
    with lock:
        return _answer(server, worker, pseudo_gradient, inner_steps, speed, final, remote=False)


def _answer(
    server: AsyncOuterServer,
    worker: int,
    pseudo_gradient: Optional[Tensor],
    inner_steps: int,
    speed: Optional[float],
    final: bool,
    remote: bool,
) -> Reply:
    arrival = None if pseudo_gradient is None else server.arrive(worker, pseudo_gradient, inner_steps, speed)
    record = server.workers.setdefault(worker, WorkerRecord())
    payload = None
    if not final:
        payload = server.pull_payload(worker) if remote else [server.pull(worker)[0]]
    return Reply(
        version=server.version,
        staleness=0 if arrival is None else arrival.staleness,
        applied=arrival is not None and arrival.applied,
        inner_steps=server.inner_steps_for(worker),
        rounds=record.rounds,
        payload=payload,
    )


class ServerThread:
    """Rank 0's thread answering the other workers' round trips until each has sent its final arrival.

    Args:
        server: the outer state; ``lock`` serializes it with rank 0's own worker.
        group: the control plane's gloo group; ``world_size`` its size.
        timeout: how long any one worker may stay silent.
        owner: the strategy's name, for errors.
        on_arrival: called with each applied or dropped :class:`Arrival` (tests record the order).
    """

    def __init__(
        self,
        server: AsyncOuterServer,
        lock: threading.Lock,
        group: dist.ProcessGroup,
        world_size: int,
        timeout: timedelta,
        owner: str,
        on_arrival: Optional[Callable[[Arrival], None]] = None,
    ) -> None:
        self._server = server
        self._lock = lock
        self._group = group
        self._timeout = timeout
        self._owner = owner
        self._on_arrival = on_arrival
        self._active = set(range(1, world_size))
        self.error: Optional[BaseException] = None
        self._aborts: list[dist.Work] = []
        self._thread = threading.Thread(target=self._run, name="async-diloco-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait until every other worker has sent its final arrival or the server failed (then raise)."""
        self._thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        last_seen = {rank: time.monotonic() for rank in self._active}
        try:
            while self._active:
                header = torch.empty(_ARRIVAL_FIELDS, dtype=torch.float64)
                work = dist.irecv(header, src=None, group=self._group, tag=TAG_ARRIVAL)
                deadline = min(last_seen[rank] for rank in self._active) + self._timeout.total_seconds()
                try:
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                except RuntimeError as error:  # a timeout, or a dead worker's closed connection
                    now = time.monotonic()
                    missing = sorted(r for r in self._active if now - last_seen[r] >= self._timeout.total_seconds())
                    self._fail(missing or sorted(self._active), str(error))
                    return
                worker, inner_steps, speed, final, *description = header.tolist()
                worker, inner_steps = int(worker), int(inner_steps)
                last_seen[worker] = time.monotonic()
                payload = _recv_payload(description, worker, self._group, TAG_PSEUDO_GRADIENT)
                pseudo_gradient = None if payload is None else self._server.decode(payload)
                with self._lock:
                    before = self._server.arrivals
                    reply = _answer(
                        self._server,
                        worker,
                        pseudo_gradient,
                        inner_steps,
                        None if speed < 0 else speed,
                        bool(final),
                        remote=True,
                    )
                    arrived = self._server.arrivals > before
                if arrived and self._on_arrival is not None:
                    self._on_arrival(Arrival(worker, reply.version, reply.staleness, reply.applied))
                _send_reply(reply, worker, self._group)
                if final:
                    self._active.discard(worker)
        except BaseException as error:  # raised again in the training thread
            self.error = AsyncDiLoCoError(f"{self._owner}: the server thread failed: {error}")
            self.error.__cause__ = error

    def _fail(self, missing: list[int], cause: str) -> None:
        self.error = missing_worker_error(self._owner, missing, self._timeout, cause)
        abort = torch.tensor([STATUS_ABORT, 0, 0, 0, 0, 0, missing[0], *_description(None)], dtype=torch.float64)
        # Kept, so the message outlives this call: the thread ends here, the sends complete when each is read.
        self._aborts = [
            dist.isend(abort, dst=rank, group=self._group, tag=TAG_REPLY)
            for rank in sorted(self._active - set(missing))
        ]


def _send_reply(reply: Reply, worker: int, group: dist.ProcessGroup) -> None:
    header = torch.tensor(
        [STATUS_OK, reply.version, reply.staleness, float(reply.applied), reply.inner_steps, reply.rounds, -1]
        + _description(reply.payload),
        dtype=torch.float64,
    )
    dist.send(header, dst=worker, group=group, tag=TAG_REPLY)
    _send_payload(reply.payload, worker, group, TAG_PARAMETERS)


def round_trip(
    payload: Optional[list[Tensor]],
    inner_steps: int,
    speed: Optional[float],
    final: bool,
    group: dist.ProcessGroup,
    timeout: timedelta,
    owner: str,
) -> Reply:
    """A worker other than rank 0: send its pseudo-gradient's ``payload`` (its flat fp32 pseudo-gradient,
    or what its compressor made of it; None: nothing to apply) and take the server's reply, with, unless
    ``final``, the global parameters' payload."""
    rank = dist.get_rank()
    header = torch.tensor(
        [rank, inner_steps, -1.0 if speed is None else speed, float(final)] + _description(payload),
        dtype=torch.float64,
    )
    try:
        dist.send(header, dst=SERVER_RANK, group=group, tag=TAG_ARRIVAL)
        _send_payload(payload, SERVER_RANK, group, TAG_PSEUDO_GRADIENT)
        answer = torch.empty(_REPLY_FIELDS, dtype=torch.float64)
        dist.irecv(answer, src=SERVER_RANK, group=group, tag=TAG_REPLY).wait(timeout)
    except RuntimeError as error:
        raise AsyncDiLoCoError(
            f"{owner}: worker {rank} got no answer from the server (rank {SERVER_RANK}) within {timeout} "
            f"(timeout): it has died or hung. Cause: {error}"
        ) from error
    status, version, staleness, applied, next_inner_steps, rounds, missing, *description = answer.tolist()
    if status == STATUS_ABORT:
        raise missing_worker_error(owner, [int(missing)], timeout)
    reply_payload = _recv_payload(description, SERVER_RANK, group, TAG_PARAMETERS)
    return Reply(int(version), int(staleness), bool(applied), int(next_inner_steps), int(rounds), reply_payload)
