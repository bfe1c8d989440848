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

1. ``w`` sends a header ``[w, inner steps run, speed (-1: unknown), final, numel]``
   (float64, tag :data:`TAG_ARRIVAL`), then its flat fp32 pseudo-gradient (tag
   :data:`TAG_PSEUDO_GRADIENT`; none when ``numel`` is 0);
2. the server applies it and answers a header ``[status, version, staleness,
   applied, next inner steps, rounds, missing rank]`` (tag :data:`TAG_REPLY`),
   then, unless the arrival was ``final``, the current global parameters, flat
   fp32 (tag :data:`TAG_PARAMETERS`), which ``w`` continues from.

A ``final`` arrival is a worker's last (when its ``fit`` ends); the server
thread ends once every other worker has sent one.

**Faults.** The server waits for the next message at most until some worker
has been silent for ``timeout``; then it fails, naming the silent workers,
answers every other worker waiting for it with status :data:`STATUS_ABORT` and
the missing rank (so each raises a clear error instead of waiting), and rank 0's
training thread raises the same error at its next round. A worker whose server
does not answer within ``timeout`` raises too. ``timeout`` must therefore exceed
the longest round of any worker.

Bytes: a worker counts the pseudo-gradient it sends and the parameters it
receives (headers aside); the server's thread counts nothing (rank 0's worker
exchanges nothing over the wire).
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

from lightning_converge.strategies.diloco.async_outer import Arrival, AsyncOuterServer, WorkerRecord

TAG_ARRIVAL, TAG_PSEUDO_GRADIENT, TAG_REPLY, TAG_PARAMETERS = 11, 12, 13, 14
STATUS_OK, STATUS_ABORT = 0.0, 1.0
SERVER_RANK = 0
_ARRIVAL_FIELDS, _REPLY_FIELDS = 5, 7


class AsyncDiLoCoError(RuntimeError):
    """A worker of asynchronous DiLoCo is missing: dead, or silent for longer than the timeout."""


@dataclass
class Reply:
    """The server's answer to one arrival; ``params`` is None for a final arrival."""

    version: int
    staleness: int
    applied: bool
    inner_steps: int
    rounds: int
    params: Optional[Tensor] = None


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
    """Rank 0's own worker: the round trip without the wire (``pseudo_gradient`` None: nothing to apply)."""
    with lock:
        return _answer(server, worker, pseudo_gradient, inner_steps, speed, final)


def _answer(
    server: AsyncOuterServer,
    worker: int,
    pseudo_gradient: Optional[Tensor],
    inner_steps: int,
    speed: Optional[float],
    final: bool,
) -> Reply:
    arrival = None if pseudo_gradient is None else server.arrive(worker, pseudo_gradient, inner_steps, speed)
    record = server.workers.setdefault(worker, WorkerRecord())
    params = None
    if not final:
        params, _ = server.pull(worker)
    return Reply(
        version=server.version,
        staleness=0 if arrival is None else arrival.staleness,
        applied=arrival is not None and arrival.applied,
        inner_steps=server.inner_steps_for(worker),
        rounds=record.rounds,
        params=params,
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
                worker, inner_steps, speed, final, numel = header.tolist()
                worker, inner_steps, numel = int(worker), int(inner_steps), int(numel)
                last_seen[worker] = time.monotonic()
                pseudo_gradient = None
                if numel:
                    pseudo_gradient = torch.empty(numel, dtype=torch.float32)
                    dist.recv(pseudo_gradient, src=worker, group=self._group, tag=TAG_PSEUDO_GRADIENT)
                with self._lock:
                    before = self._server.arrivals
                    reply = _answer(
                        self._server, worker, pseudo_gradient, inner_steps, None if speed < 0 else speed, bool(final)
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
        abort = torch.tensor([STATUS_ABORT, 0, 0, 0, 0, 0, missing[0]], dtype=torch.float64)
        # Kept, so the message outlives this call: the thread ends here, the sends complete when each is read.
        self._aborts = [
            dist.isend(abort, dst=rank, group=self._group, tag=TAG_REPLY)
            for rank in sorted(self._active - set(missing))
        ]


def _send_reply(reply: Reply, worker: int, group: dist.ProcessGroup) -> None:
    header = torch.tensor(
        [STATUS_OK, reply.version, reply.staleness, float(reply.applied), reply.inner_steps, reply.rounds, -1],
        dtype=torch.float64,
    )
    dist.send(header, dst=worker, group=group, tag=TAG_REPLY)
    if reply.params is not None:
        dist.send(reply.params, dst=worker, group=group, tag=TAG_PARAMETERS)


def round_trip(
    pseudo_gradient: Optional[Tensor],
    numel: int,
    inner_steps: int,
    speed: Optional[float],
    final: bool,
    group: dist.ProcessGroup,
    timeout: timedelta,
    owner: str,
) -> Reply:
    """A worker other than rank 0: send its flat fp32 CPU ``pseudo_gradient`` (None: nothing to apply) and
    take the server's reply and, unless ``final``, the ``numel`` global parameters."""
    rank = dist.get_rank()
    size = 0 if pseudo_gradient is None else pseudo_gradient.numel()
    header = torch.tensor(
        [rank, inner_steps, -1.0 if speed is None else speed, float(final), size], dtype=torch.float64
    )
    try:
        dist.send(header, dst=SERVER_RANK, group=group, tag=TAG_ARRIVAL)
        if size:
            dist.send(pseudo_gradient, dst=SERVER_RANK, group=group, tag=TAG_PSEUDO_GRADIENT)
        answer = torch.empty(_REPLY_FIELDS, dtype=torch.float64)
        dist.irecv(answer, src=SERVER_RANK, group=group, tag=TAG_REPLY).wait(timeout)
    except RuntimeError as error:
        raise AsyncDiLoCoError(
            f"{owner}: worker {rank} got no answer from the server (rank {SERVER_RANK}) within {timeout} "
            f"(timeout): it has died or hung. Cause: {error}"
        ) from error
    status, version, staleness, applied, next_inner_steps, rounds, missing = answer.tolist()
    if status == STATUS_ABORT:
        raise missing_worker_error(owner, [int(missing)], timeout)
    params = None
    if not final:
        params = torch.empty(numel, dtype=torch.float32)
        dist.recv(params, src=SERVER_RANK, group=group, tag=TAG_PARAMETERS)
    return Reply(int(version), int(staleness), bool(applied), int(next_inner_steps), int(rounds), params)
