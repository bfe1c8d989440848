"""What the digits benchmarks (``averaging.py``, ``guidance.py``) share.

- :func:`quiet_trainer`: a CPU Trainer without logger, checkpoints, progress bar or sanity check.
- :func:`fit_classifier`: the digits classifier, trained with a seed and callbacks.
- :class:`ValidationCurve`: logged validation metrics after every validation.
- :class:`LoopTimer`: the time of each training-loop iteration, warm-up epochs dropped.
- :class:`StreamingRoofline`: the memory bandwidth a streaming pass gets on this machine.
- :func:`machine`, :func:`markdown_table`, :func:`result_paths`: the record of a run.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout, installed or not
RESULTS = REPO / "benchmarks" / "results"

from examples.digits import Digits, DigitsClassifier  # noqa: E402

# A TensorDataset in the main process is the fastest loader for these tiny data sets.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer that writes nothing and prints nothing; ``kwargs`` go to ``L.Trainer``."""
    # Lightning's info lines (devices found, tips, "fit stopped") would repeat for every fit.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def fit_classifier(
    datamodule: Digits, *, epochs: int, seed: int, callbacks: Sequence[L.Callback] = ()
) -> tuple[DigitsClassifier, L.Trainer]:
    """Train :class:`~examples.digits.DigitsClassifier` (its default SGD) from ``seed`` for ``epochs``."""
    L.seed_everything(seed, verbose=False)
    classifier = DigitsClassifier()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(callbacks))
    trainer.fit(classifier, datamodule)
    return classifier, trainer


class ValidationCurve(L.Callback):
    """Records ``trainer.global_step`` and the logged ``metrics`` after every validation (not the sanity check)."""

    def __init__(self, *metrics: str) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {metric: [] for metric in metrics}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.steps.append(trainer.global_step)
        for metric, values in self.values.items():
            values.append(float(trainer.callback_metrics[metric]))


class LoopTimer(L.Callback):
    """Times training-loop iterations: from one batch's ``on_train_batch_start`` to the next one's.

    Iterations that start in the first ``skip_epochs`` epochs are warm-up and are
    dropped; the rest are split into those within an epoch and those that cross
    into the next epoch (they hold the epoch-end and epoch-start hooks). Each is
    timed on the wall clock and in CPU time (all of this process's threads): on a
    machine shared with other jobs the CPU time is the steadier figure, though it
    leaves out what the process waited for (another rank, I/O).
    """

    def __init__(self, skip_epochs: int = 1) -> None:
        self.skip_epochs = skip_epochs
        self.starts: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.starts.append((trainer.current_epoch, time.perf_counter(), time.process_time()))

    def iterations(self, clock: str = "wall") -> tuple[list[float], list[float]]:
        """(seconds of iterations within an epoch, seconds of iterations crossing an epoch boundary), on the
        ``"wall"`` clock or in ``"cpu"`` time."""
        index = {"wall": 1, "cpu": 2}[clock]
        within, crossing = [], []
        for start, end in zip(self.starts, self.starts[1:]):
            if start[0] >= self.skip_epochs:
                (within if end[0] == start[0] else crossing).append(end[index] - start[index])
        return within, crossing


class StreamingRoofline:
    """The bandwidth this machine delivers to one streaming pass over fp32 tensors of ``megabytes`` each.

    Two kernels: a copy ``dst.copy_(src)`` (4 B read + 4 B written per element)
    and an in-place add ``acc.add_(addend)`` (8 B read + 4 B written, the access
    pattern of a weight-EMA update). An out-of-place copy also pays a hidden read
    of its destination (read-for-ownership) that in-place updates do not; the
    roofline is the faster of the two. Call :meth:`measure` between the runs
    being compared, so that load from other processes falls on both alike.
    """

    def __init__(self, megabytes: int) -> None:
        numel = megabytes * 2**20 // 4
        src, dst = torch.randn(numel), torch.randn(numel)
        acc, addend = torch.randn(numel), torch.full((numel,), 1e-7)
        self.kernels: dict[str, tuple[int, Callable[[], object]]] = {
            f"copy_ ({megabytes} MB)": (8 * numel, lambda: dst.copy_(src)),
            f"add_ in place ({megabytes} MB)": (12 * numel, lambda: acc.add_(addend)),
        }
        self.seconds: dict[str, list[float]] = {name: [] for name in self.kernels}
        for _, run in self.kernels.values():  # fault the pages in before anything is timed
            run()

    def measure(self, repeats: int) -> None:
        for name, (_, run) in self.kernels.items():
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                self.seconds[name].append(time.perf_counter() - start)

    def summary(self) -> dict:
        """Median ms and GB/s of each kernel, and ``roofline_gb_per_s``, the faster one's GB/s."""
        kernels = {}
        for name, (bytes_moved, _) in self.kernels.items():
            median = statistics.median(self.seconds[name])
            kernels[name] = dict(bytes=bytes_moved, median_ms=median * 1e3, gb_per_s=bytes_moved / median / 1e9,
                                 calls=len(self.seconds[name]))
        return dict(kernels=kernels, roofline_gb_per_s=max(kernel["gb_per_s"] for kernel in kernels.values()))


def machine() -> dict:
    """Versions, processor, threads and load: what a reader needs to weigh the numbers."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import lightning

    return dict(
        torch=torch.__version__,
        lightning=lightning.__version__,
        python=platform.python_version(),
        processor=processor,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average=os.getloadavg(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align_right_from: int = 1) -> str:
    """A markdown table; columns from ``align_right_from`` on are right-aligned (numbers)."""
    rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def result_paths(stem: str, quick: bool) -> tuple[Path, Path]:
    """(JSON, PNG) paths in benchmarks/results; a ``--quick`` smoke run writes ``<stem>_quick.*``
    so that it never overwrites a full run's results."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}_quick" if quick else stem
    return RESULTS / f"{stem}.json", RESULTS / f"{stem}.png"
