"""Grokking with and without Grokfast: the step where Grokfast reaches a validation accuracy, and
where the baseline is at that step.

The Grokfast paper's algorithmic-data experiment (x*y mod 97, half of the 9,312
pairs for training, batch 512, the 2-layer decoder, ``torch.optim.Adam`` lr 1e-3,
betas (0.9, 0.98), 10-step warm-up, coupled L2 weight decay as in the official code:
0 for the baseline, 0.005 with the EMA filter, 0.01 with the MA filter), run in one
process with the same seed and data for each method:

    python benchmarks/grokking.py             # the README's main job (make demo): Grokfast EMA, then
                                              # the baseline for as many steps; a few minutes on 2 cores
    python benchmarks/grokking.py --quick     # a 200-step smoke run
    python benchmarks/grokking.py --methods grokfast-ema grokfast-ma --baseline-steps 45000 --publish
                                              # the long baseline (about 45 minutes here)

The runs go side by side, one process each (one torch thread each: this model is
small, and on a shared CPU two threads ran 6x slower than one). Each Grokfast run
stops once it reaches the target (unless ``--run-past-target``), at most
``--max-steps``. The baseline runs ``--baseline-steps`` steps or, by default, until
it has passed the step where the last Grokfast run stopped, so the result reads "at
the step where Grokfast reached 95%, the baseline was at X%". Grokking takes the
baseline tens of thousands of steps; the summary quotes the longest baseline in the
published results (``benchmarks/results/grokking.json``) with the command that
produced it.

Outputs (``grokking.json``, ``grokking.png``) go to a new folder under ``runs/grokking/``
(``--out`` to choose), or to ``benchmarks/results/`` with ``--publish``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import platform
import queue as queue_module
import shlex
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.grokking import GrokkingTransformer, ModularArithmetic  # noqa: E402
from lightning_converge.callbacks import Grokfast  # noqa: E402

PUBLISHED = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "grokking"

# The progress lines and the summary are the output: keep Lightning's per-run banners and the data-loader advice out.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*")

METHODS = {
    "baseline": dict(weight_decay=0.0, grokfast=None),
    "grokfast-ema": dict(weight_decay=0.005, grokfast=dict(filter="ema", alpha=0.98, lamb=2.0)),
    "grokfast-ma": dict(weight_decay=0.01, grokfast=dict(filter="ma", window_size=100, lamb=5.0)),
}


class AccuracyCurve(L.Callback):
    """Records (step, seconds since fit start, validation accuracy) at each validation, prints a
    progress line every ``print_every`` steps, and stops at the target if asked, or (``stop_after``)
    once every entry of that shared array is set (>= 0) and the step has passed them all."""

    def __init__(
        self, name: str, max_steps: int, target: float, stop_at_target: bool, print_every: int, stop_after=None
    ) -> None:
        self.name, self.max_steps, self.target = name, max_steps, target
        self.stop_at_target, self.print_every, self.stop_after = stop_at_target, print_every, stop_after
        self.steps: list[int] = []
        self.seconds: list[float] = []
        self.accuracy: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        step, seconds = trainer.global_step, time.perf_counter() - self.start
        accuracy = float(trainer.callback_metrics["val_acc"])
        self.steps.append(step)
        self.seconds.append(seconds)
        self.accuracy.append(accuracy)
        reached = accuracy >= self.target and self.stop_at_target
        others_done = self.stop_after is not None and min(self.stop_after) >= 0 and step >= max(self.stop_after)
        if step % self.print_every == 0 or reached or others_done or step >= self.max_steps:
            print(f"  [{self.name}] step {step:>5}  val acc {accuracy:6.1%}  {seconds:5.0f} s", flush=True)
        if reached or others_done:
            trainer.should_stop = True

    def first_at_target(self) -> tuple[Optional[int], Optional[float]]:
        for step, seconds, accuracy in zip(self.steps, self.seconds, self.accuracy):
            if accuracy >= self.target:
                return step, seconds
        return None, None


def run(name: str, args: argparse.Namespace, stopped_at, results) -> None:
    """One process: train ``name`` from the seed's initialization and put its result in ``results``.

    A Grokfast run writes the step it stopped at into its entry of ``stopped_at``; the baseline
    (unless ``--baseline-steps``) stops once it has passed all of them.
    """
    torch.set_num_threads(args.threads)
    setting = METHODS[name]
    if name == "baseline":
        stop_at_target, max_steps = False, args.baseline_steps or args.max_steps
        stop_after = None if args.baseline_steps else stopped_at
        goal = f"{max_steps} steps" if args.baseline_steps else "until past the steps where the Grokfast runs stop"
    else:
        stop_at_target, max_steps, stop_after = not args.run_past_target, args.max_steps, None
        goal = f"until {args.target:.0%} validation accuracy, at most {max_steps} steps"
        if not stop_at_target:
            goal = f"{max_steps} steps"
    print(f"{name}: {goal}", flush=True)
    L.seed_everything(args.seed, verbose=False)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.98), weight_decay=setting["weight_decay"])
    model = GrokkingTransformer(p=args.p, optimizer=optimizer)
    curve = AccuracyCurve(name, max_steps, args.target, stop_at_target, args.print_every, stop_after)
    callbacks = [curve] + ([Grokfast(**setting["grokfast"])] if setting["grokfast"] else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ModularArithmetic(p=args.p, batch_size=512, seed=args.seed)
    trainer.fit(model, data)
    if curve.steps[-1:] != [trainer.global_step]:
        trainer.validate(model, data, verbose=False)  # the accuracy at the last step
    if name != "baseline":
        stopped_at[args.methods.index(name)] = trainer.global_step
    step, seconds = curve.first_at_target()
    results.put(dict(
        method=name,
        weight_decay=setting["weight_decay"],
        grokfast=setting["grokfast"],
        steps_to_target=step,
        seconds_to_target=seconds,
        steps_run=trainer.global_step,
        seconds_run=curve.seconds[-1],
        final_val_acc=curve.accuracy[-1],
        curve=dict(step=curve.steps, seconds=curve.seconds, val_acc=curve.accuracy),
    ))


def accuracy_at(result: dict, step: int) -> Optional[float]:
    """The run's validation accuracy at ``step``, or None if it did not validate there."""
    curve = result["curve"]
    return dict(zip(curve["step"], curve["val_acc"])).get(step)


def table(results: list[dict], target: float) -> str:
    baseline = next(r for r in results if r["method"] == "baseline")
    lines = [
        f"| method | steps to {target:.0%} val acc | seconds | baseline's val acc at that step "
        "| val acc at its last step |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["steps_to_target"] is None:
            steps, seconds, baseline_there = f"not within {r['steps_run']:,}", "-", "-"
        else:
            steps, seconds = f"{r['steps_to_target']:,}", f"{r['seconds_to_target']:.0f}"
            there = accuracy_at(baseline, r["steps_to_target"])
            baseline_there = "-" if r is baseline or there is None else f"{there:.1%}"
        lines.append(f"| {r['method']} | {steps} | {seconds} | {baseline_there} | {r['final_val_acc']:.1%} |")
    return "\n".join(lines)


def summary(results: list[dict], args: argparse.Namespace) -> str:
    """The effect in words: where each Grokfast run reached the target, where the baseline was then."""
    baseline = next(r for r in results if r["method"] == "baseline")
    chance = 1 / args.p
    lines = []
    for r in results:
        if r is baseline:
            continue
        if r["steps_to_target"] is None:
            lines.append(f"{r['method']} did not reach {args.target:.0%} within {r['steps_run']:,} steps "
                         f"(last: {r['final_val_acc']:.1%}).")
            continue
        step = r["steps_to_target"]
        there = accuracy_at(baseline, step)
        baseline_text = ("the baseline was not validated there" if there is None
                         else f"the baseline (same seed and data) is at {there:.1%} (chance: {chance:.1%})")
        lines.append(f"{r['method']} reached {args.target:.0%} validation accuracy at step {step:,} "
                     f"({r['seconds_to_target']:.0f} s); at that step {baseline_text}.")
    if baseline["steps_to_target"] is not None:
        lines.append(f"The baseline reached {args.target:.0%} at step {baseline['steps_to_target']:,}.")
    else:
        lines.append(f"The baseline had not reached {args.target:.0%} by step {baseline['steps_run']:,} "
                     f"({baseline['final_val_acc']:.1%}).")
    return "\n".join(lines)


def published_baseline(target: float) -> Optional[str]:
    """What the published results say about the baseline, with the command that produced them."""
    path = PUBLISHED / "grokking.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    baseline = next((r for r in record["results"] if r["method"] == "baseline"), None)
    if baseline is None:
        return None
    # Results written before the command was recorded: that version's only setting was --max-steps.
    command = record.get("command") or f"python benchmarks/grokking.py --max-steps {record['settings']['max_steps']}"
    if baseline["steps_to_target"] is None:
        outcome = f"had not reached {target:.0%} by step {baseline['steps_run']:,} ({baseline['final_val_acc']:.1%})"
    else:
        outcome = f"reached {target:.0%} at step {baseline['steps_to_target']:,}"
    return f"Longest published baseline ({path.relative_to(ROOT)}, from `{command}`): it {outcome}."


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in results:
        axes[0].plot(r["curve"]["step"], r["curve"]["val_acc"], label=r["method"])
        axes[1].plot(r["curve"]["seconds"], r["curve"]["val_acc"], label=r["method"])
    for ax, xlabel in zip(axes, ("optimizer step", "seconds (this CPU)")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("x*y mod 97: Grokfast against the baseline (same seed and data)")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grokfast_methods = [m for m in METHODS if m != "baseline"]
    parser.add_argument("--methods", nargs="+", default=["grokfast-ema"], choices=grokfast_methods,
                        help="the Grokfast runs; the baseline always runs beside them")
    parser.add_argument("--max-steps", type=int, default=3000, help="at most this many steps per Grokfast run")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="the baseline's steps (default: until past the steps where the Grokfast runs stopped)")
    parser.add_argument("--run-past-target", action="store_true", help="Grokfast runs go on past the target")
    parser.add_argument("--val-every", type=int, default=10, help="validate every this many steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run's process")
    parser.add_argument("--print-every", type=int, default=100, help="a progress line every this many steps")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a 200-step smoke run")
    parser.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (the README's figures)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: a new one under runs/grokking/)")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/grokking.py", *sys.argv[1:]])
    if args.quick:
        args.max_steps, args.val_every, args.print_every = 200, 20, 100
    if args.publish and (args.out is not None or args.quick):
        parser.error("--publish writes the README's figures to benchmarks/results/: not with --out or --quick")
    out = PUBLISHED if args.publish else args.out or RUNS / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    started = time.perf_counter()

    # One process a run, side by side ("fork": the children start without importing anything again).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    stopped_at = context.Array("i", [-1] * len(args.methods))
    queue = context.Queue()
    names = ["baseline", *args.methods]
    processes = [context.Process(target=run, args=(name, args, stopped_at, queue)) for name in names]
    for process in processes:
        process.start()
    by_name = {}
    while len(by_name) < len(names):
        try:
            result = queue.get(timeout=5)
            by_name[result["method"]] = result
        except queue_module.Empty:
            failed = [name for name, process in zip(names, processes) if process.exitcode]
            if failed:
                for process in processes:
                    process.kill()
                sys.exit(f"the {failed} run failed; see its output above")
    for process in processes:
        process.join()
    results = [by_name[name] for name in names]

    quoted = None if args.publish else published_baseline(args.target)
    text = "\n".join([summary(results, args), *([quoted] if quoted else [])])
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        command=command,
        settings=vars(args) | dict(out=str(out)),
        machine=dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads()),
        results=results,
        table=table(results, args.target),
        summary=text,
        total_seconds=time.perf_counter() - started,
    )
    (out / "grokking.json").write_text(json.dumps(record, indent=1, default=str))
    written = [out / "grokking.json"]
    try:
        plot(results, args.target, out / "grokking.png")
        written.append(out / "grokking.png")
    except ImportError:
        print("(matplotlib is not installed: no plot)")
    print("\n" + record["table"] + "\n\n" + text)
    shown = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written]
    print(f"\n{record['total_seconds']:.0f} s in all; wrote {', '.join(shown)}")


if __name__ == "__main__":
    main()
