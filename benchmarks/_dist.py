"""Multi-process torch.distributed runs for the benchmarks, on the loopback or over a slow link.

- :func:`launch`: start ``world_size`` copies of a Python script as the ranks of one
  process group (torchrun's environment: ``MASTER_ADDR``, ``MASTER_PORT``,
  ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; Lightning then starts no processes of its
  own), optionally inside a network namespace, and wait for all of them.
- :func:`shaped_loopback`: a private network namespace whose loopback is rate-limited
  by a token bucket (``tc qdisc ... tbf``): a slow network on one machine. Needs root
  (``ip netns``); :func:`shaping_unavailable` says why it cannot be had.
  :func:`set_loopback_rate` changes or lifts the limit, also from inside the namespace;
  :func:`use_link` does it between two runs of the same ranks.
- :func:`measure_link`: the time of a gloo all-reduce between two ranks over a
  link, and the rate it implies.
- :func:`on_shaped_link`: run a benchmark's training over a shaped loopback (link
  measured first), or over the plain one when shaping cannot be had, saying why.

Run as a script, this file is the all-reduce probe's rank (``measure_link`` starts it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

LOOPBACK_ADDRESS = "127.0.0.1"


class RankFailed(RuntimeError):
    """A rank exited with an error or the run timed out; the message holds the end of each rank's log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_ADDRESS, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def launch(
    script_args: Sequence[str],
    *,
    world_size: int = 2,
    netns: Optional[str] = None,
    threads_per_rank: int = 1,
    log_dir: Path,
    timeout: float = 3600.0,
) -> None:
    """Run ``python script_args...`` as ranks ``0 .. world_size - 1`` of one process group and wait.

    Every rank gets the same arguments and tells itself apart by ``RANK``. Inside
    ``netns`` (a namespace name) the ranks meet on that namespace's loopback. Each
    rank's stdout and stderr go to ``log_dir/rank{r}.log``. If a rank fails or
    ``timeout`` seconds pass, the other ranks (which would wait in a collective) are
    killed and :class:`RankFailed` is raised.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    port = _free_port()  # a fresh namespace has every port free
    processes: list[subprocess.Popen] = []
    logs = [log_dir / f"rank{rank}.log" for rank in range(world_size)]
    try:
        for rank, log in enumerate(logs):
            env = dict(
                os.environ,
                MASTER_ADDR=LOOPBACK_ADDRESS,
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world_size),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                NODE_RANK="0",
                OMP_NUM_THREADS=str(threads_per_rank),
            )
            with open(log, "w") as log_file:
                command = [*prefix, sys.executable, *script_args]
                processes.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(process.poll() is None for process in processes):
            failed = any(process.returncode not in (None, 0) for process in processes)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(process.returncode != 0 for process in processes):
        report = "\n".join(
            f"--- rank {rank} (exit code {process.returncode}), end of {log}:\n{_log_tail(log)}"
            for rank, (process, log) in enumerate(zip(processes, logs))
        )
        raise RankFailed(f"{' '.join(script_args)} failed or timed out after {timeout:.0f} s\n{report}")


def shaping_unavailable() -> Optional[str]:
    """Why :func:`shaped_loopback` cannot work here (None when it can be tried)."""
    if os.geteuid() != 0:
        return "creating a network namespace needs root (run the benchmark with sudo)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (package iproute2)"
    return None


def _run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def shaped_loopback(rate_mbit: float, burst_kb: int = 128, name: Optional[str] = None) -> Iterator[str]:
    """A new network namespace whose loopback passes at most ``rate_mbit`` Mbit/s; yields its name.

    Both directions of every connection share the one loopback, so two ranks
    exchanging ``n`` bytes each put ``2 n`` bytes through the bucket. The bucket's
    depth ``burst_kb`` (kilobytes) must hold a whole loopback packet (up to 64 KB):
    tbf drops larger packets, and a burst of 32 kbit (4 KB) stalls gloo's TCP
    connections until they time out. The namespace is deleted on exit, whatever
    happened inside.
    """
    name = name or f"lcbench{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        set_loopback_rate(rate_mbit, name, burst_kb)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def set_loopback_rate(rate_mbit: Optional[float], netns: Optional[str] = None, burst_kb: int = 128) -> None:
    """Limit the loopback of ``netns`` (None: this process's namespace) to ``rate_mbit`` Mbit/s,
    replacing any limit it had; ``rate_mbit=None`` lifts the limit.

    A rank inside a :func:`shaped_loopback` namespace (root) may call it between two
    runs, so that one launch trains on the plain and on the shaped loopback in turn.
    ``burst_kb`` as for :func:`shaped_loopback`. Replacing or removing the qdisc
    restarts its byte count (:func:`loopback_bytes`); without one it reads 0.
    """
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    if rate_mbit is None:
        # check=False: deleting the root qdisc of an unshaped loopback fails, and there is nothing to do
        subprocess.run([*prefix, "tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)
        return
    _run(
        *prefix, "tc", "qdisc", "replace", "dev", "lo", "root",
        "tbf", "rate", f"{rate_mbit}mbit", "burst", f"{burst_kb}kb", "latency", "400ms",
    )


def use_link(shaped: bool, rate_mbit: float, rank: int) -> None:
    """Between two runs of the same ranks inside a :func:`shaped_loopback` namespace: rank 0 shapes the
    loopback to ``rate_mbit`` (``shaped``) or lifts the limit, and every rank waits for that (a barrier,
    once the default process group exists)."""
    import torch.distributed as dist

    if rank == 0:
        set_loopback_rate(rate_mbit if shaped else None)
    if dist.is_initialized():
        dist.barrier()


def loopback_bytes(netns: Optional[str]) -> int:
    """Bytes the loopback qdisc of ``netns`` (None: this process's namespace) has passed so far:
    the kernel's count, headers included."""
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    for line in _run(*prefix, "tc", "-s", "qdisc", "show", "dev", "lo").splitlines():
        words = line.split()
        if words[:1] == ["Sent"]:
            return int(words[1])
    raise RuntimeError(f"no byte count in the loopback qdisc's statistics (namespace {netns})")


def measure_link(megabytes: float, netns: Optional[str], repeats: int = 3) -> dict:
    """Time a gloo all-reduce of ``megabytes`` (fp32) between two ranks over the loopback (of ``netns``).

    Returns the median seconds and the rate they imply: for two ranks each sends
    ``megabytes`` (half in the reduce-scatter, half in the all-gather), so
    ``2 * megabytes`` cross the shared loopback.
    """
    with tempfile.TemporaryDirectory(prefix="link_probe") as tmp:
        out = Path(tmp) / "probe.json"
        args = [__file__, "--megabytes", str(megabytes), "--repeats", str(repeats), "--out", str(out)]
        launch(args, netns=netns, log_dir=Path(tmp), timeout=120 + 20 * repeats * megabytes)
        seconds = json.loads(out.read_text())["seconds"]
    median = sorted(seconds)[len(seconds) // 2]
    return dict(
        megabytes=megabytes,
        seconds=seconds,
        median_seconds=median,
        implied_mbit_per_s=2 * megabytes * 2**20 * 8 / median / 1e6,
    )


Result = TypeVar("Result")


def on_shaped_link(
    rate_mbit: float, probe_mb: float, no_shaping: bool, run: Callable[[Optional[str]], Result]
) -> tuple[Result, Optional[dict], Optional[str]]:
    """``run(netns)`` inside a network namespace whose loopback is shaped to ``rate_mbit`` (the link
    measured first with a ``probe_mb`` all-reduce, and printed), or ``run(None)`` on the plain loopback
    when shaping cannot be had (``no_shaping``, no root, ``ip``/``tc`` refused).

    Returns ``run``'s result, the link measurement (None without shaping) and why shaping was skipped
    (None when it was not).
    """
    unavailable = "--no-shaping was given" if no_shaping else shaping_unavailable()
    if unavailable is None:
        try:
            with shaped_loopback(rate_mbit) as netns:
                link = dict(rate_mbit=rate_mbit, **measure_link(probe_mb, netns))
                print(f"shaped link: a {probe_mb:g} MB all-reduce between two ranks took "
                      f"{link['median_seconds']:.2f} s ({link['implied_mbit_per_s']:.1f} Mbit/s)", flush=True)
                return run(netns), link, None
        except subprocess.CalledProcessError as error:  # ip / tc refused, e.g. no namespaces in a container
            unavailable = f"could not shape a loopback: {' '.join(error.cmd)}: {error.stderr.strip()}"
    print(f"SHAPED LINK SKIPPED: {unavailable}. Training on the plain loopback only.", flush=True)
    return run(None), None, unavailable


def _probe_rank(megabytes: float, repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    values = torch.ones(int(megabytes * 2**20) // 4)
    dist.all_reduce(values)  # connect, and fault the pages in
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(values)
        seconds.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of measure_link's all-reduce probe")
    parser.add_argument("--megabytes", type=float, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    probe = parser.parse_args()
    _probe_rank(probe.megabytes, probe.repeats, probe.out)
