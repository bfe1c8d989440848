"""Record the collectives each rank issues during two-worker DiLoCo fits, and the thread that issues them.

Run by tests/test_diloco.py as ``python diloco_collective_order.py OUT_DIR`` on both ranks. The
collectives of ``torch.distributed`` (which the strategies and Lightning call through that module)
are wrapped to record, in issue order, ``(thread name, collective, "default" | "exchange" group,
number of elements)``; so is the exchange's device helper (the thread it runs on). Each rank writes
``OUT_DIR/rank{r}.pt``: scenario -> {"collectives": [...], "device_helper_threads": [...]}.
"""

import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from diloco_fit import fit  # the sibling script: the tiny regression both ranks fit

from lightning_converge.comm import OneBitCompressor
from lightning_converge.strategies import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_converge.strategies.diloco.exchange import PseudoGradientExchange

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_to_all_single", "all_gather", "broadcast", "barrier")
RECORD: dict[str, list] = {"collectives": [], "device_helper_threads": []}


def recording(name, collective):
    def run(*args, **kwargs):
        group = kwargs.get("group")
        default = group is None or group is dist.GroupMember.WORLD
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        numel = None if tensor is None else tensor.numel()
        RECORD["collectives"].append(
            (threading.current_thread().name, name, "default" if default else "exchange", numel)
        )
        return collective(*args, **kwargs)

    return run


for name in COLLECTIVES:
    setattr(dist, name, recording(name, getattr(dist, name)))

run_on_device = PseudoGradientExchange._run_on_device


def recording_run_on_device(self, *args, **kwargs):
    RECORD["device_helper_threads"].append(threading.current_thread().name)
    return run_on_device(self, *args, **kwargs)


PseudoGradientExchange._run_on_device = recording_run_on_device


def onebit():
    """Two collectives per sync (an all-to-all, then an all-gather): orders that could interleave."""
    return OneBitCompressor(block_size=64, backend="reference")


SCENARIOS = {
    # delay=1: each sync is started while the previous one may still be in flight
    "delayed_onebit": lambda: DiLoCoStrategy(inner_steps=3, delay=1, compressor=onebit(), backend="reference"),
    # streaming: two fragments, overlapping syncs
    "streaming_onebit": lambda: StreamingDiLoCoStrategy(
        inner_steps=4, num_fragments=2, overlap_steps=1, compressor=onebit(), backend="reference"
    ),
    # no compressor: asynchronous all-reduces from the training thread
    "delayed_fp32": lambda: DiLoCoStrategy(inner_steps=3, delay=1, backend="reference"),
    # dynamic local updates: the speeds' all-gather beside each sync's exchange
    "dynamic_onebit": lambda: DiLoCoStrategy(
        inner_steps=3, dynamic_inner_steps=True, compressor=onebit(), backend="reference"
    ),
    "dynamic_fp32": lambda: DiLoCoStrategy(inner_steps=3, dynamic_inner_steps=True, backend="reference"),
}


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    results = {}
    for scenario, make_strategy in SCENARIOS.items():
        trainer, _ = fit(make_strategy(), "SGD", 10)
        results[scenario] = {key: list(values) for key, values in RECORD.items()}
        for values in RECORD.values():
            values.clear()
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")
