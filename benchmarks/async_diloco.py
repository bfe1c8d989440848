"""Asynchronous DiLoCo against DiLoCo and DDP with one worker 2x slower: loss against steps, samples, bytes, seconds.

What it measures
    The character GPT of the DiLoCo benchmark (``benchmarks/diloco.py``: ``examples.char_lm.CharGPT``, width
    192, 4 blocks, 1.9 M parameters, on CPython's standard-library top-level modules, windows of 64 bytes, 8 a
    worker and step; the same inner AdamW, lr 2e-3, warm-up over 10% of a worker's steps then cosine decay),
    trained by 2 and 4 workers of which the last is ``--slowdown`` (2) times slower than the others, with:

    * ``ddp``: ``strategy="ddp"``, the fp32 gradient all-reduce every step;
    * ``diloco H=..``: ``DiLoCoStrategy(inner_steps=H)``, synchronous: every round waits for the slow worker;
    * ``diloco H=.. + dynamic H``: ``DiLoCoStrategy(inner_steps=H, dynamic_inner_steps=True)``, synchronous with
      Liu et al.'s dynamic local updates: each round the slow worker trains ``H_i`` of the H steps, in
      proportion to the speeds measured in the last round, and idles through the rest (it draws their
      batches, trains on none), so its round takes about as long as a fast worker's and no worker waits
      long at the sync; the pseudo-gradients are averaged uniformly;
    * ``async Nesterov``: ``AsyncDiLoCoStrategy(outer_optimizer="nesterov")``, plain Nesterov outer momentum on
      the stale, interleaved pseudo-gradients (the paper's unstable baseline);
    * ``async Delayed Nesterov``: ``outer_optimizer="delayed_nesterov"``, momentum updated every
      ``--delayed-period`` arrivals (default: the number of workers);
    * ``async Delayed Nesterov + dynamic H``: the same with ``dynamic_inner_steps=True``;
    * ``async Delayed Nesterov + staleness penalty``: the same with ``staleness_penalty=--staleness-penalty``;
    * ``async Delayed Nesterov + overlap``: the same with ``overlap=True``: a worker starts its next round as
      soon as it has sent its pseudo-gradient and rebases its progress onto the server's reply when it comes.

    A row is one line of :func:`methods`: a kind and the strategy's options.

    Every DiLoCo method uses the same H (``--h``, 20;
    ``--h-4``, 8, with 4 workers) and outer optimizer settings: lr 0.7 and momentum 0.5, the DiLoCo
    benchmark's (there the papers' 0.9 left DiLoCo further from DDP with few outer steps; here, in a
    small trial of ``--quick``'s model with H=5, 0.9 left synchronous DiLoCo 10% above DDP and 0.5 level
    with it, while plain Nesterov still ended 3% above synchronous DiLoCo and Delayed Nesterov 0.9%).

    The slow worker. A callback on the last rank sleeps, after each step, ``--slowdown - 1`` times the CPU
    seconds its main thread spent in that step (its compute; time blocked on the network costs no CPU), so
    its computing takes twice as long whatever the link; the strategies know nothing of it.

    Budget. The synchronous methods run ``--steps`` (200; ``--steps-4``, 80, with 4 workers) steps on
    every worker, paced by the slow one; with dynamic H the slow worker's idle steps are among them, so it
    trains fewer (the tables' "steps per rank" and samples count the steps that trained). The asynchronous
    ones share the same total number of samples (workers x steps x batch) in proportion to the workers'
    speeds (1 and 1/slowdown), as a global sample counter would, so their workers end at about the same
    time: with 2 workers the fast one runs 4/3 and the slow one 2/3 of ``--steps``. Each worker's
    learning-rate schedule spans its own steps. Four workers on this 2-core machine are oversubscribed (two
    processes a core: a step computes about half as fast, its CPU seconds are about half its wall-clock, and
    the slow worker's sleep lends its core to the others), so the slow worker gets less than 2x there; the
    tables' "slow/fast s per step" (seconds per trained step) says how much.

    Loss. The loss of every curve is the validation loss (``--val-batches`` batches, the same for every
    method) of the model the workers agree on: during training, the strategy's ``agreed_parameters()``
    (DiLoCo's global parameters; asynchronous DiLoCo's, owned by rank 0) or, for DDP, the model, copied on
    rank 0 at ``--snapshots`` evenly spaced steps of rank 0 (a CPU copy, validated after ``fit``, so the
    timed run does not pay for it; asynchronous DiLoCo's server thread may be applying an arrival
    meanwhile, so a copy can hold some tensors from before that one update and some from after); at the end, the model every rank holds after ``fit`` (the strategies
    apply what is in flight and hand every worker the final global parameters). Each point is placed at
    the time of its copy, and at the samples every worker had finished by then (each rank's step ends,
    one clock for all processes of this machine), the mean steps per worker (samples over workers and batch),
    and the bytes sent and received by then per worker (the strategies' ``comm/bytes_sent`` and
    ``comm/bytes_received`` counts summed over the workers, over their number; DDP's fp32 gradients twice
    a step). Both directions count because asynchronous DiLoCo's rank 0 serves its own worker locally:
    a remote worker sends a pseudo-gradient and receives the global parameters each round, as a DiLoCo
    worker hands its all-reduce a pseudo-gradient and receives the average. The final point is at the
    moment the last rank's ``fit`` returned (its last sync included).

    Targets (the issue's), per number of workers and link, of ``async Delayed Nesterov`` against the
    synchronous DiLoCo: it reaches DiLoCo's final validation loss at least 1.5x sooner in wall-clock
    (DiLoCo's training seconds, at whose end its final model was there, over the time of the first point
    of the method's curve at or below that loss), and its final loss, at the same total samples, is
    within 3% of DiLoCo's. The slowdown the slow worker got (its seconds per step over the fast ones') is
    reported beside them. Throughput alone bounds the speed-up: workers that never wait process
    ``(n - 1 + 1/2) / (n / 2)`` times the samples a second of workers paced by the slow one, 1.5x with 2
    workers (the target itself) and 1.75x with 4: with 2 workers the target needs the asynchronous
    method to be at least as good per sample, or DiLoCo's blocking syncs to cost it time (shaped link).

    Links. Each launch first trains every method for a few steps with H=2, so that every
    ``torch.compile`` kernel is compiled before anything is timed. The ranks run inside a private network
    namespace. Every method first trains on the plain loopback, then rank 0 shapes the loopback to
    ``--rate-mbit`` (100) Mbit/s with ``tc qdisc ... tbf`` and every method trains again over it (both
    directions and all ranks share the one shaped loopback; see ``benchmarks/diloco.py``). A DDP step
    over the shaped link takes 1-4 s, so on it DDP stops once it has trained as long as the synchronous
    DiLoCo took there (``--ddp-shaped-factor`` times that; its curve shows where it was then, with its
    schedule sized for the whole budget). One intra-op thread a rank (``--threads``); the load average is
    recorded.

How to run (from the repository root; the shaped link needs root for ``ip netns``)
    sudo .venv/bin/python benchmarks/async_diloco.py           # sized for about 15 minutes on 2 cores
    sudo .venv/bin/python benchmarks/async_diloco.py --quick   # 2 workers, plain loopback, small model: ~2 min
    python benchmarks/async_diloco.py --no-shaping             # plain loopback only, no root needed

Without root, ``ip`` or ``tc`` the shaped link is skipped with a message saying why. Writes
``benchmarks/results/async_diloco.json`` and ``async_diloco.png`` (``async_diloco_quick.*`` with ``--quick``)
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import dataclasses
import itertools
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _char_lm  # noqa: E402
import _dist  # noqa: E402
from _char_lm import StepRecord, bytes_so_far, links, megabytes, validation_loss  # noqa: E402
from _common import machine, markdown_table, result_paths  # noqa: E402
from lightning_converge.kernels.dispatch import BACKEND_ENV  # noqa: E402
from lightning_converge.strategies import DiLoCoStrategy  # noqa: E402

# The targets: async DiLoCo (Delayed Nesterov) against synchronous DiLoCo, one worker slowed.
MIN_SPEEDUP = 1.5
MAX_LOSS_GAP = 0.03
TARGET_METHOD = "async Delayed Nesterov"
ASYNC_METRICS = ("async_diloco/rounds", "async_diloco/staleness", "async_diloco/inner_steps")
# Each worker's inner steps of its current round: asynchronous DiLoCo's, synchronous DiLoCo's with dynamic H.
INNER_STEPS_METRICS = ("async_diloco/inner_steps", "diloco/inner_steps")


# How a strategy option shows in a method's name (" + dynamic H"); an option not listed shows as its name.
OPTION_LABELS = {"dynamic_inner_steps": "dynamic H", "staleness_penalty": "staleness penalty", "overlap": "overlap"}


@dataclasses.dataclass(frozen=True)
class Method:
    """``kind`` "ddp", "diloco" (synchronous) or "async"; ``outer_optimizer`` the asynchronous strategy's;
    ``options`` more keyword arguments of the strategy, as (name, value) pairs, each named in the method's
    name (:data:`OPTION_LABELS`)."""

    kind: str
    outer_optimizer: str = "delayed_nesterov"
    options: tuple[tuple[str, object], ...] = ()

    @property
    def is_async(self) -> bool:
        return self.kind == "async"

    def name(self, inner_steps: int) -> str:
        if self.kind == "ddp":
            return "ddp"
        if self.is_async:
            base = "async " + {"nesterov": "Nesterov", "delayed_nesterov": "Delayed Nesterov"}[self.outer_optimizer]
        else:
            base = f"diloco H={inner_steps}"
        return base + "".join(f" + {OPTION_LABELS.get(option, option)}" for option, _ in self.options)

    def strategy(self, inner_steps: int, args: argparse.Namespace):
        outer = dict(outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, **dict(self.options))
        if self.kind == "ddp":
            return "ddp"
        if self.kind == "diloco":
            return DiLoCoStrategy(inner_steps=inner_steps, outer_optimizer="nesterov", **outer)
        from lightning_converge.strategies import AsyncDiLoCoStrategy

        return AsyncDiLoCoStrategy(
            inner_steps=inner_steps, outer_optimizer=self.outer_optimizer,
            delayed_nesterov_period=args.delayed_period, **outer,
        )


def methods(args: argparse.Namespace) -> list[Method]:
    """Synchronous DiLoCo first (the targets' reference; its time on the shaped link bounds DDP's there).
    A row is one line here, e.g. ``Method("async", options=(("overlap", True),))``; the plot gives each row
    the next colour, so a new row goes last to leave the others' colours as they were."""
    return [
        Method("diloco"),
        Method("ddp"),
        Method("async", outer_optimizer="nesterov"),
        Method("async"),
        Method("async", options=(("dynamic_inner_steps", True),)),
        Method("async", options=(("staleness_penalty", args.staleness_penalty),)),
        Method("diloco", options=(("dynamic_inner_steps", True),)),
        Method("async", options=(("overlap", True),)),
    ]


def budget(world_size: int, args: argparse.Namespace) -> int:
    return args.steps if world_size == 2 else args.steps_4


def inner_steps_of(world_size: int, args: argparse.Namespace) -> int:
    return args.h if world_size == 2 else args.h_4


def worker_speeds(world_size: int, slowdown: float) -> list[float]:
    """Steps per unit of time of each rank, the fast ones' 1: the last rank is the slow worker."""
    return [1.0] * (world_size - 1) + [1.0 / slowdown]


def steps_of_rank(method: Method, rank: int, world_size: int, steps: int, slowdown: float) -> int:
    """Synchronous methods: ``steps`` on every worker. Asynchronous ones: the same total (``world_size *
    steps``) shared in proportion to the workers' speeds, so that they all end at about the same time."""
    if not method.is_async:
        return steps
    speeds = worker_speeds(world_size, slowdown)
    return max(1, round(world_size * steps * speeds[rank] / sum(speeds)))


# ---------------------------------------------------------------- one rank (inside the launched processes)


class SlowWorker(L.Callback):
    """Makes this worker ``slowdown`` times slower: after every training step it sleeps ``slowdown - 1``
    times the CPU seconds its main thread spent on that step (from ``on_train_batch_start`` to
    ``on_train_batch_end``: forward, backward, optimizer and strategy step; waiting on the network costs no CPU).
    """

    def __init__(self, slowdown: float) -> None:
        self.slowdown = slowdown
        self.slept_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.cpu_start = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pause = (self.slowdown - 1.0) * (time.thread_time() - self.cpu_start)
        time.sleep(pause)
        self.slept_seconds += pause


def agreed_parameters(trainer: L.Trainer) -> list[torch.Tensor]:
    """The parameters the workers agree on: the strategy's ``agreed_parameters()`` where it has them
    (the DiLoCo family's global parameters), else (DDP, or once training has ended) the model's."""
    agreed = getattr(trainer.strategy, "agreed_parameters", None)
    params = agreed() if agreed is not None else None
    return list(trainer.lightning_module.parameters()) if params is None else list(params)


class AgreedSnapshots(L.Callback):
    """CPU copies of the agreed parameters after every ``every_n_steps``-th step of this rank, with the
    ``time.perf_counter()`` reading of each (validated after ``fit``, outside the timed run)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self.clock: list[float] = []
        self.parameters: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.parameters.append([p.detach().to("cpu", torch.float32, copy=True) for p in agreed_parameters(trainer)])
            self.clock.append(time.perf_counter())


class TrainedSteps(L.Callback):
    """Per step on this rank, whether it trained (False for synchronous DiLoCo's idle steps with dynamic H,
    whose ``outputs`` say ``idle``)."""

    def __init__(self) -> None:
        self.trained: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained.append(not (isinstance(outputs, dict) and outputs.get("idle", False)))


class LoggedValues(L.Callback):
    """Per step on this rank, the value of each of ``names`` the strategy has logged (None before it has)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.values: dict[str, list[Optional[float]]] = {name: [] for name in names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, values in self.values.items():
            value = trainer.callback_metrics.get(name)
            values.append(None if value is None else float(value))


class StopAfterSeconds(L.Callback):
    """Stop after the first step that ends ``seconds`` or more after training started on any rank: every
    step the ranks all-reduce (max) whether their time is up (4 bytes, not counted), so they stop alike.
    For synchronous strategies only (an asynchronous worker must not join a collective mid-training)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time_up = torch.tensor(float(time.perf_counter() - self.start >= self.seconds))
        if trainer.strategy.reduce(time_up, reduce_op="max") > 0:
            trainer.should_stop = True


def validate_snapshots(snapshots: AgreedSnapshots, model: torch.nn.Module, data, batches: int) -> list[float]:
    """The validation loss of each snapshot, in a copy of ``model`` (the model itself is left as it is)."""
    probe = copy.deepcopy(model).cpu()
    losses = []
    for parameters in snapshots.parameters:
        with torch.no_grad():
            for target, value in zip(probe.parameters(), parameters):
                target.copy_(value)
        losses.append(validation_loss(probe, data, batches))
    return losses


def train_methods_on_this_rank(args: argparse.Namespace) -> None:
    """Warm every method up; train each on the plain loopback, then each on the shaped one (one process
    group for all), writing one record per method, link and rank to ``--worker-out``."""
    torch.set_num_threads(args.threads)
    # Read before the first fit: Lightning's teardown removes the launcher's WORLD_SIZE.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    steps, inner_steps = budget(world_size, args), inner_steps_of(world_size, args)
    to_run = methods(args)
    for method in to_run:  # every kernel compiled before anything is timed
        _char_lm.fit(method.strategy(2, args), world_size, 4, args, callbacks=[])
    seconds_of_diloco: dict[str, float] = {}

    def train_one(index: int, method: Method, link: str) -> dict:
        record = StepRecord(count_loopback=link == "shaped" and rank == 0)
        logged = LoggedValues(("comm/wait_seconds", *ASYNC_METRICS, "diloco/inner_steps"))
        trained = TrainedSteps()
        callbacks: list[L.Callback] = [record, logged, trained]
        slow = SlowWorker(args.slowdown) if rank == world_size - 1 else None
        snapshots = AgreedSnapshots(max(1, steps // args.snapshots)) if rank == 0 else None
        callbacks += [callback for callback in (slow, snapshots) if callback is not None]
        if link == "shaped" and method.kind == "ddp":
            callbacks.append(StopAfterSeconds(args.ddp_shaped_factor * seconds_of_diloco["shaped"]))
        max_steps = steps_of_rank(method, rank, world_size, steps, args.slowdown)
        model, data, trainer = _char_lm.fit(method.strategy(inner_steps, args), world_size, max_steps,
                                            args, callbacks=callbacks)
        fit_seconds = time.perf_counter() - record.start  # the last sync included
        if method == Method("diloco"):
            seconds_of_diloco[link] = fit_seconds
        if record.count_loopback:
            record.loopback_bytes.append(_dist.loopback_bytes(None))
        result = dict(
            parameters=sum(p.numel() for p in model.parameters()),
            steps=len(record.loss),
            trained=trained.trained,
            loss=record.loss,
            bytes_sent=record.bytes_sent,
            bytes_received=record.bytes_received,
            bytes_total=bytes_so_far(trainer, "sent") + bytes_so_far(trainer, "received"),
            start=record.start,
            step_end_seconds=record.step_end_seconds,
            fit_seconds=fit_seconds,
            slept_seconds=None if slow is None else slow.slept_seconds,
            logged=logged.values,
            loopback_bytes=record.loopback_bytes,
            parameter_checksum=sum(p.double().sum().item() for p in model.parameters()),
        )
        if snapshots is not None:
            result.update(
                snapshot_seconds=[clock - record.start for clock in snapshots.clock],
                snapshot_val_loss=validate_snapshots(snapshots, model, data, args.val_batches),
                final_val_loss=validation_loss(model, data, args.val_batches),
            )
        return result

    _char_lm.train_on_links(to_run, args.worker_shaped, args.rate_mbit, rank, args.worker_out, train_one)


# ---------------------------------------------------------------- the launcher's side


def merge_ranks(ranks: list[dict], batch_size: int) -> dict:
    """One method's run from its ranks' records: the validation-loss curve of the agreed model against
    seconds (from rank 0's start of training), samples finished by every worker, mean steps per worker and
    bytes sent per worker (mean over the workers), ending with the final model when the last rank was done.
    Steps and samples count the steps that trained (not synchronous DiLoCo's idle steps with dynamic H)."""
    world_size = len(ranks)
    # Every rank's step ends on rank 0's clock (perf_counter is one clock for every process of the machine).
    ends = [[rank["start"] - ranks[0]["start"] + end for end in rank["step_end_seconds"]] for rank in ranks]
    trained_by = [list(itertools.accumulate(rank["trained"])) for rank in ranks]  # after each step
    trained_per_rank = [sum(rank["trained"]) for rank in ranks]

    def finished_by(seconds: float) -> tuple[int, float]:
        """Steps every worker had trained by ``seconds``, and the bytes they had sent and received by then."""
        counts = [bisect.bisect_right(rank_ends, seconds) for rank_ends in ends]
        moved = sum(rank["bytes_sent"][count - 1] + rank["bytes_received"][count - 1]
                    for rank, count in zip(ranks, counts) if count)
        return sum(trained[count - 1] for trained, count in zip(trained_by, counts) if count), moved

    end_of_training = max(rank["start"] - ranks[0]["start"] + rank["fit_seconds"] for rank in ranks)
    curve = []
    points = [*zip(ranks[0]["snapshot_seconds"], ranks[0]["snapshot_val_loss"])]
    for seconds, val_loss in points:
        steps, sent = finished_by(seconds)
        curve.append(dict(seconds=seconds, val_loss=val_loss, samples=steps * batch_size,
                          steps_per_worker=steps / world_size, bytes_per_worker=sent / world_size))
    total_steps = sum(trained_per_rank)
    curve.append(dict(seconds=end_of_training, val_loss=ranks[0]["final_val_loss"], samples=total_steps * batch_size,
                      steps_per_worker=total_steps / world_size,
                      bytes_per_worker=sum(rank["bytes_total"] for rank in ranks) / world_size))
    rank0 = ranks[0]
    return dict(
        parameters=rank0["parameters"],
        curve=curve,
        final_val_loss=rank0["final_val_loss"],
        training_seconds=end_of_training,
        samples=total_steps * batch_size,
        steps_per_rank=trained_per_rank,
        seconds_per_step_per_rank=[rank["step_end_seconds"][-1] / trained
                                   for rank, trained in zip(ranks, trained_per_rank)],
        fit_seconds_per_rank=[rank["fit_seconds"] for rank in ranks],
        bytes_per_worker=sum(rank["bytes_total"] for rank in ranks) / world_size,
        slow_worker_slept_seconds=ranks[-1]["slept_seconds"],
        logged_per_rank=[rank["logged"] for rank in ranks],
        loopback_bytes=(rank0["loopback_bytes"][1] - rank0["loopback_bytes"][0]
                        if len(rank0["loopback_bytes"]) == 2 else None),
        ranks_agree=all(rank["parameter_checksum"] == rank0["parameter_checksum"] for rank in ranks),
        train_loss_per_rank=[rank["loss"] for rank in ranks],
    )


def train(args: argparse.Namespace, world_size: int, netns: Optional[str], work_dir: Path) -> dict[str, dict]:
    """Launch the ranks (inside ``netns`` when given) and train every method on every link; return
    link -> method name -> the merged run."""
    out = work_dir / f"{world_size}_workers"
    if netns:
        _dist.set_loopback_rate(None, netns)  # warm-ups on the plain loopback; the ranks shape it when due
    worker_args = [__file__, *sys.argv[1:], "--worker-out", str(out)] + (["--worker-shaped"] if netns else [])
    _dist.launch(worker_args, world_size=world_size, netns=netns, threads_per_rank=args.threads,
                 log_dir=out, timeout=2 * 3600)
    inner_steps = inner_steps_of(world_size, args)
    return {
        link: {
            method.name(inner_steps): merge_ranks(
                _char_lm.read_rank_records(out, index, link, world_size), args.batch_size
            )
            for index, method in enumerate(methods(args))
        }
        for link in links(netns is not None)
    }


def last_logged(run: dict, name: str) -> list[Optional[float]]:
    """Per rank, the last value of a logged metric (None where it was never logged)."""
    return [next((v for v in reversed(values[name]) if v is not None), None) if name in values else None
            for values in run["logged_per_rank"]]


def mean_staleness(run: dict) -> Optional[float]:
    """The mean of ``async_diloco/staleness`` over the steps at which a worker's rounds grew (an update of
    its applied), over all workers; None for the synchronous methods."""
    stalenesses = []
    for values in run["logged_per_rank"]:
        rounds, staleness = values.get("async_diloco/rounds", []), values.get("async_diloco/staleness", [])
        previous = 0.0
        for count, stale in zip(rounds, staleness):
            if count is not None and count > previous and stale is not None:
                stalenesses.append(stale)
                previous = count
    return sum(stalenesses) / len(stalenesses) if stalenesses else None


def seconds_to(run: dict, level: float) -> Optional[float]:
    """The time of the first point of the run's curve at or below ``level`` (None if none is)."""
    return next((point["seconds"] for point in run["curve"] if point["val_loss"] <= level), None)


def slow_over_fast(seconds_per_step: list[float]) -> float:
    """The slow (last) worker's seconds per step over the fast ones' mean: the slowdown it got (about 1
    when a synchronous strategy paces every worker by the slowest)."""
    fast = seconds_per_step[:-1]
    return seconds_per_step[-1] / (sum(fast) / len(fast))


def summarize(runs: dict[str, dict], sync_name: str) -> dict[str, dict]:
    """Per method, against the synchronous DiLoCo of the same link and workers: final loss and its gap,
    samples, bytes, training seconds, seconds to DiLoCo's final loss and the speed-up to it (DiLoCo's
    training seconds, when its final model was there, over the method's seconds to that loss)."""
    sync = runs[sync_name]
    target = sync["final_val_loss"]
    sync_seconds = sync["training_seconds"]  # when its final model was there
    summary = {}
    for name, run in runs.items():
        reached = seconds_to(run, target)
        summary[name] = dict(
            final_val_loss=run["final_val_loss"],
            val_loss_gap_vs_sync=run["final_val_loss"] / target - 1,
            samples=run["samples"],
            samples_vs_sync=run["samples"] / sync["samples"],
            steps_per_rank=run["steps_per_rank"],
            bytes_per_worker=run["bytes_per_worker"],
            loopback_bytes=run["loopback_bytes"],
            training_seconds=run["training_seconds"],
            target_val_loss=target,
            seconds_to_target=reached,
            speedup_to_target_vs_sync=None if reached is None else sync_seconds / reached,
            rounds_per_rank=last_logged(run, "async_diloco/rounds"),
            inner_steps_per_rank=[next((h for h in values if h is not None), None) for values in
                                  zip(*(last_logged(run, name) for name in INNER_STEPS_METRICS))],
            mean_staleness=mean_staleness(run),
            slow_over_fast_seconds_per_step=slow_over_fast(run["seconds_per_step_per_rank"]),
            ranks_agree=run["ranks_agree"],
        )
    return summary


def throughput_ceiling(world_size: int, slowdown: float) -> float:
    """The speed-up over a synchronous method that throughput alone allows: samples a second of workers that
    never wait over those of workers paced by the slowest (1.5 for 2 workers, one 2x slower; 1.75 for 4)."""
    speeds = worker_speeds(world_size, slowdown)
    return sum(speeds) / (world_size * min(speeds))


def judge_targets(summaries: dict[tuple[int, str], dict], sync_names: dict[int, str], slowdown: float) -> list[dict]:
    """Pass / fail of each of the issue's targets for every number of workers and link measured."""
    verdicts = []
    for (world_size, link), summary in summaries.items():
        row, where = summary[TARGET_METHOD], f"{world_size} workers, {link}"
        speedup = row["speedup_to_target_vs_sync"]
        ceiling = f" (throughput allows {throughput_ceiling(world_size, slowdown):.2f}x)"
        verdicts += [
            dict(target=f"{TARGET_METHOD}: >= {MIN_SPEEDUP:g}x sooner than {sync_names[world_size]} to its final "
                        f"val loss ({where})",
                 measured=("never reached it" if speedup is None else f"{speedup:.2f}x") + ceiling,
                 passed=speedup is not None and speedup >= MIN_SPEEDUP),
            dict(target=f"{TARGET_METHOD}: final val loss within {MAX_LOSS_GAP:.0%} of {sync_names[world_size]}'s "
                        f"at {row['samples_vs_sync']:.2f}x its samples ({where})",
                 measured=f"{row['val_loss_gap_vs_sync']:+.2%}", passed=row["val_loss_gap_vs_sync"] <= MAX_LOSS_GAP),
        ]
    return verdicts


def results_table(summary: dict[str, dict], shaped: bool) -> str:
    header = ["method", "final val loss", "vs sync DiLoCo", "samples", "steps per rank", "MB sent+received/worker"]
    header += ["through the loopback (tc)"] if shaped else []
    header += ["training s", "s to sync's final loss", "speed-up to it", "rounds per rank", "last H per rank",
               "mean staleness", "slow/fast s per step"]
    rows = []
    for name, row in summary.items():
        reached = row["seconds_to_target"] is not None
        cells = [
            name,
            f"{row['final_val_loss']:.4f}",
            f"{row['val_loss_gap_vs_sync']:+.2%}",
            f"{row['samples']}",
            "/".join(str(steps) for steps in row["steps_per_rank"]),
            megabytes(row["bytes_per_worker"]),
        ]
        cells += [megabytes(row["loopback_bytes"])] if shaped else []
        cells += [
            f"{row['training_seconds']:.1f}",
            f"{row['seconds_to_target']:.1f}" if reached else "not reached",
            f"{row['speedup_to_target_vs_sync']:.2f}x" if reached else "-",
            per_rank(row["rounds_per_rank"]),
            per_rank(row["inner_steps_per_rank"]),
            "-" if row["mean_staleness"] is None else f"{row['mean_staleness']:.2f}",
            f"{row['slow_over_fast_seconds_per_step']:.2f}",
        ]
        rows.append(cells)
    return markdown_table(header, rows)


def per_rank(values: list[Optional[float]]) -> str:
    """``"13/7"``: one whole number per rank; ``-`` where none was logged."""
    return "/".join("-" if v is None else f"{v:.0f}" for v in values) if any(v is not None for v in values) else "-"


def targets_table(verdicts: list[dict]) -> str:
    verdict_word = {True: "pass", False: "FAIL"}
    rows = [[v["target"], v["measured"], verdict_word[v["passed"]]] for v in verdicts]
    return markdown_table(["target", "measured", "verdict"], rows, align_right_from=1)


AXES = (
    ("steps_per_worker", "optimizer steps per worker (mean)", "linear"),
    ("samples", "samples, all workers", "linear"),
    ("bytes_per_worker", "MB sent + received per worker (mean, cumulative, log)", "log"),
    ("seconds", "training seconds", "linear"),
)


def plot(runs: dict[int, dict[str, dict]], sync_names: dict[int, str], path: Path) -> None:
    """Validation loss of the agreed model against each of :data:`AXES`; a row per link, a colour per
    method, solid lines for 2 workers and dashed for 4; dotted: each synchronous DiLoCo's final loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    link_names = [link for link in ("loopback", "shaped") if any(link in by_link for by_link in runs.values())]
    fig, axes = plt.subplots(len(link_names), len(AXES), figsize=(22, 5 * len(link_names)), squeeze=False,
                             constrained_layout=True)
    colors: dict[str, str] = {}
    for row, link in zip(axes, link_names):
        for world_size, linestyle in zip(sorted(runs), ("-", "--")):
            for name, run in runs[world_size][link].items():
                color = colors.setdefault(re.sub(r" H=\d+", "", name), f"C{len(colors)}")
                for ax, (key, _, _) in zip(row, AXES):
                    x = [point[key] / (1e6 if key == "bytes_per_worker" else 1) for point in run["curve"]]
                    ax.plot(x, [point["val_loss"] for point in run["curve"]], color=color, linestyle=linestyle,
                            marker=".", linewidth=1.2, label=f"{name}, {world_size} workers")
            sync_loss = runs[world_size][link][sync_names[world_size]]["final_val_loss"]
            for ax in row:
                ax.axhline(sync_loss, color="grey", linestyle=":", linewidth=1)
        for ax, (_, label, scale) in zip(row, AXES):
            ax.set_xscale(scale)
            ax.set_xlabel(label)
            ax.set_ylabel(f"validation loss, agreed model, {link} (nats/char)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle("Character GPT, one worker 2x slower: DDP, synchronous DiLoCo and asynchronous DiLoCo "
                 "(solid: 2 workers, dashed: 4; dotted: synchronous DiLoCo's final loss)")
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("--steps", type=int, default=200, help="steps of every worker of the 2-worker synchronous runs")
    parser.add_argument("--steps-4", type=int, default=80, help="the same with 4 workers")
    parser.add_argument("--h", type=int, default=20, help="inner steps of every DiLoCo method, 2 workers")
    parser.add_argument("--h-4", type=int, default=8, help="the same with 4 workers")
    parser.add_argument("--slowdown", type=float, default=2.0, help="how many times slower the last worker is")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="every DiLoCo method's outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.5, help="every DiLoCo method's outer momentum")
    parser.add_argument("--delayed-period", type=int, default=None,
                        help="Delayed Nesterov's arrivals between momentum updates (default: the number of workers)")
    parser.add_argument("--staleness-penalty", type=float, default=0.5,
                        help="staleness_penalty of the penalized variant (see AsyncDiLoCoStrategy)")
    parser.add_argument("--snapshots", type=int, default=10, help="copies of the agreed model validated per run")
    parser.add_argument("--ddp-shaped-factor", type=float, default=1.0,
                        help="on the shaped link DDP stops after this x synchronous DiLoCo's training seconds there")
    _char_lm.add_model_arguments(parser)
    parser.set_defaults(val_batches=32)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="the shaped link's rate")
    parser.add_argument("--probe-mb", type=float, default=8.0, help="all-reduce size that checks the link")
    parser.add_argument("--no-shaping", action="store_true", help="skip the shaped link")
    parser.add_argument("--quick", action="store_true",
                        help="2 workers, plain loopback, a smaller model (width 64, 2 blocks), 40 steps, H=5")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # set on the launched ranks
    parser.add_argument("--worker-shaped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.workers, args.steps, args.h, args.no_shaping = [2], 40, 5, True
        args.dim, args.depth, args.val_batches, args.snapshots = 64, 2, 4, 5
    if args.slowdown < 1:
        parser.error(f"--slowdown must be >= 1, got {args.slowdown}")
    args.workers = sorted(set(args.workers))
    return args


def main() -> None:
    args = parse_args()
    # Steady-state timings: compiled passes from the first step; worker processes inherit the setting.
    os.environ.setdefault(BACKEND_ENV, "compiled")
    if args.worker_out is not None:
        train_methods_on_this_rank(args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="async_diloco_bench") as tmp:

        def train_on(netns: Optional[str]) -> dict[int, dict[str, dict]]:
            runs = {}
            for world_size in args.workers:
                print(f"{world_size} workers, {'plain then shaped' if netns else 'plain'} loopback ...", flush=True)
                runs[world_size] = train(args, world_size, netns, Path(tmp))
            return runs

        runs, link, unavailable = _dist.on_shaped_link(args.rate_mbit, args.probe_mb, args.no_shaping, train_on)

    shaped = unavailable is None
    sync_names = {ws: Method("diloco").name(inner_steps_of(ws, args)) for ws in args.workers}
    summaries = {(ws, link_name): summarize(runs[ws][link_name], sync_names[ws])
                 for ws in args.workers for link_name in links(shaped)}
    verdicts = judge_targets(summaries, sync_names, args.slowdown)
    link_label = {"loopback": "plain loopback", "shaped": f"{args.rate_mbit:g} Mbit/s"}
    tables = {f"{ws} workers, {link_label[link_name]}": results_table(summary, link_name == "shaped")
              for (ws, link_name), summary in summaries.items()}
    tables["targets"] = targets_table(verdicts)
    json_path, png_path = result_paths("async_diloco", args.quick)
    first = runs[args.workers[0]]["loopback"][sync_names[args.workers[0]]]
    record = dict(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        parameters=first["parameters"],
        machine=dict(machine(), load_average_before=load_before, load_average_after=os.getloadavg()),
        shaped_link=link,
        shaped_link_skipped=unavailable,
        total_seconds=time.perf_counter() - started,
        runs=runs,
        summaries={f"{ws} workers, {link_name}": summary for (ws, link_name), summary in summaries.items()},
        targets=verdicts,
        tables=tables,
    )
    json_path.write_text(json.dumps(record, indent=1))
    plot(runs, sync_names, png_path)

    print(f"\n{record['parameters']:,} parameters; {args.threads} thread(s) a rank; load average "
          f"{load_before[0]:.1f} before, {record['machine']['load_average_after'][0]:.1f} after; "
          f"{record['total_seconds'] / 60:.1f} min in all")
    for (ws, link_name), summary in summaries.items():
        agree = all(row["ranks_agree"] for row in summary.values())
        print(f"{ws} workers, {link_name}: the ranks end with identical parameters in every method: {agree}")
    for title, table in tables.items():
        print(f"\n{title}\n\n{table}")
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
