"""Optimizers on the character GPT, same budget: steps and seconds to a target validation loss, final loss.

What it measures
    The character-level GPT of the DiLoCo benchmark (``examples.char_lm.CharGPT``, width
    ``--dim`` 128, ``--depth`` 4 blocks, 4 heads: 0.87 M parameters) on CPython's
    standard-library top-level modules (``examples.char_lm.StdlibText``, ``*.py``, windows of
    ``--seq-len`` 64 bytes, ``--batch-size`` 16 a step; the stream's last 5% validates), one
    process, ``--steps`` (250) optimizer steps for every method, from the same initialization
    and the same batches for a given seed, with seeds 0, 1, 2 (``--seeds``):

    * ``adamw``: :class:`~lightning_converge.optim.AdamW` (betas 0.9/0.95, weight decay 0.1),
      linear warm-up over 10% of the steps then cosine decay to 10% (``CharGPT``'s schedule);
      its learning rate is tuned first by a sweep over ``--sweep-lrs`` (1e-3, 2e-3, 4e-3,
      seed 0, the whole budget each; lowest final validation loss wins). The other methods
      take that tuned rate ``lr*``; nothing else is tuned.
    * ``schedule-free adamw``: ``ScheduleFreeAdamW`` at ``lr*`` (betas 0.9/0.95, weight decay
      0.1, warm-up over 10% of the steps, no schedule), evaluated at its average x
      (``optimizer.eval()`` around each validation). Optional: skipped, with a message, when
      ``lightning_converge.optim.ScheduleFreeAdamW`` cannot be imported.
    * ``muon``: :class:`~lightning_converge.optim.Muon` on the blocks' matrices (momentum 0.95,
      Nesterov, ``adjust_lr_fn="match_rms_adamw"``: Moonshot's scaling, under which AdamW's
      learning rate and weight decay carry over, so lr ``lr*`` and weight decay 0.1), AdamW
      (as ``adamw``) on the embeddings, the head and the norms and biases; warm-up + cosine.
    * ``adan``: :class:`~lightning_converge.optim.Adan` at ``lr*`` (its default betas 0.98/0.92/0.99,
      weight decay 0.1), warm-up + cosine.
    * ``ademamix``: :class:`~lightning_converge.optim.AdEMAMix` at ``lr*`` (betas 0.9/0.95/0.9999,
      alpha 5, alpha and beta3 warm-ups over the whole run as the paper recommends, weight
      decay 0.1), warm-up + cosine.

    Every ``--eval-every`` (30) steps and at the last step, the validation loss over the first
    ``--val-batches`` (16) validation batches (the same bytes for every method). The target
    is ``--target`` or, by default, the tuned AdamW's final validation loss (mean over seeds):
    "steps to target" is the first evaluated step at or below it, "seconds" the training
    seconds until then (evaluation excluded). Seconds come from one process with
    ``--threads`` (1) intra-op thread (two threads on this 2-core machine made every step 20-40x
    slower as soon as another process ran: timings would measure the neighbours); the load average is recorded with the results, since
    other jobs on the machine slow every method. Numbers are means over the seeds (with the
    standard deviation of the final loss); a method that misses the target in some seed is
    reported with how many seeds reached it.

How to run (from the repository root)
    python benchmarks/optimizers_lm.py           # about 10 minutes on 2 quiet cores
    python benchmarks/optimizers_lm.py --quick   # smoke run, under a minute

Writes ``benchmarks/results/optimizers_lm.json`` and ``optimizers_lm.png``
(``optimizers_lm_quick.*`` with ``--quick``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, quiet_trainer, result_paths  # noqa: E402
from _char_lm import validation_loss  # noqa: E402
from examples.char_lm import CharGPT, StdlibText  # noqa: E402
from lightning_converge import optim  # noqa: E402

WEIGHT_DECAY = 0.1
ADAMW_BETAS = (0.9, 0.95)


class ConstantLearningRateGPT(CharGPT):
    """``CharGPT`` without its learning-rate schedule: for Schedule-Free, which replaces it."""

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())


def schedule_free_adamw() -> Optional[type]:
    """``lightning_converge.optim.ScheduleFreeAdamW``, or None (with a message) where it is not there yet."""
    cls = getattr(optim, "ScheduleFreeAdamW", None)
    if cls is None:
        print("schedule-free adamw: skipped (lightning_converge.optim.ScheduleFreeAdamW cannot be imported)")
    return cls


def method_builders(args: argparse.Namespace) -> dict[str, Callable[[CharGPT, float], torch.optim.Optimizer]]:
    """Per method: (model, lr*) -> its optimizer over the model."""
    builders = {
        "adamw": lambda model, lr: optim.AdamW(
            model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY),
        "muon": lambda model, lr: optim.Muon(
            model, lr=lr, weight_decay=WEIGHT_DECAY, momentum=0.95, adjust_lr_fn="match_rms_adamw",
            adamw_lr=lr, adamw_betas=ADAMW_BETAS, adamw_weight_decay=WEIGHT_DECAY),
        "adan": lambda model, lr: optim.Adan(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY),
        "ademamix": lambda model, lr: optim.AdEMAMix(
            model.parameters(), lr=lr, betas=(*ADAMW_BETAS, 0.9999), alpha=5.0, alpha_warmup=args.steps,
            beta3_warmup=args.steps, weight_decay=WEIGHT_DECAY),
    }
    schedule_free = schedule_free_adamw()
    if schedule_free is not None:
        builders["schedule-free adamw"] = lambda model, lr: schedule_free(
            model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY,
            warmup_steps=max(1, args.steps // 10))
    return builders


class Evaluations(L.Callback):
    """Every ``every`` steps and at the last: the validation loss, and the training seconds so far.

    Fires at ``on_train_batch_end``; the evaluation's own time is left out of the seconds. An
    optimizer with ``eval()``/``train()`` (Schedule-Free) is evaluated at its average.
    """

    def __init__(self, data: StdlibText, every: int, batches: int, last_step: int) -> None:
        self.data, self.every, self.batches, self.last_step = data, every, batches, last_step
        self.steps: list[int] = []
        self.seconds: list[float] = []
        self.val_loss: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.training_seconds, self.resumed_at = 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != self.last_step:
            return
        self.training_seconds += time.perf_counter() - self.resumed_at
        optimizer = trainer.optimizers[0]
        averaged = callable(getattr(optimizer, "eval", None))
        if averaged:
            optimizer.eval()
        self.val_loss.append(validation_loss(pl_module, self.data, self.batches))
        pl_module.train()
        if averaged:
            optimizer.train()
        self.steps.append(step)
        self.seconds.append(self.training_seconds)
        self.resumed_at = time.perf_counter()


def train(method: str, build: Callable, lr: float, seed: int, args: argparse.Namespace) -> dict:
    L.seed_everything(seed, verbose=False)
    model_cls = ConstantLearningRateGPT if method == "schedule-free adamw" else CharGPT
    model = model_cls(dim=args.dim, depth=args.depth, heads=args.heads, seq_len=args.seq_len,
                      warmup_steps=max(1, args.steps // 10))
    model.optimizer_factory = lambda params: build(model, lr)  # Muon reads the module's structure
    data = StdlibText(seq_len=args.seq_len, batch_size=args.batch_size)  # its default: the top-level *.py
    data.setup("fit")
    evaluations = Evaluations(data, args.eval_every, args.val_batches, args.steps)
    trainer = quiet_trainer(max_steps=args.steps, limit_val_batches=0, callbacks=[evaluations])
    trainer.fit(model, data)
    return dict(method=method, lr=lr, seed=seed, steps=evaluations.steps, seconds=evaluations.seconds,
                val_loss=evaluations.val_loss, final_val_loss=evaluations.val_loss[-1])


def first_at_or_below(run: dict, target: float) -> tuple[Optional[int], Optional[float]]:
    """(step, training seconds) of the first evaluation at or below ``target``, or (None, None)."""
    for step, seconds, loss in zip(run["steps"], run["seconds"], run["val_loss"]):
        if loss <= target:
            return step, seconds
    return None, None


def summarize(runs: dict[str, list[dict]], target: float) -> dict[str, dict]:
    summary = {}
    for method, seeds in runs.items():
        finals = [run["final_val_loss"] for run in seeds]
        reached = [first_at_or_below(run, target) for run in seeds]
        reached = [(step, seconds) for step, seconds in reached if step is not None]
        summary[method] = dict(
            final_val_loss_mean=statistics.fmean(finals),
            final_val_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            seeds=len(seeds),
            seeds_at_target=len(reached),
            steps_to_target_mean=statistics.fmean(s for s, _ in reached) if reached else None,
            seconds_to_target_mean=statistics.fmean(t for _, t in reached) if reached else None,
            seconds_per_step=statistics.fmean(run["seconds"][-1] / run["steps"][-1] for run in seeds),
        )
    return summary


def results_table(summary: dict[str, dict], target: float) -> str:
    def cell(value, fmt, reached, seeds):
        if value is None:
            return "not reached"
        return f"{value:{fmt}}" + ("" if reached == seeds else f" ({reached}/{seeds} seeds)")

    rows = [
        [method, f"{s['final_val_loss_mean']:.4f} ± {s['final_val_loss_std']:.4f}",
         cell(s["steps_to_target_mean"], ".0f", s["seeds_at_target"], s["seeds"]),
         cell(s["seconds_to_target_mean"], ".1f", s["seeds_at_target"], s["seeds"]),
         f"{1e3 * s['seconds_per_step']:.0f}"]
        for method, s in summary.items()
    ]
    return markdown_table(["method", "final val loss (nats/char)", f"steps to {target:.4f}",
                           f"seconds to {target:.4f}", "ms / step"], rows)


def plot(runs: dict[str, list[dict]], target: float, path: Path) -> None:
    """Validation loss (mean over seeds) against steps and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_seconds) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for index, (method, seeds) in enumerate(runs.items()):
        mean_loss = [statistics.fmean(values) for values in zip(*(run["val_loss"] for run in seeds))]
        mean_seconds = [statistics.fmean(values) for values in zip(*(run["seconds"] for run in seeds))]
        style = dict(label=method, color=f"C{index}", marker=".")
        by_step.plot(seeds[0]["steps"], mean_loss, **style)
        by_seconds.plot(mean_seconds, mean_loss, **style)
    for ax, xlabel in ((by_step, "optimizer step"), (by_seconds, "training seconds (evaluation excluded)")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss, mean over seeds (nats/char)")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle("Character GPT on the standard library, same budget per optimizer (dotted: the target)")
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3],
                        help="AdamW's learning rates tried (seed 0); the best is every method's lr")
    parser.add_argument("--target", type=float, help="validation loss to reach (default: tuned AdamW's final)")
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (with 2 on 2 cores, any other load made steps 20-40x slower)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.sweep_lrs = 40, [0], [2e-3, 4e-3]
        args.eval_every, args.val_batches, args.dim, args.depth = 10, 4, 64, 2
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    builders = method_builders(args)
    started = time.perf_counter()
    sweep = {lr: train("adamw", builders["adamw"], lr, args.seeds[0], args) for lr in args.sweep_lrs}
    tuned_lr = min(sweep, key=lambda lr: sweep[lr]["final_val_loss"])
    print(markdown_table(["AdamW lr (seed %d)" % args.seeds[0], "final val loss"],
                         [[f"{lr:g}" + (" (chosen)" if lr == tuned_lr else ""), f"{run['final_val_loss']:.4f}"]
                          for lr, run in sweep.items()]))
    runs: dict[str, list[dict]] = {}
    for method, build in builders.items():
        runs[method] = [
            sweep[tuned_lr] if method == "adamw" and seed == args.seeds[0]
            else train(method, build, tuned_lr, seed, args)
            for seed in args.seeds
        ]
        print(f"{method}: final val loss {[round(run['final_val_loss'], 4) for run in runs[method]]}", flush=True)
    target = args.target if args.target is not None else statistics.fmean(r["final_val_loss"] for r in runs["adamw"])
    summary = summarize(runs, target)
    table = results_table(summary, target)
    print(f"\nlr* = {tuned_lr:g}; target validation loss {target:.4f}\n\n{table}")
    json_path, png_path = result_paths("optimizers_lm", args.quick)
    record = dict(config=vars(args), machine=machine(), wall_seconds=time.perf_counter() - started,
                  tuned_lr=tuned_lr, sweep={f"{lr:g}": run for lr, run in sweep.items()}, target=target,
                  summary=summary, table=table, runs=runs)
    json_path.write_text(json.dumps(record, indent=1))
    plot(runs, target, png_path)
    print(f"\nwrote {json_path} and {png_path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
