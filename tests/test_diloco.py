"""DiLoCo and Streaming DiLoCo: the outer-step kernel, the identities with plain training and DDP,
the schedule of syncs, delayed updates, checkpoints, byte counts, bad arguments and a worker that
stops answering.

The two-worker run is ``tests/scripts/diloco_fit.py``: one run, several scenarios, checked by
several tests here; in the last one a worker stops answering. Both ranks are started here at once,
as ``torchrun`` would, so that they import in parallel; Lightning sees ``LOCAL_RANK`` and launches
nothing itself. The expected values come from :func:`simulate`, DiLoCo written out as the papers
describe it for two workers in one process, with ``torch.optim.SGD`` as the outer optimizer.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from lightning_converge.callbacks import EMA
from lightning_converge.kernels import diloco_outer_step
from lightning_converge.schedules import QSR
from lightning_converge.strategies import DiLoCoStrategy, StreamingDiLoCoStrategy
from lightning_converge.strategies.diloco import assign_fragments, split_evenly

ROOT = Path(__file__).parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from diloco_fit import AFTER_FIT, Regression, batch_indices, dataset  # noqa: E402

sys.path.remove(str(SCRIPTS))

NUM_PARAMS = sum(p.numel() for p in Regression().parameters())  # 6*16 + 16 + 16 + 1 = 129


# ---------------------------------------------------------------------------------------- kernel


def _outer_inputs(generator: torch.Generator) -> tuple[list[torch.Tensor], ...]:
    shapes = [(7,), (33, 5), (129,)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    buffers = [torch.zeros(s) for s in shapes]
    return params, buffers


@pytest.mark.parametrize("nesterov, momentum", [(True, 0.9), (False, 0.9), (True, 0.0)])
@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_outer_step_equals_torch_sgd_and_a_new_lr_never_recompiles(backend, nesterov, momentum):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    generator = torch.Generator().manual_seed(0)
    params, buffers = _outer_inputs(generator)
    reference = [p.clone() for p in params]
    # torch refuses Nesterov without momentum; ours then is plain SGD, as torch's SGD
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=momentum, nesterov=nesterov and momentum > 0)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        lr = 0.7 / (step + 1)  # a schedule: must not recompile
        for group in sgd.param_groups:
            group["lr"] = lr
        for p, g in zip(reference, grads):
            p.grad = g
        sgd.step()
        diloco_outer_step(
            params,
            grads,
            buffers,
            lr=torch.tensor(lr),
            momentum=torch.tensor(momentum),
            nesterov=nesterov,
            backend=backend,
        )
        for ours, theirs in zip(params, reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    if backend == "compiled":
        assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_triton_matches_reference(nesterov):
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(1)
    params, _ = _outer_inputs(generator)
    buffers = [torch.randn(p.shape, generator=generator) for p in params]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    expected = [[t.clone() for t in ts] for ts in (params, buffers)]
    hyper = dict(lr=torch.tensor(0.7), momentum=torch.tensor(0.9), nesterov=nesterov)
    diloco_outer_step.reference(expected[0], grads, expected[1], **hyper)
    diloco_outer_step(params, grads, buffers, backend="triton", **hyper)
    for actual, wanted in zip([*params, *buffers], [*expected[0], *expected[1]]):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- arguments


def test_registered_by_name():
    assert StrategyRegistry["diloco"]["strategy"] is DiLoCoStrategy
    assert StrategyRegistry["streaming_diloco"]["strategy"] is StreamingDiLoCoStrategy
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="streaming_diloco", logger=False)
    assert type(trainer.strategy) is StreamingDiLoCoStrategy


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (DiLoCoStrategy, dict(inner_steps=0), ValueError, "inner_steps must be >= 1"),
        (DiLoCoStrategy, dict(inner_steps="often"), TypeError, "inner_steps"),
        (DiLoCoStrategy, dict(outer_optimizer="adam"), ValueError, "outer_optimizer must be one of"),
        (DiLoCoStrategy, dict(outer_optimizer=0.7), TypeError, "outer_optimizer"),
        (DiLoCoStrategy, dict(outer_momentum=1.0), ValueError, "outer_momentum"),
        (DiLoCoStrategy, dict(outer_lr=-1.0), ValueError, "outer_lr"),
        (DiLoCoStrategy, dict(delay=2), ValueError, "delay must be 0 or 1"),
        (DiLoCoStrategy, dict(backend="cuda"), ValueError, "backend"),
        (DiLoCoStrategy, dict(find_unused_parameters=True), TypeError, "does not wrap the model"),
        (DiLoCoStrategy, dict(ddp_kwargs={"find_unused_parameters": True}), TypeError, "have no meaning here"),
        (DiLoCoStrategy, dict(ddp_comm_hook=print), TypeError, "have no meaning here"),
        # A misspelt option is unknown, with the closest valid name; not a DDP option.
        (DiLoCoStrategy, dict(inner_step=5), TypeError, r"unknown option 'inner_step' \(did you mean 'inner_steps'"),
        (DiLoCoStrategy, dict(kernel_backend="reference"), TypeError, r"did you mean 'backend'\?"),
        (StreamingDiLoCoStrategy, dict(num_fragment=2), TypeError, r"did you mean 'num_fragments'\?"),
        (DiLoCoStrategy, dict(outer_state_device="gpu:0"), ValueError, "outer_state_device must be a device"),
        (StreamingDiLoCoStrategy, dict(num_fragments=0), ValueError, "num_fragments"),
        (StreamingDiLoCoStrategy, dict(inner_steps=3, num_fragments=4), ValueError, "smaller than num_fragments"),
        (StreamingDiLoCoStrategy, dict(inner_steps=8, num_fragments=4, overlap_steps=2), ValueError, "per-fragment"),
        (StreamingDiLoCoStrategy, dict(overlap_steps=-1), ValueError, "overlap_steps"),
        (StreamingDiLoCoStrategy, dict(mixing_alpha=1.5), ValueError, "mixing_alpha"),
        (StreamingDiLoCoStrategy, dict(fragment_assignment="random"), ValueError, "fragment_assignment"),
        (
            StreamingDiLoCoStrategy,
            dict(fragment_assignment="balanced", outer_optimizer=lambda params: torch.optim.Adam(params)),
            ValueError,
            "balanced",
        ),
        (StreamingDiLoCoStrategy, dict(delay=1), TypeError, "delay"),
    ],
)
def test_bad_arguments_raise_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_a_pass_through_subclass_lists_its_parents_options_when_one_is_unknown():
    class Subclass(DiLoCoStrategy):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    with pytest.raises(TypeError) as raised:
        Subclass(inner_step=5)
    valid = set(inspect.signature(DiLoCoStrategy).parameters) - {"kwargs"}
    assert "did you mean 'inner_steps'" in str(raised.value)
    assert all(repr(name) in str(raised.value) for name in valid)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cls", [DiLoCoStrategy, StreamingDiLoCoStrategy])
def test_a_cuda_outer_state_device_without_cuda_raises_at_construction(cls):
    with pytest.raises(ValueError, match="outer_state_device='cuda', but this machine has 0 CUDA devices"):
        cls(outer_state_device="cuda")


def test_the_ddp_strategy_arguments_are_explicit_in_the_signature():
    # LightningCLI and jsonargparse see only named parameters, not what **kwargs would take.
    ddp_arguments = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin",
                     "process_group_backend", "timeout", "start_method", "ddp_kwargs"}  # fmt: skip
    for cls in (DiLoCoStrategy, StreamingDiLoCoStrategy):
        assert ddp_arguments <= set(inspect.signature(cls.__init__).parameters), cls
    strategy = DiLoCoStrategy(process_group_backend="gloo", start_method="spawn", timeout=7, ddp_kwargs={})
    assert (strategy.process_group_backend, strategy._start_method) == ("gloo", "spawn")
    assert strategy._timeout == datetime.timedelta(seconds=7)


# A GPT-like model: embeddings, four blocks of two tensors, a final norm and a head (name, size).
GPT_LIKE = [
    ("token_embedding.weight", 100), ("position_embedding.weight", 50),
    ("blocks.0.mlp.weight", 40), ("blocks.0.mlp.bias", 4),
    ("blocks.1.mlp.weight", 40), ("blocks.1.mlp.bias", 4),
    ("blocks.2.mlp.weight", 40), ("blocks.2.mlp.bias", 4),
    ("blocks.3.mlp.weight", 40), ("blocks.3.mlp.bias", 4),
    ("ln_f.weight", 8), ("head.weight", 100),
]  # fmt: skip
REGRESSION = [("net.0.weight", 96), ("net.0.bias", 16), ("net.2.weight", 16), ("net.2.bias", 1)]


@pytest.mark.parametrize(
    "model, num_fragments, assignment, expected",
    [
        # Blocks 0 and 2 / 1 and 3 (88 each); then, largest first, to the lighter fragment (the first
        # on a tie): token embedding (100) to 0, head (100) to 1, position embedding (50) to 0, ln_f to 1.
        (GPT_LIKE, 2, "strided", [[0, 1, 2, 3, 6, 7], [4, 5, 8, 9, 10, 11]]),
        (GPT_LIKE, 2, "contiguous", [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]),
        # One block each; the four outside tensors, largest first, to the four (equal) fragments in turn.
        (GPT_LIKE, 4, "strided", [[0, 2, 3], [4, 5, 11], [1, 6, 7], [8, 9, 10]]),
        (REGRESSION, 2, "strided", [[0, 1], [2, 3]]),
        # Fewer layers than fragments: each tensor is a layer of its own.
        (REGRESSION, 3, "strided", [[0, 3], [1], [2]]),
        (REGRESSION, 3, "contiguous", [[0, 1], [2], [3]]),
    ],
)
def test_fragments_are_assigned_by_layer(model, num_fragments, assignment, expected):
    names, numels = zip(*model)
    assert assign_fragments(names, numels, num_fragments, assignment) == expected


# Fragments of Regression's parameters (net.0.weight 96, net.0.bias 16, net.2.weight 16, net.2.bias 1) as
# pieces (tensor, first element, end element): by layer, and cut into two runs of 64 and 65 elements.
BY_LAYER = {
    1: [[(0, 0, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]],
    2: [[(0, 0, 96), (1, 0, 16)], [(2, 0, 16), (3, 0, 1)]],
}
BALANCED_2 = [[(0, 0, 64)], [(0, 64, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]


@pytest.mark.parametrize(
    "numels, num_fragments, expected",
    [
        ([96, 16, 16, 1], 1, [[(0, 0, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]),
        ([96, 16, 16, 1], 2, BALANCED_2),  # 129 elements: bounds at 0, round(64.5) = 64, 129
        ([96, 16, 16, 1], 3, [[(0, 0, 43)], [(0, 43, 86)], [(0, 86, 96), (1, 0, 16), (2, 0, 16), (3, 0, 1)]]),
        ([10, 10, 10, 10], 2, [[(0, 0, 10), (1, 0, 10)], [(2, 0, 10), (3, 0, 10)]]),  # cuts between tensors
    ],
)
def test_balanced_fragments_are_equal_runs_of_the_parameters(numels, num_fragments, expected):
    assert split_evenly(numels, num_fragments) == expected


def test_more_fragments_than_tensors_is_an_error():
    names, numels = zip(*REGRESSION)
    with pytest.raises(ValueError, match="num_fragments=5 is larger than the number of parameter tensors"):
        assign_fragments(names, numels, 5, "strided")
    with pytest.raises(ValueError, match="num_fragments=5 is larger than the number of parameter tensors"):
        split_evenly(numels, 5)


# ---------------------------------------------------------------------------------------- one worker, in process


class TwoOptimizers(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # Lightning's own rule for several optimizers

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.05) for _ in range(2)]


def _fit_one_worker(
    model: L.LightningModule, strategy, max_steps: int = 6, ckpt_path=None, callbacks=()
) -> L.Trainer:
    trainer = L.Trainer(
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize(
    "outer_optimizer",
    ["sgd", functools.partial(torch.optim.SGD, lr=1.0)],
    ids=["built_in_compiled", "torch_sgd"],
)
def test_one_worker_with_plain_outer_steps_equals_training_without_the_strategy(outer_optimizer):
    plain = Regression("AdamW")
    _fit_one_worker(plain, "auto")
    model = Regression("AdamW")
    strategy = DiLoCoStrategy(inner_steps=1, outer_optimizer=outer_optimizer, outer_lr=1.0, outer_momentum=0.0)
    _fit_one_worker(model, strategy)
    assert strategy.outer_steps == 6
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("single_process_group")
def test_qsr_sets_the_inner_steps_from_the_live_learning_rate():
    # SGD lr 0.05: (alpha / lr) ** 2 = (0.1 / 0.05) ** 2 = 4 inner steps, above the base of 3.
    strategy = DiLoCoStrategy(inner_steps=QSR(base=3, alpha=0.1), backend="reference")
    _fit_one_worker(Regression("SGD"), strategy, max_steps=8)
    assert strategy.outer_steps == 2  # after steps 4 and 8 (with the base, H = 3: after 3, 6 and a last one at 8)


class WarmupFromZero(Regression):
    """Inner SGD lr 0.05 after a linear warm-up from 0: lr 0 at step 0, 0.025 at step 1, 0.05 from step 2."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / 2, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


@pytest.mark.usefixtures("single_process_group")
def test_qsr_after_a_warmup_from_zero_takes_the_base_then_the_capped_period():
    # Round 1 starts at step 0 with lr 0: the base, 3 steps. Round 2 starts at step 3 with lr 0.05:
    # (1.0 / 0.05) ** 2 = 400 steps, capped at 5: its sync is after step 8, where fit ends.
    strategy = DiLoCoStrategy(inner_steps=QSR(base=3, alpha=1.0, max_inner_steps=5), backend="reference")
    _fit_one_worker(WarmupFromZero(), strategy, max_steps=8)
    assert strategy.outer_steps == 2


@pytest.mark.usefixtures("single_process_group")
def test_any_inner_steps_schedule_that_takes_lr_is_given_the_live_lr():
    seen = []

    def period(step: int, lr: float) -> int:
        seen.append((step, lr))
        return 3

    _fit_one_worker(WarmupFromZero(), DiLoCoStrategy(inner_steps=period, backend="reference"), max_steps=7)
    # Each round starts after the lr scheduler stepped: lr = 0.05 * min(step / 2, 1).
    assert seen == [(0, 0.0), (3, 0.05), (6, 0.05)]


class InMemoryLogger(L.pytorch.loggers.Logger):
    """Keeps what the Trainer logs: step -> metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("compressor, bytes_per_number", [(None, 4), ("fp16", 2)])
def test_bytes_are_logged_per_step_and_in_total(compressor, bytes_per_number):
    # One worker, inner_steps 3, 7 steps: exchanges complete after steps 3 and 6 (the all-reduce of
    # the 129 numbers of the pseudo-gradient: 129 * bytes_per_number in, as many out), and once more
    # when fit ends (step 7 moved the model).
    strategy = DiLoCoStrategy(inner_steps=3, compressor=compressor, backend="reference")
    logger = InMemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=7, logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Regression())
    sync = NUM_PARAMS * bytes_per_number
    per_step = [0, 0, sync, 0, 0, sync, 0]  # steps 1..7
    logged = [logger.metrics[step] for step in sorted(logger.metrics)]
    assert [m["comm/bytes_sent"] for m in logged] == per_step
    assert [m["comm/bytes_received"] for m in logged] == per_step
    totals = [sum(per_step[: i + 1]) for i in range(7)]
    assert [m["comm/bytes_sent_total"] for m in logged] == totals
    assert [m["comm/bytes_received_total"] for m in logged] == totals
    assert strategy.bytes_sent == strategy.bytes_received == 3 * sync


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize(
    "strategy, model, match",
    [
        (StreamingDiLoCoStrategy(inner_steps=10, num_fragments=5), Regression(), "larger than the number"),
        (DiLoCoStrategy(outer_optimizer=lambda params: None), Regression(), "must return a torch.optim"),
        (DiLoCoStrategy(inner_steps=lambda step: 0.2), Regression(), "inner_steps must be >= 1"),
        (DiLoCoStrategy(), TwoOptimizers(), "one inner optimizer"),
        # the workers' buffers are not synchronized: no agreed value for an average of them
        (DiLoCoStrategy(backend="reference"), Regression(), "include_buffers"),
    ],
    ids=[
        "too_many_fragments",
        "outer_optimizer_not_an_optimizer",
        "schedule_below_one",
        "two_optimizers",
        "ema_include_buffers",
    ],
)
def test_bad_setups_raise_before_training(strategy, model, match):
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        _fit_one_worker(model, strategy, callbacks=[EMA(include_buffers=True)] if match == "include_buffers" else [])
    for before, after in zip(initial, model.parameters()):
        assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------- two workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_workers(script: str, args: list[str], log_dir: Path, timeout: float) -> list[tuple[int, str]]:
    """Start ranks 0 and 1 of ``script`` together; return each one's exit code and output."""
    port = _free_port()
    processes, logs = [], []
    for rank in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            NODE_RANK="0",
            LOCAL_RANK=str(rank),
        )
        # Files, not pipes: a rank blocked on a full pipe would stall the other in a collective.
        log = open(log_dir / f"{Path(script).stem}_rank{rank}.log", "w+")
        logs.append(log)
        processes.append(
            subprocess.Popen([sys.executable, str(SCRIPTS / script), *args], env=env, stdout=log, stderr=log)
        )
    try:
        for process in processes:
            process.wait(timeout=timeout)
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


SCENARIOS = [
    "ddp_identity",
    "diloco",
    "delayed",
    "diloco_fp16",
    "streaming",
    "streaming_balanced",
    "delayed_adamw",
    "streaming_int8_adamw",
]


END_OF_FIT_SCENARIOS = [
    "accumulate_bf16_callbacks",
    "delayed_stops_at_sync",
    "ema_ends_at_sync",
    "switch_ema",
    "validation",
    "validation_ema",
]


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory):
    """One two-worker run of diloco_fit.py: every scenario, then ``worker_stops``.

    Returns name -> [rank 0's record, rank 1's], and under ``"exits"`` each rank's exit code and log.
    """
    out = tmp_path_factory.mktemp("diloco")
    exits = run_two_workers(
        "diloco_fit.py", [str(out), *SCENARIOS, *END_OF_FIT_SCENARIOS, *AFTER_FIT, "worker_stops"], out, timeout=600
    )
    runs = {"exits": exits, "checkpoint_dir": out}
    for name in [
        *SCENARIOS,
        *[f"{name}_resumed" for name in SCENARIOS if name.endswith("_adamw")],
        *END_OF_FIT_SCENARIOS,
        *[f"{name}{run}" for name in AFTER_FIT for run in ("", "_stopped", "_resumed")],
    ]:
        paths = [out / f"{name}_rank{rank}.pt" for rank in (0, 1)]
        if not all(path.exists() for path in paths):
            pytest.fail(
                f"scenario {name} left no results; the ranks' logs:\n{exits[0][1][-4000:]}\n{exits[1][1][-4000:]}"
            )
        runs[name] = [torch.load(path) for path in paths]
    return runs


def simulate(
    steps: int,
    inner_steps: int,
    num_fragments: int = 1,
    overlap_steps: int = 0,
    mixing_alpha: float = 0.0,
    delay: int = 0,
    fragments: list[list[tuple[int, int, int]]] | None = None,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Two workers, inner SGD lr 0.05, outer Nesterov SGD lr 0.7 momentum 0.9 (torch.optim.SGD's
    equations written out per piece), fragments by layer unless ``fragments`` are given.

    Returns the global parameters after every outer update and the final parameters.
    """
    x, y = dataset().tensors
    workers = [Regression("SGD") for _ in range(2)]
    inner = [torch.optim.SGD(w.parameters(), lr=0.05) for w in workers]
    local = [list(w.parameters()) for w in workers]
    global_params = [p.detach().clone() for p in local[0]]
    momentum = [torch.zeros_like(p) for p in global_params]
    fragments = fragments or BY_LAYER[num_fragments]
    pending = {}  # fragment -> [averaged pseudo-gradient pieces, step to apply it after (None: its next sync)]
    origins = {}  # fragment -> each worker's pieces where its inner phase started, if not the global ones
    updates = []

    def pieces(tensors, f):
        return [tensors[i].detach().view(-1)[start:end] for i, start, end in fragments[f]]

    @torch.no_grad()
    def pull_global(f, alpha):
        for params in local:
            for mine, theirs in zip(pieces(params, f), pieces(global_params, f)):
                mine.copy_(alpha * mine + (1 - alpha) * theirs)

    def apply(f, alpha):
        average, _ = pending.pop(f)
        for param, buffer, grad in zip(pieces(global_params, f), pieces(momentum, f), average):
            buffer.mul_(0.9).add_(grad)
            param.sub_(0.7 * (grad + 0.9 * buffer))
        pull_global(f, alpha)
        updates.append([g.clone() for g in global_params])

    def start(f, apply_at):
        starts = origins.pop(f, [pieces(global_params, f)] * 2)
        nows = [pieces(params, f) for params in local]
        # per piece: the mean over the workers of (where the phase started - where it is now)
        average = [sum(s - n for s, n in zip(piece_starts, piece_nows)) / 2
                   for piece_starts, piece_nows in zip(zip(*starts), zip(*nows))]
        if delay and f in pending:
            apply(f, mixing_alpha)
        elif delay:  # nothing to apply: the next phase starts where this one ended
            origins[f] = [[piece.clone() for piece in pieces(params, f)] for params in local]
        pending[f] = [average, apply_at]

    for step in range(1, steps + 1):
        for rank, (worker, optimizer) in enumerate(zip(workers, inner)):
            index = batch_indices(step - 1, rank)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(worker.net(x[index]), y[index]).backward()
            optimizer.step()
        for f in range(num_fragments):
            if step % inner_steps == (f + 1) * inner_steps // num_fragments % inner_steps:
                start(f, None if delay else step + overlap_steps)
        for f in [f for f, (_, apply_at) in pending.items() if apply_at == step]:
            apply(f, mixing_alpha)
    # The end of fit: apply what is in flight, sync what moved since its phase started, replace the
    # local parameters.
    for f in range(num_fragments):
        if f in pending and pending[f][1] is not None:
            apply(f, mixing_alpha)
        starts = origins.get(f, [pieces(global_params, f)] * 2)
        moved = any(
            not torch.equal(a, b) for params, begun in zip(local, starts) for a, b in zip(pieces(params, f), begun)
        )
        if moved:
            start(f, steps)
        if f in pending:
            apply(f, 0.0)
    return updates, [p.detach() for p in local[0]]


def _assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_inner_steps_1_with_plain_outer_sgd_equals_ddp_with_sgd(two_worker_runs):
    rank0, rank1 = two_worker_runs["ddp_identity"]
    # Plain DDP with SGD is SGD on the 16 samples both ranks share (tests/test_optim_lightning.py checks
    # that DDP does exactly this): here written out.
    model = Regression("SGD")
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = dataset().tensors
    for step in range(5):
        sgd.zero_grad()
        index = torch.cat([batch_indices(step, rank) for rank in (0, 1)])
        torch.nn.functional.mse_loss(model.net(x[index]), y[index]).backward()
        sgd.step()
    _assert_all_close(rank0["params"], [p.detach() for p in model.parameters()])
    _assert_all_close(rank1["params"], rank0["params"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCENARIOS)
def test_workers_hold_identical_global_parameters_after_every_outer_step(two_worker_runs, name):
    rank0, rank1 = two_worker_runs[name]
    assert len(rank0["globals_after_update"]) == rank0["outer_steps"] > 0
    for update0, update1 in zip(rank0["globals_after_update"], rank1["globals_after_update"]):
        assert all(torch.equal(a, b) for a, b in zip(update0, update1))
    # fit ends with a last sync, so the workers also end with the same (global) parameters
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank0["globals_after_update"][-1]))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name, config",
    [
        ("diloco", dict(inner_steps=3)),
        ("delayed", dict(inner_steps=3, delay=1)),
        ("streaming", dict(inner_steps=4, num_fragments=2, overlap_steps=1, mixing_alpha=0.5)),
        (
            "streaming_balanced",
            dict(inner_steps=4, num_fragments=2, overlap_steps=1, mixing_alpha=0.5, fragments=BALANCED_2),
        ),
    ],
)
def test_runs_follow_the_algorithm(two_worker_runs, name, config):
    rank0, _ = two_worker_runs[name]
    updates, final = simulate(steps=10, **config)
    assert len(rank0["globals_after_update"]) == len(updates)
    for ours, expected in zip(rank0["globals_after_update"], updates):
        _assert_all_close(ours, expected)
    _assert_all_close(rank0["params"], final)


@pytest.mark.distributed
def test_gradient_accumulation_bf16_mixed_and_callbacks_count_optimizer_steps(two_worker_runs):
    # 6 optimizer steps of 2 micro-batches each under bf16 autocast, with EMA and Grokfast: H=3 counts
    # optimizer steps, so the syncs come after steps 3 and 6 (after micro-batches 6 and 12).
    rank0, rank1 = two_worker_runs["accumulate_bf16_callbacks"]
    for rank in (rank0, rank1):
        assert rank["events"] == [(3, 0, "start"), (3, 0, "apply"), (6, 0, "start"), (6, 0, "apply")]
        assert rank["outer_steps"] == 2
        assert {"ema/decay", "grokfast/slow_norm"} <= set(rank["logged"])
        assert all(torch.isfinite(p).all() for p in rank["params"])
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))


@pytest.mark.distributed
def test_delay_applies_each_outer_update_one_outer_step_late(two_worker_runs):
    diloco, delayed = two_worker_runs["diloco"][0], two_worker_runs["delayed"][0]
    applied = lambda run: [step for step, _, kind in run["events"] if kind == "apply"]  # noqa: E731
    # Syncs after steps 3, 6, 9, and the last one when fit ends at step 10. With delay=1 the update
    # sent at step 3 lands at step 6, the one sent at 6 at 9, the one sent at 9 when fit ends.
    assert applied(diloco) == [3, 6, 9, 10]
    assert applied(delayed) == [6, 9, 10, 10]
    # Both runs start from the same parameters and send the same first pseudo-gradient: the delayed
    # run's first update is the undelayed run's, one outer step later.
    assert all(torch.equal(a, b) for a, b in zip(delayed["globals_after_update"][0], diloco["globals_after_update"][0]))


@pytest.mark.distributed
def test_fragments_sync_in_turn(two_worker_runs):
    # H = 4 steps, 2 fragments (by layer: fragment 0 holds net.0, fragment 1 net.2), overlap 1 step:
    # fragment f starts after steps (f + 1) * 4 // 2 + 4k and is applied one step later. When fit ends
    # (step 10), the update in flight is applied and both fragments take a last blocking sync.
    expected = [
        (2, 0, "start"),
        (3, 0, "apply"),
        (4, 1, "start"),
        (5, 1, "apply"),
        (6, 0, "start"),
        (7, 0, "apply"),
        (8, 1, "start"),
        (9, 1, "apply"),
        (10, 0, "start"),
        (10, 0, "apply"),
        (10, 0, "start"),
        (10, 0, "apply"),
        (10, 1, "start"),
        (10, 1, "apply"),
    ]
    for rank in two_worker_runs["streaming"]:
        assert rank["events"] == expected


def _worker_files(path: Path, checkpoint: dict) -> list[dict]:
    """Every worker's own file beside the checkpoint at ``path``, as ``checkpoint`` records them."""
    record = checkpoint["rank_states"]
    return [torch.load(path.parent / record["directory"] / name, weights_only=True) for name in record["files"]]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["delayed_adamw", "streaming_int8_adamw"])
def test_resuming_from_a_checkpoint_inside_an_inner_phase_continues_identically(two_worker_runs, name):
    # Checkpointed after step 4 of 12: inside an inner phase, with an outer update in flight and
    # per-worker AdamW states; resumed from there by fresh processes' worth of objects.
    for full, resumed in zip(two_worker_runs[name], two_worker_runs[f"{name}_resumed"]):
        assert all(torch.equal(a, b) for a, b in zip(full["params"], resumed["params"]))
        assert full["outer_steps"] == resumed["outer_steps"]
        assert full["bytes_sent"] == resumed["bytes_sent"]
        steps_after_4 = [event for event in full["events"] if event[0] > 4]
        assert resumed["events"] == steps_after_4

    path = two_worker_runs["checkpoint_dir"] / f"{name}_checkpoints" / "epoch=0-step=4.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["diloco"]
    assert state["inner_step"] == 4
    workers = _worker_files(path, checkpoint)
    assert checkpoint["rank_states"]["world_size"] == 2 and [w["rank"] for w in workers] == [0, 1]
    # each worker's own local parameters: they differ inside an inner phase
    local_models = [rank["strategy"]["diloco"]["model"] for rank in workers]
    assert any(not torch.equal(a, b) for a, b in zip(local_models[0].values(), local_models[1].values()))
    assert any(fragment["pending_average"] is not None for fragment in state["fragments"])
    # the model in the checkpoint is the global one
    assert all(torch.equal(a, b) for a, b in zip(checkpoint["state_dict"].values(), state["global_params"]))


@pytest.mark.distributed
@pytest.mark.usefixtures("single_process_group")
def test_resuming_with_fewer_workers_restarts_the_inner_phase_from_the_global_parameters(two_worker_runs):
    checkpoint = two_worker_runs["checkpoint_dir"] / "delayed_adamw_checkpoints" / "epoch=0-step=4.ckpt"
    strategy = DiLoCoStrategy(inner_steps=3, delay=1, backend="reference")
    with pytest.warns(UserWarning, match="saved by 2 ranks and is resumed by 1"):
        _fit_one_worker(Regression("AdamW"), strategy, max_steps=6, ckpt_path=checkpoint)
    # The update sent at step 3 (in the checkpoint, averaged over the two workers) lands at step 6,
    # the one sent at step 6 when fit ends.
    assert strategy.outer_steps == 2


@pytest.mark.distributed
def test_bytes_sent_are_the_pseudo_gradient_sizes(two_worker_runs):
    # name -> (bytes per number sent, syncs, outer updates logged at step 10: before the syncs when fit ends)
    expected = {"ddp_identity": (4, 5, 5), "diloco": (4, 4, 3), "delayed": (4, 4, 2), "diloco_fp16": (2, 4, 3)}
    for name, (bytes_per_number, syncs, logged_updates) in expected.items():
        for rank in two_worker_runs[name]:
            assert rank["bytes_sent"] == syncs * NUM_PARAMS * bytes_per_number
            assert rank["logged"]["diloco/outer_step"] == logged_updates
            assert rank["logged"]["comm/bytes_sent_total"] == logged_updates * NUM_PARAMS * bytes_per_number
            assert rank["logged"]["comm/bytes_received_total"] == logged_updates * NUM_PARAMS * bytes_per_number
            assert 0 <= rank["logged"]["comm/wait_seconds"] <= rank["wait_seconds"] + 1e-6  # logged as fp32

    # Streaming sends one fragment a sync: fp32, 2 fragments by layer: net.0 6*16 + 16 = 112 numbers,
    # net.2 16 + 1 = 17; int8 in blocks of 64 with an fp32 scale per block, 3 fragments (more than
    # the 2 layers: strided over the tensors): {0.weight, 2.bias} 96 + 1 = 97 numbers, 2 blocks;
    # {0.bias} 16, 1; {2.weight} 16, 1. Balanced: 129 numbers cut into 64 and 65.
    fragment_bytes = {
        "streaming": [112 * 4, 17 * 4],
        "streaming_balanced": [64 * 4, 65 * 4],
        "streaming_int8_adamw": [97 + 2 * 4, 16 + 4, 16 + 4],
    }
    for name, sizes in fragment_bytes.items():
        for rank in two_worker_runs[name]:
            applied = [fragment for _, fragment, kind in rank["events"] if kind == "apply"]
            assert rank["bytes_sent"] == sum(sizes[f] for f in applied)


@pytest.mark.distributed
def test_fp16_pseudo_gradients_stay_close_to_fp32_ones(two_worker_runs):
    fp16, fp32 = two_worker_runs["diloco_fp16"][0], two_worker_runs["diloco"][0]
    assert [e[:2] for e in fp16["events"]] == [e[:2] for e in fp32["events"]]
    for a, b in zip(fp16["params"], fp32["params"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        assert not torch.equal(a, b)


@pytest.mark.distributed
def test_a_worker_that_stops_makes_the_other_fail_with_a_clear_error_at_the_timeout(two_worker_runs):
    (code0, log0), (code1, log1) = two_worker_runs["exits"]
    assert code0 == 17, log0[-3000:]  # rank 0 stopped answering before step 4, and died 8 s later
    assert code1 != 0
    assert "the exchange of pseudo-gradients failed on rank 1 after inner step 4" in log1, log1[-3000:]
    assert "Another worker has probably died or stopped responding (process-group timeout: 0:00:02)" in log1
    # gloo gave up after the strategy's 2 s, long before rank 0 died and closed its connections
    assert "Timed out waiting 2000ms" in log1


# ---------------------------------------------------------------------------------------- the end of fit


@pytest.mark.distributed
def test_delay_1_stopping_right_after_a_sync_applies_only_the_average_in_flight(two_worker_runs):
    # fit ends at step 3 = inner_steps: the first pseudo-gradient is in flight and nothing has moved since.
    updates, final = simulate(steps=3, inner_steps=3, delay=1)
    assert len(updates) == 1
    for rank in two_worker_runs["delayed_stops_at_sync"]:
        assert rank["outer_steps"] == 1
        assert rank["events"] == [(3, 0, "start"), (3, 0, "apply")]
        _assert_all_close(rank["globals_after_update"][0], updates[0])
        _assert_all_close(rank["params"], final)


def _assert_states_equal(actual, expected) -> None:
    """Callback states (dicts and lists of tensors and plain values) equal, tensors bit for bit."""
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_states_equal(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            _assert_states_equal(a, b)
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    else:
        assert actual == expected


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(AFTER_FIT))
def test_a_checkpoint_saved_after_fit_continues_exactly(two_worker_runs, name):
    stop = AFTER_FIT[name][2]
    full, stopped, resumed = (two_worker_runs[f"{name}{run}"] for run in ("", "_stopped", "_resumed"))
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank]["params"], full[rank]["params"]))
        assert resumed[rank]["outer_steps"] == full[rank]["outer_steps"]
        assert resumed[rank]["events"] == [event for event in full[rank]["events"] if event[0] > stop]
        for callback, state in full[rank]["callbacks"].items():
            _assert_states_equal(resumed[rank]["callbacks"][callback], state)
    # every run ends with one model on both workers (the stopped one: after a last sync)
    for run in (full, stopped, resumed):
        assert all(torch.equal(a, b) for a, b in zip(run[0]["params"], run[1]["params"]))
    if "EMA" in full[0]["callbacks"]:  # the EMA follows the global parameters: one average
        _assert_states_equal(full[0]["callbacks"]["EMA"], full[1]["callbacks"]["EMA"])
        assert all(  # and the fitted model is that average
            torch.equal(p, a) for p, a in zip(full[0]["params"], full[0]["callbacks"]["EMA"]["averages"].values())
        )
    if "LAWA" in full[0]["callbacks"]:  # snapshots of the global parameters: the same on both workers
        _assert_states_equal(full[0]["callbacks"]["LAWA"], full[1]["callbacks"]["LAWA"])
    if "Grokfast" in full[0]["callbacks"]:  # local gradients: each worker's filter is its own
        slow = [full[rank]["callbacks"]["Grokfast"]["slow"] for rank in range(2)]
        assert any(not torch.equal(slow[0][key], slow[1][key]) for key in slow[0])


@pytest.mark.distributed
def test_ema_under_diloco_averages_the_global_parameters_and_the_workers_end_with_it(two_worker_runs):
    # H=3, 6 steps: the last step is a sync step. The EMA (decay 0.5) starts from the initial parameters
    # and takes one update after each outer step, with the global parameters.
    rank0, rank1 = two_worker_runs["ema_ends_at_sync"]
    assert rank0["outer_steps"] == 2
    expected = [p.detach().clone() for p in Regression().parameters()]
    for global_params in rank0["globals_after_update"]:
        expected = [0.5 * e + 0.5 * g for e, g in zip(expected, global_params)]
    for rank in (rank0, rank1):
        _assert_all_close(list(rank["callbacks"]["EMA"]["averages"].values()), expected)
        assert rank["callbacks"]["EMA"]["num_updates"] == 2
    _assert_all_close(rank0["params"], expected)
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))


@pytest.mark.distributed
def test_switch_ema_under_diloco_switches_the_global_parameters_on_every_worker(two_worker_runs):
    # Epochs of 4 steps, syncs every 3 steps: each switch falls inside an inner phase. The global
    # parameters become the average on both workers; each worker's local parameters move with them,
    # so what it has learnt since its phase started (local - global) carries over.
    rank0, rank1 = two_worker_runs["switch_ema"]
    assert len(rank0["after_switch"]) == 3  # epoch ends at steps 4, 8 and 10 (max_steps)
    for rank in (rank0, rank1):
        for before, after in zip(rank["before_switch"], rank["after_switch"]):
            _assert_all_close(after["global"], after["average"])
            learnt_before = [l - g for l, g in zip(before["local"], before["global"])]
            _assert_all_close([l - g for l, g in zip(after["local"], after["global"])], learnt_before)
    for after0, after1 in zip(rank0["after_switch"], rank1["after_switch"]):
        assert all(torch.equal(a, b) for a, b in zip(after0["global"], after1["global"]))
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["validation", "validation_ema"])
def test_validation_evaluates_the_model_a_checkpoint_saves_the_same_on_every_worker(two_worker_runs, name):
    # Validation after step 4, inside an inner phase (H=3): the workers' local parameters differ. The model
    # evaluated is the global one (or, with EMA, its average of the global parameters) on both workers,
    # and it is the model a checkpoint saved during that validation holds as state_dict.
    ranks = two_worker_runs[name]
    seen = [rank["seen_in_validation"] for rank in ranks]
    path = two_worker_runs["checkpoint_dir"] / f"{name}.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    for rank in seen:
        assert all(torch.equal(a, b) for a, b in zip(rank["evaluated"], seen[0]["evaluated"]))
        assert all(torch.equal(a, b) for a, b in zip(rank["evaluated"], checkpoint["state_dict"].values()))
    if name == "validation":
        _assert_all_close(seen[0]["evaluated"], seen[0]["global"])
    else:  # the EMA's one update, after the outer step at step 3: 0.5 * initial + 0.5 * global
        initial = [p.detach() for p in Regression().parameters()]
        _assert_all_close(seen[0]["evaluated"], [0.5 * i + 0.5 * g for i, g in zip(initial, seen[0]["global"])])
    # the workers' local parameters went on from where they were: the runs end as the algorithm says
    local_models = [rank["strategy"]["diloco"]["model"] for rank in _worker_files(path, checkpoint)]
    assert any(not torch.equal(a, b) for a, b in zip(local_models[0].values(), local_models[1].values()))
    if name == "validation":
        updates, final = simulate(steps=5, inner_steps=3)
        _assert_all_close(ranks[0]["params"], final)


@pytest.mark.distributed
def test_the_exchange_group_sees_the_same_collectives_in_the_same_order_on_every_rank_from_one_thread(tmp_path):
    """NCCL needs every rank to issue a group's collectives in one order; with a compressor they all come
    from the exchange's thread (which also makes the pseudo-gradient's device current), without one from
    the training thread, and the other thread issues none on that group."""
    exits = run_two_workers("diloco_collective_order.py", [str(tmp_path)], tmp_path, timeout=300)
    for code, log in exits:
        assert code == 0, log[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for scenario in ["delayed_onebit", "streaming_onebit", "delayed_fp32", "dynamic_onebit", "dynamic_fp32"]:
        compressed = scenario.endswith("onebit")
        # dynamic_inner_steps: after each sync's exchange, the speeds' all-gather (one number a rank)
        speeds = ["all_gather_into_tensor"] if scenario.startswith("dynamic") else []
        on_group = [
            [(thread, name, numel) for thread, name, group, numel in rank[scenario]["collectives"] if group == "exchange"]
            for rank in ranks
        ]
        assert on_group[0] and on_group[0] == on_group[1], scenario
        threads = {thread for thread, _, _ in on_group[0]}
        if compressed:
            assert len(threads) == 1 and threads.pop().startswith("diloco-exchange"), scenario
            # the 1-bit exchange: an all-to-all, then an all-gather, per sync
            names = [name for _, name, _ in on_group[0]]
            per_sync = ["all_to_all_single", "all_gather_into_tensor", *speeds]
            assert names == per_sync * (len(names) // len(per_sync)), scenario
            helper_threads = ranks[0][scenario]["device_helper_threads"]  # one per exchange, one per all-gather
            assert len(helper_threads) == len(names) // len(per_sync) * (1 + len(speeds)), scenario
            assert all(thread.startswith("diloco-exchange") for thread in helper_threads), scenario
        else:
            assert threads == {"MainThread"}, scenario
            names = [name for _, name, _ in on_group[0]]
            per_sync = ["all_reduce", *speeds]
            assert names == per_sync * (len(names) // len(per_sync)), scenario
            assert ranks[0][scenario]["device_helper_threads"] == [], scenario


def test_the_gpu_checks_exchange_section_runs_here_and_finds_the_thread_average_equal():
    """benchmarks/gpu_check.py's DiLoCo exchange check (NCCL on a GPU) on gloo and CPU: its plumbing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    section = gpu_check.check_diloco_exchange(torch.device("cpu"), numel=1000)
    assert section["all_equal"] and list(section["rows"]) == ["int8", "onebit", "fp32"]
    for name in ("int8", "onebit"):
        assert section["rows"][name]["thread"] == ["diloco-exchange_0"]
    assert section["rows"]["fp32"]["thread"] == []  # no thread: an asynchronous all-reduce
    assert not torch.distributed.is_initialized()
