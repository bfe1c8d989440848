"""A user's first fit and the steady-state step: the default backend ("auto") against "reference".

What it measures
    1. First fit. An 8-step ``Trainer.fit`` of a tiny Hugging Face Llama (built
       from a config, randomly initialized, nothing downloaded) with our AdamW, EMA,
       LAWA, Grokfast and GradES, each run in a fresh Python process, as a user's
       first run is. Backends: ``reference``; ``auto`` (the default); ``compiled``
       (what the default was before it compiled only where it pays) with a cold
       inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``, as on a new machine)
       and again with that cache warm (a second process reusing it: torch's FX-graph
       and AOTAutograd caches, on by default). Figures: ``Trainer.fit`` wall-clock,
       the whole process, and the median step time of the fit's last steps.
    2. Steady state. Our AdamW on model-shaped fp32 parameters (28 M in 53 tensors,
       as in DESIGN.md) with backends ``reference``, ``compiled`` and ``auto``, each
       on its own copy, and two streaming kernels that measure the machine's
       bandwidth (the roofline), timed in interleaved rounds. ``auto`` would run the
       reference for the number of steps its policy computes (reported) before it
       compiles; stepping the reference that long takes minutes here, so the
       benchmark makes it switch at once: what is timed is ``auto``'s dispatch on
       top of the graph it shares with ``compiled``. Also: the cold compile of that
       pass (the compiled backend's first step, in a process with a fresh inductor
       cache), hence the measured break-even (steps after which compiling has paid
       for itself) beside the step at which ``auto`` switches.

    Runs of different backends alternate, in an order rotated every repeat, so
    that load from other jobs on this shared machine falls on all of them alike;
    the load average is recorded. The fits run with one torch thread
    (``--fit-threads``): with two, whenever other jobs hold the cores, torch's
    OpenMP threads wait on each other and a step takes 40x longer at random
    (measured: 10 ms or 500 ms a step for the same fit), whatever the backend. Targets: the first fit with ``auto`` within 1.5x
    of ``reference``; ``auto``'s steady-state step within 1.1x of ``compiled``'s.

How to run (from the repository root; needs the ``bench`` extra, which has transformers)
    python benchmarks/first_fit.py            # 5 repeats + 28 M steady state: about 10 minutes on 2 busy cores
    python benchmarks/first_fit.py --quick    # 1 repeat, 3 M parameters: first_fit_quick.{json,png}

Writes benchmarks/results/first_fit.json and first_fit.png and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, StreamingRoofline, machine, markdown_table, result_paths  # noqa: E402
from optimizer_step import HYPERPARAMETERS, make_parameters, model_shapes  # noqa: E402

FIT_STEPS = 8
# (label, backend): every "compiled" run of a repeat shares one inductor cache, cold for the first.
FIT_RUNS = [("reference", "reference"), ("auto", "auto"), ("compiled, cold cache", "compiled"),
            ("compiled, warm cache", "compiled")]  # fmt: skip
TARGET_FIRST_FIT_RATIO = 1.5
TARGET_STEADY_RATIO = 1.1
ADAMW_BYTES_PER_PARAM = 28  # read p g m v, write p m v


def fit_once(backend: str, steps: int, threads: int) -> dict:
    """One fit in this process (the worker of part 1); returns its times."""
    import logging

    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_converge.callbacks import EMA, LAWA, GradES, Grokfast
    from lightning_converge.optim import AdamW

    class TinyLlama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
            self.model = LlamaForCausalLM(config)

        def training_step(self, batch, batch_index):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return AdamW(self.parameters(), lr=1e-3, backend=backend)

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.ends.append(time.perf_counter())

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    tokens = torch.randint(0, 256, (steps * 4, 32))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4)
    step_times = StepTimes()
    callbacks = [EMA(backend=backend), LAWA(validate_with="live", backend=backend), Grokfast(backend=backend),
                 GradES(tau=0.3, verbose=False), step_times]  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(TinyLlama(), loader)
    fit_s = time.perf_counter() - start
    late = [b - a for a, b in zip(step_times.ends[steps // 2 - 1 :], step_times.ends[steps // 2 :])]
    return dict(fit_s=fit_s, late_step_ms=statistics.median(late) * 1e3)


def run_fit_process(backend: str, cache_dir: str, threads: int) -> dict:
    """A fresh Python process that imports the pack and fits once; its wall-clock included."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    env.pop("LIGHTNING_CONVERGE_BACKEND", None)
    start = time.perf_counter()
    command = [sys.executable, __file__, "--fit-worker", backend, "--fit-threads", str(threads)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(result, process_s=time.perf_counter() - start)


def first_fits(repeats: int, threads: int) -> dict:
    times: dict[str, list[dict]] = {label: [] for label, _ in FIT_RUNS}
    load = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as compiled_cache:
            # Rotate the order of the cold runs; the warm run follows the cold compiled one it reuses.
            cold_runs = FIT_RUNS[:3]
            order = cold_runs[repeat % 3 :] + cold_runs[: repeat % 3]
            for label, backend in order + FIT_RUNS[3:]:
                cache = compiled_cache if backend == "compiled" else cold
                times[label].append(run_fit_process(backend, cache, threads))
                print(f"  repeat {repeat + 1}/{repeats} {label}: fit {times[label][-1]['fit_s']:.2f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        load.append(os.getloadavg()[0])
    rows = {}
    for label, runs in times.items():
        rows[label] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        rows[label]["fit_s_all"] = [run["fit_s"] for run in runs]
    reference = rows["reference"]
    for row in rows.values():
        row["fit_ratio_vs_reference"] = row["fit_s"] / reference["fit_s"]
        row["process_ratio_vs_reference"] = row["process_s"] / reference["process_s"]
    return dict(steps=FIT_STEPS, repeats=repeats, threads=threads, rows=rows, load_average_per_repeat=load)


def steady_state(n_params: float, n_tensors: int, rounds: int, steps_per_round: int) -> dict:
    """Part 2, in a process whose inductor cache is fresh (see main)."""
    from lightning_converge.kernels import adamw, dispatch
    from lightning_converge.optim import AdamW

    shapes = model_shapes(n_params, n_tensors)
    count = sum(math.prod(shape) for shape in shapes)
    optimizers = {}
    for backend in ("reference", "compiled", "auto"):
        params = make_parameters(shapes, seed=0)
        optimizers[backend] = (AdamW(params, **HYPERPARAMETERS["AdamW"], backend=backend), params)

    def timed(backend: str) -> float:
        start = time.perf_counter()
        optimizers[backend][0].step()
        return time.perf_counter() - start

    cold_compile_s = timed("compiled")  # the first step compiles: torch.compile's start-up + this pass
    # When auto switches on these arguments (the compiled optimizer's state has their shapes now)...
    state = [optimizers["compiled"][0].state[p] for p in optimizers["compiled"][1]]
    switch = adamw.calls_before_compiling(optimizers["compiled"][1], [p.grad for p in optimizers["compiled"][1]],
                                          [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                                          [s["step"] for s in state])  # fmt: skip
    # ...but stepping the reference that often would take minutes on a busy machine: make auto switch at
    # once. What is timed is then auto's dispatch on top of the compiled graph it shares with "compiled".
    dispatch.COMPILE_COST_BYTES_PER_TENSOR = 0
    timed("auto")
    roofline = StreamingRoofline(megabytes=128)
    samples = {backend: [] for backend in optimizers}
    timed("reference")  # its first step allocates the state
    for round_index in range(rounds):
        order = list(optimizers)[round_index % 3 :] + list(optimizers)[: round_index % 3]
        for backend in order:
            samples[backend] += [timed(backend) for _ in range(steps_per_round)]
        roofline.measure(steps_per_round)
    roof = roofline.summary()["roofline_gb_per_s"]
    rows = {}
    for backend, times in samples.items():
        median = statistics.median(times)
        rows[backend] = dict(median_ms=median * 1e3, gb_per_s=count * ADAMW_BYTES_PER_PARAM / median / 1e9,
                             roofline_fraction=count * ADAMW_BYTES_PER_PARAM / median / 1e9 / roof)  # fmt: skip
    saved_s = (rows["reference"]["median_ms"] - rows["compiled"]["median_ms"]) / 1e3
    return dict(
        n_params=count,
        n_tensors=len(shapes),
        rows=rows,
        roofline_gb_per_s=roof,
        auto_over_compiled=rows["auto"]["median_ms"] / rows["compiled"]["median_ms"],
        cold_compile_s=cold_compile_s,
        measured_break_even_calls=cold_compile_s / saved_s,
        auto_switch_calls=switch,
    )


def run_steady_state_process(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, __file__, "--steady-worker", "--params", str(args.params),
                   "--tensors", str(args.tensors), "--rounds", str(args.rounds)]  # fmt: skip
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    print(done.stdout.strip().rsplit("\n", 1)[0], flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tables(fits: dict, steady: dict) -> str:
    fit_rows = [
        [label, f"{row['fit_s']:.2f}", f"{row['fit_ratio_vs_reference']:.2f}x", f"{row['process_s']:.1f}",
         f"{row['late_step_ms']:.1f}"]  # fmt: skip
        for label, row in fits["rows"].items()
    ]
    steady_rows = [
        [backend, f"{row['median_ms']:.1f}", f"{row['gb_per_s']:.1f}", f"{row['roofline_fraction']:.0%}"]
        for backend, row in steady["rows"].items()
    ]
    return "\n\n".join([
        markdown_table(["backend (first fit, 8 steps)", "fit s (median)", "vs reference", "process s",
                        "ms/step, late steps"], fit_rows),  # fmt: skip
        markdown_table([f"backend (AdamW, {steady['n_params'] / 1e6:.1f} M params)", "ms/step", "GB/s",
                        "of roofline"], steady_rows),  # fmt: skip
        f"auto compiles this AdamW pass after {steady['auto_switch_calls']} reference steps; its cold compile "
        f"took {steady['cold_compile_s']:.1f} s, which paid for itself after "
        f"{steady['measured_break_even_calls']:.0f} steps here.",
    ])  # fmt: skip


def plot(fits: dict, steady: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    labels = list(fits["rows"])
    medians = [fits["rows"][label]["fit_s"] for label in labels]
    spreads = [[m - min(fits["rows"][label]["fit_s_all"]) for m, label in zip(medians, labels)],
               [max(fits["rows"][label]["fit_s_all"]) - m for m, label in zip(medians, labels)]]  # fmt: skip
    left.barh(labels, medians, xerr=spreads, color=["tab:gray", "tab:blue", "tab:orange", "tab:olive"])
    left.invert_yaxis()
    left.set_xlabel("Trainer.fit wall-clock, s (median; whiskers: min-max)")
    left.set_title(f"First fit: tiny HF Llama, {fits['steps']} steps, {fits['repeats']} fresh process(es) each")
    backends = list(steady["rows"])
    right.barh(backends, [steady["rows"][b]["gb_per_s"] for b in backends], color=["tab:gray", "tab:orange", "tab:blue"])
    right.axvline(steady["roofline_gb_per_s"], color="tab:green", linestyle="--", label="roofline")
    right.invert_yaxis()
    right.set_xlabel("GB/s (28 bytes per parameter / median step)")
    right.set_title(f"Steady state: AdamW step, {steady['n_params'] / 1e6:.1f} M parameters")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process fits per backend")
    parser.add_argument("--fit-threads", type=int, default=1, help="torch threads in the fits")
    parser.add_argument("--params", type=float, default=28e6, help="steady state: number of fp32 parameters")
    parser.add_argument("--tensors", type=int, default=53, help="steady state: number of tensors")
    parser.add_argument("--rounds", type=int, default=5, help="steady state: timed rounds of 2 steps each")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 M parameters, 4 rounds")
    parser.add_argument("--fit-worker", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--steady-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.params, args.rounds = 1, 3e6, 3
    return args


def main() -> None:
    args = parse_args()
    if args.fit_worker:
        print(json.dumps(fit_once(args.fit_worker, FIT_STEPS, args.fit_threads)))
        return
    if args.steady_worker:
        print(json.dumps(steady_state(args.params, args.tensors, args.rounds, steps_per_round=2)))
        return
    info = machine()
    print(f"first fit: {args.repeats} repeats (load average {info['load_average'][0]:.1f})", flush=True)
    fits = first_fits(args.repeats, args.fit_threads)
    print("steady state", flush=True)
    steady = run_steady_state_process(args)
    info["load_average_at_end"] = os.getloadavg()
    fit_ratio = fits["rows"]["auto"]["fit_ratio_vs_reference"]
    targets = [
        dict(target=f"first fit with auto within {TARGET_FIRST_FIT_RATIO}x of reference", measured=f"{fit_ratio:.2f}x",
             met=fit_ratio <= TARGET_FIRST_FIT_RATIO),
        dict(target=f"steady state with auto within {TARGET_STEADY_RATIO}x of compiled",
             measured=f"{steady['auto_over_compiled']:.2f}x", met=steady["auto_over_compiled"] <= TARGET_STEADY_RATIO),
    ]  # fmt: skip
    report = dict(
        benchmark="first_fit",
        command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        settings=vars(args),
        machine=info,
        first_fit=fits,
        steady_state=steady,
        targets=targets,
    )
    json_path, png_path = result_paths("first_fit", args.quick)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(fits, steady, png_path)
    print(tables(fits, steady))
    for target in targets:
        print(f"{target['target']}: {target['measured']} ({'met' if target['met'] else 'NOT met'})")
    print(f"wrote {json_path.relative_to(REPO)} and {png_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
