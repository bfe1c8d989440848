"""Muon against ``torch.optim.Muon`` (hidden matrices) and ``torch.optim.AdamW`` (the rest),
its parameter split, its kernels' backends against the reference, torch.optim's conventions,
and Lightning: fit, resume, two-process DDP."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

from lightning_converge.kernels.dispatch import triton_available
from lightning_converge.kernels.muon import NS_COEFFICIENTS, muon_apply, muon_momentum, newton_schulz
from lightning_converge.optim import Muon, muon_parameter_groups

SCRIPTS = Path(__file__).parent / "scripts"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
BACKENDS = ["compiled", pytest.param("triton", marks=needs_triton)]  # each against "reference"

MUON = dict(lr=0.02, weight_decay=0.1, momentum=0.9)
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)


def muon_kwargs(**overrides):
    """Our Muon's arguments for the hyperparameters of :data:`MUON` and :data:`ADAMW`."""
    adamw = {f"adamw_{name}": value for name, value in ADAMW.items()}
    return {**MUON, **adamw, "backend": "reference", **overrides}


class TinyLM(nn.Module):
    """Every kind of parameter the split sorts: embeddings, hidden matrices of two shapes (one
    tall), a bias, a norm, an output head (tied to the embedding with ``tied``)."""

    def __init__(self, tied: bool = False, vocab: int = 13, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 3 * dim)  # wide in torch's (out, in) layout: 24 x 8 is tall
        self.down = nn.Linear(3 * dim, dim, bias=False)
        self.mix = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.down(torch.relu(self.up(h))) + self.mix(h)
        return self.lm_head(self.norm(h))


def batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 13, (4, 6), generator=generator)


def train(model, optimizers, steps, start=0, schedulers=()):
    for t in range(start, start + steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        model(batch(t)).logsumexp(-1).mean().backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()


def torch_pair(model, adjust_lr_fn=None, nesterov=True):
    """torch.optim.Muon on the hidden matrices (named by hand), torch.optim.AdamW on the rest."""
    hidden = [model.up.weight, model.down.weight, model.mix.weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return [
        torch.optim.Muon(hidden, **MUON, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn),
        torch.optim.AdamW(rest, **ADAMW),
    ]


def twins(dtype=torch.float32, tied=False):
    torch.manual_seed(0)
    model = TinyLM(tied).to(dtype)
    return model, copy.deepcopy(model)


def assert_params_close(model, reference, **tolerance):
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tolerance)


# --- the update, against torch.optim ---------------------------------------------------------


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_muon_on_matrices_and_torch_adamw_on_the_rest(adjust_lr_fn, nesterov):
    model, reference = twins()
    ours = Muon(model, **muon_kwargs(nesterov=nesterov, adjust_lr_fn=adjust_lr_fn))
    train(model, [ours], steps=4)
    train(reference, torch_pair(reference, adjust_lr_fn, nesterov), steps=4)
    # The iteration runs in bf16: one fp32 rounding done in another order can flip a bf16 ulp.
    assert_params_close(model, reference, rtol=1e-4, atol=1e-4)


def test_float64_parameters_equal_torch():
    model, reference = twins(torch.float64)
    ours = Muon(model, **muon_kwargs())
    train(model, [ours], steps=3)
    train(reference, torch_pair(reference), steps=3)
    assert all(s[k].dtype == torch.float64 for s in ours.state.values() for k in s if k != "step")
    assert_params_close(model, reference, rtol=1e-6, atol=1e-6)


def test_bf16_parameters_keep_fp32_state_and_follow_the_fp32_run():
    model, reference = twins(torch.bfloat16)
    reference.float()
    ours = Muon(model, **muon_kwargs())
    train(model, [ours], steps=3)
    train(reference, [Muon(reference, **muon_kwargs())], steps=3)
    assert ours.state[model.up.weight]["momentum_buffer"].dtype == torch.float32
    assert ours.state[model.norm.weight]["exp_avg"].dtype == torch.float32
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.02)


def test_newton_schulz_batched_equals_torchs_per_matrix():
    generator = torch.Generator().manual_seed(0)
    for shape in [(5, 9), (9, 5), (7, 7)]:
        stack = torch.randn(3, *shape, generator=generator)
        expected = torch.stack([_zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in stack])
        # bf16 products: a batched and a single matrix product may round an entry one ulp apart.
        torch.testing.assert_close(newton_schulz(stack), expected, rtol=0, atol=2**-6)


def test_lr_scheduler_scales_both_parts():
    model, reference = twins()
    ours = Muon(model, **muon_kwargs())
    theirs = torch_pair(reference)
    decay = lambda step: 1.0 / (1 + step)  # noqa: E731
    train(model, [ours], steps=4, schedulers=[torch.optim.lr_scheduler.LambdaLR(ours, decay)])
    train(reference, theirs, steps=4, schedulers=[torch.optim.lr_scheduler.LambdaLR(o, decay) for o in theirs])
    assert [g["lr"] for g in ours.param_groups] == [o.param_groups[0]["lr"] for o in theirs]
    assert_params_close(model, reference, rtol=1e-4, atol=1e-4)


# --- the split ---------------------------------------------------------------------------------


def _names(model, groups):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {group["use_muon"]: sorted(by_id[id(p)] for p in group["params"]) for group in groups}


@pytest.mark.parametrize("tied", [False, True])
def test_split_sends_hidden_matrices_to_muon_and_the_rest_to_adamw(tied):
    model = TinyLM(tied)
    expected_muon = ["down.weight", "mix.weight", "up.weight"]
    expected_adamw = sorted(n for n, _ in model.named_parameters() if n not in expected_muon)
    assert ("lm_head.weight" in expected_adamw) != tied  # tied: listed once, as the embedding
    for source in (model, model.named_parameters()):
        assert _names(model, muon_parameter_groups(source)) == {True: expected_muon, False: expected_adamw}


def test_split_by_names_finds_raw_embeddings_heads_and_non_matrices():
    params = {
        "transformer.wte.weight": (50, 8),
        "transformer.pos_emb": (16, 8),
        "blocks.0.attn.qkv.weight": (24, 8),
        "blocks.0.conv.weight": (8, 8, 3),
        "classifier.weight": (3, 8),
        "blocks.0.norm.weight": (8,),
    }
    named = [(name, torch.zeros(shape)) for name, shape in params.items()]
    groups = muon_parameter_groups(named)
    muon = [name for name, p in named if any(p is q for q in groups[0]["params"])]
    assert groups[0]["use_muon"] and muon == ["blocks.0.attn.qkv.weight"]
    assert len(groups[1]["params"]) == len(params) - 1


def test_explicit_groups_override_the_split():
    model, reference = twins()
    groups = [
        dict(params=[model.up.weight, model.lm_head.weight], use_muon=True),
        dict(params=[p for n, p in model.named_parameters() if n not in ("up.weight", "lm_head.weight")],
             use_muon=False),
    ]
    ours = Muon(groups, **muon_kwargs())
    train(model, [ours], steps=3)
    head_and_up = [reference.up.weight, reference.lm_head.weight]
    rest = [p for n, p in reference.named_parameters() if n not in ("up.weight", "lm_head.weight")]
    train(reference, [torch.optim.Muon(head_and_up, **MUON), torch.optim.AdamW(rest, **ADAMW)], steps=3)
    assert_params_close(model, reference, rtol=1e-4, atol=1e-4)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(momentum=1.0), "momentum must be a real number in [0, 1)"),
        (dict(adjust_lr_fn="rms"), "adjust_lr_fn must be one of (None, 'original', 'match_rms_adamw')"),
        (dict(ns_steps=0), "ns_steps must be an int in [1, 100)"),
        (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients must hold 3 real numbers"),
        (dict(nesterov="yes"), "nesterov must be True or False"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas[1] must be a real number in [0, 1)"),
        (dict(adamw_lr=-0.1), "adamw_lr must be"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(kwargs, words):
    with pytest.raises(ValueError) as error:
        Muon(TinyLM(), **kwargs)
    assert words in str(error.value)


def test_bad_params_are_refused_with_what_to_pass():
    model = TinyLM()
    with pytest.raises(TypeError, match="plain list of tensors"):
        Muon(model.parameters())
    with pytest.raises(ValueError, match="must say use_muon"):
        Muon([dict(params=list(model.parameters()))])
    with pytest.raises(ValueError, match=r"use_muon=True but holds a 1-D parameter of shape \(8,\)"):
        Muon([dict(params=[model.norm.weight], use_muon=True)])
    complex_matrix = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    complex_matrix.grad = torch.ones_like(complex_matrix)
    with pytest.raises(RuntimeError, match="Muon does not support complex"):  # torch.optim.Muon refuses them too
        torch.optim.Muon([complex_matrix]).step()
    with pytest.raises(ValueError, match="use_muon=True but holds a complex parameter"):
        Muon([dict(params=[complex_matrix], use_muon=True)])
    # The split sends complex matrices to AdamW, which updates them as pairs of reals, as torch does.
    assert muon_parameter_groups([("w", complex_matrix)]) == [dict(params=[complex_matrix], use_muon=False)]


# --- backends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, nesterov", [(torch.float32, True), (torch.bfloat16, False)])
def test_kernels_match_the_reference(backend, dtype, nesterov):
    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (7, 1), (33, 31)]

    def inputs():
        generator.manual_seed(1)
        params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        buffers = [torch.randn(s, generator=generator) for s in shapes]
        return params, grads, buffers, [torch.empty(s, dtype=torch.bfloat16) for s in shapes]

    results = []
    for name in ("reference", backend):
        params, grads, buffers, directions = inputs()
        momentum = torch.tensor(0.9, dtype=torch.float64)
        muon_momentum(grads, buffers, directions, momentum=momentum, nesterov=nesterov, backend=name)
        values = dict(lr=0.02, weight_decay=0.1, lr_ratio=1.5)
        scalars = {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}
        muon_apply(params, directions, **scalars, backend=name)
        results.append((params, buffers, directions))
    (params, buffers, directions), (expected_params, expected_buffers, expected_directions) = results
    torch.testing.assert_close(buffers, expected_buffers, rtol=1e-6, atol=1e-6)
    # An fp32 value one ulp apart (compiled code may fuse a multiply-add) can round to the
    # neighbouring bf16 direction: one bf16 ulp, then lr * lr_ratio times that in the parameter.
    torch.testing.assert_close(directions, expected_directions, rtol=2**-7, atol=1e-6)
    largest = max(d.abs().max().item() for d in expected_directions)
    atol = 0.02 * 1.5 * largest * 2**-7 if dtype == torch.float32 else None
    torch.testing.assert_close(params, expected_params, rtol=None if atol is None else 1e-6, atol=atol)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_directions_round_to_nearest_bf16_as_torch(backend):
    """With momentum 0 the direction is the gradient: what reaches the iteration is exactly
    torch's ``grad.bfloat16()`` (round to nearest even; the triton interpreter's casts truncate)."""
    grad = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2))
    direction = torch.empty_like(grad, dtype=torch.bfloat16)
    muon_momentum([grad], [torch.zeros_like(grad)], [direction], momentum=torch.tensor(0.0, dtype=torch.float64),
                  nesterov=False, backend=backend)
    assert torch.equal(direction, grad.bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_backends_match_the_reference(backend):
    model, reference = twins()
    train(model, [Muon(model, **muon_kwargs(backend=backend))], steps=2)
    train(reference, [Muon(reference, **muon_kwargs())], steps=2)
    assert_params_close(model, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_step_builds_no_host_tensors_and_reads_nothing_back(backend, monkeypatch):
    """GPU by design: with a schedule changing both groups' lr, no step makes a tensor from a
    Python number or reads one back, and every step makes the same calls."""
    from test_gpu_path import _assert_steady_and_sync_free, no_host_reads

    model, _ = twins()
    optimizer = Muon(model, **muon_kwargs(backend=backend))
    train(model, [optimizer], steps=1)  # the first step creates the state
    per_step = []
    for step in range(3):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (step + 1)
        with no_host_reads(monkeypatch) as ops:
            optimizer.step()
        per_step.append(ops)
    _assert_steady_and_sync_free(per_step)


# --- torch.optim's conventions -------------------------------------------------------------------


def test_copies_pickles_and_state_dicts_continue_identically():
    model, _ = twins()
    optimizer = Muon(model, **muon_kwargs())
    train(model, [optimizer], steps=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    copies = [copy.deepcopy((model, optimizer)), pickle.loads(pickle.dumps((model, optimizer)))]
    fresh_model = copy.deepcopy(model)
    fresh = Muon(fresh_model, **muon_kwargs())
    fresh.load_state_dict(saved)
    copies.append((fresh_model, fresh))
    train(model, [optimizer], steps=2, start=2)
    for copied_model, copied in copies:
        assert copied.adamw_defaults == optimizer.adamw_defaults and copied.backend == "reference"
        train(copied_model, [copied], steps=2, start=2)
        assert_params_close(copied_model, model, rtol=0, atol=0)


def test_load_state_dict_hooks_run_and_state_keeps_its_precision():
    model, _ = twins(torch.bfloat16)
    optimizer = Muon(model, **muon_kwargs())
    train(model, [optimizer], steps=1)
    target = Muon(copy.deepcopy(model), **muon_kwargs())
    seen = []

    def halve_lr(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.5 * state_dict["param_groups"][0]["lr"]
        return state_dict

    target.register_load_state_dict_pre_hook(halve_lr)
    target.register_load_state_dict_post_hook(lambda opt: seen.append(opt.param_groups[0]["lr"]))
    target.load_state_dict(optimizer.state_dict())
    assert seen == [0.5 * MUON["lr"]]
    assert target.param_groups[1]["lr"] == ADAMW["lr"]
    assert all(v.dtype == torch.float32 for s in target.state.values() for k, v in s.items() if k != "step")


def test_add_param_group_takes_the_adamw_defaults():
    model = TinyLM()
    optimizer = Muon([dict(params=[model.up.weight], use_muon=True)], **muon_kwargs())
    optimizer.add_param_group(dict(params=[model.norm.weight], use_muon=False))
    group = optimizer.param_groups[1]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (ADAMW["lr"], ADAMW["betas"], ADAMW["weight_decay"])


# --- Lightning -----------------------------------------------------------------------------------


class LitTinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM()

    def training_step(self, tokens, batch_idx):
        return self.model(tokens).logsumexp(-1).float().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader([batch(t)[0] for t in range(8)], batch_size=4)

    def configure_optimizers(self):
        optimizer = Muon(self, **muon_kwargs())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(epochs, ckpt_path=None, **trainer_kwargs):
    module = LitTinyLM()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_resume_after_fit_continues_exactly(tmp_path):
    straight, _ = _fit(4)
    _, first = _fit(2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = _fit(4, ckpt_path=tmp_path / "half.ckpt")
    assert_params_close(resumed, straight, rtol=0, atol=0)


def test_lightning_bf16_mixed_trains_with_fp32_state():
    module, trainer = _fit(3, precision="bf16-mixed")
    state = trainer.optimizers[0].state[module.model.up.weight]
    assert module.model.up.weight.dtype == state["momentum_buffer"].dtype == torch.float32


@pytest.mark.distributed
def test_two_process_ddp_ranks_agree_and_equal_single_process_full_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, str(SCRIPTS / "muon_ddp_fit.py"), str(tmp_path)], check=True, env=env, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    # DDP averages the ranks' gradients: the gradient of the 16 samples both ranks share.
    sys.path.insert(0, str(SCRIPTS))
    try:
        from muon_ddp_fit import MuonRegression, dataset
    finally:
        sys.path.pop(0)
    module = MuonRegression()
    optimizer = module.configure_optimizers()
    x, y = dataset().tensors
    for step in range(5):
        start = 16 * (step % 4)  # 64 samples: four steps an epoch
        rows = torch.cat([torch.arange(start + r, start + 16, 2) for r in (0, 1)])
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module.net(x[rows]), y[rows]).backward()
        optimizer.step()
    for a, b in zip(rank0, module.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)
