"""Optimizer step time and memory bandwidth: our fused rules against torch and pytorch-optimizer.

What it measures
    The wall-clock time of ``optimizer.step()`` on model-shaped fp32 parameters
    (a GPT-like stack, about 25 M parameters in about 50 tensors, fixed seed,
    random gradients that stay the same every step) for

    * ours (``lightning_converge.optim``, backend ``"compiled"``): AdamW, Adan, Lion,
      AdEMAMix, ADOPT, and cautious AdamW and Lion; Muon (Muon on the blocks' matrices,
      AdamW on the embedding and the vectors); Schedule-Free AdamW where it is importable;
    * ``torch.optim.AdamW`` with ``fused=True`` and with ``foreach=True``; ``torch.optim.Muon``
      on the same matrices with fused ``torch.optim.AdamW`` on the rest;
    * pytorch-optimizer's Adan, Lion, AdEMAMix and ADOPT (default, eager foreach
      path), with hyperparameters set to ours.

    Each implementation has its own copy of the parameters and gradients. After
    warm-up steps (the first of which includes ``torch.compile``), the
    implementations are timed in rounds: every round runs a few steps of each, in
    an order that changes from round to round, so that load from other processes
    on this shared machine falls on all of them alike. The figure reported is the
    median over all timed steps; the 25th-75th percentile range shows the noise,
    and the median CPU time per step (all threads of this process) is less
    affected by time-slicing than wall-clock time.

    Bandwidth: each rule must move ``BYTES_PER_PARAM[rule]`` bytes per parameter
    per step, so its achieved bandwidth is ``params * bytes / time``. Two streaming
    kernels, timed in the same rounds, measure what the memory system delivers: a
    copy ``dst.copy_(src)`` (read + write) and an in-place add ``a.add_(b)``
    (2 reads + 1 write). An out-of-place copy also pays a hidden read of the
    destination before it writes it (read-for-ownership), which an optimizer,
    updating its tensors in place, does not; the roofline is the faster of the two.

    Targets checked: our AdamW within 1.1x of torch fused AdamW; every one of our
    rules at >= 80% of the roofline; each of our Adan, Lion, AdEMAMix and ADOPT
    >= 5x faster than pytorch-optimizer's. The largest speed-up the bytes allow
    (the peer's time over the time the roofline needs for those bytes) is reported
    next to each.

How to run (from the repository root)
    python benchmarks/optimizer_step.py                  # 25 M parameters, 50 tensors
    python benchmarks/optimizer_step.py --quick          # smoke run: 3 M parameters, few steps,
                                                         # written to optimizer_step_quick.{json,png}
    python benchmarks/optimizer_step.py --params 50e6 --tensors 100 --steps 90 --threads 1

Writes benchmarks/results/optimizer_step.json (every number and the machine),
benchmarks/results/optimizer_step.png (GB/s per implementation against the
roofline) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout, installed or not

import lightning_converge.optim as ours  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# Bytes one step must move per fp32 parameter, in one pass over memory:
#   4 bytes for every tensor read (parameter, gradient, each state tensor)
# + 4 bytes for every tensor written back (parameter, each state tensor).
#   AdamW, ADOPT: read p g m v, write p m v              = 16 + 12 = 28
#   Lion:         read p g m,   write p m                = 12 +  8 = 20
#   AdEMAMix:     read p g m1 m2 nu, write p m1 m2 nu    = 20 + 16 = 36
#   Adan:         read p g m d n prev_g, write p m d n prev_g = 24 + 20 = 44
# Cautious masking rescales by the mask's count over each tensor, which must be
# known before any update is written: a first pass reads what the mask depends
# on (AdamW: g m v, +12; Lion: g m, +8).
BYTES_PER_PARAM = {
    "AdamW": 28,
    "ADOPT": 28,
    "Lion": 20,
    "AdEMAMix": 36,
    "Adan": 44,
    "AdamW cautious": 40,
    "Lion cautious": 28,
    "ScheduleFreeAdamW": 28,  # read p(y) g z v, write p z v
}
# Muon per matrix parameter: the momentum pass reads g m and writes m and the bf16 direction
# (4+4+4+2), the apply pass reads p and the bf16 orthogonal update and writes p (4+2+4); the
# rest of the parameters are AdamW's 28. Between the two passes the Newton-Schulz products
# (about 30 * min(A,B)**2 * max(A,B) flops per A x B matrix) are bound by compute, not bytes:
# Muon's % of roofline says how far the whole step is from its elementwise bytes, and it is
# not held to the roofline target.
MUON_BYTES_PER_MATRIX_PARAM = 24
COMPUTE_BOUND_RULES = ("Muon",)

# Our defaults, given explicitly to every implementation of a rule.
HYPERPARAMETERS = {
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "Adan": dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
    "AdEMAMix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, eps=1e-8, weight_decay=0.0),
    "ADOPT": dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0),
}

# pytorch-optimizer's options that make its update the same as ours.
PEER_OPTIONS = {
    # Proximal weight decay p / (1 + lr*wd), ours with no_prox=False.
    "Adan": dict(weight_decouple=False),
    # Decoupled weight decay, as ours.
    "Lion": dict(weight_decouple=True),
    # No alpha / beta3 warm-up, as ours by default.
    "AdEMAMix": dict(t_alpha_beta3=None),
    # L2 (coupled) decay as ours with decouple=False; ours clips at (step - 1)**0.25.
    "ADOPT": dict(weight_decouple=False, clip_lambda=lambda step: (step - 1) ** 0.25),
}

OURS = {"AdamW": ours.AdamW, "Adan": ours.Adan, "Lion": ours.Lion, "AdEMAMix": ours.AdEMAMix, "ADOPT": ours.ADOPT}
EXOTIC_RULES = ("Adan", "Lion", "AdEMAMix", "ADOPT")

TARGET_ADAMW_RATIO = 1.1
TARGET_ROOFLINE_FRACTION = 0.8
TARGET_SPEEDUP = 5.0


@dataclass
class Contender:
    """Something timed in the rounds: an optimizer's step or a streaming kernel."""

    name: str
    family: str  # "ours", "torch", "pytorch-optimizer" or "roofline"
    rule: str | None  # key of BYTES_PER_PARAM; None for the streaming kernels
    bytes_per_step: int
    step: Callable[[], object]
    params: list[torch.Tensor] | None = None


def model_shapes(n_params: float, n_tensors: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like stack with about ``n_params`` parameters in about ``n_tensors`` tensors.

    A token embedding, transformer blocks of 12 tensors (qkv, attention output and two
    MLP weights with their biases, two LayerNorms' weights and biases) and a final
    LayerNorm. The width is a multiple of 64 that gives the blocks about 85% of the
    parameters; the embedding's rows take the rest.
    """
    blocks = max(1, round((n_tensors - 3) / 12))
    width = max(64, 64 * round(math.sqrt(0.85 * n_params / (12 * blocks)) / 64))
    block = [
        (3 * width, width), (3 * width,), (width, width), (width,),
        (4 * width, width), (4 * width,), (width, 4 * width), (width,),
        (width,), (width,), (width,), (width,),
    ]  # fmt: skip
    block_params = sum(math.prod(shape) for shape in block)
    vocab = max(1, round((n_params - blocks * block_params - 2 * width) / width))
    return [(vocab, width)] + block * blocks + [(width,), (width,)]


def make_parameters(shapes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    """Fresh parameters with random gradients; the same values for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    return params


def optimizer_contenders(shapes: list[tuple[int, ...]], seed: int) -> list[Contender]:
    import pytorch_optimizer  # here, not at the top: gpu_check.py imports this module's shapes without it

    n_params = sum(math.prod(shape) for shape in shapes)

    def contender(name: str, family: str, rule: str, build: Callable[[list], torch.optim.Optimizer]) -> Contender:
        params = make_parameters(shapes, seed)
        optimizer = build(params)
        return Contender(name, family, rule, n_params * BYTES_PER_PARAM[rule], optimizer.step, params)

    adamw = HYPERPARAMETERS["AdamW"]
    contenders = [
        contender("torch AdamW fused", "torch", "AdamW", lambda p: torch.optim.AdamW(p, **adamw, fused=True)),
        contender("torch AdamW foreach", "torch", "AdamW", lambda p: torch.optim.AdamW(p, **adamw, foreach=True)),
    ]
    for rule, cls in OURS.items():
        hyper = HYPERPARAMETERS[rule]
        contenders.append(
            contender(f"ours {rule}", "ours", rule, lambda p, cls=cls, hyper=hyper: cls(p, **hyper, backend="compiled"))
        )
        if rule in ("AdamW", "Lion"):
            contenders.append(
                contender(
                    f"ours {rule} cautious",
                    "ours",
                    f"{rule} cautious",
                    lambda p, cls=cls, hyper=hyper: cls(p, **hyper, cautious=True, backend="compiled"),
                )
            )
        if rule in EXOTIC_RULES:
            peer = getattr(pytorch_optimizer, rule)
            options = PEER_OPTIONS[rule]
            contenders.append(
                contender(
                    f"pytorch-optimizer {rule}",
                    "pytorch-optimizer",
                    rule,
                    lambda p, peer=peer, hyper=hyper, options=options: peer(p, **hyper, **options),
                )
            )
    return contenders + new_rule_contenders(shapes, seed)


def new_rule_contenders(shapes: list[tuple[int, ...]], seed: int) -> list[Contender]:
    """Muon, ours and torch's, over the blocks' matrices (AdamW on the embedding and vectors); Schedule-Free AdamW."""
    adamw = HYPERPARAMETERS["AdamW"]

    def split(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        matrices = [p for p in params[1:] if p.ndim == 2]  # params[0] is the embedding
        return matrices, [p for p in params if all(p is not m for m in matrices)]

    matrices, rest = split(make_parameters(shapes, seed))
    muon_bytes = sum(p.numel() for p in matrices) * MUON_BYTES_PER_MATRIX_PARAM + sum(
        p.numel() for p in rest) * BYTES_PER_PARAM["AdamW"]
    contenders = []
    for name, family, build in [
        ("ours Muon", "ours", lambda matrices, rest: [ours.Muon(
            [dict(params=matrices, use_muon=True), dict(params=rest, use_muon=False)],
            adamw_lr=adamw["lr"], adamw_betas=adamw["betas"], adamw_weight_decay=adamw["weight_decay"],
            backend="compiled")]),
        ("torch Muon + AdamW fused", "torch", lambda matrices, rest: [
            torch.optim.Muon(matrices), torch.optim.AdamW(rest, **adamw, fused=True)]),
    ]:
        params = make_parameters(shapes, seed)
        optimizers = build(*split(params))
        contenders.append(Contender(name, family, "Muon", muon_bytes,
                                    lambda optimizers=optimizers: [o.step() for o in optimizers], params))
    if hasattr(ours, "ScheduleFreeAdamW"):
        params = make_parameters(shapes, seed)
        optimizer = ours.ScheduleFreeAdamW(params, lr=adamw["lr"], weight_decay=adamw["weight_decay"],
                                           backend="compiled")
        n_params = sum(p.numel() for p in params)
        contenders.append(Contender("ours ScheduleFreeAdamW", "ours", "ScheduleFreeAdamW",
                                    n_params * BYTES_PER_PARAM["ScheduleFreeAdamW"], optimizer.step, params))
    return contenders


def roofline_contenders(megabytes: int) -> list[Contender]:
    """A copy and an in-place add over float32 tensors of ``megabytes`` each."""
    numel = megabytes * 2**20 // 4
    src, dst = torch.randn(numel), torch.randn(numel)
    acc, addend = torch.randn(numel), torch.full((numel,), 1e-7)
    return [
        Contender(f"copy_ ({megabytes} MB)", "roofline", None, 2 * 4 * numel, lambda: dst.copy_(src)),
        Contender(f"add_ in place ({megabytes} MB)", "roofline", None, 3 * 4 * numel, lambda: acc.add_(addend)),
    ]


def time_call(step: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU time (all of this process's threads) of one call, in seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rounds(contenders: list[Contender], warmup: int, rounds: int, steps_per_round: int, seed: int) -> dict:
    """Warm every contender up, then time them interleaved; return per-contender step times (s)."""
    first_step = {}
    for contender in contenders:
        first_step[contender.name] = time_call(contender.step)[0]  # includes torch.compile for ours
        for _ in range(warmup - 1):
            contender.step()
        print(f"  warmed up {contender.name}: first step {first_step[contender.name]:.2f} s", flush=True)
    times = {contender.name: [] for contender in contenders}
    cpu_times = {contender.name: [] for contender in contenders}
    load = []
    order = list(contenders)
    shuffler = random.Random(seed)
    for round_index in range(rounds):
        shuffler.shuffle(order)
        for contender in order:
            for _ in range(steps_per_round):
                wall, cpu = time_call(contender.step)
                times[contender.name].append(wall)
                cpu_times[contender.name].append(cpu)
        load.append(os.getloadavg()[0])
        print(f"  round {round_index + 1}/{rounds} done (load average {load[-1]:.2f})", flush=True)
    return dict(first_step_s=first_step, step_times_s=times, cpu_times_s=cpu_times, load_average_per_round=load)


def max_param_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two implementations' parameters after the same steps."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def summarize(contenders: list[Contender], timing: dict, n_params: int) -> dict:
    """Median times, bandwidths, ratios and the targets, as plain numbers."""
    rows = {}
    for contender in contenders:
        samples = timing["step_times_s"][contender.name]
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4)
        rows[contender.name] = dict(
            family=contender.family,
            rule=contender.rule,
            bytes_per_step=contender.bytes_per_step,
            median_ms=median * 1e3,
            p25_ms=quartiles[0] * 1e3,
            p75_ms=quartiles[2] * 1e3,
            cpu_median_ms=statistics.median(timing["cpu_times_s"][contender.name]) * 1e3,
            first_step_s=timing["first_step_s"][contender.name],
            gb_per_s=contender.bytes_per_step / median / 1e9,
        )
    roofline = max(row["gb_per_s"] for row in rows.values() if row["family"] == "roofline")
    by_name = {contender.name: contender for contender in contenders}
    for name, row in rows.items():
        row["roofline_fraction"] = row["gb_per_s"] / roofline
        if row["family"] == "roofline":
            continue
        row["roofline_ms"] = row["bytes_per_step"] / roofline / 1e6  # the time those bytes need at best
        if row["family"] == "ours" and row["rule"] in EXOTIC_RULES:
            peer_name = f"pytorch-optimizer {row['rule']}"
            peer = rows[peer_name]
            row["speedup_vs_pytorch_optimizer"] = peer["median_ms"] / row["median_ms"]
            row["speedup_bound_by_roofline"] = peer["median_ms"] / row["roofline_ms"]
            row["max_abs_param_diff_vs_peer"] = max_param_difference(by_name[name].params, by_name[peer_name].params)

    muon, torch_muon = rows["ours Muon"], rows["torch Muon + AdamW fused"]
    muon["ratio_vs_torch_muon"] = muon["median_ms"] / torch_muon["median_ms"]
    muon["max_abs_param_diff_vs_torch_muon"] = max_param_difference(
        by_name["ours Muon"].params, by_name["torch Muon + AdamW fused"].params
    )
    ours_adamw, fused = rows["ours AdamW"], rows["torch AdamW fused"]
    ours_adamw["ratio_vs_torch_fused"] = ours_adamw["median_ms"] / fused["median_ms"]
    ours_adamw["max_abs_param_diff_vs_torch_fused"] = max_param_difference(
        by_name["ours AdamW"].params, by_name["torch AdamW fused"].params
    )
    targets = [
        dict(
            target=f"ours AdamW within {TARGET_ADAMW_RATIO}x of torch fused AdamW",
            measured=f"{ours_adamw['ratio_vs_torch_fused']:.2f}x",
            met=ours_adamw["ratio_vs_torch_fused"] <= TARGET_ADAMW_RATIO,
        )
    ]
    for name, row in rows.items():
        if row["family"] == "ours" and row["rule"] not in COMPUTE_BOUND_RULES:
            targets.append(
                dict(
                    target=f"{name} >= {TARGET_ROOFLINE_FRACTION:.0%} of roofline",
                    measured=f"{row['roofline_fraction']:.0%}",
                    met=row["roofline_fraction"] >= TARGET_ROOFLINE_FRACTION,
                )
            )
    for rule in EXOTIC_RULES:
        row = rows[f"ours {rule}"]
        targets.append(
            dict(
                target=f"ours {rule} >= {TARGET_SPEEDUP:g}x faster than pytorch-optimizer",
                measured=f"{row['speedup_vs_pytorch_optimizer']:.2f}x "
                f"(the bytes allow at most {row['speedup_bound_by_roofline']:.2f}x)",
                met=row["speedup_vs_pytorch_optimizer"] >= TARGET_SPEEDUP,
            )
        )
    return dict(n_params=n_params, roofline_gb_per_s=roofline, rows=rows, targets=targets)


def markdown(summary: dict) -> str:
    lines = [
        "| implementation | ms/step median | (p25-p75) | CPU ms/step | GB/s | % of roofline | comparison |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in summary["rows"].items():
        comparison = ""
        if "speedup_vs_pytorch_optimizer" in row:
            comparison = f"{row['speedup_vs_pytorch_optimizer']:.2f}x faster than pytorch-optimizer"
        if "ratio_vs_torch_muon" in row:
            comparison = f"{row['ratio_vs_torch_muon']:.2f}x the time of torch Muon + AdamW fused"
        if "ratio_vs_torch_fused" in row:
            comparison = f"{row['ratio_vs_torch_fused']:.2f}x the time of torch fused"
        if row["family"] == "roofline" and row["roofline_fraction"] == 1.0:
            comparison = "the roofline"
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | ({row['p25_ms']:.1f}-{row['p75_ms']:.1f}) | "
            f"{row['cpu_median_ms']:.1f} | {row['gb_per_s']:.1f} | {row['roofline_fraction']:.0%} | {comparison} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in summary["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} | {'yes' if target['met'] else 'NO'} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ours": "tab:blue", "torch": "tab:orange", "pytorch-optimizer": "tab:gray", "roofline": "tab:green"}
    names = list(summary["rows"])
    rows = [summary["rows"][name] for name in names]
    fig, ax = plt.subplots(figsize=(11, 0.4 * len(names) + 1.5))
    positions = range(len(names))
    gb_per_s = [row["gb_per_s"] for row in rows]
    # Whiskers: the bandwidth at the 75th and 25th percentile step times.
    spread = [
        [speed - row["bytes_per_step"] / row["p75_ms"] / 1e6 for speed, row in zip(gb_per_s, rows)],
        [row["bytes_per_step"] / row["p25_ms"] / 1e6 - speed for speed, row in zip(gb_per_s, rows)],
    ]
    ax.barh(positions, gb_per_s, xerr=spread, color=[colors[row["family"]] for row in rows], ecolor="black")
    ax.axvline(summary["roofline_gb_per_s"], color="tab:green", linestyle="--", label="roofline")
    ax.axvline(
        TARGET_ROOFLINE_FRACTION * summary["roofline_gb_per_s"],
        color="tab:green",
        linestyle=":",
        label=f"{TARGET_ROOFLINE_FRACTION:.0%} of roofline",
    )
    ax.set_yticks(list(positions), [f"{name}  ({row['median_ms']:.1f} ms)" for name, row in zip(names, rows)])
    ax.set_xlim(0, 1.15 * max(speed + high for speed, high in zip(gb_per_s, spread[1])))
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (bytes the rule must move / median step time; whiskers: p75 and p25 times)")
    ax.set_title(f"Optimizer step, {summary['n_params'] / 1e6:.1f} M fp32 parameters")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in colors.values()]
    line_handles, line_labels = ax.get_legend_handles_labels()
    labels = list(colors) + line_labels
    ax.legend(handles + line_handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    return dict(
        torch=torch.__version__,
        pytorch_optimizer=importlib.metadata.version("pytorch_optimizer"),
        python=platform.python_version(),
        processor=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average_at_start=os.getloadavg(),
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="number of fp32 parameters (about)")
    parser.add_argument("--tensors", type=int, default=50, help="number of parameter tensors (about)")
    parser.add_argument("--steps", type=int, default=90, help="timed steps per implementation")
    parser.add_argument("--steps-per-round", type=int, default=3, help="steps of one implementation in a row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    parser.add_argument("--copy-mb", type=int, default=256, help="size of each roofline kernel tensor, MB")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 M parameters, 6 steps, 32 MB copy")
    args = parser.parse_args()
    if args.quick:
        args.params, args.steps, args.steps_per_round, args.warmup, args.copy_mb = 3e6, 6, 2, 2, 32
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = max(1, math.ceil(args.steps / args.steps_per_round))
    shapes = model_shapes(args.params, args.tensors)
    n_params = sum(math.prod(shape) for shape in shapes)
    info = machine()
    print(
        f"{n_params / 1e6:.2f} M parameters in {len(shapes)} tensors; {rounds} rounds x {args.steps_per_round} steps; "
        f"torch {info['torch']}, {info['torch_threads']} threads on {info['cpu_count']} CPUs",
        flush=True,
    )
    contenders = optimizer_contenders(shapes, args.seed) + roofline_contenders(args.copy_mb)
    timing = run_rounds(contenders, args.warmup, rounds, args.steps_per_round, args.seed)
    summary = summarize(contenders, timing, n_params)
    info["load_average_at_end"] = os.getloadavg()
    report = dict(
        benchmark="optimizer_step",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        settings=dict(
            vars(args),
            rounds=rounds,
            n_tensors=len(shapes),
            shapes=shapes,
            hyperparameters=HYPERPARAMETERS,
            peer_options={rule: sorted(options) for rule, options in PEER_OPTIONS.items()},
            bytes_per_param=dict(BYTES_PER_PARAM, Muon_matrices=MUON_BYTES_PER_MATRIX_PARAM),
        ),
        method=(
            "Each implementation steps its own copy of the same parameters and gradients. After warm-up "
            "(the first step includes torch.compile for ours), implementations are timed in interleaved rounds: "
            "each round runs steps_per_round steps of every implementation in a freshly shuffled order, so that "
            "background load on this shared machine (other engineers' tests) falls on all of them alike. "
            "Figures are medians over all timed steps; GB/s = bytes the rule must move / median time; "
            "the roofline is the faster of the copy and in-place add kernels timed in the same rounds."
        ),
        machine=info,
        load_average_per_round=timing["load_average_per_round"],
        **summary,
        step_times_ms={name: [round(t * 1e3, 4) for t in times] for name, times in timing["step_times_s"].items()},
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "optimizer_step_quick" if args.quick else "optimizer_step"  # a smoke run keeps the full results
    json_path, png_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, png_path)
    print()
    print(markdown(summary))
    print(f"\nwrote {json_path.relative_to(REPO)} and {png_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
