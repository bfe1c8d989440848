"""The optimizers against their papers' equations, torch.optim.AdamW, and each other's backends."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_converge.kernels.dispatch import triton_available
from lightning_converge.optim import ADOPT, AdEMAMix, Adan, AdamW, Lion

# ---------------------------------------------------------------------------
# The update equations, written out per tensor in float64, independently of kernels/.
# Each takes (param, grad, state dict, step, hyperparameters) and returns the new param.


def _cautious(update, grad):
    mask = (update * grad > 0).double()
    return update * mask * (mask.numel() / (mask.sum() + 1))


def adamw_equations(p, g, s, t, lr, betas, eps, weight_decay, cautious):
    b1, b2 = betas
    s.setdefault("m", torch.zeros_like(p))
    s.setdefault("v", torch.zeros_like(p))
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g * g
    m_hat = s["m"] / (1 - b1**t)
    v_hat = s["v"] / (1 - b2**t)
    update = m_hat / (v_hat.sqrt() + eps * 1.0)  # eps added after the bias-corrected sqrt
    # torch adds eps to sqrt(v)/sqrt(bc2), which is the line above
    if cautious:
        update = _cautious(update, g)
    return p * (1 - lr * weight_decay) - lr * update


def adan_equations(p, g, s, t, lr, betas, eps, weight_decay, no_prox, cautious):
    b1, b2, b3 = betas
    if "m" not in s:
        s.update(m=torch.zeros_like(p), d=torch.zeros_like(p), n=torch.zeros_like(p), prev=g.clone())
    diff = g - s["prev"]
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["d"] = b2 * s["d"] + (1 - b2) * diff
    s["n"] = b3 * s["n"] + (1 - b3) * (g + b2 * diff) ** 2
    s["prev"] = g.clone()
    update = (s["m"] / (1 - b1**t) + b2 * s["d"] / (1 - b2**t)) / ((s["n"] / (1 - b3**t)).sqrt() + eps)
    if cautious:
        update = _cautious(update, g)
    if no_prox:
        return p * (1 - lr * weight_decay) - lr * update
    return (p - lr * update) / (1 + lr * weight_decay)


def lion_equations(p, g, s, t, lr, betas, weight_decay, cautious):
    b1, b2 = betas
    s.setdefault("m", torch.zeros_like(p))
    update = torch.sign(b1 * s["m"] + (1 - b1) * g)
    if cautious:
        update = _cautious(update, g)
    s["m"] = b2 * s["m"] + (1 - b2) * g
    return p * (1 - lr * weight_decay) - lr * update


def ademamix_equations(p, g, s, t, lr, betas, alpha, alpha_warmup, beta3_warmup, eps, weight_decay, cautious):
    b1, b2, b3 = betas
    if alpha_warmup:
        alpha = alpha * min(t / alpha_warmup, 1.0)
    if beta3_warmup and t < beta3_warmup:
        def half_life(beta):
            return math.log(0.5) / math.log(beta + 1e-8) - 1

        a = t / beta3_warmup
        b3 = 0.5 ** (1 / ((1 - a) * half_life(b1) + a * half_life(b3) + 1))
    for key in ("m1", "m2", "nu"):
        s.setdefault(key, torch.zeros_like(p))
    s["m1"] = b1 * s["m1"] + (1 - b1) * g
    s["m2"] = b3 * s["m2"] + (1 - b3) * g
    s["nu"] = b2 * s["nu"] + (1 - b2) * g * g
    update = (s["m1"] / (1 - b1**t) + alpha * s["m2"]) / ((s["nu"] / (1 - b2**t)).sqrt() + eps)
    if cautious:
        update = _cautious(update, g)
    return p - lr * (update + weight_decay * p)


def adopt_equations(p, g, s, t, lr, betas, eps, weight_decay, decouple, clip_exponent, cautious):
    b1, b2 = betas
    if not decouple:
        g = g + weight_decay * p
    if t == 1:  # the first step only initializes the second moment
        s["m"] = torch.zeros_like(p)
        s["v"] = g * g
        return p
    normed = g / torch.clamp(s["v"].sqrt(), min=eps)
    if clip_exponent is not None:
        bound = (t - 1) ** clip_exponent
        normed = normed.clamp(-bound, bound)
    s["m"] = b1 * s["m"] + (1 - b1) * normed
    update = _cautious(s["m"], g) if cautious else s["m"]
    if decouple:
        p = p * (1 - lr * weight_decay)
    s["v"] = b2 * s["v"] + (1 - b2) * g * g
    return p - lr * update


RULES = {
    AdamW: (adamw_equations, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    Adan: (adan_equations, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False)),
    Lion: (lion_equations, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    AdEMAMix: (
        ademamix_equations,
        dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=2.0, alpha_warmup=4, beta3_warmup=6, eps=1e-8,
             weight_decay=0.01),
    ),
    ADOPT: (
        adopt_equations,
        dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.01, decouple=False, clip_exponent=0.25),
    ),
}
VARIANTS = {Adan: dict(no_prox=True), ADOPT: dict(decouple=True, clip_exponent=None), AdEMAMix: dict(alpha_warmup=None)}
SHAPES = [(7, 13), (33,), (3, 5, 2)]


def _random(shape, gen, dtype):
    # float64 values drawn as float64, so most are not representable in fp32.
    return torch.randn(shape, generator=gen, dtype=torch.float64 if dtype == torch.float64 else None).to(dtype)


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_random(shape, gen, dtype).requires_grad_() for shape in SHAPES]


def _grads(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [_random(shape, gen, dtype) for shape in SHAPES]


def _run(optimizer, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(t, params[0].dtype)):
            p.grad = g
        optimizer.step()


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_rule_follows_its_equations(cls, cautious, backend):
    equations, hparams = RULES[cls]
    params = _params()
    expected = [p.detach().double() for p in params]
    states = [{} for _ in params]
    _run(cls(params, cautious=cautious, backend=backend, **hparams), params, steps=8)
    for t in range(1, 9):
        for i, g in enumerate(_grads(t - 1)):
            expected[i] = equations(expected[i], g.double(), states[i], t, cautious=cautious, **hparams)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", list(VARIANTS), ids=lambda c: c.__name__)
def test_rule_options_follow_their_equations(cls):
    equations, hparams = RULES[cls]
    hparams = {**hparams, **VARIANTS[cls]}
    params = _params()
    expected = [p.detach().double() for p in params]
    states = [{} for _ in params]
    _run(cls(params, backend="reference", **hparams), params, steps=6)
    for t in range(1, 7):
        for i, g in enumerate(_grads(t - 1)):
            expected[i] = equations(expected[i], g.double(), states[i], t, cautious=False, **hparams)
    # Unclipped ADOPT divides by a tiny second moment early on: fp32 rounding grows there.
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_compiled_equals_reference_in_bf16(cls):
    # bf16 parameters and gradients, fp32 state, weight decay and cautious masking on.
    hparams = {**RULES[cls][1], **VARIANTS.get(cls, {})}
    results = []
    for backend in ("reference", "compiled"):
        params = _params(torch.bfloat16)
        optimizer = cls(params, cautious=True, backend=backend, **hparams)
        _run(optimizer, params, steps=4)
        assert all(p.dtype == torch.bfloat16 for p in params)
        assert all(
            v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values()
        ), "optimizer state must be fp32"
        results.append((params, optimizer.state_dict()["state"]))
    (ref_params, ref_state), (cmp_params, cmp_state) = results
    for a, b in zip(ref_params, cmp_params):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    for i in ref_state:
        for key in ref_state[i]:
            torch.testing.assert_close(ref_state[i][key], cmp_state[i][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_adamw_equals_torch_adamw_over_50_steps(backend):
    params = _params()
    torch_params = [p.detach().clone().requires_grad_() for p in params]

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 3e-3, "weight_decay": 0.05},
            {"params": ps[2:], "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.0},
        ]

    ours = AdamW(groups(params), eps=1e-7, backend=backend)
    theirs = torch.optim.AdamW(groups(torch_params), eps=1e-7)
    for t in range(50):
        for p, q, g in zip(params, torch_params, _grads(t)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # Same state layout as torch, so state_dicts are interchangeable.
    assert ours.state_dict()["state"][0].keys() == theirs.state_dict()["state"][0].keys()


def test_changing_lr_never_recompiles():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    params = _params()
    optimizer = AdamW(params, lr=1e-2, backend="compiled")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    lrs = set()
    for t in range(20):
        for p, g in zip(params, _grads(t)):
            p.grad = g
        optimizer.step()
        scheduler.step()
        lrs.add(optimizer.param_groups[0]["lr"])
        optimizer.param_groups[0]["betas"] = (0.9 - 0.01 * t, 0.999)
    assert len(lrs) == 20
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_state_dict_resume_continues_exactly(cls, tmp_path):
    hparams = RULES[cls][1]
    params = _params(torch.bfloat16)
    uninterrupted = cls(params, backend="reference", **hparams)
    _run(uninterrupted, params, steps=6)

    params2 = _params(torch.bfloat16)
    first = cls(params2, backend="reference", **hparams)
    _run(first, params2, steps=3)
    path = tmp_path / "opt.pt"
    torch.save({"params": [p.detach() for p in params2], "optimizer": first.state_dict()}, path)

    saved = torch.load(path, weights_only=True)
    params3 = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = cls(params3, backend="reference", **hparams)
    resumed.load_state_dict(saved["optimizer"])
    assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values())
    _run(resumed, params3, steps=3, start=3)
    for a, b in zip(params, params3):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_parameter_without_grad_is_skipped(cls):
    params = _params()
    optimizer = cls(params, backend="reference", **RULES[cls][1])
    _run(optimizer, params, steps=2)
    frozen_value = params[1].detach().clone()
    frozen_state = copy.deepcopy(optimizer.state[params[1]])
    for p, g in zip(params, _grads(5)):
        p.grad = g
    params[1].grad = None
    optimizer.step()
    assert torch.equal(params[1], frozen_value)
    for key, value in frozen_state.items():
        assert torch.equal(optimizer.state[params[1]][key], value)
    assert not torch.equal(params[0], _params()[0])


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    model = torch.nn.Linear(3, 1)
    optimizer = AdamW(model.parameters(), backend="reference")
    x = torch.randn(8, 3)

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (AdamW, dict(lr=-1.0), "lr"),
        (AdamW, dict(lr=float("nan")), "lr"),
        (AdamW, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (AdamW, dict(eps=-1e-8), "eps"),
        (AdamW, dict(weight_decay=-0.1), "weight_decay"),
        (AdamW, dict(backend="cuda"), "backend"),
        (Adan, dict(betas=(0.9, 0.9)), "betas must hold 3"),
        (Lion, dict(betas=(-0.1, 0.99)), r"betas\[0\]"),
        (AdEMAMix, dict(alpha_warmup=0), "alpha_warmup"),
        (AdEMAMix, dict(alpha=-1.0), "alpha"),
        (ADOPT, dict(clip_exponent=-0.5), "clip_exponent"),
    ],
)
def test_bad_arguments_raise_before_any_step(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_triton_backend_on_cpu_without_interpreter_falls_back_to_auto(monkeypatch):
    """backend="triton" on CPU tensors runs what "auto" runs there, with a warning (tests/test_gpu_path.py)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(AdamW.kernel, "_fallback_warned", False)  # it warns once per kernel and process
    params, reference_params = _params(), _params()
    optimizer, reference = AdamW(params, backend="triton"), AdamW(reference_params, backend="reference")
    for p, q, g in zip(params, reference_params, _grads(0)):
        p.grad, q.grad = g.clone(), g.clone()
    with pytest.warns(UserWarning, match="cannot run on cpu"):
        optimizer.step()
    reference.step()
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_environment_variable_overrides_auto(monkeypatch):
    from lightning_converge.kernels import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "compiled"
    monkeypatch.setenv("LIGHTNING_CONVERGE_BACKEND", "reference")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("compiled", cpu) == "compiled"
    monkeypatch.setenv("LIGHTNING_CONVERGE_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("auto", cpu)


# ---------------------------------------------------------------------------
# Precision: float64 parameters get float64 math and state; the scalars derived from
# hyperparameters (1 - beta, bias corrections) are formed in float64 before rounding.

# The triton backend runs under TRITON_INTERPRET=1 (conftest).
PRECISION_BACKENDS = [
    "reference",
    "compiled",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed")),
]


# ADOPT's clip (step - 1) ** clip_exponent is exp(log(0) * e) = 0 at step 1: right, but numpy warns.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_float64_rule_follows_its_equations_in_float64(cls, cautious, backend):
    equations, hparams = RULES[cls]
    params = _params(torch.float64)
    expected = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    optimizer = cls(params, cautious=cautious, backend=backend, **hparams)
    _run(optimizer, params, steps=6)
    for t in range(1, 7):
        for i, g in enumerate(_grads(t - 1, torch.float64)):
            expected[i] = equations(expected[i], g, states[i], t, cautious=cautious, **hparams)
    assert all(v.dtype == torch.float64 for s in optimizer.state.values() for k, v in s.items() if k != "step")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
def test_float64_adamw_equals_torch_adamw(backend):
    params = _params(torch.float64)
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    ours = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1)
    for t in range(20):
        for p, q, g in zip(params, torch_params, _grads(t, torch.float64)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_float64_parameters_do_not_move_at_lr_zero(cls, backend):
    """Values that fp32 cannot hold stay exactly as they are when nothing should move them."""
    params = _params(torch.float64)
    before = [p.detach().clone() for p in params]
    _run(cls(params, backend=backend, **{**RULES[cls][1], "lr": 0.0}), params, steps=2)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
def test_adamw_with_beta2_0_9999_matches_torch_adamw_over_many_steps(backend):
    """fp32 0.9999 is 0.99989998: a kernel that formed 1 - beta2 from it would be 1.7e-4 off."""
    params = _params()
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    hyper = dict(lr=1e-3, betas=(0.9, 0.9999), weight_decay=0.01)
    ours = AdamW(params, backend=backend, **hyper)
    theirs = torch.optim.AdamW(torch_params, **hyper)
    for t in range(100):
        for p, q, g in zip(params, torch_params, _grads(t)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][name], theirs.state[q][name], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
def test_ademamix_with_beta3_0_99999_follows_the_float64_equations(backend):
    """fp32 0.99999 is 0.99998999: 1 - beta3 formed from it would be 1.4e-3 off."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.999, 0.99999), alpha=5.0, alpha_warmup=None, beta3_warmup=None, eps=1e-8,
                 weight_decay=0.0)
    params = _params()
    optimizer = AdEMAMix(params, backend=backend, **hyper)
    _run(optimizer, params, steps=20)
    expected = [p.detach().double() for p in _params()]
    states = [{} for _ in params]
    for t in range(1, 21):
        for i, g in enumerate(_grads(t - 1)):
            expected[i] = ademamix_equations(expected[i], g.double(), states[i], t, cautious=False, **hyper)
    for p, e, s in zip(params, expected, states):
        torch.testing.assert_close(optimizer.state[p]["exp_avg_slow"].double(), s["m2"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", list(RULES), ids=lambda c: c.__name__)
def test_changing_hyperparameters_never_recompile(cls):
    """lr, betas (and AdEMAMix's alpha) change every step; the compiled graph stays the one."""
    from torch._dynamo.utils import counters

    hparams = RULES[cls][1]
    params = _params()
    optimizer = cls(params, backend="compiled", **hparams)
    _run(optimizer, params, steps=1)
    graphs = counters["stats"]["unique_graphs"]
    for t in range(1, 6):
        group = optimizer.param_groups[0]
        group["lr"] = hparams["lr"] / (t + 1)
        group["betas"] = tuple(beta - 0.001 * t for beta in hparams["betas"])
        if "alpha" in group:
            group["alpha"] = hparams["alpha"] + t
        _run(optimizer, params, steps=1, start=t)
    assert counters["stats"]["unique_graphs"] == graphs
