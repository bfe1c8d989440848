"""Grokking with and without Grokfast: steps and seconds to a validation accuracy.

The Grokfast paper's algorithmic-data experiment (x*y mod 97, half of the 9,312
pairs for training, batch 512, the 2-layer decoder, ``torch.optim.Adam`` lr 1e-3,
betas (0.9, 0.98), 10-step warm-up, coupled L2 weight decay as in the official code:
0 for the baseline, 0.005 with the EMA filter, 0.01 with the MA filter), run in one
process with the same seed for each method:

    python benchmarks/grokking.py                  # README's main job: 1,500 steps each
    python benchmarks/grokking.py --max-steps 45000 --run-past-target   # the long baseline

Each Grokfast run stops once it reaches the target (unless ``--run-past-target``);
the baseline always runs the whole budget. Writes
``benchmarks/results/grokking.json`` and ``grokking.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.grokking import GrokkingTransformer, ModularArithmetic  # noqa: E402
from lightning_converge.callbacks import Grokfast  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The table is the output: keep Lightning's per-run banners and the data-loader advice out of it.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*")

METHODS = {
    "baseline": dict(weight_decay=0.0, grokfast=None),
    "grokfast-ema": dict(weight_decay=0.005, grokfast=dict(filter="ema", alpha=0.98, lamb=2.0)),
    "grokfast-ma": dict(weight_decay=0.01, grokfast=dict(filter="ma", window_size=100, lamb=5.0)),
}


class AccuracyCurve(L.Callback):
    """Records (step, seconds since fit start, validation accuracy); stops at the target if asked."""

    def __init__(self, target: float, stop_at_target: bool) -> None:
        self.target, self.stop_at_target = target, stop_at_target
        self.steps: list[int] = []
        self.seconds: list[float] = []
        self.accuracy: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.steps.append(trainer.global_step)
        self.seconds.append(time.perf_counter() - self.start)
        self.accuracy.append(float(trainer.callback_metrics["val_acc"]))
        if self.stop_at_target and self.accuracy[-1] >= self.target:
            trainer.should_stop = True

    def first_at_target(self) -> tuple[int | None, float | None]:
        for step, seconds, accuracy in zip(self.steps, self.seconds, self.accuracy):
            if accuracy >= self.target:
                return step, seconds
        return None, None


def run(name: str, args: argparse.Namespace) -> dict:
    setting = METHODS[name]
    L.seed_everything(args.seed, verbose=False)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.98), weight_decay=setting["weight_decay"])
    model = GrokkingTransformer(p=args.p, optimizer=optimizer)
    curve = AccuracyCurve(args.target, stop_at_target=name != "baseline" and not args.run_past_target)
    callbacks = [curve] + ([Grokfast(**setting["grokfast"])] if setting["grokfast"] else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ModularArithmetic(p=args.p, batch_size=512, seed=args.seed))
    step, seconds = curve.first_at_target()
    result = dict(
        method=name,
        weight_decay=setting["weight_decay"],
        grokfast=setting["grokfast"],
        steps_to_target=step,
        seconds_to_target=seconds,
        steps_run=trainer.global_step,
        final_val_acc=curve.accuracy[-1],
        curve=dict(step=curve.steps, seconds=curve.seconds, val_acc=curve.accuracy),
    )
    reached = f"step {step} ({seconds:.0f} s)" if step is not None else "not reached"
    print(f"{name:>13}: {args.target:.0%} validation accuracy at {reached}; "
          f"{trainer.global_step} steps, final {curve.accuracy[-1]:.3f}", flush=True)
    return result


def table(results: list[dict], target: float, max_steps: int) -> str:
    baseline = results[0]
    lines = [
        f"| method | steps to {target:.0%} val acc | seconds | speed-up in steps | final val acc |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["steps_to_target"] is None:
            steps, seconds, speedup = f"not within {r['steps_run']}", "-", "-"
        else:
            steps, seconds = str(r["steps_to_target"]), f"{r['seconds_to_target']:.0f}"
            base_steps = baseline["steps_to_target"]
            speedup = (f"{base_steps / r['steps_to_target']:.1f}x" if base_steps
                       else f"> {max_steps / r['steps_to_target']:.1f}x")
            if r is baseline:
                speedup = "1x"
        lines.append(f"| {r['method']} | {steps} | {seconds} | {speedup} | {r['final_val_acc']:.3f} |")
    return "\n".join(lines)


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
    fig.suptitle("x*y mod 97: Grokfast against the baseline (same seed, same budget)")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--p", type=int, default=97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--run-past-target", action="store_true", help="run every method the whole budget")
    parser.add_argument("--quick", action="store_true", help="a 200-step smoke run")
    args = parser.parse_args()
    if args.quick:
        args.max_steps, args.val_every = 200, 20
    torch.set_num_threads(torch.get_num_threads())

    results = [run(name, args) for name in args.methods]
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = table(results, args.target, args.max_steps)
    record = dict(
        settings=vars(args),
        machine=dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads()),
        results=results,
        table=summary,
    )
    (RESULTS / "grokking.json").write_text(json.dumps(record, indent=1))
    plot(results, args.target, RESULTS / "grokking.png")
    print("\n" + summary)
    print(f"\nwrote {RESULTS / 'grokking.json'} and {RESULTS / 'grokking.png'}")


if __name__ == "__main__":
    main()
