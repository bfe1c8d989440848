"""What a GPU step needs that CPU tests can still show.

* No host synchronization in a step: the changing hyperparameters live in
  persistent 0-d device tensors refilled in place (no tensor is built from a
  Python number per step: on CUDA each would be a blocking host-to-device copy),
  and nothing is read back to the host (``.item()``, ``bool(t)``, ``float(t)``).
  Every aten call of a step is recorded with a ``TorchDispatchMode``; the Python
  conversions are made to raise while the step runs.
* ``backend="triton"`` where triton cannot run (tensors not on CUDA, a kernel
  without a triton version) falls back to what ``"auto"`` runs, with one warning
  per kernel; ``"auto"`` on CUDA without triton says so once.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_converge.callbacks import EMA, Grokfast
from lightning_converge.kernels import dispatch
from lightning_converge.kernels.dispatch import Kernel, resolve_backend
from lightning_converge.optim import ADOPT, AdamW, Adan, AdEMAMix, Lion

# aten calls that turn a host value into a tensor (torch.tensor, torch.scalar_tensor) or a
# tensor into a host value (item, bool, float): on CUDA each one waits for the device.
HOST_VALUE_OPS = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.scalar_tensor.default",
                  "aten._local_scalar_dense.default"}


class RecordOps(TorchDispatchMode):
    """Records the name of every aten call made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _refuse(*args, **kwargs):
    raise AssertionError("a value was read back to the host inside a step")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Inside: ``Tensor.item``, ``bool(t)``, ``float(t)``, ``int(t)`` raise; yields the recorded aten calls."""
    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, _refuse)
        with RecordOps() as recorder:
            yield recorder.ops


def _assert_steady_and_sync_free(per_step: list[Counter]) -> None:
    for ops in per_step:
        assert not HOST_VALUE_OPS & ops.keys(), {op: ops[op] for op in HOST_VALUE_OPS & ops.keys()}
    # The same calls every step: nothing accumulates (no growing number of tensors made per step).
    assert all(ops == per_step[0] for ops in per_step), per_step


OPTIMIZERS = [
    (AdamW, dict(weight_decay=0.1)),
    (AdamW, dict(cautious=True)),
    (Lion, {}),
    (Adan, {}),
    (AdEMAMix, dict(alpha_warmup=10, beta3_warmup=10)),
    (ADOPT, {}),
]


def _params_with_grads(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in [(5, 3), (7,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_optimizer_step_builds_no_host_tensors_and_reads_nothing_back(cls, kwargs, backend, monkeypatch):
    params = _params_with_grads(0)
    # Two groups, and an lr that changes every step (a schedule): the slots are refilled, not rebuilt.
    optimizer = cls([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}], backend=backend, **kwargs)
    optimizer.step()  # the first step creates the state
    per_step = []
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (step + 1)
        with no_host_reads(monkeypatch) as ops:
            optimizer.step()
        per_step.append(ops)
    _assert_steady_and_sync_free(per_step)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS[:3], ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_persistent_scalars_are_no_state_and_do_not_change_the_update(cls, kwargs):
    """The slots stay out of state_dict and pickles; copies step exactly like the original, and like an
    optimizer that never held slots (a fresh one loaded from the state dict)."""
    params = _params_with_grads(1)
    optimizer = cls(params, backend="reference", **kwargs)
    optimizer.step()
    state_dict = optimizer.state_dict()
    assert all(set(group) <= set(optimizer.defaults) | {"params", "initial_lr"} for group in state_dict["param_groups"])
    assert "_scalars" not in optimizer.__getstate__()

    twins = []
    for make in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        twin = make(optimizer)
        twins.append((twin, twin.param_groups[0]["params"]))
    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = cls(fresh_params, backend="reference", **kwargs)
    fresh.load_state_dict(copy.deepcopy(state_dict))
    twins.append((fresh, fresh_params))

    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for opt, ps in [(optimizer, params), *twins]:
            opt.param_groups[0]["lr"] = 1e-3 / (step + 1)
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for _, ps in twins:
        for a, b in zip(params, ps):
            assert torch.equal(a, b)


class _Module(torch.nn.Module):
    """What the callbacks' hooks use of a LightningModule, with ``log`` recording values."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        self.logged: list = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


class _Trainer:
    global_step = 0


def test_grokfast_ema_step_builds_no_host_tensors_and_reads_nothing_back(monkeypatch):
    module, trainer = _Module(), _Trainer()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    callback = Grokfast(filter="ema", alpha=lambda step: 0.9 - 0.01 * step, lamb=2.0, backend="reference")
    callback.on_train_start(trainer, module)
    per_step = []
    for step in range(5):
        trainer.global_step = step
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        if step == 0:  # the slows start here, the only step that may read the flag back
            callback.on_before_optimizer_step(trainer, module, optimizer)
            continue
        with no_host_reads(monkeypatch) as ops:
            callback.on_before_optimizer_step(trainer, module, optimizer)
        per_step.append(ops)
    _assert_steady_and_sync_free(per_step)


def test_grokfast_ema_skips_a_non_finite_step_on_the_device(monkeypatch):
    """An overflow step changes neither the gradients nor the slows, decided without a host read;
    the next finite step applies the filter equations (written out here) to the slows as they were."""
    module, trainer = _Module(), _Trainer()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    alpha, lamb = 0.8, 3.0
    callback = Grokfast(filter="ema", alpha=alpha, lamb=lamb, backend="reference")
    callback.on_train_start(trainer, module)
    params = list(module.parameters())
    first = [torch.randn_like(p) for p in params]
    for p, g in zip(params, first):
        p.grad = g.clone()
    callback.on_before_optimizer_step(trainer, module, optimizer)
    slows = {name: s.clone() for name, s in callback._slow.items()}

    overflow = [torch.randn_like(p) for p in params]
    overflow[0][0, 0], overflow[1][1] = float("inf"), float("nan")
    for p, g in zip(params, overflow):
        p.grad = g.clone()
    with no_host_reads(monkeypatch):
        callback.on_before_optimizer_step(trainer, module, optimizer)
    for p, g in zip(params, overflow):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    for name, s in callback._slow.items():
        assert torch.equal(s, slows[name])

    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with no_host_reads(monkeypatch):
        callback.on_before_optimizer_step(trainer, module, optimizer)
    for (name, p), g in zip(module.named_parameters(), grads):
        expected_slow = slows[name] * alpha + g * (1 - alpha)
        torch.testing.assert_close(callback._slow[name], expected_slow)
        torch.testing.assert_close(p.grad, g + lamb * expected_slow)


class _TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.linear(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _guarded_fit(monkeypatch, tmp_path, callback, hook_name: str, first_guarded_step: int, max_steps: int = 7):
    """Fit ``_TinyModel`` with ``callback`` under a real Trainer; each call of the callback's hook
    ``hook_name`` from ``trainer.global_step == first_guarded_step`` on runs under :func:`no_host_reads`
    (Lightning's logging patched out: it is not the callback's work). Returns the recorded calls."""
    per_step = []
    hook = getattr(callback, hook_name)

    def guarded(trainer, pl_module, *args):
        if trainer.global_step < first_guarded_step:
            return hook(trainer, pl_module, *args)
        with monkeypatch.context() as patch:
            patch.setattr(pl_module, "log", lambda *a, **k: None)
            with no_host_reads(monkeypatch) as ops:
                hook(trainer, pl_module, *args)
        per_step.append(ops)

    monkeypatch.setattr(callback, hook_name, guarded)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(_TinyModel(), data)
    return per_step


def test_ema_update_builds_no_host_tensors_and_reads_nothing_back(monkeypatch, tmp_path):
    """Each EMA update under a real Trainer (a decay schedule, so the decay changes every update);
    the average starts as a copy of the weights at steps 0 and 1."""
    callback = EMA(decay=lambda updates: 0.5 + 0.4 * updates / (updates + 1), backend="reference")
    per_step = _guarded_fit(monkeypatch, tmp_path, callback, "on_train_batch_end", first_guarded_step=2)
    assert len(per_step) == 6
    _assert_steady_and_sync_free(per_step)


@pytest.mark.parametrize("warmup", [True, False])
def test_grokfast_ma_step_builds_no_host_tensors_and_reads_nothing_back(warmup, monkeypatch, tmp_path):
    """Each MA filter step under a real Trainer, while the window fills and once it is full (window 3,
    7 steps), with a lamb schedule: the finiteness flag and the ring position stay on the device."""
    callback = Grokfast(filter="ma", window_size=3, lamb=lambda step: 1.0 + step, warmup=warmup, backend="reference")
    per_step = _guarded_fit(monkeypatch, tmp_path, callback, "on_before_optimizer_step", first_guarded_step=1)
    assert len(per_step) == 6
    _assert_steady_and_sync_free(per_step)


def test_grokfast_ma_skips_a_non_finite_step_on_the_device(monkeypatch):
    """An overflow step changes neither the gradients nor the window, decided without a host read; the
    next finite step is the second gradient pushed: slow = (g1 + g3) / 2, written out here."""
    module, trainer = _Module(), _Trainer()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    lamb = 3.0
    callback = Grokfast(filter="ma", window_size=2, lamb=lamb, warmup=False, backend="reference")
    callback.on_train_start(trainer, module)
    params = list(module.parameters())
    first = [torch.randn_like(p) for p in params]
    for p, g in zip(params, first):
        p.grad = g.clone()
    callback.on_before_optimizer_step(trainer, module, optimizer)
    state = copy.deepcopy(callback.state_dict())

    overflow = [torch.randn_like(p) for p in params]
    overflow[0][0, 0], overflow[1][1] = float("inf"), float("nan")
    for p, g in zip(params, overflow):
        p.grad = g.clone()
    with no_host_reads(monkeypatch):
        callback.on_before_optimizer_step(trainer, module, optimizer)
    for p, g in zip(params, overflow):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    for key in ("window", "window_sum", "pushed"):
        for name, tensor in callback.state_dict()[key].items():
            assert torch.equal(tensor, state[key][name]), (key, name)

    third = [torch.randn_like(p) for p in params]
    for p, g in zip(params, third):
        p.grad = g.clone()
    with no_host_reads(monkeypatch):
        callback.on_before_optimizer_step(trainer, module, optimizer)
    for p, g1, g3 in zip(params, first, third):
        torch.testing.assert_close(p.grad, g3 + lamb * (g1 + g3) / 2)


# ---------------------------------------------------------------------------
# Backend per kernel and device.


def _scale(values: list[torch.Tensor], *, factor: torch.Tensor) -> None:
    for value in values:
        value.mul_(factor)


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "backend='triton'" in str(w.message)]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_triton_on_cpu_without_the_interpreter_falls_back_with_one_warning(how, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if how == "environment":
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    params, reference_params = _params_with_grads(2), _params_with_grads(2)
    from lightning_converge.kernels import adamw

    monkeypatch.setattr(adamw, "_fallback_warned", False)  # this test's warning, whatever ran before
    optimizer = AdamW(params, backend="triton" if how == "argument" else "auto")
    reference = AdamW(reference_params, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.step()
            reference.step()
    assert len(_fallback_warnings(caught)) == 1
    assert "'adamw'" in _fallback_warnings(caught)[0] and "cannot run on cpu" in _fallback_warnings(caught)[0]
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_kernel_without_a_triton_version_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = Kernel(_scale)  # no register_triton
    values = [torch.ones(3), torch.ones(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kernel(values, factor=torch.tensor(2.0), backend="triton")
    assert [m for m in _fallback_warnings(caught) if "has no triton version" in m] == _fallback_warnings(caught)
    assert len(_fallback_warnings(caught)) == 1
    assert all(torch.equal(v, torch.full_like(v, 8.0)) for v in values)


def test_each_kernel_warns_once_for_itself(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    first, second = Kernel(_scale), Kernel(_scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kernel in (first, second, first, second):
            kernel([torch.ones(2)], factor=torch.tensor(1.0), backend="triton")
    assert len(_fallback_warnings(caught)) == 2


def test_auto_on_cuda_without_triton_says_so_once(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "_said_triton_is_missing", False)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", cuda) == "compiled"
        assert resolve_backend("auto", cuda) == "compiled"
        assert resolve_backend("triton", cuda) == "compiled"
        assert resolve_backend("auto", torch.device("cpu")) == "compiled"
    said = [str(w.message) for w in caught if "triton is not installed" in str(w.message)]
    assert len(said) == 1


def test_auto_on_cuda_with_triton_picks_it_silently(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
        assert resolve_backend("triton", torch.device("cuda", 0)) == "triton"
    assert not caught


# ---------------------------------------------------------------------------
# Overlap in compressed DDP: a plain average is the future of an asynchronous all-reduce.


class _Bucket:
    """What the comm hook uses of a ``dist.GradBucket``."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self._parameters = parameters
        self._buffer = torch.cat([p.grad.reshape(-1) for p in parameters])

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._parameters


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_plain_average_hook_returns_the_future_of_an_async_all_reduce(one_rank_group, monkeypatch):
    import torch.distributed as dist

    from lightning_converge.strategies import comm_hook
    from lightning_converge.strategies.compressed_ddp import CompressedDDPStrategy

    calls = []
    all_reduce = dist.all_reduce

    def recording(*args, **kwargs):
        calls.append(kwargs.get("async_op", False))
        return all_reduce(*args, **kwargs)

    monkeypatch.setattr(comm_hook.dist, "all_reduce", recording)
    monkeypatch.setattr(CompressedDDPStrategy, "optimizer_steps_done", property(lambda self: 0))
    strategy = CompressedDDPStrategy(compressor="none")
    params = _params_with_grads(3)
    bucket = _Bucket(params)
    expected = bucket.buffer().clone()  # one rank: the average is the gradients themselves
    future = comm_hook._run_comm_hook(strategy, bucket)
    assert calls == [True]
    torch.testing.assert_close(future.wait(), expected, rtol=0, atol=0)
    stats = strategy.exchange.take_stats()
    nbytes = expected.numel() * expected.element_size()
    assert (stats.bytes_sent, stats.bytes_received, stats.uncompressed_bytes) == (nbytes, nbytes, nbytes)


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_grokfast_kernel_leaves_the_slow_of_non_finite_elements_alone_on_every_backend(backend):
    """The guard the device-side skip relies on, against the reference; and alpha 1, lamb 0 change nothing."""
    from lightning_converge.kernels import grokfast_ema

    generator = torch.Generator().manual_seed(4)
    grads = [torch.randn(37, generator=generator), torch.randn(3, 5, generator=generator).bfloat16()]
    grads[0][[2, 30]] = torch.tensor([float("inf"), float("nan")])
    grads[1][1, 1] = float("-inf")
    slows = [torch.randn(g.shape, generator=generator) for g in grads]
    for alpha, lamb in [(0.9, 2.0), (1.0, 0.0)]:
        expected_grads, expected_slows = [g.clone() for g in grads], [s.clone() for s in slows]
        grokfast_ema(expected_grads, expected_slows, alpha=torch.tensor(alpha), lamb=torch.tensor(lamb),
                     backend="reference")
        got_grads, got_slows = [g.clone() for g in grads], [s.clone() for s in slows]
        grokfast_ema(got_grads, got_slows, alpha=torch.tensor(alpha), lamb=torch.tensor(lamb), backend=backend)
        for got, expected, slow in zip(got_slows, expected_slows, slows):
            assert torch.isfinite(expected).all()
            torch.testing.assert_close(got, expected)
            if alpha == 1.0:
                assert torch.equal(expected, slow)
        for got, expected, grad in zip(got_grads, expected_grads, grads):
            torch.testing.assert_close(got, expected, equal_nan=True)
            if lamb == 0.0:
                torch.testing.assert_close(expected, grad, rtol=0, atol=0, equal_nan=True)


def test_diloco_outer_step_builds_no_host_tensors_and_reads_nothing_back(monkeypatch):
    """The built-in outer step (Nesterov, reference backend) with an outer lr that changes every step:
    its lr and momentum are slots refilled in place, and it equals torch.optim.SGD's step."""
    from lightning_converge.strategies.diloco.outer import OuterState

    params = _params_with_grads(5)
    outer = OuterState(params, "nesterov", lambda step: 0.7 / (1 + step), 0.9, torch.device("cpu"), "reference")
    expected_params = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(expected_params, lr=0.7, momentum=0.9, nesterov=True)
    pieces = [(index, 0, p.numel()) for index, p in enumerate(params)]
    per_step = []
    generator = torch.Generator().manual_seed(6)
    for inner_step in range(5):
        averaged = torch.randn(sum(p.numel() for p in params), generator=generator)
        if inner_step == 0:  # the first step allocates the slots
            outer.step(pieces, averaged, inner_step)
        else:
            with no_host_reads(monkeypatch) as ops:
                outer.step(pieces, averaged, inner_step)
            per_step.append(ops)
        for group in sgd.param_groups:
            group["lr"] = 0.7 / (1 + inner_step)
        for p, chunk in zip(expected_params, averaged.split([p.numel() for p in expected_params])):
            p.grad = chunk.view_as(p)
        sgd.step()
    _assert_steady_and_sync_free(per_step)
    for p, q in zip(outer.params, expected_params):
        torch.testing.assert_close(p, q)


def test_onebit_adam_step_after_freeze_reads_nothing_back(one_rank_group, monkeypatch):
    """1-bit Adam's compressed steps once the variance froze, with a late parameter still warming up
    on its own: which parameters have settled is known without reading a step count back."""
    from lightning_converge.strategies.onebit_adam import OneBitAdamStrategy

    freeze_step = 3
    strategy = OneBitAdamStrategy(freeze_step=freeze_step, block_size=8)
    early, late = _params_with_grads(7)[:2], _params_with_grads(8)[2]
    optimizer = AdamW([*early, late], lr=1e-2, backend="reference")
    late_grad, late.grad = late.grad, None
    for _ in range(freeze_step):  # the warm-up stage: the late parameter has no gradient yet
        optimizer.step()
    generator = torch.Generator().manual_seed(9)
    per_step = []
    for step in range(freeze_step):  # the late parameter warms up during the compression stage
        for p in early:
            p.grad = torch.randn(p.shape, generator=generator)
        late.grad = late_grad.clone()
        if step == 0:  # the variance freezes here: the state takes its variance_step
            strategy.compressed_step(optimizer)
            continue
        with no_host_reads(monkeypatch) as ops:
            strategy.compressed_step(optimizer)
        per_step.append(ops)
    _assert_steady_and_sync_free(per_step)
    assert "variance_step" not in optimizer.state[late]
    assert [int(optimizer.state[p]["step"]) for p in (*early, late)] == [2 * freeze_step] * 2 + [freeze_step]
