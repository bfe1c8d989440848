"""The exchange of pseudo-gradients between the workers, and the syncs in flight.

:class:`PseudoGradientExchange` averages a flat fp32 pseudo-gradient over the
workers on a process group of its own (so Lightning's collectives never queue
behind an overlapped all-reduce): an asynchronous fp32 all-reduce, or, with a
``compressor``, the compressor's collectives, which block, on a thread of their
own so they overlap with the inner steps. Either way the caller gets a future at
once (:meth:`~PseudoGradientExchange.start`) and waits for it when the average
is due (:meth:`~PseudoGradientExchange.resolve`), which times the wait and
counts the bytes. A :class:`PendingSync` is one such average on its way.

On CUDA and NCCL the exchange keeps two invariants:

* Order of collectives. Every collective on the exchange's process group is
  issued from one thread, in the order :meth:`~PseudoGradientExchange.start` and
  :meth:`~PseudoGradientExchange.start_gather` are called, which is the same on
  every rank (the schedule of syncs is): the
  exchange's thread with a compressor (a single worker runs the submitted
  reductions one after the other), the training thread without (an asynchronous
  all-reduce). The other thread only waits on futures, never issues a collective
  on that group, so two threads' NCCL collectives never interleave in a
  rank-dependent order. Lightning's own collectives use the default group.
* Streams. The training thread records an event on its current stream when the
  pseudo-gradient is ready; the exchange's thread makes the pseudo-gradient's
  device current, runs the compressor on a side stream of its own that waits on
  that event, and records an event when the average is ready; the training thread's
  stream waits on that one before using the average (:meth:`~PseudoGradientExchange.resolve`).
  Both tensors are marked as used by the other stream, so the caching allocator
  does not reuse their memory early. Off CUDA none of this applies.

Bytes follow the convention of :class:`lightning_converge.comm.Exchange`: the
sizes of the tensors handed to the collective and returned by it, compressed
when a ``compressor`` is set (an fp32 all-reduce of N numbers sends 4 N bytes
and receives 4 N), not the ring algorithm's ``2 (n - 1) / n`` multiple on the wire.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_converge.comm import Compressor, Exchange, Layout, make_compressor
from lightning_converge.kernels.dispatch import ScalarSlots

Result = TypeVar("Result")


def as_compressor(compressor: Union[str, Compressor, None]) -> Optional[Compressor]:
    """The ``compressor`` option as a :class:`~lightning_converge.comm.Compressor` (None: fp32), or a TypeError."""
    if isinstance(compressor, str):
        return make_compressor(compressor)
    if not (compressor is None or isinstance(compressor, Compressor)):
        raise TypeError(f"compressor must be None, a compressor's name or a Compressor, got {compressor!r}")
    return compressor


@dataclass
class PendingSync:
    """One fragment's pseudo-gradient on its way through the all-reduce, not yet applied.

    ``apply_at_step`` is the inner step after which the average is applied, or
    None for "when the fragment next syncs" (``delay=1``). ``exchange`` resolves
    to the average over the workers (flat fp32, on the parameters' device) and
    the bytes this worker sent; once it has, or for an average restored from a
    checkpoint, it is None and ``average`` holds the result.
    """

    apply_at_step: Optional[int]
    # Resolves to (average, the CUDA event after which it is ready or None, bytes sent, bytes received).
    exchange: Optional[torch.futures.Future] = None
    average: Optional[Tensor] = None


class PseudoGradientExchange:
    """Averages pseudo-gradients over the workers and counts what that costs: bytes and waiting.

    Built with the strategy; :meth:`open` gives it its process group when fitting starts, :meth:`close`
    takes it away when the stage ends. The counters live on across both, as the strategy's read-outs.

    Args:
        compressor: how pseudo-gradients travel (None: fp32), see :func:`as_compressor`.
        owner: the name failures are reported under (the strategy's class name).
    """

    def __init__(self, compressor: Optional[Compressor], owner: str) -> None:
        self.compressor = compressor
        self._owner = owner
        self._group: Optional[dist.ProcessGroup] = None
        self._timeout: Optional[timedelta] = None
        # With a compressor: its byte-counting collectives, and the thread they run on (they block).
        self._collectives: Optional[Exchange] = None
        self._thread: Optional[ThreadPoolExecutor] = None
        self._scalars = ScalarSlots()  # what start_gather sends
        # The thread's side stream per CUDA device, made in the thread on first use.
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0
        # Bytes of the exchanges completed since the last take_step_bytes().
        self._step_bytes_sent = 0
        self._step_bytes_received = 0

    @property
    def is_open(self) -> bool:
        return self._group is not None

    def open(self, timeout: Optional[timedelta], replica_groups: Optional[list[list[int]]] = None) -> None:
        """Open the exchange's own process group (collective: every rank calls it) with ``timeout``: all ranks
        average together, or, given ``replica_groups`` (lists of ranks, each rank in one), each rank with the
        ranks of its list (the ranks that hold the same shard in every replica)."""
        self._timeout = timeout
        if replica_groups is None:
            self._group = dist.new_group(backend=dist.get_backend(), timeout=timeout)
        else:
            self._group, _ = dist.new_subgroups_by_enumeration(
                replica_groups, timeout=timeout, backend=dist.get_backend()
            )
        if self.compressor is not None:
            self._collectives = Exchange(self._group)
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange")

    def close(self) -> None:
        """Close the process group; an exchange still in flight is abandoned."""
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def start(self, pseudo_gradient: Tensor, layout: Layout, step: int) -> torch.futures.Future:
        """Start averaging ``pseudo_gradient`` (flat fp32, laid out as ``layout``) over the workers, after
        inner step ``step``; the future resolves to (average, the CUDA event after which it is ready or None,
        bytes sent, bytes received). Call it on every rank in the same order (see the module's invariants)."""
        try:
            return self._start(pseudo_gradient, layout, step)
        except RuntimeError as error:
            raise self._failure(error, step) from error

    def _start(self, pseudo_gradient: Tensor, layout: Layout, step: int) -> torch.futures.Future:
        if self.compressor is None:
            size = pseudo_gradient.numel() * pseudo_gradient.element_size()  # in and out: one fp32 tensor
            world_size = dist.get_world_size(self._group)
            # Issued from the training thread, the only one using the group then; NCCL orders it after the
            # current stream, and the future's value is ready on the stream that waits for it.
            work = dist.all_reduce(pseudo_gradient, group=self._group, async_op=True)
            return work.get_future().then(lambda done: (done.value()[0].div_(world_size), None, size, size))
        future = torch.futures.Future()
        ready = _ready_event(pseudo_gradient.device)

        def reduce() -> None:
            try:
                average, done = self._run_on_device(
                    pseudo_gradient.device,
                    ready,
                    [pseudo_gradient],
                    lambda: self.compressor.reduce(pseudo_gradient, layout, self._collectives, step),
                )
                stats = self._collectives.take_stats()
                future.set_result((average, done, stats.bytes_sent, stats.bytes_received))
            except Exception as error:  # raised again in the training thread, by wait()
                future.set_exception(error)

        self._thread.submit(reduce)
        return future

    def _run_on_device(
        self,
        device: torch.device,
        ready: Optional[torch.cuda.Event],
        inputs: Sequence[Tensor],
        work: Callable[[], Result],
    ) -> tuple[Result, Optional[torch.cuda.Event]]:
        """Run ``work()`` in the exchange's thread, on ``device``; return its result and, on CUDA, an event
        recorded when the work queued by it is done (None elsewhere).

        On CUDA: ``device`` becomes the thread's current device (a new thread starts on device 0), and the
        work runs on the thread's side stream, which first waits for ``ready`` (the producer's event);
        ``inputs``, allocated on the producer's stream, are marked as used by the side stream.
        """
        if device.type != "cuda":
            return work(), None
        torch.cuda.set_device(device)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_event(ready)
        for tensor in inputs:
            tensor.record_stream(stream)
        with torch.cuda.stream(stream):
            result = work()
            done = torch.cuda.Event()
            done.record(stream)
        return result, done

    def resolve(self, pending: PendingSync, step: int) -> Tensor:
        """Wait for the pending exchange (timed), count its bytes, and return the averaged pseudo-gradient;
        ``step`` is the inner step training is at, for the error a failed exchange raises."""
        if pending.exchange is not None:
            started = time.perf_counter()
            try:
                pending.average, done, sent, received = pending.exchange.wait()
            except RuntimeError as error:
                raise self._failure(error, step) from error
            if done is not None:  # made on the exchange's side stream: the current stream waits for it
                consumer = torch.cuda.current_stream(pending.average.device)
                consumer.wait_event(done)
                pending.average.record_stream(consumer)
            self.wait_seconds += time.perf_counter() - started
            self._count_bytes(sent, received)
            pending.exchange = None
        return pending.average

    def start_gather(self, value: float, device: torch.device) -> torch.futures.Future:
        """Start gathering one number from every worker (such as its speed) on the exchange's group, from
        the thread and in the order of its other collectives (see the module's invariants): call it on every
        rank at the same point. ``device``: the pseudo-gradients' (a CUDA device under NCCL). The future
        resolves to the numbers, rank by rank, as a list of floats; :meth:`resolve_gather` waits for it."""
        world_size = dist.get_world_size(self._group)
        # A persistent slot, refilled without a host sync: one gather is in flight at a time (resolved at its sync).
        mine = self._scalars("gathered", value, device, torch.float64).reshape(1)
        gathered = torch.empty(world_size, dtype=torch.float64, device=device)
        if self.compressor is None:  # the training thread issues the group's collectives
            work = dist.all_gather_into_tensor(gathered, mine, group=self._group, async_op=True)
            return work.get_future().then(lambda _: gathered.tolist())
        future = torch.futures.Future()
        ready = _ready_event(device)

        def gather() -> None:
            try:
                self._run_on_device(
                    device, ready, [mine], lambda: dist.all_gather_into_tensor(gathered, mine, group=self._group)
                )
                future.set_result(gathered.tolist())  # read here: the training thread is not synchronized
            except Exception as error:  # raised again in the training thread, by wait()
                future.set_exception(error)

        self._thread.submit(gather)
        return future

    def resolve_gather(self, future: torch.futures.Future, step: int) -> list[float]:
        """Wait for :meth:`start_gather`'s numbers (timed as waiting; counted as 8 bytes sent and 8 a worker
        received); ``step`` is the inner step training is at, for the error a failed exchange raises."""
        started = time.perf_counter()
        try:
            numbers = future.wait()
        except RuntimeError as error:
            raise self._failure(error, step) from error
        self.wait_seconds += time.perf_counter() - started
        self._count_bytes(8, 8 * len(numbers))
        return numbers

    def _count_bytes(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self._step_bytes_sent += sent
        self._step_bytes_received += received

    def take_step_bytes(self) -> tuple[int, int]:
        """The bytes sent and received in the exchanges completed since the last call."""
        step_bytes = (self._step_bytes_sent, self._step_bytes_received)
        self._step_bytes_sent = self._step_bytes_received = 0
        return step_bytes

    def _failure(self, error: BaseException, step: int) -> RuntimeError:
        return RuntimeError(
            f"{self._owner}: the exchange of pseudo-gradients failed on rank {dist.get_rank()} after inner "
            f"step {step}. Another worker has probably died or stopped responding "
            f"(process-group timeout: {self._timeout}). Cause: {error}"
        )


def _ready_event(device: torch.device) -> Optional[torch.cuda.Event]:
    """In the training thread: on CUDA, an event on ``device``'s current stream after the work queued so
    far (what produced the pseudo-gradient); None elsewhere."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
