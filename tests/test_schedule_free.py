"""Schedule-Free SGD and AdamW against the authors' package ``schedulefree``, and their train/eval
modes under Lightning (:class:`~lightning_converge.callbacks.ScheduleFreeMode`).

The optimizers are compared with ``SGDScheduleFree`` / ``AdamWScheduleFree`` over many steps,
in train mode (the parameters hold y) and after ``eval()`` (x). Lightning runs are compared
with the reference package driven by hand (``train()`` / ``eval()`` where a user would write
them), and resumed runs with the same run uninterrupted. Every Lightning run gets the
callback the way an installed package gives it: through the entry point that
``pyproject.toml`` declares, which Lightning loads when a ``Trainer`` is built.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import EMA, ScheduleFreeMode
from lightning_converge.kernels import schedule_free_adamw, schedule_free_sgd
from lightning_converge.kernels.dispatch import triton_available
from lightning_converge.optim import ScheduleFreeAdamW, ScheduleFreeSGD

schedulefree = pytest.importorskip("schedulefree")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
FACTORY_GROUP = "lightning.pytorch.callbacks_factory"

BACKENDS = [
    "reference",
    "compiled",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]
# Ours, the reference package's class, hyperparameters with warm-up, r and weight decay.
RULES = {
    "AdamW": (
        ScheduleFreeAdamW,
        schedulefree.AdamWScheduleFree,
        dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.05, warmup_steps=5, r=0.5, weight_lr_power=1.5),
    ),
    "SGD": (
        ScheduleFreeSGD,
        schedulefree.SGDScheduleFree,
        dict(lr=5e-2, momentum=0.7, weight_decay=0.05, warmup_steps=5, r=0.5, weight_lr_power=1.5),
    ),
}
SHAPES = [(33, 5), (7,), (129,)]


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in SHAPES]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def reference_run(rule: str, steps: int, **overrides) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The reference package's parameters after ``steps`` steps: in train mode (y), then eval (x)."""
    _, reference_cls, hyperparameters = RULES[rule]
    params = make_params()
    optimizer = reference_cls(params, **{**hyperparameters, **overrides})
    optimizer.train()
    for t in range(steps):
        set_grads(params, t)
        optimizer.step()
    y = [p.detach().clone() for p in params]
    optimizer.eval()
    return y, [p.detach().clone() for p in params]


# --- the optimizers against the reference package ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
def test_equals_the_reference_package_in_train_and_eval_mode(rule, backend):
    """40 steps (warm-up included), then eval(), train() and 10 more steps against the reference's."""
    cls, reference_cls, hyperparameters = RULES[rule]
    ours_params, theirs_params = make_params(), make_params()
    ours = cls(ours_params, backend=backend, **hyperparameters)
    theirs = reference_cls(theirs_params, **hyperparameters)
    theirs.train()
    for t in range(50):
        if t == 40:
            torch.testing.assert_close(ours_params, theirs_params)
            ours.eval()
            theirs.eval()
            torch.testing.assert_close(ours_params, theirs_params)
            ours.train()
            theirs.train()
        set_grads(ours_params, t)
        set_grads(theirs_params, t)
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_params, theirs_params)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours_params, theirs_params)
    assert ours.param_groups[0]["k"] == theirs.param_groups[0]["k"] == 50


@pytest.mark.parametrize("rule", RULES)
def test_warm_up_and_the_average_weights_never_recompile(rule):
    """lr, ckp1 and the bias correction change at every step of the warm-up (and the lr by hand):
    the compiled graph stays the one of the first step."""
    from torch._dynamo.utils import counters

    cls, _, hyperparameters = RULES[rule]
    params = make_params()
    optimizer = cls(params, backend="compiled", **hyperparameters)
    set_grads(params, 0)
    optimizer.step()
    graphs = counters["stats"]["unique_graphs"]
    for t in range(1, 8):
        optimizer.param_groups[0]["lr"] = hyperparameters["lr"] / (t + 1)
        set_grads(params, t)
        optimizer.step()
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("rule", RULES)
def test_averaged_parameters_are_eval_modes_x_without_moving_the_parameters(rule):
    cls, _, hyperparameters = RULES[rule]
    params = make_params()
    optimizer = cls(params, backend="reference", **hyperparameters)
    for t in range(6):
        set_grads(params, t)
        optimizer.step()
    y = [p.detach().clone() for p in params]
    averaged = optimizer.averaged_parameters()
    torch.testing.assert_close(params, y, rtol=0, atol=0)
    _, x = reference_run(rule, 6)
    torch.testing.assert_close([averaged[p] for p in params], x)


@pytest.mark.parametrize("rule", RULES)
def test_complex_parameters_switch_modes_as_their_real_view(rule):
    """eval(), train() and averaged_parameters() of complex parameters act on their real view, as the
    step does; parameters without a gradient yet get no state from switching modes."""
    cls, _, hyperparameters = RULES[rule]
    generator = torch.Generator().manual_seed(2)
    complex_params = [
        torch.randn(shape, dtype=torch.complex64, generator=generator).requires_grad_() for shape in [(5, 3), (7,)]
    ]
    real = [torch.view_as_real(p.detach()).clone().requires_grad_() for p in complex_params]
    idle = torch.nn.Parameter(torch.randn(3))
    real_optimizer = cls(real, backend="reference", **hyperparameters)
    complex_optimizer = cls([*complex_params, idle], backend="reference", **hyperparameters)
    for t in range(4):
        set_grads(real, t)
        for c, r in zip(complex_params, real):
            c.grad = torch.view_as_complex(r.grad.clone())
        real_optimizer.step()
        complex_optimizer.step()
    averaged = complex_optimizer.averaged_parameters()
    real_averaged = real_optimizer.averaged_parameters()
    torch.testing.assert_close(
        [torch.view_as_real(averaged[c]) for c in complex_params], [real_averaged[r] for r in real]
    )
    real_optimizer.eval()
    complex_optimizer.eval()
    torch.testing.assert_close([torch.view_as_real(c.detach()) for c in complex_params], [r.detach() for r in real])
    real_optimizer.train()
    complex_optimizer.train()
    torch.testing.assert_close([torch.view_as_real(c.detach()) for c in complex_params], [r.detach() for r in real])
    assert idle not in complex_optimizer.state


@pytest.mark.parametrize("rule", RULES)
def test_state_dicts_load_both_ways_with_the_reference_package(rule):
    """The reference's state dict continues here as there, and ours continues there as here."""
    cls, reference_cls, hyperparameters = RULES[rule]
    expected_y, _ = reference_run(rule, 8)
    for first_cls, second_cls in ((reference_cls, cls), (cls, reference_cls)):
        params = make_params()
        first = first_cls(params, **hyperparameters)
        first.train()
        for t in range(4):
            set_grads(params, t)
            first.step()
        second = second_cls(params, **hyperparameters)
        second.load_state_dict(first.state_dict())
        for t in range(4, 8):
            set_grads(params, t)
            second.step()
        torch.testing.assert_close(params, expected_y)


@pytest.mark.parametrize("rule", RULES)
def test_bf16_parameters_keep_fp32_state_and_follow_the_fp32_run(rule):
    """bf16 parameters (y) with fp32 z and second moment follow the reference package's fp32 run
    to bf16's precision, in train and eval mode."""
    cls, _, hyperparameters = RULES[rule]
    params = make_params(torch.bfloat16)
    optimizer = cls(params, backend="reference", **hyperparameters)
    for t in range(20):
        set_grads(params, t)
        optimizer.step()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values())
    fp32_y, fp32_x = reference_run(rule, 20)
    torch.testing.assert_close([p.float() for p in params], fp32_y, rtol=0.05, atol=0.05)
    optimizer.eval()
    torch.testing.assert_close([p.float() for p in params], fp32_x, rtol=0.05, atol=0.05)


KERNEL_CASES = {
    "AdamW": (schedule_free_adamw, ("zs", "exp_avg_sqs"), dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2=0.3)),
    # momentum 0.4 and ckp1 0.6 take torch.lerp's other branch.
    "SGD": (schedule_free_sgd, ("zs",), dict(momentum=0.4)),
}


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("rule", KERNEL_CASES)
def test_triton_kernel_matches_the_reference_step_by_step(rule, dtype, weight_decay):
    """Three steps on odd sizes, each compared on its own (the reference steps clones of the inputs),
    with new scalars every step; the triton kernel runs under the interpreter (conftest)."""
    kernel, state_names, hyperparameters = KERNEL_CASES[rule]
    generator = torch.Generator().manual_seed(0)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    state_dtype = draw
    params = [torch.randn(shape, generator=generator, dtype=draw).to(dtype) for shape in SHAPES]
    grads = [torch.randn(shape, generator=generator, dtype=draw).to(dtype) for shape in SHAPES]
    states = [[torch.rand(shape, generator=generator, dtype=state_dtype) for shape in SHAPES] for _ in state_names]
    inputs = [params, grads, *states]
    for step in range(3):
        scalars = dict(hyperparameters, lr=1e-2 * (step + 1), weight_decay=weight_decay, ckp1=(0.2, 0.6, 1 / 7)[step])
        scalars = {name: torch.tensor(value, dtype=torch.float64) for name, value in scalars.items()}
        expected = [[t.clone() for t in tensors] for tensors in inputs]
        kernel.reference(*expected, **scalars)
        kernel(*inputs, backend="triton", **scalars)
        for actual_list, expected_list in zip(inputs, expected):
            for actual, wanted in zip(actual_list, expected_list):
                if actual.dtype == torch.bfloat16:
                    # Within one bf16 ulp: the interpreter truncates fp32 -> bf16 where torch (and
                    # triton on a GPU) rounds to nearest.
                    torch.testing.assert_close(actual, wanted, rtol=2**-7, atol=1e-6)
                elif actual.dtype == torch.float64:
                    torch.testing.assert_close(actual, wanted, rtol=1e-13, atol=1e-15)
                else:
                    torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)
        inputs[1] = [torch.randn(g.shape, generator=generator, dtype=draw).to(dtype) for g in grads]


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("rule", RULES)
def test_a_step_is_one_triton_launch_per_dtype_group(rule):
    from lightning_converge.kernels.triton.common import register_launch_hook

    cls, _, hyperparameters = RULES[rule]
    params = make_params() + make_params(torch.bfloat16)
    optimizer = cls(params, backend="triton", **hyperparameters)
    launches = []
    handle = register_launch_hook(lambda kernel, grid: launches.append(grid))
    try:
        for t in range(2):
            set_grads(params, t)
            optimizer.step()
    finally:
        handle.remove()
    assert len(launches) == 2 * 2  # two steps, fp32 and bf16 groups


@pytest.mark.parametrize("rule", RULES)
def test_step_in_eval_mode_is_refused(rule):
    cls, _, hyperparameters = RULES[rule]
    params = make_params()
    optimizer = cls(params, **hyperparameters)
    optimizer.eval()
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match=r"step\(\) in eval mode.*optimizer.train\(\)"):
        optimizer.step()
    optimizer.train()
    optimizer.step()


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (ScheduleFreeAdamW, dict(betas=(0.0, 0.999)), r"betas\[0\] must be a real number in \(0, 1\)"),
        (ScheduleFreeSGD, dict(momentum=0.0), r"momentum must be a real number in \(0, 1\)"),
        (ScheduleFreeSGD, dict(momentum=1.0), r"momentum must be a real number in \(0, 1\)"),
        (ScheduleFreeAdamW, dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (ScheduleFreeSGD, dict(warmup_steps=2.5), "warmup_steps must be an int >= 0"),
        (ScheduleFreeAdamW, dict(r=-1.0), "r must be a finite real number >= 0"),
        (ScheduleFreeSGD, dict(weight_lr_power=float("inf")), "weight_lr_power must be a finite real number >= 0"),
        (ScheduleFreeAdamW, dict(eps=-1e-8), "eps must be a finite real number >= 0"),
    ],
)
def test_rule_specific_arguments_are_checked(cls, kwargs, match):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {match}"):
        cls([torch.nn.Parameter(torch.randn(2))], **kwargs)


# --- under Lightning --------------------------------------------------------------------------


@pytest.fixture
def entry_point(tmp_path_factory, monkeypatch) -> Optional[Path]:
    """The package's entry points as ``pyproject.toml`` declares them, where Lightning looks for
    them: already there when the package is installed (``make setup``), else a directory put on
    ``sys.path`` that holds them as an installed package does."""
    # The section's "name = target" lines (tomllib is Python 3.11+; the package supports 3.10).
    section = re.search(
        rf'^\[project\.entry-points\."{re.escape(FACTORY_GROUP)}"\]\n((?:[^\[\n].*\n)*)',
        (ROOT / "pyproject.toml").read_text(),
        re.MULTILINE,
    )
    declared = dict(re.findall(r'^(\w+) = "([^"]+)"$', section.group(1), re.MULTILINE))
    assert declared, "pyproject.toml declares no callback factory"
    installed = {(e.name, e.value) for e in importlib.metadata.entry_points(group=FACTORY_GROUP)}
    if set(declared.items()) <= installed:
        return None
    site = tmp_path_factory.mktemp("site")
    metadata = site / "lightning_converge_entry_points-0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: lightning-converge-entry-points\nVersion: 0\n")
    (metadata / "entry_points.txt").write_text(
        f"[{FACTORY_GROUP}]\n" + "".join(f"{name} = {target}\n" for name, target in declared.items())
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class Regression(L.LightningModule):
    """One full batch per epoch (every step sees the same data, so a resumed run can match);
    records the parameters each training step and each validation step sees."""

    def __init__(self, optimizer_cls=ScheduleFreeAdamW, **optimizer_kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.optimizer_cls = optimizer_cls
        self.optimizer_kwargs = optimizer_kwargs or dict(lr=2e-2, warmup_steps=2, weight_decay=0.01)
        self.seen_in_training: list[list[torch.Tensor]] = []
        self.seen_in_validation: list[list[torch.Tensor]] = []

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def training_step(self, batch, batch_idx):
        self.seen_in_training.append(snapshot(self))
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(snapshot(self))
        self.log("val_loss", self.loss(batch))

    test_step = validation_step

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=16)

    def val_dataloader(self):
        return DataLoader(dataset(), batch_size=16)

    def configure_optimizers(self):
        return self.optimizer_cls(self.parameters(), **self.optimizer_kwargs)


def fit(model: Regression, epochs: int, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=2,
    )
    trainer = L.Trainer(**{**options, **trainer_kwargs})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def by_hand(epochs: int, validate_every: int = 2) -> tuple[list, list, torch.nn.Module]:
    """The same run with the reference package, ``train()``/``eval()`` written out as its users do:
    (parameters each step sees, each validation sees, the model after eval() at the end)."""
    model = Regression()
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), **model.optimizer_kwargs)
    batch = dataset().tensors
    in_training, in_validation = [], []
    optimizer.train()
    for epoch in range(epochs):
        in_training.append(snapshot(model))
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
        if (epoch + 1) % validate_every == 0:
            optimizer.eval()
            in_validation.append(snapshot(model))
            optimizer.train()
    optimizer.eval()
    return in_training, in_validation, model


def test_the_entry_point_gives_every_trainer_the_callback(entry_point):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert sum(isinstance(cb, ScheduleFreeMode) for cb in trainer.callbacks) == 1


@pytest.mark.parametrize("explicit", [False, True], ids=["entry-point", "also-explicit"])
def test_training_sees_y_validation_and_the_fitted_model_see_x(entry_point, explicit):
    """Against the reference package driven by hand; a callback passed explicitly beside the
    entry point's does not switch twice."""
    model = Regression()
    fit(model, 6, callbacks=[ScheduleFreeMode()] if explicit else [])
    in_training, in_validation, expected = by_hand(6)
    assert len(model.seen_in_validation) == 3
    torch.testing.assert_close(model.seen_in_training, in_training)
    torch.testing.assert_close(model.seen_in_validation, in_validation)
    torch.testing.assert_close(snapshot(model), snapshot(expected))
    # y and x differ: the test would not see a missing switch otherwise.
    assert not torch.allclose(in_validation[-1][0], in_training[-1][0])


def test_validating_changes_nothing_in_training(entry_point):
    """y after each validation is exactly the y before it: a run validated every epoch trains as one never
    validated (train() after eval() alone would give y only up to rounding)."""
    validated, never = Regression(), Regression()
    fit(validated, 8, check_val_every_n_epoch=1, num_sanity_val_steps=1)
    fit(never, 8, limit_val_batches=0)
    assert len(validated.seen_in_validation) == 9 and not never.seen_in_validation
    torch.testing.assert_close(validated.seen_in_training, never.seen_in_training, rtol=0, atol=0)
    torch.testing.assert_close(snapshot(validated), snapshot(never), rtol=0, atol=0)


def test_validate_and_test_after_fit_see_x(entry_point):
    model = Regression()
    trainer = fit(model, 4)
    _, _, expected = by_hand(4)
    trainer.validate(model)
    trainer.test(model, dataloaders=model.val_dataloader())
    assert len(model.seen_in_validation) == 2 + 2  # two in fit, then validate and test
    for seen in model.seen_in_validation[-2:]:
        torch.testing.assert_close(seen, snapshot(expected))


def test_checkpoints_mid_run_hold_x_and_resume_exactly(entry_point, tmp_path):
    """Full and weights-only checkpoints every 3 steps hold x as state_dict; fit resumed from the full
    one at step 3 takes exactly the steps of the run that went straight on."""
    straight = Regression()
    fit(
        straight,
        6,
        enable_checkpointing=True,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "full", every_n_train_steps=3, save_top_k=-1, filename="{step}"),
            # Every step: ModelCheckpoints with the same schedule would share a state key.
            ModelCheckpoint(
                dirpath=tmp_path / "weights",
                every_n_train_steps=1,
                save_top_k=-1,
                filename="{step}",
                save_weights_only=True,
            ),
        ],
    )
    full, weights_only = (
        torch.load(tmp_path / kind / "step=3.ckpt", weights_only=True) for kind in ("full", "weights")
    )
    assert "optimizer_states" not in weights_only and "live_state_dict" not in weights_only
    in_training, _, _ = by_hand(6)
    _, _, x_at_3 = by_hand(3)
    names = [name for name, _ in straight.named_parameters()]
    for checkpoint in (full, weights_only):
        torch.testing.assert_close([checkpoint["state_dict"][n] for n in names], snapshot(x_at_3))
    torch.testing.assert_close([full["live_state_dict"][n] for n in names], in_training[3])

    resumed = Regression()
    fit(resumed, 6, ckpt_path=tmp_path / "full" / "step=3.ckpt")
    torch.testing.assert_close(resumed.seen_in_training, straight.seen_in_training[3:], rtol=0, atol=0)
    torch.testing.assert_close(snapshot(resumed), snapshot(straight), rtol=0, atol=0)


def test_checkpoint_saved_after_fit_holds_x_and_resumes_exactly(entry_point, tmp_path):
    straight = Regression()
    fit(straight, 6)
    first = Regression()
    trainer = fit(first, 3)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    checkpoint = torch.load(tmp_path / "after_fit.ckpt", weights_only=True)
    names = [name for name, _ in first.named_parameters()]
    _, _, x = by_hand(3)
    torch.testing.assert_close([checkpoint["state_dict"][n] for n in names], snapshot(x))
    torch.testing.assert_close(snapshot(first), snapshot(x))
    resumed = Regression()
    fit(resumed, 6, ckpt_path=tmp_path / "after_fit.ckpt")
    torch.testing.assert_close(resumed.seen_in_training, straight.seen_in_training[3:], rtol=0, atol=0)
    torch.testing.assert_close(snapshot(resumed), snapshot(straight), rtol=0, atol=0)


def test_bf16_mixed_checkpoint_holds_x_of_its_live_weights(entry_point, tmp_path):
    """Under bf16-mixed the state_dict of a mid-run checkpoint is x = y + (1 - 1/beta1) (z - y),
    written out here from the checkpoint's live weights and optimizer state."""
    model = Regression()
    fit(
        model,
        4,
        precision="bf16-mixed",
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")],
    )
    checkpoint = torch.load(tmp_path / "step=2.ckpt", weights_only=True)
    beta1 = checkpoint["optimizer_states"][0]["param_groups"][0]["betas"][0]
    names = [name for name, _ in model.named_parameters()]
    for index, name in enumerate(names):
        y = checkpoint["live_state_dict"][name]
        z = checkpoint["optimizer_states"][0]["state"][index]["z"]
        assert y.dtype == z.dtype == torch.float32
        torch.testing.assert_close(checkpoint["state_dict"][name], y + (1 - 1 / beta1) * (z - y))
    assert model.seen_in_training[-1][0].dtype == torch.float32


@pytest.mark.parametrize("explicit_first", [False, True], ids=["entry-point", "explicit-before-ema"])
def test_ema_averages_y_and_leaves_training_alone(entry_point, tmp_path, explicit_first):
    """With an EMA that evaluates with its average, training takes the same steps as without it;
    validation, the fitted model and the state_dict of a checkpoint saved after fit are the EMA's
    average, left as the EMA made it, and the checkpoint's live weights are y, whichever callback
    comes first."""
    alone = Regression()
    fit(alone, 6).save_checkpoint(tmp_path / "alone.ckpt")
    with_ema = Regression()
    callbacks = [EMA(decay=0.5, backend="reference")]
    trainer = fit(with_ema, 6, callbacks=[ScheduleFreeMode(), *callbacks] if explicit_first else callbacks)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    torch.testing.assert_close(with_ema.seen_in_training, alone.seen_in_training, rtol=0, atol=0)
    # The last validation (after the last step) saw the average the model holds after fit.
    torch.testing.assert_close(with_ema.seen_in_validation[-1], snapshot(with_ema), rtol=0, atol=0)
    assert not torch.allclose(snapshot(with_ema)[0], snapshot(alone)[0])
    ema, plain = (torch.load(tmp_path / name, weights_only=True) for name in ("ema.ckpt", "alone.ckpt"))
    names = [name for name, _ in with_ema.named_parameters()]
    torch.testing.assert_close([ema["state_dict"][n] for n in names], snapshot(with_ema), rtol=0, atol=0)
    torch.testing.assert_close(ema["live_state_dict"], plain["live_state_dict"], rtol=0, atol=0)


@pytest.mark.distributed
def test_two_process_ddp_equals_the_reference_package_on_the_full_batch(entry_point, tmp_path):
    """Five steps under DDP with 2 gloo processes; each rank ends with x of the reference package's
    run on the batch the two ranks share."""
    paths = [str(entry_point), str(ROOT)] if entry_point is not None else [str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_fit.py"), str(tmp_path), "ScheduleFreeAdamW"],
        check=True,
        env=env,
        timeout=300,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)

    sys.path.insert(0, str(SCRIPTS))
    try:
        from ddp_fit import Regression as DDPRegression
        from ddp_fit import dataset as ddp_dataset
    finally:
        sys.path.pop(0)
    model = DDPRegression("ScheduleFreeAdamW")
    reference = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2)
    reference.train()
    x, y = ddp_dataset().tensors
    for step in range(5):
        start = 16 * (step % 4)
        batch = torch.cat([torch.arange(start + r, start + 16, 2) for r in (0, 1)])
        reference.zero_grad()
        torch.nn.functional.mse_loss(model.net(x[batch]), y[batch]).backward()
        reference.step()
    reference.eval()
    torch.testing.assert_close(rank0, snapshot(model), rtol=1e-5, atol=1e-6)


def test_cli_builds_the_optimizer_from_its_class_path(entry_point, monkeypatch):
    from lightning_converge.cli import ConvergeCLI

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning-converge"])
    optimizer = "{class_path: lightning_converge.optim.ScheduleFreeAdamW, init_args: {lr: 0.004, warmup_steps: 10}}"
    cli = ConvergeCLI(
        args=["--config", str(ROOT / "configs" / "demo.yaml"), "--model.init_args.optimizer", optimizer],
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
    )
    built = cli.model.configure_optimizers()["optimizer"]
    assert type(built) is ScheduleFreeAdamW
    # The example's own warm-up scheduler has scaled lr already: initial_lr is the configured one.
    assert built.param_groups[0]["initial_lr"] == 0.004 and built.param_groups[0]["warmup_steps"] == 10
    assert any(isinstance(cb, ScheduleFreeMode) for cb in cli.trainer.callbacks)


@pytest.mark.parametrize(
    "backend",
    ["reference", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))],
)
@pytest.mark.parametrize("rule", RULES)
def test_a_step_builds_no_host_tensors_and_reads_nothing_back(rule, backend, monkeypatch):
    """What a GPU step needs (tests/test_gpu_path.py): the warm-up, the average's weights and the
    bias correction are host arithmetic on Python numbers, refilled into persistent slots."""
    from test_gpu_path import _assert_steady_and_sync_free, no_host_reads

    cls, _, hyperparameters = RULES[rule]
    params = make_params()
    optimizer = cls([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}], backend=backend, **hyperparameters)
    set_grads(params, 0)
    optimizer.step()  # the first step creates the state
    per_step = []
    for step in range(4):  # inside the warm-up, then past it, with an lr that changes every step
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (step + 1)
        with no_host_reads(monkeypatch) as ops:
            optimizer.step()
        per_step.append(ops)
    _assert_steady_and_sync_free(per_step)
