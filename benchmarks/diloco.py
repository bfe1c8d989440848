"""DiLoCo, its variants and DDP, 2 and 4 workers: loss against steps, bytes sent and seconds over a slow link.

What it measures
    The character-level GPT of the compression benchmark (``examples.char_lm.CharGPT``,
    width 192, 4 blocks, 1.9 M parameters: 7.6 MB of fp32 a step for DDP) on CPython's
    standard-library top-level modules (``examples.char_lm.StdlibText``, ``*.py``,
    windows of 64 bytes, 8 a worker and step; the last 5% of the stream validates),
    trained once per method with the same seed (batches), the same step budget and the
    same inner optimizer, ``lightning_converge.optim.AdamW`` (lr 2e-3, betas 0.9/0.95,
    weight decay 0.1, linear warm-up over 10% of the steps, cosine decay to 10%), from
    the same random initialization. ``--pretrain-steps N`` starts every method instead
    from N steps of one process on both workers' batch (the DiLoCo paper starts from a
    pretrained model; here 300 such steps left DiLoCo H=50 further from DDP, +4.2%):

    * ``ddp``: ``strategy="ddp"``, the fp32 gradient all-reduce every step;
    * ``diloco H=10 / 50 / 100``: ``DiLoCoStrategy(inner_steps=H)`` with the paper's outer
      optimizer, Nesterov SGD with lr 0.7, and outer momentum 0.5 (``--outer-momentum``;
      the paper's 0.9 ended 3.5% above DDP at H=50: with the four outer steps of this
      budget, momentum 0.9 amplifies the later, stale directions);
    * ``diloco H=50 int8``: the same, pseudo-gradients sent as blockwise int8 with error
      feedback (``compressor="int8"``);
    * ``diloco H=50 delay=1``: each all-reduce overlapped with the next inner phase, its
      result applied one outer step late;
    * ``streaming H=50 F=4 strided``: ``StreamingDiLoCoStrategy`` with its defaults (4
      fragments of whole blocks, strided, the embeddings and head added to the lightest
      fragments; ``overlap_steps=1``, ``mixing_alpha=0.5``);
    * ``streaming H=50 F=4 balanced``: the same with ``fragment_assignment="balanced"``:
      4 equal runs of the parameters laid end to end, tensors cut where a run ends.

    Two workers run every method for ``--steps`` (200) steps. Four workers on this 2-core
    machine are oversubscribed (two processes a core, so every step computes about half
    as fast), and a DDP step over the shaped link takes about 4 s with four ranks, so
    that part is small: ``ddp`` and ``diloco H=10`` (``--h-4``) for ``--steps-4`` (30)
    steps, three outer steps (with H=50 there would be none before training ends).
    ``--quick`` runs two workers only, a smaller model (width 64, 2 blocks) for 40 steps
    with H in (4, 10, 20).

    Loss. The final loss, on which the targets are judged, is the validation loss of the
    model the workers end with (``--val-batches`` batches, the same for every method),
    taken after ``fit`` returns: DiLoCo applies what is in flight and syncs whatever
    moved when training ends, so every worker then holds the same global parameters
    (checked: the script reports whether the ranks' parameters agree). The curves are
    the training loss of the workers' own models, averaged over the ranks and smoothed
    by a trailing mean over 10% of the steps; "seconds to DDP's final loss" is the time
    of the first step whose smoothed loss is at or below DDP's smoothed loss at its last
    step (DDP itself gets there at or near its last step), on the timed link.

    Bytes. ``comm/bytes_sent`` as the strategies count it: the payload a worker hands to
    the collectives (pseudo-gradients, compressed or not), including the syncs DiLoCo
    runs when training ends; for DDP, which counts nothing, its fp32 gradients once a
    step, the size of the buffers its all-reduce takes. Peak bytes per sync is the
    largest exchange during training (for Streaming DiLoCo one fragment's; the syncs
    when training ends, several fragments' at once, are left out of the peak). On the
    shaped link the kernel's own count of the bytes through the loopback (``tc -s
    qdisc``: every rank, both directions, headers and Lightning's own collectives) is
    reported beside it.

    Time. Each launch first trains every method for a few steps with a short H, so that
    every ``torch.compile`` kernel (the inner AdamW, the outer step, the int8 quantizer,
    each fragment's mixing) is compiled before anything is timed. Seconds per step are a
    method's training seconds (the slowest rank's wall-clock at the end of its last
    step) over its steps, so DiLoCo's sync steps count; the blocking sync when training
    ends is outside. The ranks run inside a private network namespace. Every method first
    trains its budget on the plain loopback: the run the losses, bytes and the curves
    against steps and bytes come from. Then rank 0 shapes the loopback to
    ``--rate-mbit`` (100) Mbit/s with ``tc qdisc ... tbf`` and every method trains again
    over it: DDP its budget, the DiLoCo methods until their smoothed training loss
    reaches DDP's final one, for at most ``--max-step-factor`` (1.5) times the budget
    (their learning-rate schedule then spans that longer run): the time to DDP's final
    loss is measured, not extrapolated. Both directions and all ranks
    share the one shaped loopback: two ranks all-reducing n bytes put 2n bytes through
    it, four ranks 6n (on a real network each machine would have a link of its own). A
    gloo all-reduce between two ranks is timed there first to check the rate. One
    intra-op thread a rank (``--threads``); other jobs may share this CPU (the load
    average is recorded), which slows the computing part of every step, not the link.

How to run (from the repository root; the shaped link needs root for ``ip netns``)
    sudo .venv/bin/python benchmarks/diloco.py           # about 13 minutes here
    sudo .venv/bin/python benchmarks/diloco.py --quick   # smoke run, 1-2 minutes
    python benchmarks/diloco.py --no-shaping             # plain loopback only, no root needed

Without root, ``ip`` or ``tc`` the shaped link is skipped with a message saying why:
every method then trains its whole budget on the plain loopback, and the target on
the shaped link is not judged. Each number of workers is one launch
(``benchmarks/_dist.py``) whose ranks run the methods one after another. Writes
``benchmarks/results/diloco.json`` and ``diloco.png`` (``diloco_quick.*`` with
``--quick``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _char_lm  # noqa: E402
import _dist  # noqa: E402
from _char_lm import StepRecord, bytes_sent_so_far, links, megabytes, validation_loss  # noqa: E402
from _curves import StopAtLoss, first_step_at_or_below, mean_over_ranks, trailing_mean  # noqa: E402
from _common import machine, markdown_table, result_paths  # noqa: E402
from lightning_converge.strategies import DiLoCoStrategy, StreamingDiLoCoStrategy  # noqa: E402
from lightning_converge.kernels.dispatch import BACKEND_ENV  # noqa: E402

# The targets, two workers, DiLoCo at H = --h against DDP.
MAX_LOSS_GAP = 0.03
MIN_FEWER_BYTES = 50.0
MIN_SPEEDUP_SHAPED = 5.0
PRETRAINED = "pretrained.ckpt"  # in the run's temporary directory


@dataclasses.dataclass(frozen=True)
class Method:
    """DDP (``inner_steps`` None), DiLoCo, or with ``num_fragments`` > 1 Streaming DiLoCo (its defaults otherwise)."""

    inner_steps: Optional[int] = None
    compressor: Optional[str] = None
    delay: int = 0
    num_fragments: int = 1
    fragment_assignment: str = "strided"

    @property
    def name(self) -> str:
        if self.inner_steps is None:
            return "ddp"
        if self.num_fragments > 1:
            return f"streaming H={self.inner_steps} F={self.num_fragments} {self.fragment_assignment}"
        options = [self.compressor] if self.compressor else []
        options += ["delay=1"] if self.delay else []
        return " ".join([f"diloco H={self.inner_steps}", *options])

    def strategy(self, args: argparse.Namespace):
        if self.inner_steps is None:
            return "ddp"
        outer = dict(outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, compressor=self.compressor)
        if self.num_fragments > 1:
            return StreamingDiLoCoStrategy(
                inner_steps=self.inner_steps, num_fragments=self.num_fragments,
                fragment_assignment=self.fragment_assignment, **outer,
            )
        return DiLoCoStrategy(inner_steps=self.inner_steps, delay=self.delay, **outer)

    def warm_up(self) -> tuple[Method, int]:
        """This method with the shortest H it accepts, and the steps that run each of its kernels."""
        if self.inner_steps is None:
            return self, 2
        shortest = 2 * self.num_fragments  # Streaming's overlap of one step needs a fragment period of two
        return dataclasses.replace(self, inner_steps=shortest), shortest


def methods(world_size: int, args: argparse.Namespace) -> list[Method]:
    """DDP first (the reference), then the DiLoCo family; four workers run DDP and DiLoCo at H = ``--h-4``."""
    if world_size == 4:
        return [Method(), Method(args.h_4)]
    variants = [] if args.no_variants else [
        Method(args.h, compressor="int8"),
        Method(args.h, delay=1),
        Method(args.h, num_fragments=args.num_fragments),
        Method(args.h, num_fragments=args.num_fragments, fragment_assignment="balanced"),
    ]
    return [Method(), *(Method(h) for h in args.inner_steps), *variants]


def budget(world_size: int, args: argparse.Namespace) -> int:
    return args.steps if world_size == 2 else args.steps_4


def window_of(steps: int) -> int:
    """The trailing-mean window of the loss curves: 10% of the budget, at least 5 steps."""
    return max(5, steps // 10)


# ---------------------------------------------------------------- one rank (inside the launched processes)


def pretrain(args: argparse.Namespace, path: Path) -> None:
    """The common start of every method: ``--pretrain-steps`` steps of one process on both workers' batch
    (AdamW, warm-up then cosine decay, as every run), saved as a checkpoint the runs load (weights only:
    each run starts a fresh inner optimizer, as DiLoCo starts from a pretrained model in the paper)."""
    torch.set_num_threads(args.threads)
    # One process, no process group: the launcher's environment stays clean for the ranks it starts.
    _, _, trainer = _char_lm.fit("auto", 1, args.pretrain_steps, args, callbacks=[],
                                 batch_size=2 * args.batch_size)
    trainer.save_checkpoint(path, weights_only=True)


def ddp_final_loss(out: Path, world_size: int, steps: int) -> float:
    """DDP's final training loss on the plain loopback (mean over ranks, smoothed): the timed runs' target."""
    losses = [record["loss"] for record in _char_lm.read_rank_records(out, 0, "loopback", world_size)]
    return trailing_mean(mean_over_ranks(losses), window_of(steps))[-1]


def train_methods_on_this_rank(args: argparse.Namespace) -> None:
    """Warm every method up; train each on the plain loopback, then each on the shaped one (one process
    group for all), writing ``{method index}_{link}_rank{r}.json`` to ``--worker-out``.

    On the plain loopback every method trains the budget and is validated. On the shaped link DDP
    trains the budget again; the DiLoCo methods train until they reach DDP's final loss, for at most
    ``--max-step-factor`` times the budget (their schedules span that longer run); nothing validates.
    All plain-loopback fits come first: after a shaped fit, the next unshaped fit's large transfers ran
    slow on the same gloo connections (see benchmarks/compression.py).
    """
    torch.set_num_threads(args.threads)
    # Read before the first fit: Lightning's teardown removes the launcher's WORLD_SIZE.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    to_run, steps = methods(world_size, args), budget(world_size, args)
    for method in to_run:
        warm_up_method, warm_up_steps = method.warm_up()
        _char_lm.fit(warm_up_method.strategy(args), world_size, warm_up_steps, args, callbacks=[],
                     init_checkpoint=args.worker_init)

    def train_one(index: int, method: Method, link: str) -> dict:
        record = StepRecord(count_loopback=link == "shaped" and rank == 0)
        callbacks, max_steps = [record], steps
        if link == "shaped" and method.inner_steps is not None:  # DDP, index 0, has run on both links
            target = ddp_final_loss(args.worker_out, world_size, steps)
            callbacks.append(StopAtLoss(target, window_of(steps)))
            max_steps = round(args.max_step_factor * steps)
        model, data, trainer = _char_lm.fit(method.strategy(args), world_size, max_steps, args, callbacks=callbacks,
                                            init_checkpoint=args.worker_init)
        if record.count_loopback:
            record.loopback_bytes.append(_dist.loopback_bytes(None))
        return dict(
            parameters=sum(p.numel() for p in model.parameters()),
            loss=record.loss,
            bytes_sent=record.bytes_sent,
            bytes_sent_total=bytes_sent_so_far(trainer),  # with the syncs when training ends
            step_end_seconds=record.step_end_seconds,
            loopback_bytes=record.loopback_bytes,
            parameter_checksum=sum(p.double().sum().item() for p in model.parameters()),
            val_loss=validation_loss(model, data, args.val_batches) if rank == 0 and link == "loopback" else None,
        )

    _char_lm.train_on_links(to_run, args.worker_shaped, args.rate_mbit, rank, args.worker_out, train_one)


# ---------------------------------------------------------------- the launcher's side


def train(args: argparse.Namespace, world_size: int, netns: Optional[str], work_dir: Path) -> dict[str, dict]:
    """Launch the ranks (inside ``netns`` when given), train every method on every link of the plan;
    return link -> method -> the ranks' records merged."""
    out = work_dir / f"{world_size}_workers"
    if netns:
        _dist.set_loopback_rate(None, netns)  # warm-ups on the plain loopback; the ranks shape it when due
    worker_args = [__file__, *sys.argv[1:], "--worker-out", str(out)] + (["--worker-shaped"] if netns else [])
    if args.pretrain_steps:
        worker_args += ["--worker-init", str(work_dir / PRETRAINED)]
    _dist.launch(worker_args, world_size=world_size, netns=netns, threads_per_rank=args.threads,
                 log_dir=out, timeout=3 * 3600)
    runs: dict[str, dict] = {}
    for link in links(netns is not None):
        runs[link] = {}
        for index, method in enumerate(methods(world_size, args)):
            ranks = _char_lm.read_rank_records(out, index, link, world_size)
            rank0 = ranks[0]
            runs[link][method.name] = dict(
                parameters=rank0["parameters"],
                loss=mean_over_ranks([r["loss"] for r in ranks]),
                bytes_sent=rank0["bytes_sent"],
                bytes_sent_total=rank0["bytes_sent_total"],
                # A step is done when the slowest rank is done with it.
                step_end_seconds=[max(ends) for ends in zip(*(r["step_end_seconds"] for r in ranks))],
                loopback_bytes=rank0["loopback_bytes"],
                ranks_agree=all(r["parameter_checksum"] == rank0["parameter_checksum"] for r in ranks),
                val_loss=rank0["val_loss"],
            )
    return runs


def exchange_bytes(run: dict) -> list[int]:
    """The bytes of each exchange during training: the increments of the running count, one per step at most."""
    totals = [0, *run["bytes_sent"]]
    return [b - a for a, b in itertools.pairwise(totals) if b > a]


def seconds_per_step(run: dict) -> float:
    return run["step_end_seconds"][-1] / len(run["step_end_seconds"])


def summarize(runs: dict[str, dict], timed_runs: dict[str, dict], steps: int) -> dict[str, dict]:
    """Per method: losses and bytes of its run of the budget on the plain loopback (``runs``), and its
    seconds per step and to DDP's final training loss on the timed link (``timed_runs``: the shaped
    link's runs, or the same runs without one), with the speed-up to that loss (DDP's seconds over its)."""
    window = window_of(steps)
    ddp = runs["ddp"]
    target = trailing_mean(ddp["loss"], window)[-1]
    summary = {}
    for name, run in runs.items():
        timed = timed_runs[name]
        reached = first_step_at_or_below(trailing_mean(timed["loss"], window), target, window)
        summary[name] = row = dict(
            smoothed_loss=trailing_mean(run["loss"], window),
            val_loss=run["val_loss"],
            val_loss_gap_vs_ddp=run["val_loss"] / ddp["val_loss"] - 1,
            bytes_sent=run["bytes_sent_total"],
            fewer_bytes_than_ddp=ddp["bytes_sent_total"] / run["bytes_sent_total"],
            exchanges_in_training=len(exchange_bytes(run)),
            peak_bytes_per_sync=max(exchange_bytes(run)),
            seconds_per_step_loopback=seconds_per_step(run),
            seconds_per_step=seconds_per_step(timed),
            timed_steps=len(timed["loss"]),
            target_train_loss=target,
            steps_to_target=None if reached is None else reached + 1,
            seconds_to_target=None if reached is None else timed["step_end_seconds"][reached],
            speedup_to_target_vs_ddp=None,
        )
        if len(timed["loopback_bytes"]) == 2:  # the kernel's count: every rank, both directions, the whole fit
            row["loopback_bytes"] = timed["loopback_bytes"][1] - timed["loopback_bytes"][0]
    for row in summary.values():
        if row["seconds_to_target"] is not None:
            row["speedup_to_target_vs_ddp"] = summary["ddp"]["seconds_to_target"] / row["seconds_to_target"]
    return summary


def judge_targets(summary: dict[str, dict], shaped: bool, args: argparse.Namespace) -> list[dict]:
    """Pass / fail (None: not measured) of each of the issue's targets, from the two-worker summary."""
    diloco = Method(args.h).name
    row = summary[diloco]
    speedup = row["speedup_to_target_vs_ddp"]
    if not shaped:
        speed_measured, speed_passed = "not measured: no shaped link", None
    else:
        speed_measured = "never reached DDP's final loss" if speedup is None else f"{speedup:.1f}x"
        speed_passed = speedup is not None and speedup >= MIN_SPEEDUP_SHAPED
    verdicts = [
        dict(target=f"{diloco}: final val loss within {MAX_LOSS_GAP:.0%} of DDP's",
             measured=f"{row['val_loss_gap_vs_ddp']:+.2%}", passed=row["val_loss_gap_vs_ddp"] <= MAX_LOSS_GAP),
        dict(target=f"{diloco}: >= {MIN_FEWER_BYTES:g}x fewer bytes than DDP",
             measured=f"{row['fewer_bytes_than_ddp']:.1f}x", passed=row["fewer_bytes_than_ddp"] >= MIN_FEWER_BYTES),
        dict(target=f"{diloco}: >= {MIN_SPEEDUP_SHAPED:g}x faster than DDP to DDP's final loss, shaped link",
             measured=speed_measured, passed=speed_passed),
    ]
    for assignment in ("strided", "balanced"):
        streaming = Method(args.h, num_fragments=args.num_fragments, fragment_assignment=assignment).name
        if streaming not in summary:  # not with --no-variants
            continue
        peak_ratio = summary[streaming]["peak_bytes_per_sync"] / row["peak_bytes_per_sync"]
        verdicts.append(dict(
            target=f"{streaming}: peak bytes per sync <= 1/{args.num_fragments} of {diloco}'s",
            measured=f"{peak_ratio:.4f} of it (1/{1 / peak_ratio:.2f})", passed=peak_ratio <= 1 / args.num_fragments,
        ))
    return verdicts


def speedup_cell(speedup: Optional[float], missing: str) -> str:
    return missing if speedup is None else f"{speedup:.1f}x"


def results_table(summary: dict[str, dict], link_label: Optional[str], most_steps: int) -> str:
    """One row per method; ``link_label`` names the shaped link (None: there was none). The speed-up is
    DDP's seconds to its final training loss over the method's."""
    timed = link_label or "loopback"
    header = ["method", "final val loss", "vs DDP", "bytes sent/worker", "fewer than DDP", "peak bytes/sync",
              "s/step loopback"]
    if link_label:
        header += [f"s/step {link_label}", f"through the {link_label} loopback (tc)"]
    header += [f"steps to DDP's final loss (of <= {most_steps})", f"s to it ({timed})", "speed-up to it"]
    rows = []
    for name, row in summary.items():
        cells = [
            name,
            f"{row['val_loss']:.4f}",
            f"{row['val_loss_gap_vs_ddp']:+.2%}",
            megabytes(row["bytes_sent"]),
            f"{row['fewer_bytes_than_ddp']:.0f}x",
            megabytes(row["peak_bytes_per_sync"]),
            f"{row['seconds_per_step_loopback']:.3f}",
        ]
        if link_label:
            cells += [f"{row['seconds_per_step']:.3f}", megabytes(row["loopback_bytes"])]
        reached = row["seconds_to_target"] is not None
        cells += [f"{row['steps_to_target']}" if reached else "not reached",
                  f"{row['seconds_to_target']:.0f}" if reached else "-",
                  speedup_cell(row["speedup_to_target_vs_ddp"], "-")]
        rows.append(cells)
    return markdown_table(header, rows)


def targets_table(verdicts: list[dict]) -> str:
    verdict_word = {True: "pass", False: "FAIL", None: "not judged"}
    rows = [[v["target"], v["measured"], verdict_word[v["passed"]]] for v in verdicts]
    return markdown_table(["target (2 workers)", "measured", "verdict"], rows, align_right_from=3)


def plot(runs: dict[int, dict], timed_runs: dict[int, dict], summaries: dict[int, dict], time_label: str,
         path: Path) -> None:
    """Smoothed training loss against steps and bytes (the runs of the budget on the plain loopback) and
    against training seconds (the timed runs: on the shaped link they stop at DDP's final loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_bytes, by_seconds) = plt.subplots(1, 3, figsize=(18, 5.5), constrained_layout=True)
    colors: dict[str, str] = {}
    for world_size, linestyle in zip(sorted(runs), ("-", "--")):
        for name, run in runs[world_size].items():
            color = colors.setdefault(name, f"C{len(colors)}")
            style = dict(label=f"{name}, {world_size} workers", color=color, linestyle=linestyle, linewidth=1.2)
            smoothed = summaries[world_size][name]["smoothed_loss"]
            by_step.plot(range(1, len(smoothed) + 1), smoothed, **style)
            by_bytes.plot([sent / 1e6 for sent in run["bytes_sent"]], smoothed, **style)
            timed = timed_runs[world_size][name]
            window = window_of(len(run["loss"]))
            by_seconds.plot(timed["step_end_seconds"], trailing_mean(timed["loss"], window), **style)
    by_bytes.set_xscale("log")  # a method's steps before its first exchange (0 bytes) are left out
    axes_labels = ((by_step, "optimizer step"), (by_bytes, "MB sent per worker (cumulative, log)"),
                   (by_seconds, f"training seconds, {time_label}"))
    for ax, xlabel in axes_labels:
        ax.axhline(summaries[2]["ddp"]["target_train_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss, mean over workers, trailing mean (nats/char)")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle("Character GPT on the standard library: DDP, DiLoCo and its variants, Streaming DiLoCo "
                 "(solid: 2 workers, dashed: 4; dotted: 2-worker DDP's final loss)")
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], choices=[2, 4],
                        help="numbers of workers to run (2 is needed for the targets)")
    parser.add_argument("--steps", type=int, default=200, help="steps of every 2-worker run")
    parser.add_argument("--steps-4", type=int, default=30, help="steps of the 4-worker runs")
    parser.add_argument("--max-step-factor", type=float, default=1.5,
                        help="on the shaped link a DiLoCo method trains until DDP's final loss, at most this x the steps")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[10, 50, 100], help="DiLoCo's H values")
    parser.add_argument("--h", type=int, default=50, help="H of the targets, of int8, delay=1 and streaming")
    parser.add_argument("--h-4", type=int, default=10, help="DiLoCo's H with 4 workers")
    parser.add_argument("--num-fragments", type=int, default=4, help="Streaming DiLoCo's fragments")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="the outer Nesterov SGD's learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.5,
                        help="the outer Nesterov SGD's momentum (the paper's, and the strategy's default: 0.9)")
    parser.add_argument("--no-variants", action="store_true",
                        help="DDP and DiLoCo at each --inner-steps only (no int8, delay=1, streaming; for sweeps)")
    _char_lm.add_model_arguments(parser)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="the shaped link's rate")
    parser.add_argument("--probe-mb", type=float, default=8.0, help="all-reduce size that checks the link")
    parser.add_argument("--no-shaping", action="store_true", help="skip the shaped link")
    parser.add_argument("--quick", action="store_true", help="a smoke run of 1-2 minutes")
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="steps of the one-process pretraining every method starts from (0: from scratch)")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # set on the launched ranks
    parser.add_argument("--worker-shaped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-init", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.workers, args.steps, args.inner_steps, args.h = [2], 40, [4, 10, 20], 10
        args.pretrain_steps = min(args.pretrain_steps, 20)
        args.dim, args.depth, args.val_batches, args.probe_mb = 64, 2, 4, 1.0
    if 2 not in args.workers:
        parser.error("--workers must include 2: the targets are judged on two workers")
    args.workers = sorted(set(args.workers))
    return args


def main() -> None:
    args = parse_args()
    # Steady-state timings: compiled passes from the first step (the default "auto" starts on the
    # reference and compiles once that pays). Worker processes inherit the setting.
    os.environ.setdefault(BACKEND_ENV, "compiled")
    if args.worker_out is not None:
        train_methods_on_this_rank(args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="diloco_bench") as tmp:
        if args.pretrain_steps:
            print(f"pretraining for {args.pretrain_steps} steps in one process ...", flush=True)
            pretrain(args, Path(tmp) / PRETRAINED)

        def train_on(netns: Optional[str]) -> dict[int, dict[str, dict]]:
            runs = {}
            for world_size in args.workers:
                links = "plain then shaped loopback" if netns else "plain loopback"
                print(f"{world_size} workers, {links} ...", flush=True)
                runs[world_size] = train(args, world_size, netns, Path(tmp))
            return runs

        runs, link, unavailable = _dist.on_shaped_link(args.rate_mbit, args.probe_mb, args.no_shaping, train_on)

    shaped = unavailable is None
    timed_link = "shaped" if shaped else "loopback"
    full_runs = {ws: runs[ws]["loopback"] for ws in args.workers}
    timed_runs = {ws: runs[ws][timed_link] for ws in args.workers}
    summaries = {ws: summarize(full_runs[ws], timed_runs[ws], budget(ws, args)) for ws in args.workers}
    verdicts = judge_targets(summaries[2], shaped, args)
    link_label = f"{args.rate_mbit:g} Mbit/s" if shaped else None
    tables = {
        f"{ws} workers": results_table(
            summaries[ws], link_label, round(args.max_step_factor * budget(ws, args)) if shaped else budget(ws, args)
        )
        for ws in args.workers
    }
    tables["targets"] = targets_table(verdicts)
    json_path, png_path = result_paths("diloco", args.quick)
    record = dict(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        parameters=full_runs[2]["ddp"]["parameters"],
        machine=dict(machine(), load_average_before=load_before, load_average_after=os.getloadavg()),
        shaped_link=link,
        shaped_link_skipped=unavailable,
        total_seconds=time.perf_counter() - started,
        runs=runs,
        summaries=summaries,
        targets=verdicts,
        tables=tables,
    )
    json_path.write_text(json.dumps(record, indent=1))
    plot(full_runs, timed_runs, summaries, f"shaped link ({link_label})" if shaped else "plain loopback", png_path)

    print(f"\n{record['parameters']:,} parameters; {args.threads} thread(s) a rank; load average "
          f"{load_before[0]:.1f} before, {record['machine']['load_average_after'][0]:.1f} after; "
          f"{record['total_seconds'] / 60:.1f} min in all")
    for ws in args.workers:
        agree = all(run["ranks_agree"] for run in full_runs[ws].values())
        print(f"{ws} workers: the ranks end with identical parameters in every method: {agree}")
    for title, table in tables.items():
        print(f"\n{title}\n\n{table}")
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
