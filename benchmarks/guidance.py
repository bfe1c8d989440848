"""Classifier-free guidance on the 8x8 digits: no guidance, CFG, APG, an annealed scale and a guidance interval.

What it measures, in one run
    1. A judge: the digits classifier (``examples/digits.py``, SGD, 30 epochs) trained
       on the real training split; its accuracy on the real test split is reported.
    2. One class-conditional flow-matching model (``DigitsFlowMatching``: rectified
       flow, label dropout 0.1) trained on the training split with our ``EMA``
       callback (decay ``EMAWarmup(power=0.75, max_decay=0.999)``), which also
       validates with the averaged weights. Samples come from the EMA weights; one
       row uses the live (not averaged) weights for comparison.
    3. ``--per-class`` samples of every class per method, 32 Euler steps, the same
       starting noise for every method (one generator seed), guided on the
       denoised (x_0) prediction:

       - no guidance (scale 1), live weights and EMA weights;
       - constant CFG, scales 2 and 4;
       - APG at scale 4 (eta 0, norm threshold 1, momentum -0.5; in a trial run
         of this model the median norm of the x_0 difference cond - uncond fell
         from about 2 at the first step to below 1 halfway through the steps);
       - an annealed CFG scale, ``Linear(1, 7)`` over the step index (mean 4);
       - CFG at scale 4 only for noise levels sigma in [0.28, 5.42)
         (``guidance_interval``; the interval of Kynkaenniemi et al. for EDM2; the
         flow's sigma is t / (1 - t)).

    Metrics, against the real training digits:

    - sliced Wasserstein distance (SW2) between the generated and the real pixel
      vectors: 256 random unit directions (seed 0), along each the two sets'
      quantiles at 64 levels, root mean square difference; overall (all classes
      pooled) and per class (the class's samples against that class's real digits,
      then the mean over classes). Lower is better. The real held-out digits
      (validation + test split) give a reference row; with about 54 digits per
      class against 200 samples per method, its per-class SW2 carries more
      sampling error (the estimate grows as sets shrink): a yardstick, not a floor.
    - class accuracy: the judge's accuracy on the samples, the label being the
      class asked for.
    - out-of-range pixels: the fraction of pixels with |x| > 1.1 (real pixels lie
      in [-1, 1]): the oversaturation that high guidance scales cause.

How to run (from the repository root)
    python benchmarks/guidance.py             # 70-80 s here at a load average of 5-7 (training dominates)
    python benchmarks/guidance.py --quick     # smoke run, about 30 s: 400 steps, 20 samples per class

Writes benchmarks/results/guidance.json (every number and the machine) and
guidance.png (a grid of samples per method: a row per class), and prints
markdown tables. ``--quick`` writes guidance_quick.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    ValidationCurve,
    fit_classifier,
    machine,
    markdown_table,
    quiet_trainer,
    result_paths,
)
from examples.digits import NUM_CLASSES, NUM_PIXELS, Digits, DigitsClassifier, DigitsFlowMatching  # noqa: E402
from lightning_converge.callbacks import EMA  # noqa: E402
from lightning_converge.guidance import APG, Guidance, cfg, guidance_interval  # noqa: E402
from lightning_converge.schedules import EMAWarmup, Linear  # noqa: E402

OUT_OF_RANGE = 1.1


@dataclass
class SamplingMethod:
    weights: str  # "ema" or "live"
    guidance: Callable[[int], Optional[Guidance]]  # built for the number of sampling steps
    guide_by: str = "step"


METHODS = {
    "no guidance, live weights": SamplingMethod("live", lambda steps: None),
    "no guidance, EMA weights": SamplingMethod("ema", lambda steps: None),
    "CFG w=2": SamplingMethod("ema", lambda steps: Guidance(2.0, cfg)),
    "CFG w=4": SamplingMethod("ema", lambda steps: Guidance(4.0, cfg)),
    "APG w=4": SamplingMethod("ema", lambda steps: Guidance(4.0, APG(eta=0.0, norm_threshold=1.0, momentum=-0.5))),
    "CFG w=1->7 linear": SamplingMethod("ema", lambda steps: Guidance(Linear(1.0, 7.0, steps=steps - 1), cfg)),
    "CFG w=4, sigma in [0.28, 5.42)": SamplingMethod("ema", lambda steps: guidance_interval(4.0, 0.28, 5.42), "sigma"),
}


class SlicedWasserstein:
    """Sliced 2-Wasserstein distance between two sets of ``dim``-vectors (of any sizes).

    Along each of ``projections`` random unit directions (drawn once from ``seed``)
    both sets' quantiles are taken at ``quantiles`` evenly spaced levels; the
    distance is the root mean square of their differences over levels and directions.
    """

    def __init__(self, dim: int, projections: int = 256, quantiles: int = 64, seed: int = 0) -> None:
        directions = torch.randn(projections, dim, generator=torch.Generator().manual_seed(seed))
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.levels = (torch.arange(quantiles) + 0.5) / quantiles

    def __call__(self, a: Tensor, b: Tensor) -> float:
        quantiles_a = torch.quantile(a @ self.directions.T, self.levels, dim=0)
        quantiles_b = torch.quantile(b @ self.directions.T, self.levels, dim=0)
        return (quantiles_a - quantiles_b).pow(2).mean().sqrt().item()


def evaluate(
    images: Tensor, labels: Tensor, real: Digits, judge: DigitsClassifier, distance: SlicedWasserstein
) -> dict:
    """SW2 against ``real``'s training digits (all pooled, and per class), the judge's accuracy, out-of-range pixels."""
    real_images, real_labels = real.train_set.tensors
    per_class = [distance(images[labels == c], real_images[real_labels == c]) for c in range(NUM_CLASSES)]
    return dict(
        sw2=distance(images, real_images),
        sw2_per_class=per_class,
        sw2_per_class_mean=sum(per_class) / NUM_CLASSES,
        class_accuracy=(judge.predict_labels(images) == labels).float().mean().item(),
        out_of_range_pixels=(images.abs() > OUT_OF_RANGE).float().mean().item(),
    )


def train_flow(args: argparse.Namespace, data: Digits) -> tuple[DigitsFlowMatching, dict[str, dict[str, Tensor]], dict]:
    """The trained model and its live and EMA state dicts, and the training record."""
    L.seed_everything(args.seed, verbose=False)
    model = DigitsFlowMatching()
    # The live weights stay in the model after fit; the averages are read from the callback's state.
    ema = EMA(decay=EMAWarmup(power=0.75, max_decay=0.999), keep_average_on_train_end=False)
    curve = ValidationCurve("val_loss")
    trainer = quiet_trainer(max_steps=args.steps, check_val_every_n_epoch=args.val_every_epochs, callbacks=[ema, curve])
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    weights = dict(live={name: tensor.clone() for name, tensor in model.state_dict().items()},
                   ema=ema.state_dict()["averages"])
    record = dict(steps=trainer.global_step, seconds=seconds, parameters=sum(p.numel() for p in model.parameters()),
                  hparams=dict(model.hparams), val_loss_with_ema_weights=dict(step=curve.steps, **curve.values),
                  final_ema_decay=float(trainer.callback_metrics["ema/decay"]))
    print(f"  flow model: {record['steps']} steps in {seconds:.0f} s; "
          f"val loss (EMA weights) {curve.values['val_loss'][-1]:.4f}", flush=True)
    return model, weights, record


def samples_grid(images: Tensor, labels: Tensor, columns: int) -> Tensor:
    """The first ``columns`` samples of every class as one image: a row of 8x8 digits per class, 1-pixel gaps."""
    grid = torch.full((NUM_CLASSES * 9 - 1, columns * 9 - 1), float("nan"))
    for c in range(NUM_CLASSES):
        for column, image in enumerate(images[labels == c][:columns]):
            grid[c * 9 : c * 9 + 8, column * 9 : column * 9 + 8] = image.reshape(8, 8)
    return grid


def plot(grids: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 4.0 * rows), constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    cmap = matplotlib.colormaps["gray_r"].copy()
    cmap.set_bad("white")
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        ax.imshow(grid.clamp(-1, 1), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    fig.suptitle("8x8 digits: a row per class 0-9 (pixels clipped to [-1, 1] for display)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(report: dict) -> list[str]:
    rows = report["methods"]
    summary = markdown_table(
        ["method", "weights", "SW2 all classes", "SW2 per class (mean)", "class accuracy",
         f"pixels |x| > {OUT_OF_RANGE}"],
        [[name, row["weights"], f"{row['sw2']:.4f}", f"{row['sw2_per_class_mean']:.4f}", f"{row['class_accuracy']:.3f}",
          f"{row['out_of_range_pixels']:.3f}"] for name, row in rows.items()],
    )
    per_class = markdown_table(
        ["method", *[str(c) for c in range(NUM_CLASSES)]],
        [[name, *[f"{value:.3f}" for value in row["sw2_per_class"]]] for name, row in rows.items()],
    )
    judge, flow = report["judge"], report["flow"]
    return [
        f"Samples against the real training digits ({report['settings']['per_class']} per class; "
        f"judge's test accuracy {judge['test_accuracy']:.4f}; flow model {flow['parameters'] / 1e3:.0f} k parameters, "
        f"{flow['steps']} steps)\n\n{summary}",
        f"SW2 per class\n\n{per_class}",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps of the flow model")
    parser.add_argument("--val-every-epochs", type=int, default=25, help="validate every n epochs (10 steps each)")
    parser.add_argument("--per-class", type=int, default=200, help="samples per class and method")
    parser.add_argument("--sample-steps", type=int, default=32, help="Euler steps per sample")
    parser.add_argument("--judge-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (one: two threads on these tiny models mostly wait for each "
                             "other on this shared 2-core machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 steps, 20 samples per class, 5 epochs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.val_every_epochs, args.per_class, args.judge_epochs = 400, 10, 20, 5
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = dict(benchmark="guidance", command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                  settings=vars(args), machine=machine())

    judge, _ = fit_classifier(Digits(batch_size=32, seed=0), epochs=args.judge_epochs, seed=args.seed)
    data = Digits(batch_size=128, seed=0)
    test_images, test_labels = data.test_set.tensors
    report["judge"] = dict(test_accuracy=(judge.predict_labels(test_images) == test_labels).float().mean().item())
    print(f"  judge: test accuracy {report['judge']['test_accuracy']:.4f}", flush=True)

    model, weights, report["flow"] = train_flow(args, data)
    model.eval()
    distance = SlicedWasserstein(NUM_PIXELS, seed=0)
    held_out = torch.cat([data.val_set.tensors[0], test_images]), torch.cat([data.val_set.tensors[1], test_labels])
    reference = evaluate(*held_out, data, judge, distance)
    report["methods"] = {"real held-out digits (reference)": dict(weights="-", **reference)}
    grids = {"real held-out digits": samples_grid(*held_out, columns=8)}
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    for name, method in METHODS.items():
        model.load_state_dict(weights[method.weights])
        images = model.sample(labels, method.guidance(args.sample_steps), guide_by=method.guide_by,
                              num_steps=args.sample_steps, generator=torch.Generator().manual_seed(args.seed))
        report["methods"][name] = dict(weights=method.weights, **evaluate(images, labels, data, judge, distance))
        grids[name] = samples_grid(images, labels, columns=8)
        print(f"  sampled {name}", flush=True)

    report["seconds"] = time.perf_counter() - start
    report["tables"] = tables(report)
    json_path, png_path = result_paths("guidance", args.quick)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(grids, png_path)
    print("\n" + "\n\n".join(report["tables"]))
    print(f"\n{report['seconds']:.0f} s; wrote {json_path.relative_to(REPO)} and {png_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
