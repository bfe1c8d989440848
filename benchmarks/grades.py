"""GradES on a real fine-tune: steps and seconds to the baseline's final validation loss.

A character-level GPT (``examples.char_lm.CharGPT``: 4 blocks, width 128, 0.9 M
parameters, 16 attention/FFN matrices) is first pretrained here on CPython's
standard-library top-level modules (``*.py``, 4.7 MB), then fine-tuned from that one
checkpoint on a package the pretraining never read (``asyncio/``, 0.5 MB; the last 5%
of its bytes validate) three times, with the same seed, batches and step budget:

* ``baseline``: plain AdamW fine-tuning (lr 5e-4, 10-step warm-up, cosine decay to 10%);
* ``grades-update``: with GradES on the statistic of the authors' package, the L1 norm of
  each matrix's weight change per step (``metric="update_l1"``);
* ``grades-grad``: with GradES on the paper's statistic, the L1 norm of each matrix's
  gradient (``metric="grad_l1"``).

GradES settings, as in the authors' package: a check every step (``every_n_steps=1``), no
freezing before 55% of the steps (``grace_period=0.55``, their README's alpha), and
training stops once every monitored matrix is frozen (``max_frozen_ratio=1``). The
statistics are divided by the matrix's size (``normalize=True``), so one ``tau`` means
the same for a 128x128 and a 128x512 matrix. No ``tau`` is known for a new model in
advance (the paper tunes it per model), so a rule fixed before the GradES runs sets it:
``tau = --tau-fraction`` (default 1/2) times the median over the matrices of the
statistic in the baseline run, averaged over the last 10% of the steps before the grace
period ends (the GradES runs are identical to the baseline up to there). A matrix thus
freezes once its statistic is half what a typical matrix showed when freezing became
allowed. The plot shows the baseline's per-matrix statistics divided by each tau.

Reported per run: training seconds (validation excluded) and steps to the baseline's
final validation loss, the final validation loss, the baseline's validation loss at
the step where the run stopped, and the frozen fraction over the steps. Wall-clock per
step before and after freezing is measured apart, after the runs: the pretrained model
takes training steps with no matrix frozen and with each run's final frozen set, the
settings taking turns step by step so that the shared CPU's drift hits them alike.
Timing noise is reported too: the seconds each run took for the first steps, which are
identical in every run. Validation runs every ``--val-every`` steps and when a run
stops. The script runs on ``--threads`` threads (default 1): with two OpenMP threads and
another busy process on this 2-core machine, steps were about 10x slower and erratic.

    python benchmarks/grades.py           # about 5 minutes on this CPU
    python benchmarks/grades.py --quick   # a smoke run of under a minute

Writes ``benchmarks/results/grades.json`` and ``grades.png`` (``grades_quick.*`` with
``--quick``), prints a markdown table, and leaves the pretrained checkpoint at
``--pretrained-checkpoint``, from which ``lightning-converge fit --config
configs/grades_finetune.yaml --model.init_args.init_checkpoint <that path>`` repeats the
``grades-update`` fine-tune.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet_trainer  # noqa: E402
from examples.char_lm import CharGPT, StdlibText  # noqa: E402
from lightning_converge.callbacks import GradES  # noqa: E402
from lightning_converge.callbacks.grades import DEFAULT_PATTERNS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRETRAIN_FILES = ("*.py",)  # the standard library's top-level modules
FINETUNE_FILES = ("asyncio/**/*.py",)  # a package the pretraining never read
MODEL = dict(dim=128, depth=4, heads=4, seq_len=128)
GRADES = dict(normalize=True, every_n_steps=1, grace_period=0.55, max_frozen_ratio=1.0, verbose=False)
VARIANTS = {"grades-update": "update_l1", "grades-grad": "grad_l1"}  # run name -> GradES metric
COLORS = {"baseline": "tab:blue", "grades-update": "tab:orange", "grades-grad": "tab:green"}


def adamw(lr: float) -> functools.partial:
    return functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def finetuning_data(batch_size: int) -> StdlibText:
    return StdlibText(FINETUNE_FILES, seq_len=MODEL["seq_len"], batch_size=batch_size, val_fraction=0.05)


def pretrained_model(args: argparse.Namespace) -> CharGPT:
    """The pretrained checkpoint, to fine-tune with lr ``args.lr`` after a 10-step warm-up."""
    return CharGPT(**MODEL, warmup_steps=10, optimizer=adamw(args.lr), init_checkpoint=str(args.pretrained_checkpoint))


def make_trainer(max_steps: int, val_every: int, callbacks: list[L.Callback]) -> L.Trainer:
    return quiet_trainer(max_steps=max_steps, val_check_interval=val_every, check_val_every_n_epoch=None,
                         callbacks=callbacks)


class TrainingRecord(L.Callback):
    """Per step: training seconds and GradES's frozen fraction; per validation: the loss.

    Place it last: its ``on_train_batch_end`` then runs after GradES's, so a step's time
    includes GradES's decision and the frozen fraction is the one after that step.
    """

    def __init__(self, grades: Optional[GradES] = None) -> None:
        self.grades = grades
        self.step_seconds: list[float] = []
        self.frozen_fraction: list[float] = []
        self.val_steps: list[int] = []
        self.val_seconds: list[float] = []  # training seconds so far, validation excluded
        self.val_loss: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self.batch_start)
        self.frozen_fraction.append(self.grades.frozen_fraction if self.grades else 0.0)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.global_step in self.val_steps:
            return
        self.val_steps.append(trainer.global_step)
        self.val_seconds.append(sum(self.step_seconds))
        self.val_loss.append(float(trainer.callback_metrics["val_loss"]))


class MatrixStatistics(L.Callback):
    """Every ``every`` steps, both GradES statistics of each monitored matrix, per element:
    the mean absolute gradient and the mean absolute weight change of that step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.stats: dict[str, dict[str, list[float]]] = {"grad_l1": {}, "update_l1": {}}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.matrices = {
            name: p for name, p in pl_module.named_parameters()
            if p.dim() == 2 and any(re.search(pattern, name) for pattern in DEFAULT_PATTERNS)
        }
        for per_matrix in self.stats.values():
            per_matrix.update({name: [] for name in self.matrices})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = None
        if trainer.global_step % self.every:
            return
        self.steps.append(trainer.global_step)
        for name, p in self.matrices.items():
            self.stats["grad_l1"][name].append(p.grad.abs().mean().item())
        self.before = {name: p.detach().clone() for name, p in self.matrices.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is None:
            return
        for name, p in self.matrices.items():
            self.stats["update_l1"][name].append((p.detach() - self.before[name]).abs().mean().item())

    def calibrate_tau(self, metric: str, grace_step: int, window: int, fraction: float) -> float:
        """``fraction`` times the median over matrices of each one's mean statistic over the
        recorded steps in ``[grace_step - window, grace_step)``."""
        in_window = [i for i, step in enumerate(self.steps) if grace_step - window <= step < grace_step]
        if not in_window:
            raise ValueError(f"no recorded step in [{grace_step - window}, {grace_step}): lower --stats-every")
        means = [statistics.fmean(values[i] for i in in_window) for values in self.stats[metric].values()]
        return fraction * statistics.median(means)


def pretrain(args: argparse.Namespace) -> dict:
    L.seed_everything(args.seed, verbose=False)
    model = CharGPT(**MODEL, warmup_steps=20, optimizer=adamw(args.pretrain_lr))
    data = StdlibText(PRETRAIN_FILES, seq_len=MODEL["seq_len"], batch_size=args.batch_size, val_fraction=0.02)
    record = TrainingRecord()
    trainer = make_trainer(args.pretrain_steps, args.pretrain_steps, [record])
    trainer.fit(model, data)
    args.pretrained_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(args.pretrained_checkpoint, weights_only=True)
    result = dict(
        files=list(PRETRAIN_FILES),
        bytes=sum(path.stat().st_size for path in data.files),
        parameters=sum(p.numel() for p in model.parameters()),
        steps=trainer.global_step,
        train_seconds=sum(record.step_seconds),
        val_loss=record.val_loss[-1],
    )
    print(f"pretrained {result['parameters']:,} parameters on {result['bytes']:,} bytes: {result['steps']} steps, "
          f"{result['train_seconds']:.0f} s, val loss {result['val_loss']:.3f}", flush=True)
    return result


def finetune(name: str, args: argparse.Namespace, grades: Optional[GradES] = None,
             matrix_statistics: Optional[MatrixStatistics] = None) -> dict:
    L.seed_everything(args.seed, verbose=False)
    model = pretrained_model(args)
    data = finetuning_data(args.batch_size)
    record = TrainingRecord(grades)
    callbacks = [c for c in (grades, matrix_statistics) if c is not None] + [record]
    trainer = make_trainer(args.max_steps, args.val_every, callbacks)
    trainer.fit(model, data)
    if not record.val_steps or record.val_steps[-1] != trainer.global_step:  # stopped between two validations
        trainer.validate(model, data, verbose=False)
    result = dict(
        method=name,
        metric=grades.metric if grades else None,
        tau=grades.tau(0) if grades else None,
        steps_run=trainer.global_step,
        train_seconds=sum(record.step_seconds),
        final_val_loss=record.val_loss[-1],
        frozen_at=dict(grades.frozen_at) if grades else {},
        curve=dict(step=record.val_steps, train_seconds=record.val_seconds, val_loss=record.val_loss),
        step_seconds=record.step_seconds,
        frozen_fraction=record.frozen_fraction,
    )
    print(f"{name:>13}: {result['steps_run']} steps, {result['train_seconds']:.0f} s, "
          f"final val loss {result['final_val_loss']:.4f}" + (f"\n{grades.summary()}" if grades else ""), flush=True)
    return result


def first_at_or_below(curve: dict, target: float) -> tuple[Optional[int], Optional[float]]:
    """The first validated step (and training seconds) whose loss is at or below ``target``."""
    for step, seconds, loss in zip(curve["step"], curve["train_seconds"], curve["val_loss"]):
        if loss <= target:
            return step, seconds
    return None, None


def step_cost(args: argparse.Namespace, frozen_sets: dict[str, list[str]], repeats: int) -> dict[str, float]:
    """Median milliseconds of one training step (forward, backward, AdamW step) of the pretrained
    model on fine-tuning batches with each named set of matrices frozen as GradES freezes them
    (``requires_grad=False``, so no weight gradient and no optimizer work). The settings take
    turns step by step, so the shared CPU's drift hits them alike."""
    data = finetuning_data(args.batch_size)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    settings = {}
    for name, frozen in frozen_sets.items():
        model = pretrained_model(args)
        parameters = dict(model.named_parameters())
        for matrix in frozen:
            parameters[matrix].requires_grad_(False)
        settings[name] = (model, adamw(args.lr)(model.parameters()))  # frozen: no gradient, skipped
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        batch = next(batches)
        for name, (model, optimizer) in settings.items():
            start = time.perf_counter()
            model.loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


def baseline_loss_at(baseline: dict, step: int) -> Optional[float]:
    """The baseline's validation loss at ``step``, interpolated linearly between its validations
    (None outside them)."""
    steps, losses = baseline["curve"]["step"], baseline["curve"]["val_loss"]
    for (step_0, loss_0), (step_1, loss_1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if step_0 <= step <= step_1:
            return loss_0 + (loss_1 - loss_0) * (step - step_0) / (step_1 - step_0)
    return losses[-1] if step == steps[-1] else None


def table(results: list[dict], target: float, cost_ms: dict[str, float]) -> str:
    baseline = results[0]
    lines = [
        f"| run | tau | steps run | training s | final val loss | baseline's val loss at that step "
        f"| steps (s) to {target:.4f} | matrices frozen (at steps) | ms/step: none frozen -> this run's frozen set |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reached = (f"{r['steps_to_target']} ({r['seconds_to_target']:.0f})" if r["steps_to_target"] is not None
                   else "not reached")
        at_stop = baseline_loss_at(baseline, r["steps_run"])
        if r["frozen_at"]:
            first, last = min(r["frozen_at"].values()), max(r["frozen_at"].values())
            frozen = f"{len(r['frozen_at'])}/{r['monitored']} ({first}" + (f"-{last})" if last > first else ")")
            none, this = cost_ms["none"], cost_ms[r["method"]]
            cost = f"{none:.0f} -> {this:.0f} ({this / none - 1:+.0%})"
        else:
            frozen = "-" if r["tau"] is None else f"0/{r['monitored']}"
            cost = "-"
        tau = "-" if r["tau"] is None else f"{r['tau']:.2e}"
        lines.append(
            f"| {r['method']} | {tau} | {r['steps_run']} | {r['train_seconds']:.0f} | {r['final_val_loss']:.4f} "
            f"| {'-' if at_stop is None else format(at_stop, '.4f')} | {reached} | {frozen} | {cost} |"
        )
    return "\n".join(lines)


def timing_noise(results: list[dict]) -> dict:
    """The training seconds each run took for the steps before any run froze a matrix: the runs
    are identical there, so any difference is the shared CPU's noise."""
    first_freezes = [min(r["frozen_at"].values()) for r in results if r["frozen_at"]]
    shared = min(first_freezes + [r["steps_run"] for r in results])
    return dict(steps=shared, seconds={r["method"]: sum(r["step_seconds"][:shared]) for r in results})


def plot(results: list[dict], matrix_stats: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (loss_steps, loss_seconds), (frozen, stats) = axes
    for r in results:
        curve = r["curve"]
        style = dict(label=r["method"], color=COLORS[r["method"]])
        loss_steps.plot(curve["step"], curve["val_loss"], **style)
        loss_seconds.plot(curve["train_seconds"], curve["val_loss"], **style)
        if r["tau"] is not None:
            frozen.plot(range(1, len(r["frozen_fraction"]) + 1), r["frozen_fraction"], **style)
    for ax, xlabel in ((loss_steps, "optimizer step"), (loss_seconds, "training seconds (this shared CPU)")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="baseline's final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats per character)")
        ax.grid(alpha=0.3)
    loss_steps.legend()
    frozen.set_xlabel("optimizer step")
    frozen.set_ylabel("GradES frozen fraction")
    frozen.set_xlim(0, results[0]["steps_run"])
    frozen.set_ylim(-0.02, 1.02)
    frozen.grid(alpha=0.3)
    frozen.legend()
    for r in results[1:]:
        color = COLORS[r["method"]]
        for values in matrix_stats["stats"][r["metric"]].values():
            stats.plot(matrix_stats["steps"], [v / r["tau"] for v in values], color=color, alpha=0.4, linewidth=0.8)
        stats.plot([], [], color=color, label=f"{r['metric']} / tau, each matrix (baseline run)")
    stats.axhline(1.0, color="black", linewidth=1)
    stats.axvline(matrix_stats["grace_step"], color="grey", linestyle=":", linewidth=1, label="grace period ends")
    stats.set_yscale("log")
    stats.set_xlabel("optimizer step")
    stats.set_ylabel("statistic / tau (below 1: frozen)")
    stats.grid(alpha=0.3)
    stats.legend()
    fig.suptitle("Fine-tuning a stdlib-pretrained character GPT on asyncio/: GradES against the baseline")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=300, help="fine-tuning budget of every run")
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--stats-every", type=int, default=5, help="record the baseline's matrix statistics")
    parser.add_argument("--tau-fraction", type=float, default=0.5,
                        help="tau = this times the typical matrix statistic as the grace period ends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-repeats", type=int, default=15, help="interleaved steps per frozen set")
    parser.add_argument("--pretrained-checkpoint", type=Path, default=Path("lightning_logs/grades/pretrained.ckpt"))
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.max_steps, args.val_every, args.stats_every, args.cost_repeats = 20, 20, 10, 2, 3
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    pretrained = pretrain(args)
    matrix_statistics = MatrixStatistics(args.stats_every)
    baseline = finetune("baseline", args, matrix_statistics=matrix_statistics)
    grace_step = math.ceil(GRADES["grace_period"] * args.max_steps)  # as GradES counts it
    window = max(1, args.max_steps // 10)
    results = [baseline]
    for name, metric in VARIANTS.items():
        tau = matrix_statistics.calibrate_tau(metric, grace_step, window, args.tau_fraction)
        results.append(finetune(name, args, grades=GradES(tau, metric=metric, **GRADES)))

    target = baseline["final_val_loss"]
    monitored = len(matrix_statistics.matrices)
    for r in results:
        r["steps_to_target"], r["seconds_to_target"] = first_at_or_below(r["curve"], target)
        r["monitored"] = monitored
    frozen_sets = {"none": []} | {r["method"]: list(r["frozen_at"]) for r in results if r["frozen_at"]}
    cost_ms = step_cost(args, frozen_sets, args.cost_repeats)
    noise = timing_noise(results)
    summary = table(results, target, cost_ms)
    matrix_stats = dict(steps=matrix_statistics.steps, grace_step=grace_step, stats=matrix_statistics.stats)
    record = dict(
        settings={**vars(args), "pretrained_checkpoint": str(args.pretrained_checkpoint)},
        model=MODEL,
        grades=GRADES,
        finetune_files=list(FINETUNE_FILES),
        machine=dict(machine(), load_average_before=load_before, load_average_after=os.getloadavg()),
        total_seconds=time.perf_counter() - started,
        pretraining=pretrained,
        target_val_loss=target,
        results=results,
        step_cost_ms=dict(frozen_sets=frozen_sets, median_ms=cost_ms, repeats=args.cost_repeats),
        timing_noise=noise,
        baseline_matrix_statistics=matrix_stats,
        table=summary,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "grades_quick" if args.quick else "grades"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))
    plot(results, matrix_stats, target, RESULTS / f"{name}.png")
    print("\n" + summary)
    print(f"\nTiming noise: the first {noise['steps']} steps, identical in every run, took "
          + ", ".join(f"{seconds:.1f} s ({method})" for method, seconds in noise["seconds"].items()))
    print(f"\n{record['total_seconds']:.0f} s in all; load average {load_before[0]:.1f} before, "
          f"{record['machine']['load_average_after'][0]:.1f} after, on {os.cpu_count()} CPUs")
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}; "
          f"pretrained checkpoint: {args.pretrained_checkpoint}")


if __name__ == "__main__":
    main()
