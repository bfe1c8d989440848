"""Weight averaging (EMA, Switch-EMA, LAWA): epochs to converge on the digits, and the time an update adds to a step.

What it measures, in one run
    Convergence. The digits classifier (``examples/digits.py``: an MLP, SGD
        lr 0.05 momentum 0.9, batch 32, about 40 steps an epoch) trained plain,
        with ``EMA(decay=0.98)``, with Switch-EMA (the same EMA with
        ``switch_every_epoch=True``) and with ``LAWA(k=6, every_n_epochs=1)``,
        validating with the averaged weights after every epoch. Every method runs
        with the same seeds (initialization and batch order); the split is fixed.
        Reported: the epochs each needs to reach the plain run's best validation
        accuracy (that seed's), and the curves.
    Agreement. Our EMA, Lightning's ``EMAWeightAveraging`` and
        ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn)``
        updated from a callback, all with decay 0.98 and the same seed, should
        compute the same average. AveragedModel starts from the weights after the
        first optimizer step; our EMA does with ``start_step=1``. Reported: the
        largest weight difference and the validation numbers of each average.
    Overhead. A stack of Linear layers (about 25 M fp32 parameters in 48
        tensors) trained by plain SGD on a batch of 8 random vectors, inside a
        real ``Trainer.fit``, once without averaging and once with each of:
        ours EMA (compiled ``ema_update`` backend) and LAWA; Lightning's
        ``EMAWeightAveraging`` and ``StochasticWeightAveraging``; and
        AveragedModel EMA from a callback. A timer callback records the start of
        every training batch; the time from one start to the next is one loop
        iteration (forward, backward, optimizer step and every callback hook).
        Each fit runs 4 short epochs; the first is warm-up and is not timed.
        Methods that update every step are charged the median iteration time
        within epochs minus the no-averaging run's; methods that update once an
        epoch (LAWA's snapshot, SWA's running mean) are charged the median time
        of the iterations that cross an epoch boundary minus the baseline's.
        Fits of all methods alternate in rounds, in an order shuffled every
        round, so that load from other processes on this shared machine falls
        on all of them alike. In the same rounds: the ``ema_update`` kernel alone
        on copies of the model's tensors (no Trainer), and a copy and an in-place add over 256 MB
        (:class:`~_common.StreamingRoofline`), whose faster GB/s is the roofline.
        Bytes an update must move per fp32 parameter: EMA and SWA's mean 12 (read
        the average, read the weights, write the average), a LAWA snapshot 8
        (read the weights, write the snapshot); achieved GB/s = those bytes / time added.

    Post-hoc EMA. One class-conditional flow-matching model of the guidance
        benchmark (``DigitsFlowMatching``, AdamW lr 1e-3, batch 128, ``--flow-steps``
        steps) trained once with two callbacks: the guidance benchmark's fixed EMA
        (``EMAWarmup(power=0.75, max_decay=0.999)``) and
        ``PostHocEMA(sigma_rels=(0.05, 0.10), every_n_steps=--snapshot-every)``.
        After training, the EMA of every ``sigma_rel`` of a sweep is reconstructed
        from the snapshots; each is (a) validated (``PostHocEMA.evaluate``, the flow's
        ``val_loss``: what picks ``sigma_rel`` without sampling) and (b) sampled
        without guidance (``--per-class`` samples per class, 32 Euler steps, the same
        noise for every row) and scored by the guidance benchmark's SW2 against the
        real training digits (all classes pooled, and the per-class mean). Rows for
        the live weights and the fixed EMA come from the same run and noise; the
        two tracked profiles are reported both as tracked and as reconstructed
        (how close the least-squares reconstruction gets at a known answer).
        Reported: the table, the sigma_rel val_loss picks and its SW2 against the
        fixed EMA's.

    Threads: one intra-op thread by default (``--threads``). On this shared
    2-core machine, with other jobs running, two threads mostly wait for each
    other: the digits classifier took 1.6 ms a step with one thread and 50-64 ms
    with two; a 3 M parameter EMA step 41 ms against 307 ms.

How to run (from the repository root)
    python benchmarks/averaging.py            # all three parts: 3-5 minutes here (load average 3-9)
    python benchmarks/averaging.py --quick    # smoke run, about 30 s: 1 seed, 6 epochs, 2 M parameters
                                              # (its numbers only show that the code runs)
    python benchmarks/averaging.py --part overhead --rounds 12
    python benchmarks/averaging.py --part posthoc      # post-hoc EMA only: about 2-3 minutes on 2 quiet cores

Writes benchmarks/results/averaging.json (every number, the curves and the
machine; ``--part`` replaces that part only, keeping the other's results) and averaging.png (validation curves; time added per update), and
prints markdown tables. ``--quick`` writes averaging_quick.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    LoopTimer,
    StreamingRoofline,
    ValidationCurve,
    fit_classifier,
    machine,
    markdown_table,
    quiet_trainer,
    result_paths,
)
from examples.digits import NUM_CLASSES, NUM_PIXELS, Digits, DigitsFlowMatching  # noqa: E402
from guidance import SlicedWasserstein  # noqa: E402
from lightning_converge.callbacks import EMA, LAWA, PostHocEMA  # noqa: E402
from lightning_converge.kernels import ema_update, scalar  # noqa: E402
from lightning_converge.schedules import EMAWarmup  # noqa: E402

CLASSIFIER_EMA_DECAY = 0.98  # a horizon of 1 / (1 - 0.98) = 50 steps, about 1.25 epochs of the digits
LAWA_K = 6
OVERHEAD_EMA_DECAY = 0.999
OVERHEAD_LR = 1e-4
OVERHEAD_BATCH = 8
OVERHEAD_EPOCHS = 4  # per fit; the first is warm-up
POSTHOC_TRACKED = (0.05, 0.10)  # the paper's two profiles
POSTHOC_SWEEP = (0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25, 0.30)

CONVERGENCE_METHODS: dict[str, Callable[[], list[L.Callback]]] = {
    "plain": lambda: [],
    "EMA": lambda: [EMA(decay=CLASSIFIER_EMA_DECAY)],
    "Switch-EMA": lambda: [EMA(decay=CLASSIFIER_EMA_DECAY, switch_every_epoch=True)],
    "LAWA": lambda: [LAWA(k=LAWA_K, every_n_epochs=1)],
}


class AveragedModelEMA(L.Callback):
    """``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``, updated after every
    optimizer step. Its first update copies the weights. It evaluates nothing: ``averaged.module`` holds the average."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.averaged: Optional[AveragedModel] = None
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.averaged = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(self.decay))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step != self._last_step:
            self.averaged.update_parameters(pl_module)
            self._last_step = trainer.global_step


# -- convergence ---------------------------------------------------------------------------


def first_epoch_at(accuracy: list[float], target: float) -> Optional[int]:
    """The first epoch (1-based) whose validation accuracy reaches ``target``, or None."""
    return next((epoch for epoch, value in enumerate(accuracy, start=1) if value >= target), None)


def run_convergence(args: argparse.Namespace, datamodule: Digits) -> dict:
    curves: dict[str, dict[int, list[float]]] = {method: {} for method in CONVERGENCE_METHODS}
    for seed in args.seeds:
        for method, callbacks in CONVERGENCE_METHODS.items():
            curve = ValidationCurve("val_acc")
            start = time.perf_counter()
            fit_classifier(datamodule, epochs=args.epochs, seed=seed, callbacks=[curve, *callbacks()])
            curves[method][seed] = curve.values["val_acc"]
            print(f"  seed {seed} {method:>10}: best val acc {max(curves[method][seed]):.4f} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    rows = {}
    for method in CONVERGENCE_METHODS:
        epochs_to_target = {
            seed: first_epoch_at(curves[method][seed], max(curves["plain"][seed])) for seed in args.seeds
        }
        reached = [epochs for epochs in epochs_to_target.values() if epochs is not None]
        rows[method] = dict(
            epochs_to_plain_best=epochs_to_target,
            median_epochs_to_plain_best=statistics.median(reached) if len(reached) == len(args.seeds) else None,
            seeds_reaching_plain_best=len(reached),
            mean_best_val_acc=statistics.mean(max(curve) for curve in curves[method].values()),
            mean_final_val_acc=statistics.mean(curve[-1] for curve in curves[method].values()),
            val_acc_per_epoch=curves[method],
        )
    return dict(plain_best_val_acc={seed: max(curves["plain"][seed]) for seed in args.seeds}, methods=rows)


def convergence_table(convergence: dict) -> str:
    seeds = list(convergence["plain_best_val_acc"])  # ints, or their strings once read back from the JSON
    header = ["method", *[f"seed {seed}" for seed in seeds], "median", "mean best val acc", "mean final val acc"]
    rows = []
    for method, row in convergence["methods"].items():
        per_seed = [row["epochs_to_plain_best"][seed] or f"> {len(row['val_acc_per_epoch'][seed])}" for seed in seeds]
        median = row["median_epochs_to_plain_best"]
        rows.append([method, *per_seed, "-" if median is None else f"{median:g}",
                     f"{row['mean_best_val_acc']:.4f}", f"{row['mean_final_val_acc']:.4f}"])
    targets = ", ".join(f"{value:.4f}" for value in convergence["plain_best_val_acc"].values())
    return f"Epochs to reach the plain run's best validation accuracy (per seed: {targets})\n\n" + markdown_table(
        header, rows
    )


# -- agreement -----------------------------------------------------------------------------


@torch.no_grad()
def validation_numbers(model: nn.Module, datamodule: Digits) -> dict[str, float]:
    images, labels = datamodule.val_set.tensors
    logits = model(images)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return dict(val_loss=F.cross_entropy(logits, labels).item(), val_acc=accuracy.item())


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def run_agreement(args: argparse.Namespace, datamodule: Digits) -> dict:
    ours = EMA(decay=CLASSIFIER_EMA_DECAY, start_step=1)
    lightning_ema = EMAWeightAveraging(decay=CLASSIFIER_EMA_DECAY)
    torch_ema = AveragedModelEMA(CLASSIFIER_EMA_DECAY)
    averages, curves = {}, {}
    for name, callback in (("ours EMA", ours), ("Lightning EMAWeightAveraging", lightning_ema),
                           ("torch AveragedModel EMA", torch_ema)):
        curve = ValidationCurve("val_acc", "val_loss")
        model, _ = fit_classifier(datamodule, epochs=args.agreement_epochs, seed=args.seeds[0],
                                  callbacks=[curve, callback])
        if callback is torch_ema:  # it keeps the average to itself; its run validated the live weights
            averages[name] = torch_ema.averaged.module
        else:  # ours and Lightning's validate with the average and copy it into the model when training ends
            averages[name], curves[name] = model, curve.values
    reference = averages["ours EMA"]
    ours_loss, lightning_loss = curves["ours EMA"]["val_loss"], curves["Lightning EMAWeightAveraging"]["val_loss"]
    return dict(
        decay=CLASSIFIER_EMA_DECAY,
        epochs=args.agreement_epochs,
        rows={
            name: dict(
                max_abs_weight_diff_vs_ours=max_difference(average, reference),
                final_average=validation_numbers(average, datamodule),
                validated_with_average_per_epoch=curves.get(name),
            )
            for name, average in averages.items()
        },
        max_abs_val_loss_diff_per_epoch_lightning_vs_ours=max(abs(a - b) for a, b in zip(ours_loss, lightning_loss)),
    )


def agreement_table(agreement: dict) -> str:
    rows = [
        [name, f"{row['max_abs_weight_diff_vs_ours']:.2e}" if name != "ours EMA" else "(reference)", f"{row['final_average']['val_loss']:.6f}",
         f"{row['final_average']['val_acc']:.4f}"]
        for name, row in agreement["rows"].items()
    ]
    title = (f"Same average? EMA decay {agreement['decay']}, {agreement['epochs']} epochs, same seed; "
             f"per-epoch validation loss, Lightning's vs ours: max |diff| "
             f"{agreement['max_abs_val_loss_diff_per_epoch_lightning_vs_ours']:.2e}")
    return title + "\n\n" + markdown_table(
        ["average", "max abs weight diff vs ours", "val loss of the average", "val acc of the average"], rows
    )


# -- overhead ------------------------------------------------------------------------------


class LinearStack(L.LightningModule):
    """``layers`` square ``Linear(width, width)`` layers in a chain; the loss is the mean square of the output."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.layers(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=OVERHEAD_LR)


@dataclass
class OverheadMethod:
    callbacks: Callable[[], list[L.Callback]]
    updates: str  # "step": after every optimizer step; "epoch": once an epoch; "": no averaging
    bytes_per_param: int


OVERHEAD_METHODS = {
    "no averaging": OverheadMethod(lambda: [], "", 0),
    "ours EMA (compiled)": OverheadMethod(lambda: [EMA(decay=OVERHEAD_EMA_DECAY, backend="compiled")], "step", 12),
    "Lightning EMAWeightAveraging": OverheadMethod(lambda: [EMAWeightAveraging(decay=OVERHEAD_EMA_DECAY)], "step", 12),
    "torch AveragedModel EMA (callback)": OverheadMethod(lambda: [AveragedModelEMA(OVERHEAD_EMA_DECAY)], "step", 12),
    "ours LAWA (snapshot per epoch)": OverheadMethod(lambda: [LAWA(k=LAWA_K, every_n_epochs=1)], "epoch", 8),
    "Lightning StochasticWeightAveraging": OverheadMethod(
        # swa_lrs equal to the training lr: SWA's LR schedule changes nothing.
        lambda: [StochasticWeightAveraging(swa_lrs=OVERHEAD_LR, swa_epoch_start=1, annealing_epochs=1)], "epoch", 12
    ),
}
BASELINE = "no averaging"


def fit_for_timing(model: LinearStack, loader: DataLoader, method: OverheadMethod, epochs: int) -> LoopTimer:
    timer = LoopTimer()
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[timer, *method.callbacks()])
    trainer.fit(model, loader)
    return timer


class EMAKernelAlone:
    """Our fused ``ema_update`` (compiled) on copies of the model's tensors, outside any Trainer: the time
    an EMA update needs, against which the callbacks' added time shows their overhead."""

    def __init__(self, model: nn.Module) -> None:
        self.averages = [p.detach().clone() for p in model.parameters()]
        self.weights = [p.detach().clone() for p in model.parameters()]
        self.decay = scalar(OVERHEAD_EMA_DECAY, torch.device("cpu"))
        self.seconds: list[float] = []
        self._update()  # compiles, before anything is timed

    def _update(self) -> None:
        ema_update(self.averages, self.weights, decay=self.decay, backend="compiled")

    def measure(self, repeats: int) -> None:
        for _ in range(repeats):
            start = time.perf_counter()
            self._update()
            self.seconds.append(time.perf_counter() - start)


def time_fits_in_rounds(
    args: argparse.Namespace, model: LinearStack, kernels: list[StreamingRoofline | EMAKernelAlone]
) -> dict[str, dict[str, list[float]]]:
    """Warm-up fits, then ``args.rounds`` rounds of one timed fit per method and a ``measure`` of each
    kernel, in an order shuffled every round. Returns each method's iteration seconds within / across epochs."""
    inputs = torch.randn(args.steps_per_epoch * OVERHEAD_BATCH, args.width)
    loader = DataLoader(TensorDataset(inputs), batch_size=OVERHEAD_BATCH)
    for method in OVERHEAD_METHODS.values():  # the first fit of ours compiles; two epochs reach the epoch-level updates
        fit_for_timing(model, loader, method, epochs=2)
    times = {name: dict(within=[], crossing=[]) for name in OVERHEAD_METHODS}
    order: list = [*OVERHEAD_METHODS, *kernels]
    shuffler = random.Random(args.seeds[0])
    for round_index in range(args.rounds):
        shuffler.shuffle(order)
        for entry in order:
            if not isinstance(entry, str):
                entry.measure(repeats=5)
                continue
            within, crossing = fit_for_timing(model, loader, OVERHEAD_METHODS[entry], OVERHEAD_EPOCHS).iterations()
            times[entry]["within"] += within
            times[entry]["crossing"] += crossing
        print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
    return times


def run_overhead(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seeds[0])
    model = LinearStack(args.width, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    print(f"  {n_params / 1e6:.1f} M parameters in {n_tensors} tensors", flush=True)
    roofline, kernel = StreamingRoofline(args.copy_mb), EMAKernelAlone(model)
    times = time_fits_in_rounds(args, model, [roofline, kernel])

    bandwidth = roofline.summary()
    baseline = {part: statistics.median(seconds) for part, seconds in times[BASELINE].items()}
    rows = {}
    for name, method in OVERHEAD_METHODS.items():
        within, crossing = statistics.median(times[name]["within"]), statistics.median(times[name]["crossing"])
        quartiles = statistics.quantiles(times[name]["within"], n=4)
        row = dict(updates=method.updates, median_ms_per_step=within * 1e3, p25_ms_per_step=quartiles[0] * 1e3,
                   p75_ms_per_step=quartiles[2] * 1e3, median_ms_crossing_epoch=crossing * 1e3,
                   timed_steps=len(times[name]["within"]), timed_epoch_crossings=len(times[name]["crossing"]))
        if method.updates:
            added = within - baseline["within"] if method.updates == "step" else crossing - baseline["crossing"]
            row.update(bytes_per_update=method.bytes_per_param * n_params, added_ms_per_update=added * 1e3)
        rows[name] = row
    rows["ema_update kernel alone (no Trainer)"] = dict(
        updates="call", bytes_per_update=12 * n_params,
        added_ms_per_update=statistics.median(kernel.seconds) * 1e3, timed_calls=len(kernel.seconds),
    )
    for row in rows.values():
        if row.get("added_ms_per_update", 0) > 0:
            row["gb_per_s"] = row["bytes_per_update"] / row["added_ms_per_update"] / 1e6
            row["roofline_fraction"] = row["gb_per_s"] / bandwidth["roofline_gb_per_s"]
    return dict(n_params=n_params, n_tensors=n_tensors, roofline=bandwidth, rows=rows,
                roofline_ms_per_ema_update=12 * n_params / bandwidth["roofline_gb_per_s"] / 1e6)


def overhead_table(overhead: dict) -> str:
    def number(value: Optional[float], form: str) -> str:
        return "-" if value is None else format(value, form)

    updates = {"step": "every step", "epoch": "every epoch", "call": "one call", "": "-"}
    rows = []
    for name, row in overhead["rows"].items():
        fraction = row.get("roofline_fraction")
        rows.append([
            name, updates[row["updates"]],
            number(row.get("median_ms_per_step"), ".2f"),
            number(row.get("added_ms_per_update"), ".2f"),
            number(row.get("bytes_per_update", 0) / 1e6 or None, ".0f"),
            number(row.get("gb_per_s"), ".1f"),
            "-" if fraction is None else f"{fraction:.0%}",
        ])
    roofline = overhead["roofline"]
    kernels = "; ".join(f"{name} {kernel['gb_per_s']:.1f} GB/s" for name, kernel in roofline["kernels"].items())
    title = (f"Time an averaging update adds inside Trainer.fit, {overhead['n_params'] / 1e6:.1f} M fp32 parameters "
             f"in {overhead['n_tensors']} tensors (median; roofline {roofline['roofline_gb_per_s']:.1f} GB/s: "
             f"{kernels}; an EMA update needs at least {overhead['roofline_ms_per_ema_update']:.2f} ms)")
    return title + "\n\n" + markdown_table(
        ["method", "updates", "ms/step", "ms added per update", "MB moved per update", "GB/s", "of roofline"], rows
    )


# -- post-hoc EMA --------------------------------------------------------------------------


def sample_scores(
    model: DigitsFlowMatching, args: argparse.Namespace, data: Digits, distance: SlicedWasserstein
) -> dict:
    """SW2 of unguided samples of ``model`` against the real training digits: all classes pooled, per-class mean."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    images = model.sample(labels, num_steps=args.sample_steps, generator=torch.Generator().manual_seed(args.seeds[0]))
    real_images, real_labels = data.train_set.tensors
    per_class = [distance(images[labels == c], real_images[real_labels == c]) for c in range(NUM_CLASSES)]
    return dict(sw2=distance(images, real_images), sw2_per_class_mean=sum(per_class) / NUM_CLASSES)


def run_posthoc(args: argparse.Namespace) -> dict:
    data = Digits(batch_size=128, seed=0)
    L.seed_everything(args.seeds[0], verbose=False)
    model = DigitsFlowMatching()
    # PostHocEMA evaluates (its first profile during fit, each reconstruction in `evaluate`); the fixed EMA
    # leaves evaluation alone, or it would swap its own average in over the reconstructions.
    fixed = EMA(decay=EMAWarmup(power=0.75, max_decay=0.999), validate_with="live", keep_average_on_train_end=False)
    posthoc = PostHocEMA(sigma_rels=POSTHOC_TRACKED, every_n_steps=args.snapshot_every)
    # No validation during fit (its epochs are 10 steps); limit_val_batches=0 would also empty `evaluate`'s.
    trainer = quiet_trainer(
        max_steps=args.flow_steps, check_val_every_n_epoch=args.flow_steps, callbacks=[fixed, posthoc]
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    print(f"  flow model: {trainer.global_step} steps in {train_seconds:.0f} s, "
          f"{len(posthoc.snapshot_steps)} snapshots", flush=True)
    live = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tracked = posthoc.state_dict()["profiles"]

    start = time.perf_counter()
    val_loss = posthoc.evaluate(trainer, model, POSTHOC_SWEEP, metric="val_loss", datamodule=data)
    evaluate_seconds = time.perf_counter() - start
    model.eval()
    distance = SlicedWasserstein(NUM_PIXELS, seed=0)

    def scored(weights: dict[str, Tensor]) -> dict:
        model.load_state_dict(live)
        model.load_state_dict(weights, strict=False)
        return sample_scores(model, args, data, distance)

    rows = {"live weights": dict(sigma_rel=None, **scored(live)),
            "fixed EMA (guidance benchmark)": dict(sigma_rel=None, **scored(fixed.state_dict()["averages"]))}
    for sigma_rel, profile in zip(POSTHOC_TRACKED, tracked):
        rows[f"tracked sigma_rel {sigma_rel}"] = dict(sigma_rel=sigma_rel, **scored(profile))
    start = time.perf_counter()
    for sigma_rel in POSTHOC_SWEEP:
        reconstructed = posthoc.reconstruct(sigma_rel)
        rows[f"reconstructed sigma_rel {sigma_rel}"] = dict(
            sigma_rel=sigma_rel, val_loss=val_loss[sigma_rel], **scored(reconstructed)
        )
        print(f"  sigma_rel {sigma_rel}: val loss {val_loss[sigma_rel]:.4f}, "
              f"SW2 {rows[f'reconstructed sigma_rel {sigma_rel}']['sw2']:.4f}", flush=True)
    reconstruct_seconds = time.perf_counter() - start
    model.load_state_dict(live)
    for sigma_rel, profile in zip(POSTHOC_TRACKED, tracked):  # the reconstruction where the answer is known
        reconstructed = posthoc.reconstruct(sigma_rel)
        rows[f"tracked sigma_rel {sigma_rel}"]["max_abs_diff_reconstructed_vs_tracked"] = max(
            (reconstructed[name] - tensor).abs().max().item() for name, tensor in profile.items()
        )
    picked = min(val_loss, key=val_loss.get)
    best = min(POSTHOC_SWEEP, key=lambda s: rows[f"reconstructed sigma_rel {s}"]["sw2"])
    return dict(
        flow_steps=trainer.global_step, snapshot_every=args.snapshot_every, snapshots=len(posthoc.snapshot_steps),
        tracked_sigma_rels=POSTHOC_TRACKED, per_class=args.per_class, sample_steps=args.sample_steps,
        train_seconds=train_seconds, evaluate_seconds=evaluate_seconds,
        sample_and_reconstruct_seconds=reconstruct_seconds, rows=rows,
        sigma_rel_picked_by_val_loss=picked, sw2_picked=rows[f"reconstructed sigma_rel {picked}"]["sw2"],
        sigma_rel_best_sw2=best, sw2_best=rows[f"reconstructed sigma_rel {best}"]["sw2"],
        sw2_fixed_ema=rows["fixed EMA (guidance benchmark)"]["sw2"],
    )


def posthoc_table(posthoc: dict) -> str:
    def number(value: Optional[float], form: str) -> str:
        return "-" if value is None else format(value, form)

    rows = [
        [name, number(row.get("val_loss"), ".4f"), f"{row['sw2']:.4f}", f"{row['sw2_per_class_mean']:.4f}",
         number(row.get("max_abs_diff_reconstructed_vs_tracked"), ".1e")]
        for name, row in posthoc["rows"].items()
    ]
    title = (f"Post-hoc EMA on the flow-matching digits ({posthoc['flow_steps']} steps, snapshots of sigma_rel "
             f"{posthoc['tracked_sigma_rels']} every {posthoc['snapshot_every']} steps, one training run): unguided "
             f"samples, {posthoc['per_class']} per class. val_loss picks sigma_rel "
             f"{posthoc['sigma_rel_picked_by_val_loss']} "
             f"(SW2 {posthoc['sw2_picked']:.4f}); best SW2 of the sweep {posthoc['sw2_best']:.4f} at sigma_rel "
             f"{posthoc['sigma_rel_best_sw2']}; fixed EMA {posthoc['sw2_fixed_ema']:.4f}")
    return title + "\n\n" + markdown_table(
        ["weights", "val loss", "SW2 all classes", "SW2 per class (mean)", "max abs diff, reconstructed vs tracked"],
        rows,
    )


def plot_posthoc(ax, posthoc: dict) -> None:
    sweep = [row for name, row in posthoc["rows"].items() if name.startswith("reconstructed")]
    ax.plot([row["sigma_rel"] for row in sweep], [row["sw2"] for row in sweep], "o-", label="reconstructed")
    for name, style in (("fixed EMA (guidance benchmark)", "--"), ("live weights", ":")):
        ax.axhline(posthoc["rows"][name]["sw2"], color="grey", linestyle=style, label=name)
    ax.axvline(posthoc["sigma_rel_picked_by_val_loss"], color="tab:green", linewidth=1, label="picked by val loss")
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel("SW2 to the training digits (all classes)")
    ax.set_title(f"post-hoc EMA, flow matching, {posthoc['flow_steps']} steps")
    ax.legend(fontsize=8)


# -- report --------------------------------------------------------------------------------


def plot_convergence(ax, convergence: dict) -> None:
    for method, row in convergence["methods"].items():
        curves = torch.tensor(list(row["val_acc_per_epoch"].values()))
        epochs = range(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), label=method)
        ax.fill_between(epochs, curves.min(0).values, curves.max(0).values, alpha=0.15)
    ax.axhline(statistics.mean(convergence["plain_best_val_acc"].values()), color="grey", linestyle=":",
               linewidth=1, label="plain best (mean over seeds)")
    ax.set_ylim(0.9, 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over seeds; band: min-max)")
    ax.set_title("digits classifier, SGD: validation with the average")
    ax.legend(fontsize=8)


def plot_overhead(ax, overhead: dict) -> None:
    rows = {name: row for name, row in overhead["rows"].items() if "added_ms_per_update" in row}
    positions = range(len(rows))
    ax.barh(positions, [row["added_ms_per_update"] for row in rows.values()], color="tab:blue")
    ax.axvline(overhead["roofline_ms_per_ema_update"], color="tab:green", linestyle="--",
               label="12 B/param at the roofline")
    ax.set_yticks(list(positions), list(rows), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms added per averaging update (median)")
    ax.set_title(f"inside Trainer.fit, {overhead['n_params'] / 1e6:.1f} M fp32 parameters")
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(part, draw) for part, draw in (("convergence", plot_convergence), ("overhead", plot_overhead),
                                              ("posthoc", plot_posthoc)) if part in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), constrained_layout=True, squeeze=False)
    for ax, (part, draw) in zip(axes[0], panels):
        draw(ax, report[part])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "convergence", "overhead", "posthoc"], default="all",
                        help="convergence: convergence and agreement; overhead: overhead; posthoc: post-hoc EMA")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each convergence run")
    parser.add_argument("--agreement-epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024, help="overhead model: width of each Linear layer")
    parser.add_argument("--layers", type=int, default=24, help="overhead model: number of Linear layers")
    parser.add_argument("--steps-per-epoch", type=int, default=6, help="overhead fits: steps in each of their 4 epochs")
    parser.add_argument("--rounds", type=int, default=5, help="overhead: rounds of one timed fit per method")
    parser.add_argument("--copy-mb", type=int, default=256, help="size of each roofline kernel tensor, MB")
    parser.add_argument("--flow-steps", type=int, default=4000, help="post-hoc EMA: training steps of the flow model")
    parser.add_argument("--snapshot-every", type=int, default=100, help="post-hoc EMA: steps between snapshots")
    parser.add_argument("--per-class", type=int, default=200, help="post-hoc EMA: samples per class and row")
    parser.add_argument("--sample-steps", type=int, default=32, help="post-hoc EMA: Euler steps per sample")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 6 epochs, 2 M parameters, 2 rounds; "
                             "400 flow steps, 20 samples per class")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.agreement_epochs = args.seeds[:1], 6, 2
        args.width, args.layers, args.steps_per_epoch, args.rounds, args.copy_mb = 512, 8, 4, 2, 32
        args.flow_steps, args.snapshot_every, args.per_class = 400, 20, 20
    return args


PARTS = {"convergence": ("convergence", "agreement"), "overhead": ("overhead",), "posthoc": ("posthoc",)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    json_path, png_path = result_paths("averaging", args.quick)
    report = dict(benchmark="averaging", machine=machine())
    if args.part != "all" and json_path.exists():
        # One part re-run: the other part's results (and the settings and command they came from) stay.
        report = {**json.loads(json_path.read_text()), "machine": report["machine"]}
    parts = PARTS if args.part == "all" else {args.part: PARTS[args.part]}
    for part, keys in parts.items():
        report.setdefault("commands", {})[part] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        report.setdefault("settings_by_part", {})[part] = vars(args)
    if "convergence" in parts:
        datamodule = Digits(batch_size=32, seed=0)
        print("convergence", flush=True)
        report["convergence"] = run_convergence(args, datamodule)
        print("agreement", flush=True)
        report["agreement"] = run_agreement(args, datamodule)
    if "overhead" in parts:
        print("overhead", flush=True)
        report["overhead"] = run_overhead(args)
    if "posthoc" in parts:
        print("post-hoc EMA", flush=True)
        report["posthoc"] = run_posthoc(args)
    report["machine"]["load_average_at_end"] = machine()["load_average"]
    report["seconds"] = time.perf_counter() - start
    tables = []
    if "convergence" in report:
        tables += [convergence_table(report["convergence"]), agreement_table(report["agreement"])]
    if "overhead" in report:
        tables.append(overhead_table(report["overhead"]))
    if "posthoc" in report:
        tables.append(posthoc_table(report["posthoc"]))
    report["tables"] = tables
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, png_path)
    print("\n" + "\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s; wrote {json_path.relative_to(REPO)} and {png_path.relative_to(REPO)}")

if __name__ == "__main__":
    main()
