"""Gradient compression and 1-bit Adam against DDP, two workers: bytes per step, loss, and seconds over a slow link.

What it measures
    A character-level GPT (``examples.char_lm.CharGPT``; by default width 192, 4 blocks,
    1.9 M parameters, so DDP all-reduces 7.5 MB of fp32 gradients a step) trained on
    CPython's standard-library top-level modules (``examples.char_lm.StdlibText``,
    ``*.py``, windows of 64 bytes, 8 windows per rank and step; the last 5% of the
    stream validates) by two CPU workers (gloo), once per method, each with the same
    seed (initial weights and batches), the same step budget and the same optimizer,
    ``lightning_converge.optim.AdamW`` (lr 2e-3 after a linear warm-up over 10% of the
    steps, then constant, so that a run's first steps do not depend on its length;
    betas 0.9/0.95, weight decay 0.1):

    * ``ddp``: ``CompressedDDPStrategy("none")``, the fp32 all-reduce of
      ``strategy="ddp"`` (the same arithmetic) with byte accounting;
    * each compressor as its registered strategy (``strategy="ddp_<name>"``), with error
      feedback: ``fp16``, ``int8`` (blocks of 256), ``topk`` (1% of the values) with their
      defaults, compressing from the first step; ``sign`` (blocks of 128) and ``powersgd``
      (rank 8) after a full-precision warm-up of 20% of the steps, as 1-bit Adam's
      (:func:`default_options`); ``bf16``, ``ternary`` and ``onebit`` run too when named
      in ``--methods``, and ``--option METHOD NAME=VALUE`` changes a strategy option;
    * ``onebit_adam``: ``OneBitAdamStrategy`` with ``freeze_step`` = 20% of the steps
      (``--freeze-fraction``; the paper warms up for 15-25% of training).

    Bytes, from the strategies' own accounting (``last_comm_stats``, what they log as
    ``comm/bytes_sent``): bytes sent per rank and step (after the uncompressed
    warm-up, for 1-bit Adam) and the compression ratio against ``ddp``'s. The counts
    are the sizes of the tensors handed to the collectives. With two ranks an
    all-reduce or all-gather of ``n`` bytes puts ``n`` bytes per rank on the wire, but
    1-bit Adam's all-to-all counts the row a rank keeps for itself too: its wire
    bytes are 2/3 of its count. On the shaped link the kernel's own count of the
    bytes through the loopback (``tc -s qdisc``, headers included) is recorded beside
    the accounting (``loopback_vs_counted`` in the JSON).

    Loss: the final loss the targets are judged on is the validation loss after the
    last step (``--val-batches`` batches a rank, the same bytes for every method).
    The curves are the training loss averaged over both ranks and smoothed by a
    trailing mean over 10% of the steps. DDP's final loss in those terms (its
    smoothed loss at its last step) is the target of "steps / seconds to DDP's final
    loss": the first step at which a method's smoothed loss is at or below it. The
    wall-clock target ("faster than DDP on the shaped link") is judged on the mean
    seconds of a training step there, warm-up included: the same training in less
    time; a method allowed to end 2-3% above DDP's loss may never reach that loss.

    Time: the two ranks run inside a private network namespace. Every method trains
    first on the namespace's loopback as it is (no qdisc, like the normal loopback)
    for ``--steps`` steps; then every method trains again with the loopback shaped to
    ``--rate-mbit`` (100) Mbit/s by ``tc qdisc ... tbf``, both directions sharing it
    (a gloo all-reduce between two ranks is timed over it first to check the rate;
    rank 0 sets the limit). Not interleaved: after a shaped fit, the next unshaped
    fit's large transfers ran slow on the same gloo connections (TCP state carried
    over; fp16 took 0.18 s a step instead of 0.10 s). On the shaped link DDP trains
    ``--steps`` steps again; every other method trains until it reaches DDP's final
    loss, for at most ``--max-step-factor`` (1.5) times the steps, and nothing
    validates. The two links compute the same numbers (the script reports the
    largest training-loss difference).

    A step's time runs from the end of the previous step to the end of this one
    (rank 0's clock; the collectives keep the ranks in step). The first two steps of
    a phase (two phases with an uncompressed warm-up) hold one-time
    ``torch.compile`` work, seconds to a minute depending on the compile cache and
    the load: seconds per step are the median over a phase's other steps (for
    1-bit Adam, of its compressed steps), and training seconds add up the measured
    steps with those first two counted at their phase's median (the raw times are
    in the JSON).

    The two ranks run one intra-op thread each (``--threads``) on this 2-core
    machine. Other jobs may share the CPU (the load average is recorded): they slow
    the compute part of every step, not the shaped link, so seconds per step on the
    plain loopback vary by 2x or more between runs.

How to run (from the repository root; the shaped link needs root for ``ip netns``)
    sudo .venv/bin/python benchmarks/compression.py           # 8.5-9 min here
    sudo .venv/bin/python benchmarks/compression.py --quick   # smoke run: 0.4 min idle, 0.8 min with other jobs
    python benchmarks/compression.py --no-shaping             # normal loopback only, no root needed
    python benchmarks/compression.py --no-shaping --methods ddp powersgd --option powersgd rank=4 --results-name rank4

Without root, ``ip`` or ``tc``, the shaped part is skipped with a message saying why:
the ranks then train on the normal loopback only, and its seconds stand in for the
shaped link's. One launch of two ranks (``benchmarks/_dist.py``) runs every fit, one
after another, in one process group. Writes ``benchmarks/results/compression.json``
and ``compression.png`` (``--results-name``; ``*_quick.*`` with ``--quick``) and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import ast
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist  # noqa: E402
from _curves import StopAtLoss, first_step_at_or_below, mean_over_ranks, trailing_mean  # noqa: E402
from _common import machine, markdown_table, quiet_trainer, result_paths  # noqa: E402
from examples.char_lm import CharGPT, StdlibText  # noqa: E402
from lightning_converge.comm import COMPRESSORS, make_compressor  # noqa: E402
from lightning_converge.optim import AdamW  # noqa: E402
from lightning_converge.strategies import CompressedDDPStrategy, OneBitAdamStrategy  # noqa: E402
from lightning_converge.kernels.dispatch import BACKEND_ENV  # noqa: E402

FILES = ("*.py",)  # the standard library's top-level modules
WORLD_SIZE = 2
LINKS = ("loopback", "shaped")  # the namespace's loopback without, then with, the rate limit
# The first steps of a phase compile kernels (torch.compile): the first for the buckets DDP starts
# with, the second again for the buckets it rebuilds after the first step.
COMPILING_STEPS = 2
DEFAULT_METHODS = ("ddp", "fp16", "int8", "sign", "topk", "powersgd", "onebit_adam")
ALL_METHODS = ("ddp", *COMPRESSORS, "onebit_adam")
# The targets: final loss within ``max_loss_gap`` of DDP's, at least ``min_compression``
# times fewer bytes than DDP (after the warm-up), and faster than DDP over the shaped link.
TARGETS = {
    "onebit_adam": dict(max_loss_gap=0.03, min_compression=20.0),
    "sign": dict(max_loss_gap=0.03, min_compression=20.0),
    "int8": dict(max_loss_gap=0.02, min_compression=None),
    "powersgd": dict(max_loss_gap=0.02, min_compression=None),
}
COLORS = dict(zip(ALL_METHODS, ("black", "tab:gray", "tab:olive", "tab:blue", "tab:orange", "tab:brown",
                                "tab:purple", "tab:pink", "tab:green", "tab:red")))


def freeze_step(args: argparse.Namespace) -> int:
    return max(1, round(args.freeze_fraction * args.steps))


def default_options(args: argparse.Namespace) -> dict[str, dict]:
    """The options the methods run with unless ``--option`` changes them: sign and PowerSGD start
    compressing after the same full-precision warm-up as 1-bit Adam's (the gradients of the first
    steps are large and change fast: error feedback cannot catch up with them), sign with a scale
    per 128 values, PowerSGD at rank 8 (ranks 2 and 4 miss the 2% target: see the README)."""
    warmup = freeze_step(args)
    return {"sign": dict(block_size=128, start_step=warmup), "powersgd": dict(rank=8, start_step=warmup)}


def smoothing_window(args: argparse.Namespace) -> int:
    return max(5, args.steps // 10)


def make_strategy(method: str, args: argparse.Namespace) -> CompressedDDPStrategy | OneBitAdamStrategy:
    """The method's strategy with its defaults, except for the ``--option``s given for it."""
    options = args.options.get(method, {})
    if method == "onebit_adam":
        return OneBitAdamStrategy(freeze_step=freeze_step(args), **options)
    if method == "ddp":
        return CompressedDDPStrategy("none", **options)
    compressor_options = {name: value for name, value in options.items() if name != "start_step"}
    return CompressedDDPStrategy(make_compressor(method, **compressor_options), start_step=options.get("start_step", 0))


def phase_starts(method: str, args: argparse.Namespace) -> list[int]:
    """0-based indices of the first steps of the method's phases: uncompressed warm-up (1-bit Adam's,
    or a compressor's ``start_step``), if any, and compression."""
    warmup = freeze_step(args) if method == "onebit_adam" else args.options.get(method, {}).get("start_step", 0)
    return [0, warmup] if warmup else [0]


def steady_step_seconds(step_seconds: list[float], starts: list[int]) -> tuple[list[float], list[float]]:
    """The median seconds of each phase's steps after its first :data:`COMPILING_STEPS`, and the
    steps' seconds with those first ones replaced by their phase's median."""
    steady, medians = list(step_seconds), []
    bounds = starts + [len(step_seconds)]
    for start, end in itertools.pairwise(bounds):
        median = statistics.median(step_seconds[start + COMPILING_STEPS : end] or step_seconds[start:end])
        medians.append(median)
        steady[start : min(end, start + COMPILING_STEPS)] = [median] * min(end - start, COMPILING_STEPS)
    return steady, medians


# ---------------------------------------------------------------- one rank (inside the launched processes)


class StepRecord(L.Callback):
    """Per optimizer step on this rank: the training loss, the bytes the strategy counted and the
    seconds from the start of training to the step's end; the validation loss after the last step.

    With ``count_loopback`` it also reads the loopback qdisc's byte counter when training starts
    and when it ends (run it on one rank, inside the shaped namespace).
    """

    def __init__(self, count_loopback: bool) -> None:
        self.count_loopback = count_loopback
        self.loss: list[float] = []
        self.bytes_sent: list[int] = []
        self.bytes_received: list[int] = []
        self.step_end_seconds: list[float] = []
        self.loopback_bytes: list[int] = []
        self.val_loss: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.count_loopback:
            self.loopback_bytes.append(_dist.loopback_bytes(None))
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end_seconds.append(time.perf_counter() - self.start)
        stats = trainer.strategy.last_comm_stats
        self.bytes_sent.append(stats.bytes_sent)
        self.bytes_received.append(stats.bytes_received)
        self.loss.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.count_loopback:
            self.loopback_bytes.append(_dist.loopback_bytes(None))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_loss = float(trainer.callback_metrics["val_loss"])


def ddp_final_loss(runs_dir: Path, args: argparse.Namespace) -> float:
    """DDP's final training loss on the plain loopback, smoothed: the target of the timed runs."""
    losses = [json.loads((runs_dir / f"ddp_loopback_rank{r}.json").read_text())["loss"] for r in range(WORLD_SIZE)]
    return trailing_mean(mean_over_ranks(losses), smoothing_window(args))[-1]


def train_methods_on_this_rank(args: argparse.Namespace) -> None:
    """Fit every method on the plain loopback, then on the shaped one (one process group for all),
    writing ``{method}_{link}_rank{r}.json`` to ``--worker-out``.

    On the plain loopback every method trains ``--steps`` steps and validates. On the shaped
    link DDP trains ``--steps`` steps; the other methods train until they reach DDP's final
    loss, for at most ``--max-step-factor`` times the steps. Nothing validates there.
    """
    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    links = LINKS if args.worker_shaping else LINKS[:1]
    # Every plain-loopback fit first: after a shaped fit, the next unshaped fit's large transfers
    # ran slow on the same gloo connections (fp16: 0.18 s a step instead of 0.10 s).
    for link, method in itertools.product(links, args.methods):
        if args.worker_shaping:
            _dist.use_link(link == "shaped", args.rate_mbit, rank)
        record = StepRecord(count_loopback=link == "shaped" and rank == 0)
        callbacks: list[L.Callback] = [record]
        max_steps, val_batches = args.steps, args.val_batches
        if link == "shaped":
            val_batches = 0
            if method != "ddp":
                max_steps = round(args.max_step_factor * args.steps)
                callbacks.append(StopAtLoss(ddp_final_loss(args.worker_out, args), smoothing_window(args)))
        L.seed_everything(args.seed, verbose=False)
        optimizer = functools.partial(AdamW, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        model = CharGPT(  # min_lr_ratio=1: constant after the warm-up, whatever the run's length
            dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
            warmup_steps=max(1, args.steps // 10), min_lr_ratio=1.0, optimizer=optimizer,
        )
        data = StdlibText(FILES, seq_len=args.seq_len, batch_size=args.batch_size)
        trainer = quiet_trainer(
            devices=WORLD_SIZE,
            strategy=make_strategy(method, args),
            max_steps=max_steps,
            val_check_interval=args.steps,
            check_val_every_n_epoch=None,
            limit_val_batches=val_batches,
            callbacks=callbacks,
        )
        trainer.fit(model, data)
        result = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss": record.loss,
            "bytes_sent": record.bytes_sent,
            "bytes_received": record.bytes_received,
            "step_end_seconds": record.step_end_seconds,
            "loopback_bytes": record.loopback_bytes,
            "val_loss": record.val_loss,
        }
        (args.worker_out / f"{method}_{link}_rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the launcher's side


def train(args: argparse.Namespace, netns: str | None, work_dir: Path) -> dict[str, dict[str, dict]]:
    """Launch the two ranks (inside ``netns``, then on both links), train every method; each run's
    record by link and method, both ranks merged."""
    worker_args = [__file__, *sys.argv[1:], "--worker-out", str(work_dir)] + (["--worker-shaping"] if netns else [])
    if netns:
        _dist.set_loopback_rate(None, netns)  # the ranks shape it when due
    _dist.launch(worker_args, world_size=WORLD_SIZE, netns=netns, threads_per_rank=args.threads,
                 log_dir=work_dir, timeout=3 * 3600)
    runs: dict[str, dict[str, dict]] = {}
    for link in LINKS if netns else LINKS[:1]:
        runs[link] = {}
        for method in args.methods:
            ranks = [json.loads((work_dir / f"{method}_{link}_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
            rank0 = ranks[0]
            ends = [0.0, *rank0["step_end_seconds"]]
            runs[link][method] = {
                "parameters": rank0["parameters"],
                "loss": mean_over_ranks([r["loss"] for r in ranks]),
                "bytes_sent": rank0["bytes_sent"],
                "bytes_sent_differs_between_ranks": any(r["bytes_sent"] != rank0["bytes_sent"] for r in ranks),
                "bytes_received": rank0["bytes_received"],
                "step_seconds": [b - a for a, b in itertools.pairwise(ends)],
                "loopback_bytes": rank0["loopback_bytes"],
                "val_loss": rank0["val_loss"],
            }
    return runs


def summarize(runs: dict[str, dict], target: float, args: argparse.Namespace) -> dict[str, dict]:
    """Per method of one link: bytes, compression, losses, seconds per step and steps / seconds to
    ``target``, DDP's final training loss (smoothed)."""
    window = smoothing_window(args)
    ddp = runs["ddp"]
    ddp_bytes = statistics.fmean(ddp["bytes_sent"])
    summary = {}
    for method, run in runs.items():
        starts = phase_starts(method, args)
        smoothed = trailing_mean(run["loss"], window)
        reached = first_step_at_or_below(smoothed, target, window)
        steady, medians = steady_step_seconds(run["step_seconds"], starts)
        train_seconds = list(itertools.accumulate(steady))
        bytes_per_step = statistics.fmean(run["bytes_sent"][starts[-1] :])
        row = {
            "smoothed_loss": smoothed,
            "bytes_per_step": bytes_per_step,
            "compression_vs_ddp": ddp_bytes / bytes_per_step,
            "steps_run": len(run["loss"]),
            "final_train_loss": smoothed[-1],
            "seconds_per_step": medians[-1],
            "mean_seconds_per_step": train_seconds[-1] / len(train_seconds),  # warm-up included
            "train_seconds": train_seconds,
            "target_train_loss": target,
            "steps_to_target": None if reached is None else reached + 1,
            "seconds_to_target": None if reached is None else train_seconds[reached],
        }
        if run["val_loss"] is not None:
            row["val_loss"] = run["val_loss"]
            row["val_loss_gap_vs_ddp"] = run["val_loss"] / ddp["val_loss"] - 1
        if len(starts) > 1:
            row["warmup_bytes_per_step"] = statistics.fmean(run["bytes_sent"][: starts[-1]])
            row["warmup_seconds_per_step"] = medians[0]
        if len(run["loopback_bytes"]) == 2:  # the kernel's count: both ranks, the whole run
            wire = (run["loopback_bytes"][1] - run["loopback_bytes"][0]) / WORLD_SIZE / len(run["loss"])
            row["loopback_bytes_per_step"] = wire
            row["loopback_vs_counted"] = wire / statistics.fmean(run["bytes_sent"])
        summary[method] = row
    return summary


def judge_targets(summaries: dict[str, dict[str, dict]]) -> list[dict]:
    """Pass / fail of each of the issue's targets, for the methods it names that ran. Loss and bytes
    come from the loopback runs, wall-clock from the shaped link's: the mean seconds of a training
    step, warm-up included, against DDP's (the same training in less time; a method whose loss
    target lets it end above DDP's loss is not asked to reach that loss, whose seconds are reported
    beside it)."""
    verdicts = []
    timed = summaries.get("shaped", summaries["loopback"])
    for method, target in TARGETS.items():
        if method not in summaries["loopback"]:
            continue
        row = summaries["loopback"][method]
        checks = {"loss": row["val_loss_gap_vs_ddp"] <= target["max_loss_gap"]}
        if target["min_compression"] is not None:
            checks["bytes"] = row["compression_vs_ddp"] >= target["min_compression"]
        checks["wall_clock"] = timed[method]["mean_seconds_per_step"] < timed["ddp"]["mean_seconds_per_step"]
        verdicts.append({"method": method, **target, "checks": checks, "passed": all(checks.values())})
    return verdicts


def format_seconds(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.1f}"


def timed_link_name(summaries: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    return f"{args.rate_mbit:g} Mbit/s" if "shaped" in summaries else "loopback"


def results_table(summaries: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    loopback = summaries["loopback"]
    timed = summaries.get("shaped", loopback)
    link = timed_link_name(summaries, args)
    most_steps = round(args.max_step_factor * args.steps) if "shaped" in summaries else args.steps
    header = [
        "method", "bytes sent/step/rank", "fewer bytes than DDP", "final val loss", "vs DDP", "s/step loopback",
        f"s/step {link}", f"steps to DDP's final loss (of <= {most_steps})", f"s to DDP's final loss ({link})",
    ]
    rows = []
    for method, row in loopback.items():
        timed_row = timed[method]
        after_warmup = " (after warm-up)" if "warmup_bytes_per_step" in row else ""
        rows.append([
            method,
            f"{row['bytes_per_step'] / 1e6:.3f} MB{after_warmup}",
            f"{row['compression_vs_ddp']:.1f}x",
            f"{row['val_loss']:.4f}",
            f"{row['val_loss_gap_vs_ddp']:+.2%}",
            f"{row['seconds_per_step']:.3f}",
            f"{timed_row['seconds_per_step']:.3f}",
            timed_row["steps_to_target"] or "not reached",
            format_seconds(timed_row["seconds_to_target"]),
        ])
    return markdown_table(header, rows)


def targets_table(verdicts: list[dict], summaries: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    timed = summaries.get("shaped", summaries["loopback"])
    link = timed_link_name(summaries, args)
    header = ["method", "final loss within", "measured", "fewer bytes", "measured",
              f"mean s/step ({link}, warm-up included) vs DDP's", f"s to DDP's final loss ({link}) vs DDP's",
              "verdict"]
    mark = {True: "pass", False: "FAIL"}
    rows = []
    for verdict in verdicts:
        method, checks = verdict["method"], verdict["checks"]
        row = summaries["loopback"][method]
        bytes_cells = ["-", "-"]
        if "bytes" in checks:
            bytes_cells = [f">= {verdict['min_compression']:g}x",
                           f"{row['compression_vs_ddp']:.1f}x {mark[checks['bytes']]}"]
        seconds = format_seconds(timed[method]["seconds_to_target"])
        rows.append([
            method,
            f"{verdict['max_loss_gap']:.0%}",
            f"{row['val_loss_gap_vs_ddp']:+.2%} {mark[checks['loss']]}",
            *bytes_cells,
            f"{timed[method]['mean_seconds_per_step']:.3f} vs {timed['ddp']['mean_seconds_per_step']:.3f} "
            f"{mark[checks['wall_clock']]}",
            f"{seconds} vs {format_seconds(timed['ddp']['seconds_to_target'])}",
            mark[verdict["passed"]],
        ])
    return markdown_table(header, rows)


def plot(runs: dict[str, dict[str, dict]], summaries: dict[str, dict[str, dict]], args: argparse.Namespace,
         path: Path) -> None:
    """Smoothed training loss against steps and bytes sent (loopback runs) and against training
    seconds (shaped link, or loopback without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_bytes, by_seconds) = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    loopback = summaries["loopback"]
    timed = summaries.get("shaped", loopback)
    for method, run in runs["loopback"].items():
        # DDP wide and pale: the methods that follow it step for step are drawn over it.
        style = {"label": method, "color": COLORS[method], "linewidth": 3 if method == "ddp" else 1.2,
                 "alpha": 0.4 if method == "ddp" else 1.0}
        by_step.plot(range(1, len(run["loss"]) + 1), loopback[method]["smoothed_loss"], **style)
        sent_mb = [total / 1e6 for total in itertools.accumulate(run["bytes_sent"])]
        by_bytes.plot(sent_mb, loopback[method]["smoothed_loss"], **style)
        by_seconds.plot(timed[method]["train_seconds"], timed[method]["smoothed_loss"], **style)
    if "onebit_adam" in loopback:
        by_step.axvline(freeze_step(args), color=COLORS["onebit_adam"], linestyle=":", linewidth=1,
                        label="1-bit Adam compresses")
    by_bytes.set_xscale("log")
    for ax, xlabel in ((by_step, "optimizer step"), (by_bytes, "MB sent per rank (cumulative, log scale)"),
                       (by_seconds, f"training seconds over the {timed_link_name(summaries, args)} link")):
        ax.axhline(loopback["ddp"]["target_train_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss, both ranks, trailing mean (nats/char)")
        ax.grid(alpha=0.3)
    by_step.legend(loc="upper right")
    fig.suptitle("Character GPT on the standard library, 2 workers: DDP, compressed DDP and 1-bit Adam "
                 "(dotted: DDP's final loss)")
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS,
                        help="ddp must be among them (it is the reference)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per rank and step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--freeze-fraction", type=float, default=0.2, help="1-bit Adam's warm-up, of the steps")
    parser.add_argument("--max-step-factor", type=float, default=1.5,
                        help="on the shaped link, the other methods train up to this many times --steps "
                             "to reach DDP's final loss")
    parser.add_argument("--val-batches", type=int, default=40, help="validation batches per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="the shaped link's rate")
    parser.add_argument("--probe-mb", type=float, default=8.0, help="all-reduce size that checks the link")
    parser.add_argument("--option", nargs=2, action="append", default=[], metavar=("METHOD", "NAME=VALUE"),
                        help="a strategy option for one method, e.g. --option powersgd rank=4 (repeatable)")
    parser.add_argument("--no-shaping", action="store_true", help="the normal loopback only")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--results-name", default="compression", help="stem of the JSON and PNG in benchmarks/results")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # set on the launched ranks
    parser.add_argument("--worker-shaping", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "ddp" not in args.methods:
        parser.error("--methods must include ddp, the reference")
    args.methods = ["ddp"] + [m for m in dict.fromkeys(args.methods) if m != "ddp"]
    if args.quick:
        args.steps, args.dim, args.depth, args.val_batches, args.probe_mb = 20, 64, 2, 4, 1.0
    args.options = default_options(args)
    for method, assignment in args.option:
        name, _, value = assignment.partition("=")
        args.options.setdefault(method, {})[name] = ast.literal_eval(value)
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
    with tempfile.TemporaryDirectory(prefix="compression_bench") as tmp:

        def train_on(netns: str | None) -> dict[str, dict[str, dict]]:
            links = "on the plain and on the shaped loopback" if netns else "on the plain loopback"
            print(f"training {len(args.methods)} methods x {args.steps} steps, each {links} ...", flush=True)
            return train(args, netns, Path(tmp))

        runs, link, unavailable = _dist.on_shaped_link(args.rate_mbit, args.probe_mb, args.no_shaping, train_on)

    target = trailing_mean(runs["loopback"]["ddp"]["loss"], smoothing_window(args))[-1]
    summaries = {link_name: summarize(link_runs, target, args) for link_name, link_runs in runs.items()}
    verdicts = judge_targets(summaries)
    loss_difference = None  # per method, over the steps both links ran
    if "shaped" in runs:
        loss_difference = {
            m: max(abs(a - b) for a, b in zip(runs["loopback"][m]["loss"], runs["shaped"][m]["loss"]))
            for m in args.methods
        }
    results = results_table(summaries, args)
    targets = targets_table(verdicts, summaries, args)
    json_path, png_path = result_paths(args.results_name, args.quick)
    record = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "parameters": runs["loopback"]["ddp"]["parameters"],
        "freeze_step": freeze_step(args),
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "shaped_link": link,
        "shaped_link_skipped": unavailable,
        "total_seconds": time.perf_counter() - started,
        "runs": runs,
        "summaries": summaries,
        "largest_training_loss_difference_between_links": loss_difference,
        "targets": verdicts,
        "tables": {"results": results, "targets": targets},
    }
    json_path.write_text(json.dumps(record, indent=1))
    plot(runs, summaries, args, png_path)

    load_after = record["machine"]["load_average_after"]
    print(f"\n{record['parameters']:,} parameters, {args.steps} steps, {WORLD_SIZE} ranks x {args.threads} "
          f"thread(s); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({os.cpu_count()} cores); "
          f"{record['total_seconds'] / 60:.1f} min in all")
    if loss_difference is not None:
        differing = ", ".join(f"{m} {d:.1e}" for m, d in loss_difference.items() if d) or "none"
        print(f"training-loss differences between the plain and the shaped loopback: {differing}")
    print("\n" + results + "\n\n" + targets)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
