"""Asynchronous DiLoCo: the server's outer rules against the algorithms written out here, dynamic local
updates against a table, compressed messages against the compressor's own functions, bad arguments, one
worker against plain training (also under fp16 with a GradScaler, and resumed after fit), and runs of
``tests/scripts/async_diloco_fit.py``: a slow worker, four workers with int8 messages, overlapped round
trips, a killed worker, resuming by two workers (during and after fit) and by one. Compressed runs are
checked by replaying the server from the pseudo-gradients each worker recorded.

The processes of a run are started here at once, as ``torchrun`` would (Lightning sees ``LOCAL_RANK``
and launches nothing; its own launcher would kill every rank when one dies).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry

from lightning_converge.comm import Int8Compressor, SignCompressor, make_compressor
from lightning_converge.comm.exchange import describe_payload, described_bytes, payload_as_bytes, payload_from_bytes
from lightning_converge.schedules import Constant
from lightning_converge.strategies import AsyncDiLoCoStrategy
from lightning_converge.strategies.diloco import asynchronous, dynamic_inner_steps
from lightning_converge.strategies.diloco.async_outer import AsyncOuterServer, parameters_layout
from lightning_converge.strategies.diloco.async_protocol import (
    MAX_PAYLOAD_TENSORS,
    encode_pseudo_gradient,
    payload_bytes,
)
from lightning_converge.strategies.diloco.asynchronous import point_to_point_compressors

ROOT = Path(__file__).parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from diloco_fit import Regression  # noqa: E402

sys.path.remove(str(SCRIPTS))

NUM_PARAMS = sum(p.numel() for p in Regression().parameters())  # 129
SHAPES = [(7,), (3, 5), (4,)]
NUMEL = sum(torch.Size(s).numel() for s in SHAPES)


# ---------------------------------------------------------------------------------------- the server


def _server(
    outer_optimizer, lr=0.7, momentum=0.9, period=2, penalty=0.0, max_staleness=None, params=None, compressor=None
):
    params = params or [torch.randn(s, generator=torch.Generator().manual_seed(0)) for s in SHAPES]
    return AsyncOuterServer(
        params,
        outer_optimizer,
        Constant(lr),
        momentum,
        period,
        penalty,
        max_staleness,
        inner_steps=4,
        dynamic=False,
        device=torch.device("cpu"),
        backend="reference",
        compressor=compressor,
    )


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _pseudo_gradients(count):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(sum(torch.Size(s).numel() for s in SHAPES), generator=generator) for _ in range(count)]


# A fixed arrival order of three workers (which worker arrives, and who pulls after it).
ARRIVALS = [0, 1, 0, 2, 2, 1, 0, 1]


@pytest.mark.parametrize("period", [1, 2, 3])
def test_delayed_nesterov_follows_the_algorithm_written_out(period):
    server = _server("delayed_nesterov", period=period)
    theta = _flat(server.params).clone()
    eps, beta = 0.7, 0.9
    momentum, buffered = torch.zeros_like(theta), torch.zeros_like(theta)
    for worker in range(3):
        server.pull(worker)
    for t, (worker, g) in enumerate(zip(ARRIVALS, _pseudo_gradients(len(ARRIVALS))), start=1):
        server.arrive(worker, g, inner_steps=4)
        server.pull(worker)
        # Liu et al. 2024, Delayed Nesterov update, momentum activation c = 0
        buffered += g
        if t % period == 0:
            momentum = beta * momentum + buffered / period
            theta = theta - eps * (g / period + beta * momentum)
            buffered.zero_()
        else:
            theta = theta - eps * g / period
        torch.testing.assert_close(_flat(server.params), theta, rtol=1e-5, atol=1e-6)
    assert server.version == server.arrivals == len(ARRIVALS)


def test_delayed_nesterov_over_n_arrivals_is_one_synchronous_nesterov_step_on_their_average():
    """Each group of N arrivals moves the global parameters as sync DiLoCo's outer step does on N workers."""
    period = 3
    server = _server("delayed_nesterov", period=period)
    reference = [p.clone() for p in server.params]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    gradients = _pseudo_gradients(2 * period)
    for start in range(0, len(gradients), period):
        group = gradients[start : start + period]
        for worker, g in enumerate(group):
            server.pull(worker)
            server.arrive(worker, g, inner_steps=4)
        average = torch.stack(group).mean(0)
        for p, chunk in zip(reference, average.split([p.numel() for p in reference])):
            p.grad = chunk.view_as(p)
        sgd.step()
        torch.testing.assert_close(_flat(server.params), _flat(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("outer_optimizer, nesterov", [("nesterov", True), ("sgd", False)])
def test_nesterov_and_sgd_apply_each_arrival_as_torch_sgd_would(outer_optimizer, nesterov):
    server = _server(outer_optimizer)
    reference = [p.clone() for p in server.params]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=nesterov)
    for worker, g in zip(ARRIVALS, _pseudo_gradients(len(ARRIVALS))):
        server.pull(worker)
        server.arrive(worker, g, inner_steps=4)
        for p, chunk in zip(reference, g.split([p.numel() for p in reference])):
            p.grad = chunk.view_as(p)
        sgd.step()
        torch.testing.assert_close(_flat(server.params), _flat(reference), rtol=1e-5, atol=1e-6)


def test_staleness_is_counted_and_the_gap_penalty_scales_stale_updates_down():
    penalty = 0.5
    server = _server("sgd", lr=1.0, momentum=0.0, penalty=penalty)
    g0, g1 = _pseudo_gradients(2)
    server.pull(0)
    server.pull(1)
    pulled_by_1 = _flat(server.params).clone()
    fresh = server.arrive(0, g0, inner_steps=4)
    assert (fresh.staleness, fresh.scale) == (0, 1.0)
    expected = pulled_by_1 - g0
    torch.testing.assert_close(_flat(server.params), expected)
    stale = server.arrive(1, g1, inner_steps=4)
    gap = (expected - pulled_by_1).norm() / g1.norm()  # how far the model moved, relative to the update
    scale = 1.0 / (1.0 + penalty * gap)
    assert stale.staleness == 1 and stale.applied
    assert stale.scale == pytest.approx(scale.item(), rel=1e-5)
    torch.testing.assert_close(_flat(server.params), expected - scale * g1)


def test_max_staleness_drops_updates_staler_than_the_cap():
    server = _server("sgd", lr=1.0, momentum=0.0, max_staleness=0)
    g0, g1 = _pseudo_gradients(2)
    server.pull(0)
    server.pull(1)
    server.arrive(0, g0, inner_steps=4)
    before = _flat(server.params).clone()
    dropped = server.arrive(1, g1, inner_steps=4)
    assert not dropped.applied and dropped.staleness == 1
    torch.testing.assert_close(_flat(server.params), before)
    assert (server.version, server.arrivals, server.dropped) == (1, 2, 1)
    assert server.workers[1].rounds == 0
    server.pull(1)  # the dropped worker goes on from the current parameters: its next update is fresh
    assert server.arrive(1, g1, inner_steps=4).applied


def test_server_state_round_trips_and_resumes_identically():
    server = _server("delayed_nesterov", period=3)
    gradients = _pseudo_gradients(6)
    for worker, g in zip(ARRIVALS[:4], gradients[:4]):
        server.pull(worker)
        server.arrive(worker, g, inner_steps=4)
    state = {k: v for k, v in server.state_dict().items()}
    state = torch.load(_saved(state), weights_only=True)
    resumed = _server("delayed_nesterov", period=3)
    resumed.load_state_dict(state, same_workers=True)
    for worker, g in zip(ARRIVALS[4:6], gradients[4:6]):
        for s in (server, resumed):
            s.pull(worker)
            s.arrive(worker, g, inner_steps=4)
    assert torch.equal(_flat(server.params), _flat(resumed.params))
    assert resumed.workers.keys() == server.workers.keys()
    fresh = _server("delayed_nesterov", period=3)
    fresh.load_state_dict(state, same_workers=False)
    assert fresh.workers == {} and fresh.version == 4


# ---------------------------------------------------------------------------------------- compressed messages


def _int8(block_size=8):
    return Int8Compressor(block_size=block_size, backend="reference")


def test_compressed_pseudo_gradients_and_replies_follow_the_rule_written_out():
    """Three workers, a fixed arrival order: each sends int8(g + its residual) and keeps the rest (error
    feedback); the server applies exactly the decoded value and replies with int8(theta - what the worker
    holds), which both sides add to their copy of what the worker holds."""
    server = _server("delayed_nesterov", period=2, compressor=_int8())
    reference = _server("delayed_nesterov", period=2)  # fp32, fed the values written out below
    layout = parameters_layout(server.params)
    workers = {w: _int8() for w in range(3)}  # each worker's compressor, with its error feedback
    codec = _int8()  # the test's own quantize / dequantize

    def int8_round_trip(x):
        return codec.dequantize(codec.quantize(x, None), x.numel())

    residual = {w: torch.zeros(NUMEL) for w in range(3)}
    held = {w: server.pull(w)[0].clone() for w in range(3)}  # what each worker holds
    worker_view = {w: held[w].clone() for w in range(3)}
    for w in range(3):
        reference.pull(w)
    for round_, (w, g) in enumerate(zip(ARRIVALS, _pseudo_gradients(len(ARRIVALS)))):
        payload = encode_pseudo_gradient(workers[w], g.clone(), layout, rank=w, step=round_)
        sent = int8_round_trip(g + residual[w])
        residual[w] = g + residual[w] - sent
        assert torch.equal(server.decode(payload), sent)
        server.arrive(w, server.decode(payload), inner_steps=4)
        reference.arrive(w, sent, inner_steps=4)
        assert torch.equal(_flat(server.params), _flat(reference.params))

        reply = server.pull_payload(w)
        difference = _flat(reference.params) - held[w]
        held[w] = held[w] + int8_round_trip(difference)
        worker_view[w] += workers[w].decode(reply, layout)
        assert torch.equal(server.workers[w].pulled, held[w]) and torch.equal(worker_view[w], held[w])
        assert torch.equal(workers[w].elements.buffers(layout, torch.device("cpu"))["residual"], residual[w])
        # What the worker holds lags the global parameters by this reply's rounding only: half a step.
        half_step = codec.quantize(difference, None)[1].max() / 2
        assert (_flat(server.params) - held[w]).abs().max() <= half_step * (1 + 1e-5)
    assert all(residual[w].abs().sum() > 0 for w in range(3))  # error feedback carried over rounds


@pytest.mark.parametrize("name", point_to_point_compressors())
def test_every_point_to_point_compressors_payload_is_rebuilt_from_its_description_and_bytes(name):
    compressor = make_compressor(name)
    layout = parameters_layout([torch.empty(s) for s in SHAPES])
    (g,) = _pseudo_gradients(1)
    payload = encode_pseudo_gradient(compressor, g.clone(), layout, rank=1, step=0)
    assert len(payload) <= MAX_PAYLOAD_TENSORS
    rebuilt = payload_from_bytes(payload_as_bytes(payload), describe_payload(payload))
    assert payload_bytes(rebuilt) == described_bytes(describe_payload(payload)) == payload_bytes(payload)
    assert torch.equal(compressor.decode(rebuilt, layout), compressor.decode(payload, layout))


def test_the_server_state_keeps_what_each_worker_holds_and_refuses_a_resume_that_cannot_know_it():
    server = _server("sgd", compressor=_int8())
    for w, g in zip(ARRIVALS[:4], _pseudo_gradients(4)):
        server.pull(w)
        server.arrive(w, g, inner_steps=4)
        server.pull_payload(w)
    state = torch.load(_saved(server.state_dict()), weights_only=True)
    resumed = _server("sgd", compressor=_int8())
    resumed.load_state_dict(state, same_workers=True)
    for w in server.workers:
        assert torch.equal(resumed.workers[w].pulled, server.workers[w].pulled)
    assert torch.equal(_flat(resumed.pull_payload(0)), _flat(server.pull_payload(0)))
    uncompressed = _server("sgd")
    uncompressed.pull(0)
    with pytest.raises(ValueError, match="saved without a compressor"):
        _server("sgd", compressor=_int8()).load_state_dict(uncompressed.state_dict(), same_workers=True)


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------------------------------- dynamic local updates


@pytest.mark.parametrize(
    "speeds, inner_steps, expected",
    [
        ([10.0, 5.0, 2.5], 8, [8, 4, 2]),  # H proportional to speed, the fastest runs H
        ([3.0, 2.0], 3, [3, 2]),
        ([100.0, 1.0], 10, [10, 1]),  # never below 1
        ([4.0, 4.0, 4.0], 5, [5, 5, 5]),
        ([None, 2.0, 1.0], 6, [6, 6, 3]),  # not measured yet: H
        ([None, None], 6, [6, 6]),
        ([9.0, 6.0], 4, [4, 3]),  # 4 * 2/3 = 2.67, rounded
    ],
)
def test_dynamic_local_updates_give_each_worker_inner_steps_for_its_speed(speeds, inner_steps, expected):
    assert dynamic_inner_steps(speeds, inner_steps) == expected


def test_the_server_sets_each_workers_inner_steps_from_the_speeds_it_was_sent():
    server = AsyncOuterServer(
        [torch.zeros(3)],
        "sgd",
        Constant(1.0),
        0.0,
        1,
        0.0,
        None,
        inner_steps=8,
        dynamic=True,
        device=torch.device("cpu"),
        backend="reference",
    )
    for worker in range(3):
        server.pull(worker)
    for worker, speed in enumerate([10.0, 5.0, 2.5]):
        server.arrive(worker, torch.zeros(3), inner_steps=8, speed=speed)
    assert [server.inner_steps_for(w) for w in range(3)] == [8, 4, 2]


# ---------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "options, match",
    [
        ({"inner_steps": 0}, "inner_steps must be an integer >= 1, got 0"),
        ({"inner_steps": 2.0}, "inner_steps must be an integer >= 1, got 2.0"),
        ({"delayed_nesterov_period": 0}, "delayed_nesterov_period must be None or an integer >= 1, got 0"),
        ({"staleness_penalty": -0.1}, "staleness_penalty must be a number >= 0, got -0.1"),
        ({"max_staleness": -1}, "max_staleness must be None or an integer >= 0, got -1"),
        ({"outer_optimizer": "adam"}, r"outer_optimizer must be one of \('delayed_nesterov', 'nesterov', 'sgd'\)"),
        ({"outer_momentum": 1.0}, r"outer_momentum must be a number in \[0, 1\)"),
        ({"outer_lr": 0.0}, "outer_lr must be a number > 0, got 0.0"),
        (
            {"compressor": "powersgd"},
            r"compressor must be None or one whose payload the server decodes on its own: "
            r"one of \['bf16', 'fp16', 'int8', 'sign', 'ternary', 'topk'\].*got 'powersgd'",
        ),
        ({"compressor": "onebit"}, r"got 'onebit'.*use 'sign'"),
        ({"compressor": "int9"}, r"unknown compressor 'int9'"),
        ({"outer_state_device": "cuda:7"}, "outer_state_device"),
        ({"backend": "fast"}, "backend"),
        ({"overlap": 1}, "overlap must be True or False, got 1"),
    ],
)
def test_bad_arguments_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        AsyncDiLoCoStrategy(**options)


def test_unknown_and_wrapper_options_raise_clear_errors():
    with pytest.raises(TypeError, match="did you mean 'inner_steps'"):
        AsyncDiLoCoStrategy(inner_step=4)
    with pytest.raises(TypeError, match="no meaning here"):
        AsyncDiLoCoStrategy(find_unused_parameters=True)


def test_registered_by_name():
    assert StrategyRegistry["async_diloco"]["strategy"] is AsyncDiLoCoStrategy
    trainer = L.Trainer(strategy="async_diloco", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, AsyncDiLoCoStrategy)


ASYNC_DILOCO_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  strategy:
    class_path: lightning_converge.strategies.AsyncDiLoCoStrategy
    init_args:
      inner_steps: 16
      outer_optimizer: delayed_nesterov
      delayed_nesterov_period: 4
      dynamic_inner_steps: true
      staleness_penalty: 0.5
      max_staleness: 8
      timeout: 60
      compressor:
        class_path: lightning_converge.comm.Int8Compressor
        init_args:
          block_size: 64
"""


def test_a_lightningcli_yaml_builds_the_strategy_with_its_options(tmp_path, monkeypatch):
    from lightning_converge.cli import ConvergeCLI

    monkeypatch.chdir(ROOT)
    strategy_config = tmp_path / "strategy.yaml"
    strategy_config.write_text(ASYNC_DILOCO_YAML)
    configs = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(strategy_config)]
    strategy = ConvergeCLI(args=configs, run=False, parser_kwargs={"parser_mode": "omegaconf"}).trainer.strategy
    assert type(strategy) is AsyncDiLoCoStrategy and strategy.inner_steps == 16
    assert (strategy._delayed_nesterov_period, strategy._dynamic) == (4, True)
    assert (strategy._staleness_penalty, strategy._max_staleness) == (0.5, 8)
    assert strategy._timeout.total_seconds() == 60
    assert type(strategy.compressor) is Int8Compressor and strategy.compressor.block_size == 64


# ---------------------------------------------------------------------------------------- one worker


def _fit_one_worker(model, strategy, max_steps=6, ckpt_path=None, **trainer_options):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.usefixtures("single_process_group")
def test_one_worker_with_plain_outer_sgd_equals_training_without_the_strategy():
    plain = Regression("SGD")
    _fit_one_worker(plain, "auto")
    model = Regression("SGD")
    strategy = AsyncDiLoCoStrategy(
        inner_steps=1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0, backend="reference"
    )
    _fit_one_worker(model, strategy)
    assert strategy.rounds == strategy.server.version == 6
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("single_process_group")
def test_rounds_count_optimizer_steps_under_gradient_accumulation_and_bf16_autocast():
    model = Regression("AdamW")
    strategy = AsyncDiLoCoStrategy(inner_steps=3, backend="reference")
    trainer = _fit_one_worker(model, strategy, max_steps=6, accumulate_grad_batches=2, precision="bf16-mixed")
    assert strategy.rounds == strategy.server.version == 2  # 6 optimizer steps (12 batches), H = 3
    assert trainer.callback_metrics["async_diloco/rounds"] == 2
    assert trainer.callback_metrics["async_diloco/inner_steps"] == 3
    for param, final in zip(model.parameters(), strategy.server.params):
        assert torch.equal(param.detach(), final)


@pytest.mark.usefixtures("single_process_group")
def test_resuming_from_a_checkpoint_saved_after_fit_continues_exactly(tmp_path):
    """Lightning resumes a finished fit where it ended: 8 steps, saved after fit, resumed to 12 equals 12
    straight (one worker: its end of fit, at a round's end, changes nothing)."""
    straight = Regression("AdamW")
    _fit_one_worker(straight, AsyncDiLoCoStrategy(inner_steps=2, backend="reference"), max_steps=12)
    first = Regression("AdamW")
    trainer = _fit_one_worker(first, AsyncDiLoCoStrategy(inner_steps=2, backend="reference"), max_steps=8)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    resumed = Regression("AdamW")
    strategy = AsyncDiLoCoStrategy(inner_steps=2, backend="reference")
    _fit_one_worker(resumed, strategy, max_steps=12, ckpt_path=tmp_path / "after_fit.ckpt")
    assert strategy.server.version == strategy.rounds == 6
    for ours, theirs in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(ours, theirs)


class OverflowAt(Regression):
    """Inner SGD; its loss is inf at optimizer step ``step``: an fp16 overflow, whose step the scaler skips."""

    def __init__(self, step: int) -> None:
        super().__init__("SGD")
        self.overflow_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.overflow_step else loss


def _fp16_with_scaler():
    # Lightning 2.6 gives CPU 16-mixed no GradScaler of its own.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))


@pytest.mark.usefixtures("single_process_group")
def test_one_worker_under_fp16_with_a_grad_scaler_equals_training_without_the_strategy_and_skips_an_overflow(
    monkeypatch,
):
    computed = []
    pseudo_gradient = asynchronous.pseudo_gradient

    def recorded(origin, local):
        computed.append(pseudo_gradient(origin, local).clone())
        return computed[-1].clone()

    monkeypatch.setattr(asynchronous, "pseudo_gradient", recorded)
    plain, plain_precision = OverflowAt(3), _fp16_with_scaler()
    _fit_one_worker(plain, "auto", plugins=[plain_precision])
    model, precision = OverflowAt(3), _fp16_with_scaler()
    strategy = AsyncDiLoCoStrategy(
        inner_steps=1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0, backend="reference"
    )
    _fit_one_worker(model, strategy, plugins=[precision])
    assert precision.scaler.get_scale() == plain_precision.scaler.get_scale() == 2.0**15  # one step skipped
    assert strategy.rounds == strategy.server.version == len(computed) == 6
    assert all(torch.isfinite(g).all() for g in computed)
    assert torch.equal(computed[3], torch.zeros_like(computed[3]))  # the skipped step moved nothing
    assert all(g.abs().sum() > 0 for i, g in enumerate(computed) if i != 3)
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


class GlobalParametersSeen(L.Callback):
    """The global parameters the worker pulled, each time they change (before EMA's hook, listed first)."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        self.seen.append([g.clone() for g in trainer.strategy.agreed_parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        current = trainer.strategy.agreed_parameters()
        if not all(torch.equal(a, b) for a, b in zip(self.seen[-1], current)):
            self.seen.append([g.clone() for g in current])


@pytest.mark.usefixtures("single_process_group")
def test_ema_averages_the_global_parameters_once_per_pull_and_the_model_ends_with_the_average():
    from lightning_converge.callbacks import EMA

    seen, ema = GlobalParametersSeen(), EMA(decay=0.5, backend="reference")
    model = Regression("AdamW")
    strategy = AsyncDiLoCoStrategy(inner_steps=2, backend="reference")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=6,
        logger=False,
        callbacks=[seen, ema],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert len(seen.seen) == 4  # the start, then after each of the 3 rounds
    average = seen.seen[0]
    for pulled in seen.seen[1:]:
        average = [0.5 * a + 0.5 * p for a, p in zip(average, pulled)]
    for param, expected in zip(model.parameters(), average):
        torch.testing.assert_close(param.detach(), expected)


# ---------------------------------------------------------------------------------------- two workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(count: int, args: list[str], log_dir: Path, timeout: float) -> list[tuple[int, str]]:
    """Start ranks 0..count-1 of async_diloco_fit.py together; each one's exit code and output. A rank
    still running after ``timeout`` seconds is killed (its code is then negative)."""
    port = _free_port()
    processes, logs = [], []
    for rank in range(count):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(count),
            NODE_RANK="0",
            LOCAL_RANK=str(rank),
        )
        # Files, not pipes: a rank blocked on a full pipe would stall the other.
        log = open(log_dir / f"{args[1]}_{count}_rank{rank}.log", "w+")
        logs.append(log)
        command = [sys.executable, str(SCRIPTS / "async_diloco_fit.py"), *args]
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    try:
        for process in processes:
            process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for process, log in zip(processes, logs):
        log.seek(0)
        results.append((process.returncode, log.read()))
        log.close()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-worker runs: ``slow``, ``killed`` then ``resumed`` from the killed run's checkpoint; the
    four-worker run ``four``."""
    out = tmp_path_factory.mktemp("async_diloco")
    results = {name: run_workers(2, [str(out), name], out, timeout=240) for name in ("slow", "overlap", "killed")}
    results["four"] = run_workers(4, [str(out), "four"], out, timeout=240)
    checkpoint = out / "checkpoints" / "epoch=0-step=4.ckpt"
    results["resumed"] = run_workers(2, [str(out), "resumed", str(checkpoint)], out, timeout=240)
    return out, results


def _load(out: Path, name: str, rank: int):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def _succeeded(results, name):
    for rank, (code, log) in enumerate(results[name]):
        assert code == 0, f"{name}, rank {rank}:\n{log[-4000:]}"


@pytest.mark.distributed
def test_the_fast_worker_never_waits_for_the_slow_one_and_every_update_is_applied_once(runs):
    out, results = runs
    _succeeded(results, "slow")
    fast, slow = _load(out, "slow", 0), _load(out, "slow", 1)
    server = fast["server"]
    arrivals = fast["arrivals"]
    # The slow worker stalled before its first step until the fast one had completed 3 rounds.
    assert [worker for worker, *_ in arrivals[:3]] == [0, 0, 0]
    first_slow = next(a for a in arrivals if a[0] == 1)
    assert first_slow[2] >= 3  # its staleness: the fast worker's updates applied meanwhile
    # Every pseudo-gradient applied exactly once.
    for rank, worker in enumerate((fast, slow)):
        assert sum(1 for a in arrivals if a[0] == rank) == worker["sent"] == server["rounds"][rank] == worker["rounds"]
    assert server["version"] == server["arrivals"] == fast["sent"] + slow["sent"]
    assert server["dropped"] == 0
    # Every rank ends with the final global parameters.
    for ours, theirs, final in zip(fast["params"], slow["params"], server["params"]):
        assert torch.equal(ours, theirs) and torch.equal(ours, final)
    # Dynamic local updates (H recorded after each step): after its stalled first round, at least 3 times
    # slower than the fast worker's, the slow worker runs H = 1; the fast one, the fastest, H = 2 throughout.
    assert slow["round_lengths"][:2] == [2, 1]
    assert fast["round_lengths"] == [2] * 8
    # Bytes: a pseudo-gradient sent per round, the parameters received after every round but the last.
    assert slow["logged"]["comm/bytes_sent_total"] == slow["sent"] * NUM_PARAMS * 4
    assert slow["bytes_received"] == (slow["sent"] - 1) * NUM_PARAMS * 4 or slow["bytes_received"] == (
        slow["sent"] * NUM_PARAMS * 4
    )
    assert fast["logged"]["comm/bytes_sent_total"] == 0  # rank 0's worker sends nothing over the wire


@pytest.mark.distributed
def test_a_killed_worker_makes_the_other_fail_with_a_clear_error_within_the_timeout(runs):
    out, results = runs
    (code0, log0), (code1, _) = results["killed"]
    assert code1 == 17  # killed at step 6 (os._exit)
    assert code0 not in (0, -9), log0[-4000:]  # failed by itself, was not killed by the test's timeout
    message = (out / "killed_rank0.err").read_text()
    assert "worker(s) [1] stopped sending to the server" in message
    assert "resume from the last checkpoint" in message
    checkpoint = torch.load(out / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=True)
    assert checkpoint["async_diloco"]["version"] == 4  # both workers' 2 rounds of 2 steps


@pytest.mark.distributed
def test_resuming_by_two_workers_continues_the_global_state_and_each_workers_rounds(runs):
    out, results = runs
    _succeeded(results, "resumed")
    rank0, rank1 = _load(out, "resumed_2", 0), _load(out, "resumed_2", 1)
    server = rank0["server"]
    # Resumed at step 4 after 2 rounds each, to step 8: 2 more rounds each.
    assert server["version"] == server["arrivals"] == 8
    assert server["rounds"] == {0: 4, 1: 4}
    assert rank1["rounds"] == 4
    for ours, theirs in zip(rank0["params"], rank1["params"]):
        assert torch.equal(ours, theirs)


@pytest.mark.distributed
def test_validation_evaluates_the_global_parameters_on_every_worker_and_a_checkpoint_saves_them(runs):
    out, results = runs
    _succeeded(results, "resumed")
    seen = [_load(out, "resumed_2", rank)["seen_in_validation"] for rank in range(2)]
    checkpoint = torch.load(out / "validation.ckpt", weights_only=True)
    for evaluated0, evaluated1, server_global, saved in zip(
        seen[0]["evaluated"], seen[1]["evaluated"], seen[0]["global"], checkpoint["state_dict"].values()
    ):
        assert torch.equal(evaluated0, evaluated1)  # the same model on every worker
        assert torch.equal(evaluated0, server_global)  # the server's current global parameters
        assert torch.equal(saved, server_global)


@pytest.mark.distributed
@pytest.mark.usefixtures("single_process_group")
def test_resuming_by_one_worker_continues_the_global_state(runs):
    out, _ = runs
    checkpoint_path = out / "checkpoints" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint_path, weights_only=True)["async_diloco"]
    model = Regression("AdamW")
    strategy = AsyncDiLoCoStrategy(inner_steps=2, backend="reference")
    with pytest.warns(UserWarning, match="saved by 2 ranks and is resumed by 1"):
        _fit_one_worker(model, strategy, max_steps=8, ckpt_path=checkpoint_path)
    # The global state goes on (4 updates, Delayed Nesterov's momentum), the workers' records start afresh.
    assert strategy.server.version == saved["version"] + 2  # steps 5 to 8: 2 rounds of 2
    assert strategy.server.workers[0].rounds == 2
    expected = AsyncOuterServer(
        [torch.zeros_like(p) for p in saved["global_params"]],
        "delayed_nesterov",
        Constant(0.7),
        0.9,
        1,
        0.0,
        None,
        inner_steps=2,
        dynamic=False,
        device=torch.device("cpu"),
        backend="reference",
    )
    expected.load_state_dict(saved, same_workers=False)
    assert not torch.equal(_flat(expected.params), _flat(strategy.server.params))  # it trained on from there
    for ours, final in zip(model.parameters(), strategy.server.params):
        assert torch.equal(ours.detach(), final)


# ---------------------------------------------------------------------------------------- compressed runs

BLOCK_SIZE = 16  # the compressors of async_diloco_fit.py


def _named_layout():
    named = list(Regression().named_parameters())
    return parameters_layout([p for _, p in named], [name for name, _ in named])


def _run_server(compressor, world_size):
    """A server as the scripts' runs build it (rank 0's initial parameters, default outer options)."""
    server = AsyncOuterServer(
        [p.detach().clone() for p in Regression().parameters()],
        "delayed_nesterov",
        Constant(0.7),
        0.9,
        world_size,
        0.0,
        None,
        inner_steps=2,
        dynamic=False,
        device=torch.device("cpu"),
        backend="reference",
        compressor=compressor,
    )
    for rank in range(world_size):
        server.pull(rank)
    return server


def _replay(server, compressors, arrivals, recorded, steps, check_start_points=True, inner_steps=2):
    """What the server must have done for the recorded arrival order: each worker's recorded pseudo-gradients
    compressed here with its compressor (rank 0's in fp32), decoded and applied, each reply made. Returns
    the payload bytes each worker sent and received."""
    layout = _named_layout()
    rounds = {rank: iter(rank_rounds) for rank, rank_rounds in recorded.items()}
    sent, received = dict.fromkeys(compressors, 0), dict.fromkeys(compressors, 0)
    for worker, *_ in arrivals:
        start, g = next(rounds[worker])
        if check_start_points:  # the worker's round started from what the server believes it holds
            assert torch.equal(start, server.workers[worker].pulled)
        if worker == 0:
            server.arrive(0, g, inner_steps=inner_steps)
            server.pull(0)
            continue
        payload = encode_pseudo_gradient(compressors[worker], g.clone(), layout, worker, steps[worker])
        steps[worker] += 1
        sent[worker] += payload_bytes(payload)
        server.arrive(worker, server.decode(payload), inner_steps=inner_steps)
        received[worker] += payload_bytes(server.pull_payload(worker))
    return sent, received


@pytest.mark.distributed
def test_four_workers_with_int8_messages_apply_the_decoded_payloads_exactly_once_and_never_wait_per_round(runs):
    out, results = runs
    _succeeded(results, "four")
    ranks = [_load(out, "four", rank) for rank in range(4)]
    server, arrivals = ranks[0]["server"], ranks[0]["arrivals"]
    # The slowed worker (rank 3) stalled before its first step until every other had completed 3 rounds.
    assert 3 not in [worker for worker, *_ in arrivals[:9]]
    assert next(a for a in arrivals if a[0] == 3)[2] >= 9  # its first arrival's staleness
    # Every pseudo-gradient applied exactly once; every rank ends with the final global parameters.
    for rank, worker in enumerate(ranks):
        assert sum(1 for a in arrivals if a[0] == rank) == worker["sent"] == server["rounds"][rank] == worker["rounds"]
        assert worker["sent"] == 4  # 8 steps, H = 2
        for ours, final in zip(worker["params"], server["params"]):
            assert torch.equal(ours, final)
    assert server["version"] == server["arrivals"] == sum(worker["sent"] for worker in ranks)
    # The server applied exactly decode(compress(g)) of each worker's pseudo-gradients, with each worker's
    # error feedback, and replied with the compressed difference each worker added to what it held.
    replayed = _run_server(Int8Compressor(block_size=BLOCK_SIZE, backend="reference"), 4)
    compressors = {rank: Int8Compressor(block_size=BLOCK_SIZE, backend="reference") for rank in range(1, 4)}
    recorded = {rank: worker["pseudo_gradients"] for rank, worker in enumerate(ranks)}
    sent, received = _replay(replayed, compressors, arrivals, recorded, steps=dict.fromkeys(range(1, 4), 0))
    assert torch.equal(_flat(replayed.params), _flat(server["params"]))
    # Bytes logged: the payloads, compressed (int8 values and a scale per block, both ways).
    for rank in range(1, 4):
        assert ranks[rank]["logged"]["comm/bytes_sent_total"] == ranks[rank]["bytes_sent"] == sent[rank]
        assert ranks[rank]["logged"]["comm/bytes_received_total"] == ranks[rank]["bytes_received"] == received[rank]
        per_payload = NUM_PARAMS + 4 * -(-NUM_PARAMS // BLOCK_SIZE)
        assert sent[rank] == received[rank] == 4 * per_payload
    assert ranks[0]["logged"]["comm/bytes_sent_total"] == 0


def _replay_from_checkpoint(checkpoint_path, ranks, keep_error_feedback=True):
    """The global parameters that a two-worker run resumed from ``checkpoint_path`` with sign-compressed
    messages must reach (``ranks``: what each worker of it saved), replayed from the checkpoint's server
    state and rank 1's compressor state in its per-rank file (dropped unless ``keep_error_feedback``)."""
    saved = torch.load(checkpoint_path, weights_only=True)["async_diloco"]
    worker1 = torch.load(Path(f"{checkpoint_path}.rank_states") / "rank1.pt", weights_only=True)
    worker1 = worker1["strategy"]["async_diloco"]
    server = _run_server(SignCompressor(block_size=BLOCK_SIZE, backend="reference"), 2)
    server.load_state_dict(saved, same_workers=True)
    compressor = SignCompressor(block_size=BLOCK_SIZE, backend="reference")
    if keep_error_feedback:
        compressor.load_state_dict(worker1["compressor"])
    recorded = {rank: worker["pseudo_gradients"] for rank, worker in enumerate(ranks)}
    steps = {1: worker1["pseudo_gradients_sent"]}
    _replay(server, {1: compressor}, ranks[0]["arrivals"], recorded, steps, check_start_points=keep_error_feedback)
    return _flat(server.params)


@pytest.mark.distributed
def test_compressed_error_feedback_carries_through_a_checkpoint_resume(runs):
    out, results = runs
    _succeeded(results, "resumed")
    checkpoint_path = out / "checkpoints" / "epoch=0-step=4.ckpt"
    worker1 = torch.load(Path(f"{checkpoint_path}.rank_states") / "rank1.pt", weights_only=True)
    residual = worker1["strategy"]["async_diloco"]["compressor"]["elements"]["residual"]
    assert any(r.abs().sum() > 0 for r in residual.values())  # the killed run's rank 1 had error left over
    ranks = [_load(out, "resumed_2", rank) for rank in range(2)]
    final = _flat(ranks[0]["server"]["params"])
    assert torch.equal(_replay_from_checkpoint(checkpoint_path, ranks), final)
    # What a resume that lost the error feedback would have reached instead:
    assert not torch.equal(_replay_from_checkpoint(checkpoint_path, ranks, keep_error_feedback=False), final)


@pytest.mark.distributed
def test_a_checkpoint_saved_after_fit_resumes_from_the_final_global_parameters_on_every_worker(runs):
    out, results = runs
    _succeeded(results, "resumed")
    first, second = ([_load(out, name, rank) for rank in range(2)] for name in ("resumed_2", "after_fit"))
    final = _flat(first[0]["server"]["params"])
    saved = torch.load(out / "after_fit.ckpt", weights_only=True)["async_diloco"]
    # Saved after fit: every pseudo-gradient applied, every worker holding the final global parameters.
    assert saved["version"] == saved["arrivals"] == 8
    assert all(torch.equal(record["pulled"], final) for record in saved["workers"].values())
    for worker in second:  # each resumed worker's first round started there
        assert torch.equal(worker["pseudo_gradients"][0][0], final)
    # Steps 9 and 10: one more round each, applied once; then every rank holds the new final parameters.
    server = second[0]["server"]
    assert server["version"] == server["arrivals"] == 10 and server["rounds"] == {0: 5, 1: 5}
    for worker in second:
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(worker["params"], server["params"]))
    assert torch.equal(_replay_from_checkpoint(out / "after_fit.ckpt", second), _flat(server["params"]))


@pytest.mark.distributed
def test_overlapped_round_trips_move_the_progress_since_sending_onto_each_reply_and_never_wait_for_it(runs):
    out, results = runs
    _succeeded(results, "overlap")
    rank0, worker = _load(out, "overlap", 0), _load(out, "overlap", 1)
    # Every reply arrived within the next round: the worker never blocked on one.
    assert worker["reply_waits"] == worker["logged"]["async_diloco/reply_waits"] == 0
    inner_steps, lr = 3, 0.05  # async_diloco_fit.py: H = 3, inner SGD lr 0.05
    version, anchor, rounds, replies_taken = 0, None, iter(worker["pseudo_gradients"]), 0
    x = worker["steps"][0]["params"]
    for n, step in enumerate(worker["steps"], start=1):
        if step["version_before"] != version:  # a reply taken between steps (a checkpoint takes it): x + (o - a)
            torch.testing.assert_close(step["params"], x + (step["origin_before"] - anchor))
            version, replies_taken = step["version_before"], replies_taken + 1
        x = torch.add(step["params"], step["grads"], alpha=-lr)  # the inner SGD step
        if step["version"] != version:  # a reply taken in this step: x + (o - a)
            x = x + (step["origin"] - anchor)
            version, replies_taken = step["version"], replies_taken + 1
        torch.testing.assert_close(step["after"], x)
        x = step["after"]
        if n % inner_steps == 0:  # the round ends: origin - x is sent, and the worker goes on from x
            start, g = next(rounds)
            assert torch.equal(start, step["origin"])
            torch.testing.assert_close(g, start - x)
            anchor = x
    assert replies_taken == 2  # the replies to rounds 1 and 2 (round 3's is taken when fit ends)
    # The server's side is as without overlap: each pseudo-gradient applied once, decoded exactly.
    server = rank0["server"]
    assert server["version"] == server["arrivals"] == rank0["sent"] + worker["sent"] == 6
    replayed = _run_server(Int8Compressor(block_size=BLOCK_SIZE, backend="reference"), 2)
    recorded = {rank: r["pseudo_gradients"] for rank, r in enumerate((rank0, worker))}
    compressors = {1: Int8Compressor(block_size=BLOCK_SIZE, backend="reference")}
    _replay(replayed, compressors, rank0["arrivals"], recorded, steps={1: 0}, inner_steps=inner_steps)
    assert torch.equal(_flat(replayed.params), _flat(server["params"]))
    for ours, final in zip(worker["params"], server["params"]):
        assert torch.equal(ours, final)
    # The checkpoint at step 6, a meeting: worker 1 took the reply to its round 2 (sent at step 6) first, so
    # the server's state holds both workers' 2 rounds, and what the server believes worker 1 holds is
    # what worker 1 saved as its round's origin (and its parameters: no step since).
    checkpoint_path = out / "overlap_checkpoints" / "epoch=0-step=6.ckpt"
    saved = torch.load(checkpoint_path, weights_only=True)["async_diloco"]
    assert saved["version"] == saved["arrivals"] == 4 and saved["workers"][1]["rounds"] == 2
    worker1 = torch.load(Path(f"{checkpoint_path}.rank_states") / "rank1.pt", weights_only=True)
    worker1 = worker1["strategy"]["async_diloco"]
    assert torch.equal(_flat(worker1["origin"]), saved["workers"][1]["pulled"])
    assert torch.equal(_flat(worker1["model"].values()), saved["workers"][1]["pulled"])
