"""The GPU check: what only a CUDA machine can show about the kernels, in one run of a few minutes.

What it measures (on one CUDA device)
    1. kernels: every Triton kernel of :mod:`lightning_converge.kernels` (each exported
       :class:`~lightning_converge.kernels.Kernel`) against its ``reference`` on the
       same inputs: fp32 and bf16 tensors of odd sizes, tensors at different steps,
       each boolean option (cautious, nesterov, ...) both ways. The inputs are built
       from the kernel's signature (argument names say what each list holds). A
       kernel without a Triton version is listed as such.
    2. optimizer steps: ``optimizer.step()`` of our rules (backend ``"triton"``, and
       AdamW also ``"compiled"``) and ``torch.optim.AdamW(fused=True)`` on GPT-like
       fp32 parameters: about 25 M parameters in about 50 tensors and 300 M in about
       500. Timed between device synchronizations in interleaved rounds; GB/s = the bytes each rule
       must move (DESIGN.md: AdamW 28 B per parameter) / median step time, against the
       copy bandwidth of the device (the faster of ``copy_`` and an in-place ``add_``,
       timed in the same rounds).
    3. launches per step: one profiled step (``torch.profiler``) of each optimizer
       above: GPU kernels and memcpy/memset it ran, at 50 and 500 tensors.
    4. host syncs per step: one step of each optimizer, and one call of each callback
       hook below, under ``torch.cuda.set_sync_debug_mode("warn")``; every
       synchronizing CUDA call is counted with the line that made it ("error" mode
       would stop at the first).
    5. callbacks: a ``Trainer.fit`` on the 25 M-parameter set per callback: our EMA
       (``on_train_batch_end``), Lightning's ``EMAWeightAveraging`` (same hook, when
       this Lightning has it) and our Grokfast (``on_before_optimizer_step``); the
       time of the hook per step (synchronized before and after), next to a step with
       no callback.
    6. DiLoCo's exchange thread: the int8 and fp32 pseudo-gradient exchanges on the
       device (NCCL, one rank), the pseudo-gradient made on a stream of its own right
       before the exchange starts: the average against the same reduction done in the
       training thread, and the device current in the exchange's thread. Not timed: the
       dry run runs it too (gloo on CPU).

Targets, printed as met / NOT met: our AdamW <= 1.1x the step time of torch fused
AdamW at 500 tensors; every rule >= 80% of the copy bandwidth at 300 M parameters;
zero host syncs in an optimizer step or a callback hook.

How to run (from the repository root, after ``make setup TORCH_SPEC=torch``; needs
torch, triton and lightning only)
    python benchmarks/gpu_check.py                 # a CUDA machine, a few minutes
    python benchmarks/gpu_check.py --skip-compiled # without the torch.compile runs
    python benchmarks/gpu_check.py --dry-run       # anywhere, seconds: checks this script

``--dry-run`` checks the script's own plumbing: it parses its arguments, enumerates
the kernels and runs the correctness check on tiny sizes (on CPU through the Triton
interpreter, ``TRITON_INTERPRET=1``), writes the JSON (to a temporary directory unless
``--out``) and prints the tables; the timed sections say they were skipped and why.
Without CUDA and without ``--dry-run`` it measures nothing and says so.

Writes ``benchmarks/results/gpu_check.json`` (or ``--out``) after every section, so an
interrupted run keeps what it measured, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # check the checkout, installed or not
sys.path.insert(0, str(REPO / "benchmarks"))

# Sizes of the correctness check: odd, across the Triton programs' 1024-element blocks.
GPU_SHAPES = [(7,), (33, 5), (1023,), (4099,), (257, 129)]
DRY_RUN_SHAPES = [(7,), (33, 5), (129,)]
# The step count each tensor is at: a fresh one, one inside the warm-ups, one far along.
START_STEPS = [1.0, 9.0, 1000.0]
# Values of the 0-d hyperparameter tensors, by argument name (any other: 0.5).
HYPERPARAMETER_VALUES = dict(
    lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9999, eps=1e-8, weight_decay=0.1,
    alpha=0.9, lamb=2.0, decay=0.99, momentum=0.9,
)  # fmt: skip
# Keyword options without a default, by name.
OPTION_VALUES = dict(block_size=64)
# What each positional list argument holds, by name; any other name is fp32 optimizer state.
VALUE_LISTS = {"params", "grads", "currents", "values", "global_params", "pseudo_grads", "tensors"}
STEP_LISTS = {"steps", "variance_steps"}
INT_OUTPUTS = {"quantized": ("int8", 1), "packed": ("uint8", 8)}  # dtype, elements per output element

# Parameter sets of the timed sections: (parameters, tensors), GPT-like (optimizer_step.model_shapes).
PARAMETER_SETS = [(25e6, 50), (300e6, 500)]
# Our rules timed with backend="triton", by the name of their class in lightning_converge.optim.
RULES = ("AdamW", "ADOPT", "Lion", "AdEMAMix", "Adan")
COPY_MB = 1024
TARGET_ADAMW_RATIO = 1.1
TARGET_BANDWIDTH_FRACTION = 0.8
SYNC_WARNING = "synchronizing CUDA operation"


# -- 1. kernels against their reference --------------------------------------------------------


def exported_kernels() -> dict[str, Any]:
    """Every :class:`Kernel` that :mod:`lightning_converge.kernels` exports, by name."""
    from lightning_converge import kernels

    return {
        name: getattr(kernels, name) for name in kernels.__all__ if isinstance(getattr(kernels, name), kernels.Kernel)
    }


def _annotation(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def kernel_variants(kernel: Any) -> list[dict[str, bool]]:
    """The default options, then each boolean option flipped on its own."""
    flags = {
        name: p.default
        for name, p in inspect.signature(kernel.body).parameters.items()
        if p.kind is p.KEYWORD_ONLY and isinstance(p.default, bool)
    }
    return [{}] + [{name: not default} for name, default in flags.items()]


def build_inputs(kernel: Any, dtype, shapes, device, seed: int) -> tuple[list, dict]:
    """Positional and keyword arguments for ``kernel``, from the names in its signature.

    Value lists (parameters, gradients, ...) are in ``dtype``; optimizer state fp32
    (second moments non-negative); step counts 0-d fp32 tensors; quantizer outputs
    int8/uint8 and fp32 scales per block. Changing hyperparameters are 0-d tensors,
    float64 for the optimizer rules (as the optimizers pass them), else fp32 (as the
    callbacks do). Keyword arguments the kernel's ``step_factors`` computes are left out.
    """
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    parameters = inspect.signature(kernel.body).parameters
    block_size = OPTION_VALUES["block_size"] if "block_size" in parameters else None
    if block_size is not None:  # the quantizers take flat tensors
        shapes = [(math.prod(shape),) for shape in shapes]
    positional = [p for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    hyper_dtype = torch.float64 if positional[0].name == "params" else torch.float32

    def random_list(dtype_, positive=False):
        draw = torch.rand if positive else torch.randn
        return [draw(shape, generator=generator, device=device).to(dtype_) for shape in shapes]

    args = []
    for p in positional:
        name = p.name
        if name in VALUE_LISTS:
            args.append(random_list(dtype))
        elif name in STEP_LISTS:
            steps = [START_STEPS[i % len(START_STEPS)] for i in range(len(shapes))]
            if name == "variance_steps":  # the variance froze at or before the step
                steps = [min(step, 5.0) for step in steps]
            args.append([torch.tensor(step, device=device) for step in steps])
        elif name == "residuals":
            args.append([0.1 * t for t in random_list(torch.float32)])
        elif name in INT_OUTPUTS:
            out_dtype, per_element = INT_OUTPUTS[name]
            args.append(
                [
                    torch.zeros(-(-shape[0] // per_element), dtype=getattr(torch, out_dtype), device=device)
                    for shape in shapes
                ]
            )
        elif name == "scales":
            args.append([torch.zeros(-(-shape[0] // block_size), device=device) for shape in shapes])
        else:
            args.append(random_list(torch.float32, positive="sq" in name))
    kwargs = {}
    for p in parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.default is not p.empty:
            continue
        if _annotation(p) == "Tensor":
            kwargs[p.name] = torch.tensor(HYPERPARAMETER_VALUES.get(p.name, 0.5), dtype=hyper_dtype, device=device)
        elif p.name in OPTION_VALUES:
            kwargs[p.name] = OPTION_VALUES[p.name]
        elif kernel.step_factors is None:
            raise ValueError(f"no value for {kernel.__name__}'s argument {p.name!r}")
    return args, kwargs


def compare(actual: Any, expected: Any) -> tuple[float, float]:
    """(largest |actual - expected|, largest error in units of the tolerance) over all tensors.

    Tolerance: fp32 ``1e-6 + 1e-5 |expected|``; bf16 one unit in the last place
    (``1e-6 + 2**-7 |expected|``: the two implementations round fp32 results on their
    own); integers exactly (every mismatch counts as 2 units).
    """
    import torch

    worst_abs, worst_units = 0.0, 0.0
    pairs = []
    for a, e in zip(actual, expected):
        if isinstance(a, (list, tuple)):
            pairs += [(x, y) for x, y in zip(a, e)]
        elif isinstance(a, torch.Tensor):
            pairs.append((a, e))
    for a, e in pairs:
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            mismatches = (a != e).any().item()
            worst_abs = max(worst_abs, (a.long() - e.long()).abs().max().item())
            worst_units = max(worst_units, 2.0 if mismatches else 0.0)
            continue
        rtol = 2**-7 if a.dtype in (torch.bfloat16, torch.float16) else 1e-5
        difference = (a.double() - e.double()).abs()
        worst_abs = max(worst_abs, difference.max().item())
        worst_units = max(worst_units, (difference / (1e-6 + rtol * e.double().abs())).max().item())
    return worst_abs, worst_units


def check_kernels(device, shapes) -> list[dict]:
    """Each kernel's Triton implementation against its reference: one row per kernel, options and dtype."""
    import torch

    rows = []
    for name, kernel in exported_kernels().items():
        try:
            triton_impl = kernel.triton
        except NotImplementedError:
            rows.append(dict(kernel=name, options={}, dtype=None, status="no triton version"))
            continue
        except ImportError as error:
            rows.append(dict(kernel=name, options={}, dtype=None, status="skipped", detail=f"triton: {error}"))
            continue
        for options in kernel_variants(kernel):
            for dtype in (torch.float32, torch.bfloat16):
                row = dict(kernel=name, options=options, dtype=str(dtype).removeprefix("torch."))
                try:
                    args, kwargs = build_inputs(kernel, dtype, shapes, device, seed=len(rows))
                    expected = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
                    with warnings.catch_warnings():  # ADOPT's clip at step 1: log(0) under the interpreter
                        warnings.simplefilter("ignore", RuntimeWarning)
                        expected_out = kernel.reference(*expected, **kwargs, **options)
                        actual_out = triton_impl(*args, **kwargs, **options)
                    max_abs, units = compare([*args, actual_out], [*expected, expected_out])
                    row.update(
                        status="pass" if units <= 1.0 else "FAIL", max_abs_diff=max_abs, error_in_tolerances=units
                    )
                except Exception as error:  # noqa: BLE001 -- a row, not a crash: the other kernels still get checked
                    row.update(status="error", detail=f"{type(error).__name__}: {error}"[:300])
                rows.append(row)
    return rows


# -- 2-4. optimizer steps: time, launches, host syncs --------------------------------------------


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on CPU, where nothing is queued."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(run: Callable[[], Any], device) -> dict:
    """Run ``run`` under ``torch.cuda.set_sync_debug_mode("warn")``: how many synchronizing
    CUDA calls it made, and the source lines that made them (the first few). On CPU:
    runs it and reports ``host_syncs=None``."""
    import torch

    if device.type != "cuda":
        run()
        return dict(host_syncs=None, where=["not available: no CUDA"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return dict(host_syncs=len(syncs), where=where[:8])


def count_launches(run: Callable[[], Any], device) -> dict:
    """GPU kernels and memcpy/memset operations ``run`` put on the device, from ``torch.profiler``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        run()
        return dict(kernels=None, detail="not available: no CUDA")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as error:  # noqa: BLE001 -- no CUPTI, a profiler that cannot start: say so
        return dict(kernels=None, detail=f"not available: {type(error).__name__}: {error}"[:200])
    copies = [e for e in device_events if e.name.startswith(("Memcpy", "Memset"))]
    return dict(kernels=len(device_events) - len(copies), memcpy_memset=len(copies))


def gpu_parameters(shapes, seed: int, device) -> list:
    """fp32 parameters with fixed random gradients, drawn on ``device``."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator, device=device))
        param.grad = 1e-3 * torch.randn(shape, generator=generator, device=device)
        params.append(param)
    return params


def optimizer_contenders(params, skip_compiled: bool) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Name -> (rule, step function). All share ``params`` (each keeps its own state):
    the values move, which timing does not mind."""
    import torch
    from optimizer_step import HYPERPARAMETERS

    import lightning_converge.optim as ours

    contenders = {
        "torch AdamW fused": ("AdamW", torch.optim.AdamW(params, **HYPERPARAMETERS["AdamW"], fused=True).step)
    }
    for rule in RULES:
        optimizer = getattr(ours, rule)(params, **HYPERPARAMETERS[rule], backend="triton")
        contenders[f"ours {rule} triton"] = (rule, optimizer.step)
    if not skip_compiled:
        contenders["ours AdamW compiled"] = (
            "AdamW",
            ours.AdamW(params, **HYPERPARAMETERS["AdamW"], backend="compiled").step,
        )
    return contenders


def time_rounds(
    steps: dict[str, Callable[[], Any]], rounds: int, per_round: int, seed: int, device
) -> dict[str, float]:
    """Median seconds per call of each function: ``per_round`` calls between two device
    synchronizations, functions in a new random order every round."""
    samples = {name: [] for name in steps}
    order = list(steps)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_optimizers(args, device, parameter_sets=PARAMETER_SETS, copy_mb: int = COPY_MB) -> dict:
    """Sections 2-4 on each of ``parameter_sets`` ((parameters, tensors) pairs): step times,
    GB/s, launches and host syncs per step; the copy bandwidth over tensors of ``copy_mb``."""
    import torch
    from optimizer_step import BYTES_PER_PARAM, model_shapes

    numel = copy_mb * 2**20 // 4
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    acc, addend = torch.randn(numel, device=device), torch.full((numel,), 1e-7, device=device)
    roofline_kernels = {f"copy_ ({copy_mb} MB)": (8 * numel, lambda: dst.copy_(src)),
                        f"add_ in place ({copy_mb} MB)": (12 * numel, lambda: acc.add_(addend))}  # fmt: skip
    sets = []
    for n_params, n_tensors in parameter_sets:
        shapes = model_shapes(n_params, n_tensors)
        count = sum(math.prod(shape) for shape in shapes)
        params = gpu_parameters(shapes, args.seed, device)
        contenders = optimizer_contenders(params, args.skip_compiled)
        first_step_s = {}
        for name, (_, step) in contenders.items():  # warm-up: triton's JIT, torch.compile, state
            start = time.perf_counter()
            step()
            synchronize(device)
            first_step_s[name] = time.perf_counter() - start
            print(f"  {count / 1e6:.0f} M parameters, {name}: first step {first_step_s[name]:.1f} s", flush=True)
            for _ in range(2):
                step()
        steps = {name: step for name, (_, step) in contenders.items()}
        steps.update({name: run for name, (_, run) in roofline_kernels.items()})
        medians = time_rounds(steps, args.rounds, args.steps_per_round, args.seed, device)
        copy_gb_per_s = {name: moved / medians[name] / 1e9 for name, (moved, _) in roofline_kernels.items()}
        roofline = max(copy_gb_per_s.values())
        fused_ms = medians["torch AdamW fused"] * 1e3
        rows = {}
        for name, (rule, step) in contenders.items():
            gb_per_s = count * BYTES_PER_PARAM[rule] / medians[name] / 1e9
            rows[name] = dict(
                rule=rule,
                median_ms=medians[name] * 1e3,
                first_step_s=first_step_s[name],
                gb_per_s=gb_per_s,
                bandwidth_fraction=gb_per_s / roofline,
                ratio_vs_torch_fused=medians[name] * 1e3 / fused_ms,
                launches=count_launches(step, device),
                **count_host_syncs(step, device),
            )
        sets.append(dict(params=count, tensors=len(shapes), copy_gb_per_s=copy_gb_per_s,
                         roofline_gb_per_s=roofline, rows=rows))  # fmt: skip
        del params, contenders, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  timed {count / 1e6:.0f} M parameters in {len(shapes)} tensors", flush=True)
    return dict(sets=sets)


# -- 5. callbacks ---------------------------------------------------------------------------------


def timed_callback(cls: type, hook: str, sync_check_step: int, warmup: int, device) -> type:
    """A subclass of the callback ``cls`` whose ``hook`` is timed (synchronized before and after)
    at every step from ``warmup`` on, except at ``sync_check_step``, where its host syncs are counted."""

    def wrapped(self, trainer, *args):
        def run():
            return getattr(super(subclass, self), hook)(trainer, *args)

        if trainer.global_step == sync_check_step and self.host_syncs is None:
            self.host_syncs = count_host_syncs(run, device)
            return
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if trainer.global_step >= warmup:
            self.hook_seconds.append(time.perf_counter() - start)

    def init(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        self.hook_seconds, self.host_syncs = [], None

    subclass = type(f"Timed{cls.__name__}", (cls,), {"__init__": init, hook: wrapped})
    return subclass


def measure_callbacks(args, device, parameter_set=PARAMETER_SETS[0], steps: int = 30) -> dict:
    """Per callback, a fit of ``steps`` steps on ``parameter_set`` ((parameters, tensors); 25 M in 50):
    the hook's time per step and its host syncs."""
    import logging

    import lightning as L
    import torch
    from optimizer_step import model_shapes
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_converge.optim as ours
    from lightning_converge.callbacks import EMA, Grokfast

    shapes = model_shapes(*parameter_set)
    count = sum(math.prod(shape) for shape in shapes)
    warmup, sync_step = 5, 3
    # Lightning's info lines (devices found, "fit stopped") and its one-worker hint would repeat for every fit.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    class ParameterSet(L.LightningModule):
        """The parameter set; the loss is linear in it, so each step's gradients are fixed directions."""

        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(shape)) for shape in shapes])
            self.directions = None

        def training_step(self, batch, batch_idx):
            if self.directions is None:
                self.directions = [1e-3 * torch.randn_like(p) for p in self.weights]
            return sum((p * d).sum() for p, d in zip(self.weights, self.directions))

        def configure_optimizers(self):
            return ours.AdamW(self.parameters(), lr=1e-3)

    class StepTimer(L.Callback):
        """Seconds from a training batch's start to its end (after the other callbacks' hooks)."""

        def __init__(self):
            self.seconds = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            if trainer.global_step > warmup:
                self.seconds.append(time.perf_counter() - self.start)

    # Name -> (class, timed hook, arguments, bytes its update must move per fp32 parameter: an EMA reads
    # the average and the weight and writes the average, 12; Grokfast reads gradient and slow gradient
    # and writes both, 16; a finiteness check or a logged norm in the hook is on top of that).
    candidates: dict[str, tuple[Any, str, dict, int]] = {
        "ours EMA": (EMA, "on_train_batch_end", dict(decay=0.999), 12),
        "ours Grokfast": (Grokfast, "on_before_optimizer_step", dict(alpha=0.98, lamb=2.0), 16),
    }
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        candidates["Lightning EMAWeightAveraging"] = (EMAWeightAveraging, "on_train_batch_end", dict(decay=0.999), 12)
    except ImportError:
        pass
    rows = {}
    for name in ["no callback", *candidates]:
        callbacks, timed = [], None
        if name in candidates:
            cls, hook, kwargs, _ = candidates[name]
            timed = timed_callback(cls, hook, sync_step, warmup, device)(**kwargs)
            callbacks.append(timed)
        timer = StepTimer()
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=steps, callbacks=[*callbacks, timer], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(ParameterSet(), DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1))
        row = dict(step_ms=statistics.median(timer.seconds) * 1e3)
        if timed is not None:
            hook_s = statistics.median(timed.hook_seconds)
            bytes_per_param = candidates[name][3]
            row.update(hook=candidates[name][1], hook_ms=hook_s * 1e3,
                       gb_per_s=count * bytes_per_param / hook_s / 1e9, **timed.host_syncs)  # fmt: skip
        rows[name] = row
        print(f"  fitted with {name}", flush=True)
    missing = {} if "Lightning EMAWeightAveraging" in candidates else {
        "Lightning EMAWeightAveraging": f"not available: lightning {L.__version__} has no EMAWeightAveraging"
    }  # fmt: skip
    return dict(params=count, tensors=len(shapes), steps=steps, rows=rows, not_available=missing)


# -- 6. DiLoCo's exchange thread on the device ----------------------------------------------------


def check_diloco_exchange(device, numel: int) -> dict:
    """DiLoCo's pseudo-gradient exchange (``strategies/diloco/exchange.py``) on ``device``, in a process
    group of one rank (NCCL on CUDA, gloo elsewhere: the dry run checks this function's plumbing).

    With a compressor, whose collectives run on the exchange's thread (int8: an all-gather on one rank;
    onebit: an all-to-all, then an all-gather): the pseudo-gradient is made by a chain of kernels on a
    stream of the training thread's own, and ``start`` is called at once, so a thread that did not wait
    for that stream would read it unfinished; the average is used on that stream at once after
    ``resolve``. Each row compares against the same compressor run synchronously in the training
    thread, and records the thread and the device current in it. Without a compressor (fp32): the
    asynchronous all-reduce issued from the training thread.
    """
    import contextlib
    import threading

    import torch
    import torch.distributed as dist

    from lightning_converge.comm import Exchange, Layout, make_compressor
    from lightning_converge.strategies.diloco.exchange import PendingSync, PseudoGradientExchange

    initialized_here = not dist.is_initialized()
    if initialized_here:
        store = dist.HashStore()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    layout = Layout(("pseudo_gradient",), (torch.Size([numel]),))
    rows = {}
    try:
        for name in ("int8", "onebit", "fp32"):
            compressor = None if name == "fp32" else make_compressor(name)
            exchange = PseudoGradientExchange(compressor, owner="gpu_check")
            exchange.open(None)
            seen = []
            run_on_device = exchange._run_on_device

            def recording(*args, _run=run_on_device, _seen=seen, **kwargs):
                result = _run(*args, **kwargs)
                current = torch.cuda.current_device() if device.type == "cuda" else None
                _seen.append((threading.current_thread().name, current))
                return result

            exchange._run_on_device = recording
            producer = torch.cuda.Stream(device) if device.type == "cuda" else None
            base = torch.randn(numel, device=device, generator=torch.Generator(device).manual_seed(0))
            if producer is not None:
                producer.wait_stream(torch.cuda.current_stream(device))  # base is made on the default stream
            with torch.cuda.stream(producer) if producer is not None else contextlib.nullcontext():
                pseudo_gradient = base.clone()
                for _ in range(50):  # a queue of work for a thread that does not wait to overtake
                    pseudo_gradient.mul_(1.01).add_(base, alpha=0.01)
                expected_input = pseudo_gradient.clone()
                pending = PendingSync(None, exchange.start(pseudo_gradient, layout, step=0))
                average = exchange.resolve(pending, step=0).clone()  # used on the producer's stream at once
            synchronize(device)
            exchange.close()
            # The same reduction in this thread, on the default group (a world of one rank).
            expected = expected_input
            if name != "fp32":
                expected = make_compressor(name).reduce(expected_input.clone(), layout, Exchange(), 0)
            rows[name] = dict(
                equal=bool(torch.equal(average.cpu(), expected.cpu())),
                max_abs_diff=float((average - expected).abs().max()),
                thread=[thread for thread, _ in seen],
                device_in_thread=[current for _, current in seen],
                device=str(device),
            )
    finally:
        if initialized_here:
            dist.destroy_process_group()
    return dict(rows=rows, all_equal=all(row["equal"] for row in rows.values()))


def diloco_exchange_lines(section: dict, table: Callable[[list[str], list[list[Any]]], list[str]]) -> list[str]:
    """The markdown of :func:`check_diloco_exchange`'s section."""
    if "skipped" in section:
        return ["", f"DiLoCo exchange: skipped ({section['skipped']})"]
    return ["", "DiLoCo exchange on the device: the average against the same reduction in the training thread"] + table(
        ["exchange", "device", "equal", "max |diff|", "thread", "current device in the thread"],
        [[name, r["device"], "yes" if r["equal"] else "NO", f"{r['max_abs_diff']:.2e}", ", ".join(r["thread"]),
          ", ".join(str(d) for d in r["device_in_thread"])] for name, r in section["rows"].items()],
    )  # fmt: skip


# -- targets, tables, the record ------------------------------------------------------------------


def targets(report: dict) -> list[dict]:
    """The issue's targets; ``met`` is None where the section was not measured."""
    found = []
    optimizers = report["optimizers"]
    sets = optimizers.get("sets")
    # The largest set: measured, or (not measured) the one a run would measure.
    params, tensors = (sets[-1]["params"], sets[-1]["tensors"]) if sets else PARAMETER_SETS[-1]
    for name in ("ours AdamW triton", "ours AdamW compiled"):
        row = sets[-1]["rows"].get(name) if sets else None
        found.append(dict(
            target=f"{name} <= {TARGET_ADAMW_RATIO}x torch fused AdamW at {tensors} tensors",
            measured=f"{row['ratio_vs_torch_fused']:.2f}x" if row else optimizers.get("skipped", "not measured"),
            met=row["ratio_vs_torch_fused"] <= TARGET_ADAMW_RATIO if row else None,
        ))  # fmt: skip
    for rule in RULES:
        row = sets[-1]["rows"].get(f"ours {rule} triton") if sets else None
        found.append(dict(
            target=f"ours {rule} triton >= {TARGET_BANDWIDTH_FRACTION:.0%} of copy bandwidth at {params / 1e6:.0f} M parameters",
            measured=f"{row['bandwidth_fraction']:.0%}" if row else optimizers.get("skipped", "not measured"),
            met=row["bandwidth_fraction"] >= TARGET_BANDWIDTH_FRACTION if row else None,
        ))  # fmt: skip
    syncs = {}
    for measured_set in sets or []:
        for name, row in measured_set["rows"].items():
            if name.startswith("ours"):
                syncs[f"{name} step ({measured_set['tensors']} tensors)"] = row
    for name, row in report["callbacks"].get("rows", {}).items():
        if name.startswith("ours") and "host_syncs" in row:
            syncs[f"{name} {row['hook']}"] = row
    if not syncs:
        reason = optimizers.get("skipped", "not measured")
        return found + [dict(target="zero host syncs in an optimizer step or callback hook", measured=reason, met=None)]
    for name, row in syncs.items():
        where = f" at {', '.join(row['where'])}" if row["where"] else ""
        found.append(dict(target=f"zero host syncs: {name}", measured=f"{row['host_syncs']}{where}",
                          met=None if row["host_syncs"] is None else row["host_syncs"] == 0))  # fmt: skip
    return found


def markdown(report: dict) -> str:
    def table(header: list[str], rows: list[list[Any]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
        ]

    lines = [f"Kernels: Triton against the reference on {report['kernel_device']}"]
    lines += table(
        ["kernel", "options", "dtype", "status", "max |diff|", "error / tolerance"],
        [[r["kernel"], ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults", r["dtype"] or "",
          r["status"] + (f": {r['detail']}" if r.get("detail") else ""),
          f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "",
          f"{r['error_in_tolerances']:.2f}" if "error_in_tolerances" in r else ""] for r in report["kernels"]],
    )  # fmt: skip
    optimizers = report["optimizers"]
    if "skipped" in optimizers:
        lines += ["", f"Optimizer steps, launches, host syncs: skipped ({optimizers['skipped']})"]
    for measured in optimizers.get("sets", []):
        lines += ["", (f"Optimizer step, {measured['params'] / 1e6:.0f} M fp32 parameters in {measured['tensors']} "
                       f"tensors (copy bandwidth {measured['roofline_gb_per_s']:.0f} GB/s)")]  # fmt: skip
        lines += table(
            ["implementation", "ms/step", "GB/s", "% of copy bw", "x torch fused", "GPU kernels", "memcpy/memset",
             "host syncs", "first step s"],
            [[name, f"{r['median_ms']:.3f}", f"{r['gb_per_s']:.0f}", f"{r['bandwidth_fraction']:.0%}",
              f"{r['ratio_vs_torch_fused']:.2f}", r["launches"].get("kernels", r["launches"].get("detail")),
              r["launches"].get("memcpy_memset", ""), r["host_syncs"], f"{r['first_step_s']:.1f}"]
             for name, r in measured["rows"].items()],
        )  # fmt: skip
    callbacks = report["callbacks"]
    if "skipped" in callbacks:
        lines += ["", f"Callbacks: skipped ({callbacks['skipped']})"]
    else:
        lines += [
            "",
            f"Callbacks in a Trainer, {callbacks['params'] / 1e6:.0f} M parameters in {callbacks['tensors']} tensors",
        ]
        lines += table(
            ["callback", "step ms", "hook", "hook ms", "GB/s in the hook", "host syncs in the hook"],
            [[name, f"{r['step_ms']:.2f}", r.get("hook", ""), f"{r['hook_ms']:.2f}" if "hook_ms" in r else "",
              f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else "",
              f"{r['host_syncs']} {' '.join(r['where'])}" if "host_syncs" in r else ""]
             for name, r in callbacks["rows"].items()]
            + [[name, "", "", "", "", reason] for name, reason in callbacks["not_available"].items()],
        )  # fmt: skip
    lines += diloco_exchange_lines(report.get("diloco_exchange", dict(skipped="not run")), table)
    lines += [""]
    lines += table(
        ["target", "measured", "met"],
        [
            [t["target"], t["measured"], {True: "yes", False: "NO", None: "not checked"}[t["met"]]]
            for t in report["targets"]
        ],
    )
    return "\n".join(lines)


def machine(device) -> dict:
    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = dict(torch=torch.__version__, triton=version("triton"), lightning=version("lightning"),
                python=platform.python_version(), device=str(device))  # fmt: skip
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check this script: tiny kernel checks (CPU: Triton interpreter), no timings")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/gpu_check.json; --dry-run: a temporary directory)")  # fmt: skip
    parser.add_argument("--skip-compiled", action="store_true", help="leave out our AdamW with backend='compiled'")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every implementation)")
    parser.add_argument("--steps-per-round", type=int, default=5, help="steps of one implementation in a row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("No CUDA device here: nothing measured. `--dry-run` checks this script on CPU.")
        return 0
    if not cuda:
        # Before triton is first imported (the kernels load it lazily): the interpreter runs it on CPU.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    out = args.out or (Path(tempfile.mkdtemp()) / "gpu_check.json" if args.dry_run else RESULTS / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped = "--dry-run" if args.dry_run else None
    report = dict(
        check="gpu_check",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
        dry_run=args.dry_run,
        machine=machine(device),
        kernel_device=str(device) + ("" if cuda else " (TRITON_INTERPRET=1)"),
        kernels=[],
        optimizers=dict(skipped=skipped or "not run yet"),
        callbacks=dict(skipped=skipped or "not run yet"),
        diloco_exchange=dict(skipped="not run yet"),
    )

    def write() -> None:
        report["targets"] = targets(report)
        out.write_text(json.dumps(report, indent=2) + "\n")

    sections = [("kernels", lambda: check_kernels(device, DRY_RUN_SHAPES if args.dry_run else GPU_SHAPES))]
    if not args.dry_run:
        sections += [("optimizers", lambda: measure_optimizers(args, device)),
                     ("callbacks", lambda: measure_callbacks(args, device))]  # fmt: skip
    # not timed: it runs in the dry run too (gloo on CPU), to check its plumbing
    sections += [("diloco_exchange", lambda: check_diloco_exchange(device, 4099 if args.dry_run else 1 << 24))]
    for name, measure in sections:
        print(f"{name} ...", flush=True)
        try:
            report[name] = measure()
        except Exception as error:  # noqa: BLE001 -- keep the other sections' results
            report[name] = dict(skipped=f"failed: {type(error).__name__}: {error}"[:300])
            traceback.print_exc()
        write()
    if args.dry_run:
        print(f"\nTimings skipped (--dry-run{'' if cuda else ', no CUDA device'}): they need a CUDA device.")
    print()
    print(markdown(report))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
