"""What pytorch's own optimizer tests (``test/test_optim.py``, ``TestOptimRenewed``, with the
error inputs of ``torch.testing._internal.common_optimizers``) check of every ``torch.optim``
optimizer, checked here of every rule of this pack, with and without cautious masking, on
every backend (triton under its interpreter, hence the tiny tensors).

Behaviours that do not depend on the backend or the masking (hooks, argument checks) run
once per rule. Muon, which takes named parameters, joins the tests whose inputs fit it. Every test compares against an independent run: the same optimizer without
the interruption, ``torch.optim.AdamW``, or the parameters' real view.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_converge.kernels.dispatch import triton_available
from lightning_converge.optim import ADOPT, AdEMAMix, Adan, AdamW, Lion, Muon, ScheduleFreeAdamW, ScheduleFreeSGD

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# ADOPT's clip (step - 1) ** clip_exponent is exp(log(0) * e) = 0 at step 1: right, but numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

HYPERPARAMETERS = {
    AdamW: dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    Adan: dict(lr=1e-2, weight_decay=0.02),
    Lion: dict(lr=1e-3, weight_decay=0.1),
    AdEMAMix: dict(lr=1e-2, alpha_warmup=3, beta3_warmup=5, weight_decay=0.01),
    ADOPT: dict(lr=1e-2, weight_decay=0.01),
    ScheduleFreeAdamW: dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=2),
    ScheduleFreeSGD: dict(lr=1e-2, weight_decay=0.1, warmup_steps=2),
}

# Optimizers that take named parameters (or groups saying which rule each takes), not a plain list:
# `make` names the parameters as a module would. Muon: the (7, 2) matrix goes to Muon, the 3-D
# tensor to its AdamW part. They join the tests below where the test's inputs fit them.
NAMED_HYPERPARAMETERS = {
    Muon: dict(lr=2e-2, momentum=0.9, weight_decay=0.1, adamw_lr=1e-2, adamw_weight_decay=0.0),
}
NAMED_RULES = [pytest.param(cls, id=cls.__name__) for cls in NAMED_HYPERPARAMETERS]
NAMED_CONFIGS = [pytest.param(cls, False, id=cls.__name__) for cls in NAMED_HYPERPARAMETERS]


def has_option(cls, name: str) -> bool:
    return name in inspect.signature(cls).parameters


RULES = [pytest.param(cls, id=cls.__name__) for cls in HYPERPARAMETERS]
CAUTIOUS_RULES = [pytest.param(cls, id=cls.__name__) for cls in HYPERPARAMETERS if has_option(cls, "cautious")]
BETAS_RULES = [pytest.param(cls, id=cls.__name__) for cls in HYPERPARAMETERS if has_option(cls, "betas")]
CONFIGS = [
    pytest.param(cls, cautious, id=cls.__name__ + ("-cautious" if cautious else ""))
    for cls in HYPERPARAMETERS
    for cautious in ((False, True) if has_option(cls, "cautious") else (False,))
]
# The triton backend runs under TRITON_INTERPRET=1 (conftest).
BACKENDS = ["reference", "compiled", pytest.param("triton", marks=needs_triton)]
# Every test uses these shapes (and fp32) so the compiled backend compiles once per rule.
# They are also the real views of complex (3, 5) and (7,) parameters.
SHAPES = [(3, 5, 2), (7, 2)]


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in SHAPES]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        set_grads(params, t)
        optimizer.step()


def make(cls, params, cautious=False, backend="reference", **overrides) -> torch.optim.Optimizer:
    if cautious:
        overrides["cautious"] = True
    if cls in NAMED_HYPERPARAMETERS:
        named = [(f"blocks.{index}.weight", p) for index, p in enumerate(params)]
        return cls(named, backend=backend, **{**NAMED_HYPERPARAMETERS[cls], **overrides})
    return cls(params, backend=backend, **{**HYPERPARAMETERS[cls], **overrides})


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# --- copies: deepcopy, pickle, torch.save ---------------------------------------------------


def _copies(optimizer, params):
    """(copy of the optimizer, its parameters) made each way torch.optim supports."""
    yield "deepcopy", copy.deepcopy(optimizer)
    yield "pickle", pickle.loads(pickle.dumps(optimizer))
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_copies_keep_every_attribute_and_continue_identically(cls, cautious, backend):
    params = make_params()
    optimizer = make(cls, params, cautious, backend)
    run(optimizer, params, steps=2)
    public = {k for k in vars(optimizer) if not k.startswith("_")}
    for how, duplicate in _copies(optimizer, params):
        assert {k for k in vars(duplicate) if not k.startswith("_")} == public, how
        assert duplicate.backend == backend, how
        # The copies of `params`, in their order (Muon's groups hold them in another).
        copies = dict(zip(map(id, all_params(optimizer)), all_params(duplicate)))
        copied_params = [copies[id(p)] for p in params]
        expected = clone_params(params)
        reference = make(cls, expected, cautious, backend)
        reference.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        run(duplicate, copied_params, steps=2, start=2)
        run(reference, expected, steps=2, start=2)
        assert_same(copied_params, expected)


# --- state dicts ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_state_dict_round_trip_continues_identically(cls, cautious, backend):
    """torch's test_state_dict_deterministic: save, load into a fresh optimizer over equal
    parameters, continue both; the loaded dict is left as it was."""
    params = make_params()
    optimizer = make(cls, params, cautious, backend)
    run(optimizer, params, steps=3)
    loaded_params = clone_params(params)
    loaded = make(cls, loaded_params, cautious, backend)
    saved = copy.deepcopy(optimizer.state_dict())
    untouched = copy.deepcopy(saved)
    loaded.load_state_dict(saved)
    run(optimizer, params, steps=3, start=3)
    run(loaded, loaded_params, steps=3, start=3)
    assert_same(loaded_params, params)
    torch.testing.assert_close(saved, untouched, rtol=0, atol=0)
    torch.testing.assert_close(loaded.state_dict(), optimizer.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_state_dict_with_number_steps_loads(cls, cautious, backend):
    """torch's test_load_nontensor_step: older checkpoints hold ``step`` as a Python number."""
    params = make_params()
    optimizer = make(cls, params, cautious, backend)
    run(optimizer, params, steps=2)
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():
        if "step" in state:  # Muon's momentum has none
            state["step"] = state["step"].item()
    loaded_params = clone_params(params)
    loaded = make(cls, loaded_params, cautious, backend)
    loaded.load_state_dict(saved)
    run(optimizer, params, steps=2, start=2)
    run(loaded, loaded_params, steps=2, start=2)
    assert_same(loaded_params, params)


@pytest.mark.parametrize("cls", CAUTIOUS_RULES)
def test_state_dict_without_newer_keys_takes_the_defaults(cls):
    """torch's test_can_load_older_state_dict: a group saved before a key existed takes its default."""
    params = make_params()
    optimizer = make(cls, params, cautious=True)
    run(optimizer, params, steps=2)
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        del group["cautious"]
    loaded_params = clone_params(params)
    loaded = make(cls, loaded_params, cautious=True)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["cautious"] is True
    run(optimizer, params, steps=2, start=2)
    run(loaded, loaded_params, steps=2, start=2)
    assert_same(loaded_params, params)


@pytest.mark.parametrize("cls", RULES)
def test_load_state_dict_pre_hook_result_is_what_loads(cls):
    params = make_params()
    source = make(cls, params)
    run(source, params, steps=1)
    target_params = clone_params(params)
    target = make(cls, target_params)
    name = cls.state_names[0]
    seen = []

    def replace_lr_and_state(optimizer, state_dict):
        seen.append("first")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.125
        state_dict["state"][0][name].fill_(0.5)
        return state_dict

    def check_replaced(optimizer, state_dict):
        seen.append(state_dict["param_groups"][0]["lr"])

    target.register_load_state_dict_pre_hook(check_replaced)
    target.register_load_state_dict_pre_hook(replace_lr_and_state, prepend=True)
    target.load_state_dict(source.state_dict())
    assert seen == ["first", 0.125]
    assert target.param_groups[0]["lr"] == 0.125
    assert torch.equal(target.state[target_params[0]][name], torch.full_like(params[0], 0.5))
    assert source.param_groups[0]["lr"] == HYPERPARAMETERS[cls]["lr"]
    assert not torch.equal(source.state[params[0]][name], torch.full_like(params[0], 0.5))


@pytest.mark.parametrize("cls", RULES)
def test_load_state_dict_post_hook_changes_stay(cls):
    params = make_params()
    source = make(cls, params)
    run(source, params, steps=1)
    target_params = clone_params(params)
    target = make(cls, target_params)
    name = cls.state_names[0]

    def reset_first_state(optimizer):
        optimizer.state[target_params[0]][name] = torch.full_like(params[0], 0.5, dtype=torch.float32)
        optimizer.param_groups[0]["lr"] = 0.25

    target.register_load_state_dict_post_hook(reset_first_state)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.state[target_params[0]][name], torch.full_like(params[0], 0.5))
    assert target.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("cls", RULES + NAMED_RULES)
def test_state_dict_hooks(cls):
    """torch's test_state_dict_pre_hook / post_hook: both run, the post-hook's dict is returned."""
    optimizer = make(cls, make_params())
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    assert optimizer.state_dict()["extra"] == 1
    assert calls == ["pre"]


def test_bf16_parameters_keep_fp32_state_through_a_state_dict():
    params = make_params(dtype=torch.bfloat16)
    optimizer = make(AdamW, params)
    run(optimizer, params, steps=2)
    saved = copy.deepcopy(optimizer.state_dict())
    loaded = make(AdamW, clone_params(params))
    loaded.load_state_dict(saved)
    for index, state in loaded.state_dict()["state"].items():
        for name in AdamW.state_names:
            assert state[name].dtype == torch.float32
            assert torch.equal(state[name], saved["state"][index][name])


# --- switching between torch.optim.AdamW and ours through a state dict ----------------------


def _torch_adamw(params):
    return torch.optim.AdamW(params, **HYPERPARAMETERS[AdamW])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_adamw_state_dict_continues_in_ours_as_in_torch(backend):
    params = make_params()
    uninterrupted = _torch_adamw(params)
    run(uninterrupted, params, steps=6)

    switched_params = make_params()
    first = _torch_adamw(switched_params)
    run(first, switched_params, steps=3)
    ours = make(AdamW, switched_params, backend=backend)
    ours.load_state_dict(first.state_dict())
    assert ours.param_groups[0]["cautious"] is False  # our default fills the key torch lacks
    run(ours, switched_params, steps=3, start=3)
    torch.testing.assert_close(switched_params, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_our_adamw_state_dict_continues_in_torch_adamw(backend):
    params = make_params()
    uninterrupted = make(AdamW, params, backend=backend)
    run(uninterrupted, params, steps=6)

    switched_params = make_params()
    ours = make(AdamW, switched_params, backend=backend)
    run(ours, switched_params, steps=3)
    theirs = _torch_adamw(switched_params)
    theirs.load_state_dict(ours.state_dict())
    run(theirs, switched_params, steps=3, start=3)
    torch.testing.assert_close(switched_params, params)


@pytest.mark.parametrize("option, value", [("amsgrad", True), ("maximize", True), ("decoupled_weight_decay", False)])
def test_torch_options_we_do_not_implement_are_refused_on_load(option, value):
    params = make_params()
    # torch.optim.Adam is torch's AdamW with decoupled_weight_decay=False.
    theirs = torch.optim.Adam(params) if option == "decoupled_weight_decay" else torch.optim.AdamW(params, **{option: value})
    run(theirs, params, steps=1)
    ours = make(AdamW, clone_params(params))
    with pytest.raises(ValueError, match=f"parameter group 0: {option}={value}.*not implemented"):
        ours.load_state_dict(theirs.state_dict())
    assert option not in ours.param_groups[0] and not ours.state  # refused before anything changed


# --- complex parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS)
def test_complex_parameters_are_updated_as_their_real_view(cls, cautious, backend):
    """torch's test_complex: a complex parameter moves exactly like its real view would."""
    real = make_params()
    complex_params = [torch.view_as_complex(p.detach().clone()).requires_grad_() for p in real]
    real_optimizer = make(cls, real, cautious, backend)
    complex_optimizer = make(cls, complex_params, cautious, backend)
    for t in range(3):
        set_grads(real, t)
        for c, r in zip(complex_params, real):
            c.grad = torch.view_as_complex(r.grad.clone())
        real_optimizer.step()
        complex_optimizer.step()
    assert_same([torch.view_as_real(c.detach()) for c in complex_params], [r.detach() for r in real])
    assert all(state[cls.state_names[0]].is_complex() for state in complex_optimizer.state.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_adamw_equals_torch_adamw(backend):
    generator = torch.Generator().manual_seed(3)
    ours_params = [torch.randn(shape[:-1], dtype=torch.complex64, generator=generator).requires_grad_() for shape in SHAPES]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = make(AdamW, ours_params, backend=backend)
    theirs = _torch_adamw(torch_params)
    for t in range(5):
        for p, q in zip(ours_params, torch_params):
            p.grad = torch.randn(p.shape, dtype=torch.complex64, generator=generator)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_params, torch_params)


# --- steps, groups, hooks -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS)
def test_param_groups_with_their_own_hyperparameters(cls, cautious, backend):
    """Two groups with different lr and weight decay step as two separate optimizers would."""
    first_params, second_params = make_params(seed=0), make_params(seed=1)
    separate_first, separate_second = clone_params(first_params), clone_params(second_params)
    other = dict(lr=HYPERPARAMETERS[cls]["lr"] / 3, weight_decay=0.0)
    grouped = make(cls, [{"params": first_params}, {"params": second_params, **other}], cautious, backend)
    first = make(cls, separate_first, cautious, backend)
    second = make(cls, separate_second, cautious, backend, **other)
    for t in range(3):
        for params in (first_params, separate_first):
            set_grads(params, t)
        for params in (second_params, separate_second):
            set_grads(params, 100 + t)
        grouped.step()
        first.step()
        second.step()
    assert_same(first_params + second_params, separate_first + separate_second)
    assert not torch.equal(first_params[0], make_params(seed=0)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_step_without_gradients_changes_nothing(cls, cautious, backend):
    """torch's test_step_is_noop_when_params_have_no_grad."""
    params = make_params()
    before = clone_params(params)
    optimizer = make(cls, params, cautious, backend)
    optimizer.step()
    assert_same(params, before)
    assert not optimizer.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_zero_gradients_without_weight_decay_change_nothing(cls, cautious, backend):
    """torch's test_step_is_noop_for_zero_grads."""
    params = make_params()
    before = clone_params(params)
    optimizer = make(cls, params, cautious, backend, weight_decay=0.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    assert_same(params, before)


@pytest.mark.parametrize("cls", RULES + NAMED_RULES)
def test_zero_grad(cls):
    params = make_params()
    optimizer = make(cls, params)
    set_grads(params, 0)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls, cautious", CONFIGS + NAMED_CONFIGS)
def test_step_with_closure(cls, cautious):
    model = torch.nn.Linear(4, 2)
    optimizer = make(cls, model.parameters(), cautious)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before, bias_before = model.weight.detach().clone(), model.bias.detach().clone()
    loss = optimizer.step(closure)
    assert calls == [True]
    torch.testing.assert_close(loss, torch.nn.functional.linear(x, before, bias_before).pow(2).mean())
    optimizer.step(closure)  # ADOPT's first step only initializes its second moment
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("cls", RULES + NAMED_RULES)
def test_step_hooks(cls):
    """torch's test_step_pre_hook / post_hook / all_hooks: the pre-hook sees the parameters
    before the update, the post-hook after; global hooks run outside the optimizer's own."""
    params = make_params()
    optimizer = make(cls, params)
    run(optimizer, params, steps=1)  # ADOPT's first step only initializes its second moment
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", params[0].detach().clone())))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", params[0].detach().clone())))
    global_pre = register_optimizer_step_pre_hook(lambda *a: seen.append(("global pre", None)))
    global_post = register_optimizer_step_post_hook(lambda *a: seen.append(("global post", None)))
    try:
        before = params[0].detach().clone()
        run(optimizer, params, steps=1, start=1)
    finally:
        global_pre.remove()
        global_post.remove()
    assert [name for name, _ in seen] == ["global pre", "pre", "post", "global post"]
    assert torch.equal(seen[1][1], before)
    assert torch.equal(seen[2][1], params[0].detach())
    assert not torch.equal(before, params[0].detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES + NAMED_RULES)
def test_tensor_lr_equals_float_lr(cls, backend):
    """torch's test_tensor_lr: a 0-d tensor learning rate acts as the number."""
    params = make_params()
    tensor_params = clone_params(params)
    run(make(cls, params, backend=backend), params, steps=2)
    lr = torch.tensor({**HYPERPARAMETERS, **NAMED_HYPERPARAMETERS}[cls]["lr"])
    run(make(cls, tensor_params, backend=backend, lr=lr), tensor_params, steps=2)
    assert_same(tensor_params, params)


@pytest.mark.parametrize("cls", RULES + NAMED_RULES)
def test_optimizer_can_be_printed(cls):
    assert cls.__name__ in repr(make(cls, make_params()))


# --- argument checks: torch's error inputs for Adam/AdamW, for every rule -------------------


def _tensor():
    return torch.nn.Parameter(torch.randn(1, 1))


def _betas_with(cls, index, value):
    """The rule's default betas with one replaced."""
    betas = list(inspect.signature(cls).parameters["betas"].default)
    betas[index] = value
    return tuple(betas)


BAD_HYPERPARAMETERS = [
    ("lr", -1e-2, "lr must be a finite real number >= 0"),
    ("lr", "1e-3", "lr must be a finite real number >= 0"),
    ("lr", float("nan"), "lr must be a finite real number >= 0"),
    ("lr", torch.tensor([0.001, 0.001]), "lr must be a finite real number >= 0 \\(or a one-element tensor\\)"),
    ("weight_decay", -1, "weight_decay must be a finite real number >= 0"),
    ("cautious", "yes", "cautious must be True or False"),
]
# Each rule with each bad value of an option it has.
BAD_ARGUMENTS = [
    pytest.param(cls, *bad, id=f"{cls.__name__}-{bad[0]}-{index}")
    for cls in HYPERPARAMETERS
    for index, bad in enumerate(BAD_HYPERPARAMETERS)
    if has_option(cls, bad[0])
]


@pytest.mark.parametrize("cls, name, value, match", BAD_ARGUMENTS)
def test_bad_argument_is_named_at_construction(cls, name, value, match):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {match}"):
        cls([_tensor()], **{name: value})


@pytest.mark.parametrize("index, value", [(0, 1.0), (0, 1.5), (1, -0.1), (0, "0.9")])
@pytest.mark.parametrize("cls", BETAS_RULES)
def test_bad_beta_is_named_with_its_index(cls, index, value):
    with pytest.raises(ValueError, match=rf"betas\[{index}\] must be a real number in \[0, 1\)"):
        cls([_tensor()], betas=_betas_with(cls, index, value))
    with pytest.raises(ValueError, match=r"betas must hold"):
        cls([_tensor()], betas=(0.9,))


@pytest.mark.parametrize("cls, name, value, match", BAD_ARGUMENTS)
def test_bad_group_hyperparameter_is_named_with_its_group(cls, name, value, match):
    with pytest.raises(ValueError, match=f"parameter group 1: {match}"):
        cls([{"params": [_tensor()]}, {"params": [_tensor()], name: value}])
    optimizer = cls([_tensor()])
    with pytest.raises(ValueError, match=f"parameter group 1: {match}"):
        optimizer.add_param_group({"params": [_tensor()], name: value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("cls", BETAS_RULES)
def test_bad_group_betas_are_refused(cls):
    with pytest.raises(ValueError, match=r"parameter group 0: betas\[0\] must be a real number in \[0, 1\)"):
        cls([{"params": [_tensor()], "betas": _betas_with(cls, 0, 1.5)}])


@pytest.mark.parametrize("cls", RULES)
def test_torch_error_inputs_for_parameters(cls):
    sample, other = _tensor(), _tensor()
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        cls(sample)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        cls([])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": [sample]}, {"params": [sample]}])
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        cls([("weight", sample), other])
    # torch.optim only warns of a parameter repeated in a group; a fused step would update it twice.
    with pytest.raises(ValueError, match="parameter group 0 holds the same parameter twice"):
        cls([sample, sample])


@pytest.mark.parametrize("cls, kwargs, match", [
    (AdamW, dict(eps=-1e-8), "eps must be"),
    (Adan, dict(no_prox=1), "no_prox must be True or False"),
    (AdEMAMix, dict(alpha=-1.0), "alpha must be"),
    (AdEMAMix, dict(alpha_warmup=0), "alpha_warmup must be None or an int >= 1"),
    (AdEMAMix, dict(beta3_warmup=2.5), "beta3_warmup must be None or an int >= 1"),
    (ADOPT, dict(clip_exponent=-0.5), "clip_exponent must be None or a finite real number >= 0"),
    (ADOPT, dict(decouple="no"), "decouple must be True or False"),
])
def test_rule_specific_arguments_are_checked(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([_tensor()], **kwargs)


def test_muon_error_inputs_for_parameters():
    """torch's error inputs where Muon's input admits them: no parameters is torch's error (not the
    plain-list one), a parameter in two groups or twice in one is refused."""
    sample = torch.nn.Parameter(torch.randn(2, 2))
    for empty in ([], iter([]), torch.nn.Module().named_parameters()):
        with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
            Muon(empty)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        Muon([{"params": [sample], "use_muon": True}, {"params": [sample], "use_muon": False}])
    with pytest.raises(ValueError, match="parameter group 0 holds the same parameter twice"):
        Muon([("blocks.0.weight", sample), ("blocks.1.weight", sample)])
