"""fp16 AMP with a GradScaler (``precision="16-mixed"``) and the second wave's pieces: Schedule-Free
AdamW with :class:`ScheduleFreeMode`, Muon, PostHocEMA (beside EMA).

Lightning 2.6 on CPU has no GradScaler of its own (DESIGN.md), so every Trainer here gets
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler(...))``. The scaler starts at 2**20: the first
steps overflow, before the optimizers have any state. The loss of the steps in :data:`OVERFLOW_AT` is
multiplied by 2**40: their fp16 gradients overflow mid-run, once the state exists. Each Lightning run
is compared, step by step, with the reference optimizer (``schedulefree``, ``torch.optim.Muon`` +
``torch.optim.AdamW``, ``ema_pytorch``) driven by hand under the same autocast and the same scaler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ema_pytorch.post_hoc_ema import KarrasEMA
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from test_schedule_free import entry_point  # noqa: F401  (the fixture: ScheduleFreeMode as Lightning adds it)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_converge.optim.muon as muon_module
from lightning_converge.callbacks import EMA, PostHocEMA
from lightning_converge.optim import Muon, ScheduleFreeAdamW

schedulefree = pytest.importorskip("schedulefree")

STEPS = 12
OVERFLOW_AT = (6, 9)  # 0-based steps whose loss is multiplied by OVERFLOW_FACTOR
OVERFLOW_FACTOR = 2.0**40
SF_ADAMW = {"lr": 2e-2, "betas": (0.9, 0.999), "warmup_steps": 2, "weight_decay": 0.01}
MUON = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}
ADAMW = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}


def make_scaler() -> torch.amp.GradScaler:
    # growth_interval 3: the scale also grows back between the forced overflows.
    return torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


class Net(pl.LightningModule):
    """Two hidden matrices (Muon's), a head and biases (AdamW's); one full batch per epoch (every step
    sees the same data); records the parameters each validation sees."""

    def __init__(self, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(4, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.make_optimizer = make_optimizer
        self.seen_in_validation: list[list[Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(torch.tanh(self.hidden(x)))))

    def loss(self, batch: Any, step: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x).float(), y)
        return loss * OVERFLOW_FACTOR if step in OVERFLOW_AT else loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch, self.trainer.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_in_validation.append(snapshot(self))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=16)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self)


def snapshot(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class Steps(Callback):
    """After every optimizer step the Trainer counts (skipped ones included): the scaler's scale, the
    parameters, and what ``state`` returns of the optimizer."""

    def __init__(self, state: Callable[[torch.optim.Optimizer], Any] = lambda optimizer: None) -> None:
        self.state = state
        self.scales: list[float] = []
        self.params: list[list[Tensor]] = []
        self.states: list[Any] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        self.params.append(snapshot(pl_module))
        self.states.append(self.state(trainer.optimizers[0]))


def fit(model: Net, callbacks: list[Callback], ckpt_path: Any = None, **trainer_kwargs: Any) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "max_steps": STEPS,
        "plugins": [MixedPrecision("16-mixed", "cpu", scaler=make_scaler())],
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    trainer = pl.Trainer(callbacks=callbacks, **{**options, **trainer_kwargs})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def by_hand(
    model: Net,
    optimizers: list[torch.optim.Optimizer],
    after_step: Callable[[int, bool], None] = lambda step, stepped: None,
) -> list[float]:
    """The same steps written out with torch's autocast and GradScaler: unscale, step only if every
    unscaled gradient is finite (what ``scaler.step`` decides for one optimizer; for two, both skip
    together, as one optimizer would), update the scale, then ``after_step(step, stepped)``.
    Returns the scale after each step."""
    scaler = make_scaler()
    batch = data().tensors
    scales = []
    for step in range(STEPS):
        for optimizer in optimizers:
            optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model.loss(batch, step)
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        stepped = all(p.grad.isfinite().all() for o in optimizers for g in o.param_groups for p in g["params"])
        if stepped:
            for optimizer in optimizers:
                optimizer.step()
        scaler.update()
        scales.append(scaler.get_scale())
        after_step(step, stepped)
    return scales


def skipped_steps(scales: list[float]) -> list[int]:
    """The 0-based steps the scaler skipped: those after which it halved its scale."""
    before = [2.0**20, *scales[:-1]]
    return [step for step, (old, new) in enumerate(zip(before, scales)) if new < old]


def assert_skips_before_and_after_state(scales: list[float]) -> list[int]:
    """The run overflowed at its start and at each forced step, and stepped in between."""
    skipped = skipped_steps(scales)
    first_step = next(step for step in range(STEPS) if step not in skipped)
    assert 0 < first_step < min(OVERFLOW_AT) and set(OVERFLOW_AT) <= set(skipped), skipped
    return skipped


# --- Schedule-Free AdamW and ScheduleFreeMode ---------------------------------------------------


def z_state(optimizer: torch.optim.Optimizer) -> list[Tensor] | None:
    """Schedule-Free's z of every parameter, None before the first step."""
    if not optimizer.state:
        return None
    return [optimizer.state[p]["z"].clone() for p in optimizer.param_groups[0]["params"]]


def test_schedule_free_adamw_skipped_steps_leave_y_x_z_and_k_and_validation_sees_x(entry_point):  # noqa: F811
    """Training sees y and validation (every 3rd step) x, as ``AdamWScheduleFree`` under the same
    scaler with ``train()``/``eval()`` by hand; on a skipped step y, z and the step count ``k`` stay."""
    steps = Steps(state=z_state)
    model = Net(lambda module: ScheduleFreeAdamW(module.parameters(), **SF_ADAMW, backend="reference"))
    trainer = fit(model, [steps], limit_val_batches=None, val_check_interval=3, check_val_every_n_epoch=None)

    reference = Net(None)
    optimizer = schedulefree.AdamWScheduleFree(reference.parameters(), **SF_ADAMW)
    optimizer.train()
    in_validation = []

    def validate_every_third(step: int, stepped: bool) -> None:
        if (step + 1) % 3 == 0:
            optimizer.eval()
            in_validation.append(snapshot(reference))
            optimizer.train()

    scales = by_hand(reference, [optimizer], validate_every_third)
    assert steps.scales == scales
    skipped = assert_skips_before_and_after_state(scales)
    torch.testing.assert_close(model.seen_in_validation, in_validation)
    assert len(in_validation) == STEPS // 3
    ours = trainer.optimizers[0]
    assert ours.param_groups[0]["k"] == optimizer.param_groups[0]["k"] == STEPS - len(skipped)
    for step in skipped:
        if step > 0 and steps.states[step - 1] is not None:
            assert all(torch.equal(a, b) for a, b in zip(steps.params[step], steps.params[step - 1])), step
            assert all(torch.equal(a, b) for a, b in zip(steps.states[step], steps.states[step - 1])), step
    torch.testing.assert_close(steps.states[-1], [optimizer.state[p]["z"] for p in reference.parameters()])
    # The fitted model is x (ScheduleFreeMode at train end), as the reference after eval().
    optimizer.eval()
    torch.testing.assert_close(snapshot(model), snapshot(reference))


# --- Muon ----------------------------------------------------------------------------------------


def hidden_momentum(optimizer: torch.optim.Optimizer) -> list[Tensor] | None:
    """The Muon group's momentum buffers (hidden.weight, mix.weight), None before the first step."""
    group = next(group for group in optimizer.param_groups if group["use_muon"])
    if group["params"][0] not in optimizer.state:
        return None
    return [optimizer.state[p]["momentum_buffer"].clone() for p in group["params"]]


def test_muon_skipped_steps_leave_the_momentum_and_newton_schulz_gets_unscaled_gradients(monkeypatch):
    """Against torch.optim.Muon (hidden matrices) + torch.optim.AdamW (the rest) under the same scaler:
    the momentum after every step, the parameters, and what enters the Newton-Schulz iteration, which
    is written out from torch's momentum and unscaled gradient."""
    directions: list[Tensor] = []
    iteration = muon_module.newton_schulz

    def recording_newton_schulz(stack: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        directions.append(stack.clone())
        return iteration(stack, *args, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz", recording_newton_schulz)
    steps = Steps(state=hidden_momentum)
    adamw = {f"adamw_{name}": value for name, value in ADAMW.items()}
    model = Net(lambda module: Muon(module, **MUON, **adamw, backend="reference"))
    fit(model, [steps])

    reference = Net(None)
    hidden = [reference.hidden.weight, reference.mix.weight]
    rest = [p for p in reference.parameters() if all(p is not h for h in hidden)]
    torch_muon = torch.optim.Muon(hidden, **MUON)
    optimizers = [torch_muon, torch.optim.AdamW(rest, **ADAMW)]
    momentum, expected_directions = [], []

    def record(step: int, stepped: bool) -> None:
        state = [torch_muon.state[p]["momentum_buffer"].clone() for p in hidden] if torch_muon.state else None
        if stepped:  # torch's Nesterov direction, from the unscaled gradient: g + momentum * (m - g)
            expected_directions.append([p.grad.lerp(m, MUON["momentum"]) for p, m in zip(hidden, state)])
        momentum.append(state)

    scales = by_hand(reference, optimizers, record)
    assert steps.scales == scales
    skipped = assert_skips_before_and_after_state(scales)
    assert [s is None for s in steps.states] == [m is None for m in momentum]
    for ours, theirs in zip(steps.states, momentum):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for step in skipped:
        if step > 0 and steps.states[step - 1] is not None:
            assert all(torch.equal(a, b) for a, b in zip(steps.states[step], steps.states[step - 1])), step
    # Both matrices have shape (16, 4) and (16, 16): one stack each per step taken.
    taken = STEPS - len(skipped)
    assert len(directions) == 2 * taken and len(expected_directions) == taken
    for step in range(taken):
        ours = [directions[2 * step][0], directions[2 * step + 1][0]]
        for direction, expected in zip(ours, expected_directions[step]):
            torch.testing.assert_close(direction, expected.bfloat16(), rtol=2**-7, atol=1e-6)
    # The iteration runs in bf16: one fp32 rounding done in another order can flip a bf16 ulp.
    torch.testing.assert_close(snapshot(model), snapshot(reference), rtol=1e-4, atol=1e-4)


# --- PostHocEMA and EMA ----------------------------------------------------------------------------


def test_posthoc_ema_counts_skipped_steps_as_ema_does(tmp_path):
    """EMA updates after every step the Trainer counts, skipped ones included (the weights then did not
    move): ``global_step`` advances on a step the scaler skips. PostHocEMA does the same: its profiles
    equal ema_pytorch's ``KarrasEMA`` updated after every step of the hand-driven run, and EMA's average
    the recurrence written out on the same steps."""
    sigma_rels = (0.05, 0.10)
    posthoc = PostHocEMA(sigma_rels=sigma_rels, every_n_steps=4, validate_with="live", backend="reference")
    ema = EMA(decay=0.8, validate_with="live", backend="reference")
    steps = Steps()
    model = Net(lambda module: torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9))
    trainer = fit(model, [steps, posthoc, ema], default_root_dir=tmp_path)

    reference = Net(None)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    average = {name: p.detach().clone() for name, p in reference.named_parameters()}  # EMA starts at the live weights
    karras: list[KarrasEMA] = []

    def update(step: int, stepped: bool) -> None:
        for name, p in reference.named_parameters():
            average[name] = 0.8 * average[name] + 0.2 * p.detach()
        if not karras:  # KarrasEMA starts as a copy (our update 1) and its k-th update is our update k + 1
            karras.extend(KarrasEMA(reference, sigma_rel=s, update_every=1) for s in sigma_rels)
        else:
            for tracker in karras:
                tracker.update()

    scales = by_hand(reference, [optimizer], update)
    assert steps.scales == scales
    skipped = assert_skips_before_and_after_state(scales)
    # A skipped step counts: every step the Trainer counted is an update of both callbacks.
    assert trainer.global_step == STEPS
    assert posthoc.state_dict()["num_updates"] == ema.state_dict()["num_updates"] == STEPS
    assert posthoc.snapshot_steps == [4, 8, 12]
    for step in skipped:
        if step > 0:
            assert all(torch.equal(a, b) for a, b in zip(steps.params[step], steps.params[step - 1]))
    profiles = posthoc.state_dict()["profiles"]
    for profile, tracker in zip(profiles, karras):
        for name, expected in tracker.ema_model.named_parameters():
            torch.testing.assert_close(profile[name], expected.detach(), rtol=1e-5, atol=1e-6)
    averages = ema.state_dict()["averages"]
    for name, expected in average.items():
        torch.testing.assert_close(averages[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(steps.params[-1], snapshot(reference))


# --- resuming under the scaler ----------------------------------------------------------------------

PIECES = {
    "schedule_free": (lambda module: ScheduleFreeAdamW(module.parameters(), **SF_ADAMW, backend="reference"), list),
    "muon": (
        lambda module: Muon(module, **MUON, **{f"adamw_{k}": v for k, v in ADAMW.items()}, backend="reference"),
        list,
    ),
    "posthoc_ema": (
        lambda module: torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9),
        lambda: [
            PostHocEMA(every_n_steps=4, validate_with="live", backend="reference"),
            EMA(decay=0.8, backend="reference"),
        ],
    ),
}


@pytest.mark.parametrize("piece", PIECES)
def test_a_fit_resumed_after_a_skipped_step_continues_exactly(piece, tmp_path, entry_point):  # noqa: F811
    """A checkpoint taken right after the forced overflow of step 7 (0-based 6) holds the scaler's
    halved scale and growth count with the optimizer's and callbacks' state: the resumed fit skips the
    same later steps and ends bit for bit where the uninterrupted one did."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    make_optimizer, make_callbacks = PIECES[piece]
    straight_steps, straight_callbacks = Steps(), make_callbacks()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    fit(Net(make_optimizer), [straight_steps, *straight_callbacks, checkpoints], enable_checkpointing=True)
    resumed_steps, resumed_callbacks = Steps(), make_callbacks()
    resumed = Net(make_optimizer)
    fit(resumed, [resumed_steps, *resumed_callbacks], ckpt_path=tmp_path / "step=7.ckpt")
    assert 6 in skipped_steps(straight_steps.scales)
    assert resumed_steps.scales == straight_steps.scales[7:]
    for actual, expected in zip(resumed_steps.params, straight_steps.params[7:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for actual, expected in zip(resumed_callbacks, straight_callbacks, strict=True):
        torch.testing.assert_close(actual.state_dict(), expected.state_dict(), rtol=0, atol=0)
