"""Sharded training (FSDP2) on 2 gloo processes: memory per rank and step time with weight averaging, and the
optimizer step on DTensor parameters.

What it measures, in one run
    Callbacks. A stack of residual blocks (two ``Linear(width, width)`` each; by default width 1024 and
        6 blocks, 12.6 M fp32 parameters, 50 MB) trained by our AdamW on 2 ranks, under
        DDP (``strategy="ddp"``) and under FSDP2 (Lightning's ``ModelParallelStrategy(data_parallel_size=2)``,
        ``fully_shard`` on every block and on the root in ``configure_model``), same initialization and
        data (each rank its own fixed batches of ``--batch`` random vectors), with no averaging, our ``EMA``,
        ``Grokfast`` (EMA filter) and ``LAWA`` (``k=2``, a snapshot every 5 steps), and, under DDP only,
        Lightning's ``EMAWeightAveraging`` (decay 0.999 for both EMAs). Our kernels run compiled
        (``backend="compiled"``): ``"auto"`` would run the reference for these short fits.
        Memory per rank, in one more fit of each configuration (2 epochs) after the timed ones: the bytes of
        the callback's state tensors when the fit ends, as the callback holds them (ours: each rank's shards
        under FSDP2; Lightning's: its ``AveragedModel``), of the parameters and of the optimizer state; and
        the process's peak resident set size during the fit (``VmHWM``, reset through
        ``/proc/self/clear_refs``) above its RSS when the fit started. All fits run in the same two
        processes; before each of these, glibc is told to return every freed block of 64 kB or more to the
        system, so that a fit's RSS does not depend on what earlier fits left in glibc's heap. The state
        bytes are the exact figure; the RSS rise adds gradients, activations, communication buffers and
        whatever torch and Lightning allocate, and shows whether the state's saving survives them.
        Step time: one training-loop iteration (forward, backward, gradient exchange, optimizer step, every
        callback hook) from one batch start to the next on rank 0 (the ranks meet at every step), on the wall
        clock and in CPU time (the process's own work, steadier when other jobs share the CPU, but blind to
        waiting for the other rank), after a warm-up epoch (the first fit of each configuration, untimed,
        compiles our kernels). Configurations alternate in rounds, in an order shuffled every round (the same
        order on both ranks), so that load from other processes on this shared machine falls on all of them
        alike: median and quartiles.
        Lightning's ``EMAWeightAveraging`` under FSDP2 is tried last; it does not support sharded models,
        and what happens is recorded (the exception's first line), not fatal.
    Optimizer step on DTensors. The GPT-like parameter shapes of ``optimizer_step.py`` (``--opt-params``,
        default 12 M parameters in about 50 tensors) sharded by ``fully_shard`` over the 2 ranks, random
        gradients (the same every step) as DTensors sharded like their parameters. Each implementation
        steps its own copy: our AdamW (compiled), ``torch.optim.AdamW`` default (on CPU its per-tensor
        loop), ``foreach=True`` and ``fused=True`` (where torch accepts DTensors; an error is recorded
        otherwise), all on the DTensors, and ours and torch's fused AdamW on plain tensors holding each rank's
        local shards (what the same update costs without DTensors). Timed with ``optimizer_step.run_rounds``
        (interleaved rounds, medians and quartiles per rank). Agreement: the largest difference of every
        implementation's shards from ours after the same steps.

    Threads: one intra-op thread per rank (2 ranks on this 2-core machine).

How to run (from the repository root)
    python benchmarks/sharded.py             # about 7 minutes here with other jobs running
    python benchmarks/sharded.py --quick     # smoke run, about 3 minutes (mostly compiling): 2 blocks of width 256
                                             # (its numbers only show that the code runs)
    python benchmarks/sharded.py --part optimizer --opt-params 25e6

Writes benchmarks/results/sharded.json (every number, the machine) and sharded.png (state bytes per rank;
step times; optimizer step times), and prints markdown tables. ``--quick`` writes sharded_quick.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist  # noqa: E402
from _common import REPO, LoopTimer, machine, markdown_table, quiet_trainer, result_paths  # noqa: E402
from optimizer_step import HYPERPARAMETERS, Contender, make_parameters, model_shapes, run_rounds  # noqa: E402
from lightning_converge.callbacks import EMA, LAWA, Grokfast  # noqa: E402
from lightning_converge.optim import AdamW  # noqa: E402
from lightning_converge.sharding import local, local_shard  # noqa: E402

EMA_DECAY = 0.999
LR = 1e-4
LAWA_K, LAWA_EVERY = 2, 5
WORLD_SIZE = 2
# The steady state: backend="auto" runs the reference for a signature's first hundreds of calls (until compiling
# pays, see kernels/dispatch.py), which would be most of these short fits.
BACKEND = "compiled"

# -- the callbacks part: model, configurations, what one fit records -------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class BlockStack(L.LightningModule):
    """``blocks`` residual blocks of width ``width``, regressing fixed random targets; sharded by ``fully_shard``
    (every block, then the root) in ``configure_model`` when ``sharded``."""

    def __init__(self, width: int, blocks: int, sharded: bool) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initialization under every strategy
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.sharded = sharded

    def configure_model(self) -> None:
        if not self.sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.blocks(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return AdamW(self.parameters(), lr=LR, backend=BACKEND)


@dataclass
class Config:
    strategy: str  # "ddp" or "fsdp2"
    method: str  # key of METHODS

    @property
    def name(self) -> str:
        return f"{self.strategy} {self.method}"


# Each method's callbacks, and the attributes holding its state tensors (private attributes: the state as the
# callback keeps it during training; `state_dict()` would gather full tensors under FSDP2).
METHODS: dict[str, tuple[Callable[[], list[L.Callback]], tuple[str, ...]]] = {
    "no averaging": (lambda: [], ()),
    "ours EMA": (lambda: [EMA(decay=EMA_DECAY, backend=BACKEND)], ("_averages",)),
    "Lightning EMAWeightAveraging": (lambda: [EMAWeightAveraging(decay=EMA_DECAY)], ("_average_model",)),
    "ours Grokfast": (lambda: [Grokfast(backend=BACKEND)], ("_slow", "_window", "_window_sum")),
    "ours LAWA": (lambda: [LAWA(k=LAWA_K, every_n_steps=LAWA_EVERY, backend=BACKEND)], ("_snapshots",)),
}
CONFIGS = [Config("ddp", method) for method in METHODS] + [
    Config("fsdp2", method) for method in METHODS if method != "Lightning EMAWeightAveraging"
]
UNSUPPORTED = Config("fsdp2", "Lightning EMAWeightAveraging")


def tensor_bytes(state: object) -> int:
    """Bytes of every tensor in ``state`` (tensors, modules, dicts, lists), this rank's shard of a DTensor."""
    if isinstance(state, Tensor):
        return local(state).nbytes
    if isinstance(state, nn.Module):
        return tensor_bytes(list(state.parameters()) + list(state.buffers()))
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def rss_kb(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in kB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def release_freed_memory() -> None:
    """From now on, have glibc give every freed block of 64 kB or more back to the system, and give back what
    earlier fits freed, so that the RSS of one fit does not depend on the fits before it. (glibc otherwise
    raises its mmap threshold after large frees, up to 32 MB, and keeps such blocks in its heap for reuse.)"""
    import ctypes
    import gc

    gc.collect()  # finished Trainers and models sit in reference cycles
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)
    libc.malloc_trim(0)


def reset_peak_rss() -> None:
    """Make ``VmHWM`` start again from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def strategy_of(config: Config):
    if config.strategy == "ddp":
        return "ddp"
    return ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)


def fit_config(config: Config, args: argparse.Namespace, epochs: int, rank: int, measure_memory: bool = False) -> dict:
    """One fit of ``config`` on rank ``rank`` (``epochs`` epochs of ``args.steps_per_epoch`` steps). Returns
    this rank's iteration times after the first epoch, or with ``measure_memory`` its memory figures:
    the bytes of the callback state, parameters and optimizer state when the fit ends, the RSS when it
    starts (the model built, not yet sharded) and its peak during the fit."""
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batches, the same for every config
    inputs = torch.randn(args.steps_per_epoch * args.batch, args.width, generator=generator)
    loader = DataLoader(TensorDataset(inputs, inputs.sin()), batch_size=args.batch)
    callbacks, state_attributes = METHODS[config.method]
    callbacks = callbacks()
    timer = LoopTimer(skip_epochs=1)
    model = BlockStack(args.width, args.blocks, sharded=config.strategy == "fsdp2")
    trainer = quiet_trainer(
        devices=WORLD_SIZE, strategy=strategy_of(config), max_epochs=epochs, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[timer, *callbacks],
    )
    if not measure_memory:
        trainer.fit(model, loader)
        return dict(iterations_s=timer.iterations()[0], cpu_iterations_s=timer.iterations("cpu")[0])
    release_freed_memory()
    reset_peak_rss()
    start_rss = rss_kb("VmRSS")
    trainer.fit(model, loader)
    peak_rss = rss_kb("VmHWM")
    return dict(
        callback_state_bytes=sum(
            tensor_bytes(getattr(callback, attribute)) for callback in callbacks for attribute in state_attributes
        ),
        parameter_bytes=tensor_bytes(list(model.parameters())),
        optimizer_state_bytes=tensor_bytes(list(trainer.optimizers[0].state.values())),
        start_rss_kb=start_rss,
        peak_rss_kb=peak_rss,
    )


def worker_callbacks(args: argparse.Namespace) -> None:
    """One rank of the callbacks part: warm-up fits, timed rounds, one fit per configuration measuring memory
    (after the timed ones: it changes how glibc allocates), then the unsupported combination; writes
    ``callbacks_rank{r}.json`` to ``--worker-out``."""
    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])  # read before the first fit: Lightning's teardown removes WORLD_SIZE
    for config in CONFIGS:  # compiles our kernels for each configuration's shapes
        fit_config(config, args, epochs=1, rank=rank)
        print(f"warmed up {config.name}", flush=True)
    records: dict[str, list[dict]] = {config.name: [] for config in CONFIGS}
    order = list(CONFIGS)
    shuffler = random.Random(args.seed)  # the same order on every rank
    for round_index in range(args.rounds):
        shuffler.shuffle(order)
        for config in order:
            records[config.name].append(fit_config(config, args, epochs=1 + args.timed_epochs, rank=rank))
        print(f"round {round_index + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    memory = {config.name: fit_config(config, args, epochs=2, rank=rank, measure_memory=True) for config in CONFIGS}
    try:  # last: a failed fit may leave the process group in any state
        fit_config(UNSUPPORTED, args, epochs=1, rank=rank)
        unsupported = dict(error=None)
    except Exception as error:  # noqa: BLE001 - what happens is the result
        unsupported = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0]}")
    out = Path(args.worker_out) / f"callbacks_rank{rank}.json"
    out.write_text(json.dumps(dict(records=records, memory=memory, unsupported={UNSUPPORTED.name: unsupported})))


# -- the optimizer part ----------------------------------------------------------------------------------------


class Parameters(nn.Module):
    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def sharded_parameters(shapes: list[tuple[int, ...]], seed: int, mesh) -> list[nn.Parameter]:
    """``make_parameters(shapes, seed)`` sharded by ``fully_shard`` over ``mesh``, each gradient a DTensor
    sharded like its parameter (this rank's rows of the same random gradient)."""
    full = make_parameters(shapes, seed)
    module = Parameters([nn.Parameter(p.detach().clone()) for p in full])
    fully_shard(module, mesh=mesh)
    params = list(module.parameters())
    for param, whole in zip(params, full):
        param.grad = DTensor.from_local(
            local_shard(whole.grad, param), mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return params


def local_parameters(shapes: list[tuple[int, ...]], seed: int, mesh) -> list[nn.Parameter]:
    """Plain tensors holding this rank's shards of the same parameters and gradients."""
    params = []
    for param in sharded_parameters(shapes, seed, mesh):
        plain = nn.Parameter(local(param).clone())
        plain.grad = local(param.grad).clone()
        params.append(plain)
    return params


OPTIMIZERS: dict[str, tuple[str, Callable[[list], torch.optim.Optimizer]]] = {
    # name: (what the parameters are, how the optimizer is built)
    "ours AdamW (DTensor)": ("dtensor", lambda p: AdamW(p, **HYPERPARAMETERS["AdamW"], backend=BACKEND)),
    "torch AdamW default (DTensor)": ("dtensor", lambda p: torch.optim.AdamW(p, **HYPERPARAMETERS["AdamW"])),
    "torch AdamW foreach (DTensor)": (
        "dtensor", lambda p: torch.optim.AdamW(p, **HYPERPARAMETERS["AdamW"], foreach=True)),
    "torch AdamW fused (DTensor)": ("dtensor", lambda p: torch.optim.AdamW(p, **HYPERPARAMETERS["AdamW"], fused=True)),
    "ours AdamW (local shards, plain tensors)": (
        "local", lambda p: AdamW(p, **HYPERPARAMETERS["AdamW"], backend=BACKEND)),
    "torch AdamW fused (local shards, plain tensors)": (
        "local", lambda p: torch.optim.AdamW(p, **HYPERPARAMETERS["AdamW"], fused=True)),
}
REFERENCE_OPTIMIZER = "ours AdamW (DTensor)"


def worker_optimizer(args: argparse.Namespace) -> None:
    """One rank of the optimizer part: every implementation that builds and steps is timed in interleaved
    rounds on this rank's shards (a step has no communication); writes ``optimizer_rank{r}.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    shapes = model_shapes(args.opt_params, args.opt_tensors)
    contenders, errors = [], {}
    for name, (kind, build) in OPTIMIZERS.items():
        params = (sharded_parameters if kind == "dtensor" else local_parameters)(shapes, args.seed, mesh)
        try:
            optimizer = build(params)
            optimizer.step()  # a first step: some paths refuse DTensors only here
        except Exception as error:  # noqa: BLE001 - an implementation torch does not offer is a result
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        contenders.append(Contender(name, kind, "AdamW", 0, optimizer.step, params))
    rounds = max(1, math.ceil(args.opt_steps / args.steps_per_round))
    timing = run_rounds(contenders, args.warmup, rounds, args.steps_per_round, args.seed)
    reference = next(c for c in contenders if c.name == REFERENCE_OPTIMIZER).params
    difference = {
        c.name: max((local(a) - local(b)).abs().max().item() for a, b in zip(c.params, reference) if a.numel())
        for c in contenders
    }
    record = dict(
        n_params=sum(math.prod(shape) for shape in shapes), n_tensors=len(shapes),
        local_params=sum(local(p).numel() for p in reference),
        steps_each=1 + args.warmup + rounds * args.steps_per_round,  # the first step is the check above
        step_times_s=timing["step_times_s"], cpu_times_s=timing["cpu_times_s"],
        max_abs_diff_vs_ours=difference, errors=errors,
    )
    out = Path(args.worker_out) / f"optimizer_rank{dist.get_rank()}.json"
    out.write_text(json.dumps(record))
    dist.destroy_process_group()


# -- the launcher's side ---------------------------------------------------------------------------------------


def quartiles_ms(seconds: list[float]) -> dict:
    p25, median, p75 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return dict(median_ms=median * 1e3, p25_ms=p25 * 1e3, p75_ms=p75 * 1e3, samples=len(seconds))


def launch_part(part: str, args: argparse.Namespace, work_dir: Path) -> list[dict]:
    """Run the ranks of ``part`` and return their records, rank 0 first."""
    worker_args = [__file__, *sys.argv[1:], "--worker", part, "--worker-out", str(work_dir)]
    _dist.launch(worker_args, world_size=WORLD_SIZE, threads_per_rank=args.threads, log_dir=work_dir / part,
                 timeout=3600)
    return [json.loads((work_dir / f"{part}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def summarize_callbacks(ranks: list[dict]) -> dict:
    """Per configuration: rank 0's iteration times (wall-clock quartiles, CPU median) and the time each method
    adds to its strategy's run without averaging; every rank's memory figures, and how far the peak RSS of the
    fit rose above the RSS at its start."""
    rows = {}
    for name, fits in ranks[0]["records"].items():
        memory = [rank["memory"][name] for rank in ranks]
        rows[name] = dict(
            **quartiles_ms([seconds for fit in fits for seconds in fit["iterations_s"]]),
            cpu_median_ms=statistics.median(seconds for fit in fits for seconds in fit["cpu_iterations_s"]) * 1e3,
            **{key: [record[key] for record in memory]
               for key in ("callback_state_bytes", "parameter_bytes", "optimizer_state_bytes")},
            peak_rss_mb=[record["peak_rss_kb"] / 1024 for record in memory],
            peak_above_start_mb=[(record["peak_rss_kb"] - record["start_rss_kb"]) / 1024 for record in memory],
        )
    for name, row in rows.items():
        baseline = rows[f"{name.split()[0]} no averaging"]
        row["added_ms"] = row["median_ms"] - baseline["median_ms"]
        row["cpu_added_ms"] = row["cpu_median_ms"] - baseline["cpu_median_ms"]
    return dict(rows=rows, unsupported=ranks[0]["unsupported"],
                unsupported_per_rank=[rank["unsupported"] for rank in ranks])


def summarize_optimizer(ranks: list[dict]) -> dict:
    """Per implementation: each rank's quartiles, the time relative to ours (rank 0), the largest difference
    from ours over the ranks; the implementations torch refused, with why."""
    rank0 = ranks[0]
    ours = statistics.median(rank0["step_times_s"][REFERENCE_OPTIMIZER])
    rows = {}
    for name, times in rank0["step_times_s"].items():
        rows[name] = dict(
            **quartiles_ms(times),
            per_rank_median_ms=[statistics.median(rank["step_times_s"][name]) * 1e3 for rank in ranks],
            cpu_median_ms=statistics.median(rank0["cpu_times_s"][name]) * 1e3,
            time_vs_ours=statistics.median(times) / ours,
            max_abs_diff_vs_ours=max(rank["max_abs_diff_vs_ours"][name] for rank in ranks),
        )
    return dict(n_params=rank0["n_params"], n_tensors=rank0["n_tensors"],
                local_params_per_rank=[rank["local_params"] for rank in ranks], steps_each=rank0["steps_each"],
                rows=rows, refused=rank0["errors"])


def callbacks_tables(summary: dict, args: argparse.Namespace) -> str:
    def mb(values: list[float]) -> str:
        return " / ".join(f"{value / 2**20:.1f}" for value in values)

    rows = [
        [name, mb(row["callback_state_bytes"]), mb(row["parameter_bytes"]), mb(row["optimizer_state_bytes"]),
         " / ".join(f"{v:.0f}" for v in row["peak_rss_mb"]), " / ".join(f"{v:.0f}" for v in row["peak_above_start_mb"]),
         f"{row['median_ms']:.1f}", f"({row['p25_ms']:.1f}-{row['p75_ms']:.1f})", f"{row['cpu_median_ms']:.1f}",
         *(["-", "-"] if name.endswith("no averaging") else [f"{row['added_ms']:+.1f}", f"{row['cpu_added_ms']:+.1f}"])]
        for name, row in summary["rows"].items()
    ]
    unsupported = "; ".join(f"{name}: {result['error'] or 'ran'}" for name, result in summary["unsupported"].items())
    title = (f"Weight averaging under DDP and FSDP2, 2 gloo ranks, {args.blocks} blocks of width {args.width} "
             f"(per rank: rank 0 / rank 1; MB = 2^20 bytes; step time: rank 0's iterations, median and "
             f"quartiles over {args.rounds} rounds x {args.timed_epochs * (args.steps_per_epoch - 1)} steps)")
    header = ["configuration", "state MB/rank", "params MB/rank", "optimizer MB/rank", "peak RSS MB",
              "peak above start MB", "ms/step", "(p25-p75)", "CPU ms/step", "ms added", "CPU ms added"]
    return f"{title}\n\n{markdown_table(header, rows)}\n\nTried: {unsupported}"


def optimizer_table(summary: dict) -> str:
    rows = [
        [name, f"{row['median_ms']:.2f}", f"({row['p25_ms']:.1f}-{row['p75_ms']:.1f})",
         " / ".join(f"{v:.1f}" for v in row["per_rank_median_ms"]), f"{row['cpu_median_ms']:.1f}",
         f"{row['time_vs_ours']:.2f}x", f"{row['max_abs_diff_vs_ours']:.1e}"]
        for name, row in summary["rows"].items()
    ]
    refused = "".join(f"\n\nRefused: {name}: {error}" for name, error in summary["refused"].items())
    title = (f"AdamW step on FSDP2-sharded parameters, 2 ranks: {summary['n_params'] / 1e6:.1f} M parameters in "
             f"{summary['n_tensors']} tensors, {summary['local_params_per_rank'][0] / 1e6:.1f} M on each rank "
             f"(rank 0's median and quartiles; time and difference relative to ours after "
             f"{summary['steps_each']} steps each)")
    header = ["implementation", "ms/step median", "(p25-p75)", "median rank 0 / 1", "CPU ms", "time vs ours",
              "max abs diff vs ours"]
    return f"{title}\n\n{markdown_table(header, rows)}{refused}"


def time_panel(ax, rows: dict, colors: list[str], what: str) -> None:
    """Horizontal bars of median wall-clock ms with p25-p75 whiskers, and the median CPU ms as a dot."""
    names = list(rows)
    medians = [row["median_ms"] for row in rows.values()]
    spread = [[median - row["p25_ms"] for median, row in zip(medians, rows.values())],
              [row["p75_ms"] - median for median, row in zip(medians, rows.values())]]
    ax.barh(range(len(names)), medians, xerr=spread, color=colors, ecolor="black", label="wall clock")
    ax.plot([row["cpu_median_ms"] for row in rows.values()], range(len(names)), "kD", markersize=4, label="CPU time")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{what}, ms (median; whiskers p25-p75)")
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 * ("callbacks" in report) + ("optimizer" in report)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True, squeeze=False)
    axes = list(axes[0])
    if "callbacks" in report:
        rows = report["callbacks"]["rows"]
        colors = ["tab:orange" if name.startswith("ddp") else "tab:blue" for name in rows]
        ax = axes.pop(0)
        ax.barh(range(len(rows)), [max(row["callback_state_bytes"]) / 2**20 for row in rows.values()], color=colors)
        ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("callback state per rank, MB (the larger rank's)")
        ax.set_title("state per rank (orange: DDP, blue: FSDP2)")
        ax = axes.pop(0)
        time_panel(ax, rows, colors, "training step")
        ax.set_title("step inside Trainer.fit, rank 0")
    if "optimizer" in report:
        rows = report["optimizer"]["rows"]
        ax = axes.pop(0)
        time_panel(ax, rows, ["tab:blue" if name.startswith("ours") else "tab:orange" for name in rows],
                   "optimizer.step()")
        ax.set_title(f"AdamW on DTensors, {report['optimizer']['n_params'] / 1e6:.0f} M params, 2 ranks")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "callbacks", "optimizer"], default="all")
    parser.add_argument("--width", type=int, default=1024, help="callbacks: width of the blocks' Linear layers")
    parser.add_argument("--blocks", type=int, default=6, help="callbacks: number of residual blocks")
    parser.add_argument("--batch", type=int, default=8, help="callbacks: samples per rank and step")
    parser.add_argument("--steps-per-epoch", type=int, default=10, help="callbacks: steps in each epoch of a fit")
    parser.add_argument("--timed-epochs", type=int, default=2, help="callbacks: timed epochs per fit after a warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="callbacks: rounds of one fit per configuration")
    parser.add_argument("--opt-params", type=float, default=12e6, help="optimizer: number of parameters (about)")
    parser.add_argument("--opt-tensors", type=int, default=50, help="optimizer: number of tensors (about)")
    parser.add_argument("--opt-steps", type=int, default=30, help="optimizer: timed steps per implementation")
    parser.add_argument("--steps-per-round", type=int, default=3, help="optimizer: steps of one in a row")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer: untimed steps first (the first compiles)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: width 256, 2 blocks, 1 round of 1 timed epoch of 4 steps; 1 M optimizer "
                             "parameters, 6 steps")
    parser.add_argument("--worker", choices=["callbacks", "optimizer"], help=argparse.SUPPRESS)  # the ranks
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.blocks, args.steps_per_epoch, args.timed_epochs, args.rounds = 256, 2, 4, 1, 1
        args.opt_params, args.opt_steps, args.steps_per_round, args.warmup = 1e6, 6, 2, 2
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        (worker_callbacks if args.worker == "callbacks" else worker_optimizer)(args)
        return
    start = time.perf_counter()
    json_path, png_path = result_paths("sharded", args.quick)
    report = dict(benchmark="sharded", machine=machine())
    if args.part != "all" and json_path.exists():  # one part re-run: the other's results stay
        report = {**json.loads(json_path.read_text()), "machine": report["machine"]}
    parts = ["callbacks", "optimizer"] if args.part == "all" else [args.part]
    with tempfile.TemporaryDirectory(prefix="sharded_bench") as work_dir:
        for part in parts:
            print(part, flush=True)
            report.setdefault("commands", {})[part] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
            report.setdefault("settings_by_part", {})[part] = vars(args)
            ranks = launch_part(part, args, Path(work_dir))
            report[part] = (summarize_callbacks if part == "callbacks" else summarize_optimizer)(ranks)
            report[f"{part}_rank_records"] = ranks  # every time measured, to summarize again
    report["machine"]["load_average_at_end"] = machine()["load_average"]
    report["seconds"] = time.perf_counter() - start
    tables = []
    if "callbacks" in report:
        settings = argparse.Namespace(**report["settings_by_part"]["callbacks"])
        tables.append(callbacks_tables(report["callbacks"], settings))
    if "optimizer" in report:
        tables.append(optimizer_table(report["optimizer"]))
    report["tables"] = tables
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, png_path)
    print("\n" + "\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s; wrote {json_path.relative_to(REPO)} and {png_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
