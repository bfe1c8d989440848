"""The triton backend of the optimizer kernels against the reference, on CPU under
triton's interpreter (conftest sets ``TRITON_INTERPRET=1``).

Each case runs three consecutive steps of one rule through the dispatcher with
``backend="triton"``. Before every step the inputs are cloned and the reference
takes the same step on the clones, so each step is compared on its own and
errors cannot pile up. The tensors have odd sizes and sit at different steps: a
fresh one starting at step 1, one crossing the warm-ups, one far along.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from lightning_converge.kernels import (  # noqa: E402
    Kernel,
    adamw,
    adan,
    ademamix,
    adopt,
    lion,
    onebit_adam_update,
    resolve_backend,
)
from lightning_converge.kernels.dispatch import math_dtype  # noqa: E402

SHAPES = [(7,), (33, 5), (129,)]
START_STEPS = [1.0, 9.0, 1000.0]
STEPS_PER_CASE = 3
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Rule:
    kernel: Kernel
    state_names: tuple[str, ...]
    hyperparameters: dict[str, float]
    reads_step: bool = True
    # The static options to try, one dict per case (each also with and without cautious masking).
    option_sets: tuple[dict[str, Any], ...] = ({},)


RULES = {
    "adamw": Rule(adamw, ("exp_avgs", "exp_avg_sqs"), dict(beta1=0.9, beta2=0.999, eps=1e-8)),
    "adan": Rule(
        adan,
        ("exp_avgs", "exp_avg_diffs", "exp_avg_sqs", "prev_grads"),
        dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8),
        option_sets=(dict(no_prox=False), dict(no_prox=True)),
    ),
    # beta1 = 0.4 takes torch.lerp's other branch (weight 1 - beta1 >= 0.5).
    "lion": Rule(lion, ("exp_avgs",), dict(beta1=0.4, beta2=0.99), reads_step=False),
    "ademamix": Rule(
        ademamix,
        ("exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs"),
        dict(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-8),
        # With warm-ups, the tensor at steps 9-11 crosses alpha's; beta3's is still going.
        option_sets=(dict(), dict(alpha_warmup=10, beta3_warmup=20)),
    ),
    "adopt": Rule(
        adopt,
        ("exp_avgs", "exp_avg_sqs"),
        dict(beta1=0.9, beta2=0.9999, eps=1e-6),
        option_sets=tuple(
            dict(decouple=decouple, clip_exponent=clip) for decouple in (False, True) for clip in (0.25, None)
        ),
    ),
}


def _cases():
    for name, rule in RULES.items():
        for options in rule.option_sets:
            for cautious in (False, True):
                case = dict(options, cautious=cautious)
                yield pytest.param(name, case, id="-".join([name, *(f"{k}={v}" for k, v in case.items())]))


def _initial_state(name: str, grad: torch.Tensor, fresh: bool, generator: torch.Generator) -> torch.Tensor:
    """A fresh tensor's state is the optimizers' initial state (zeros; Adan's previous
    gradient is the first gradient); a tensor further along has random state. State is
    fp32, or fp64 for fp64 tensors, as the optimizers keep it."""
    dtype = math_dtype(grad)
    if fresh:
        return grad.to(dtype) if name == "prev_grads" else torch.zeros(grad.shape, dtype=dtype)
    if "sqs" in name:  # second moments are non-negative
        return torch.rand(grad.shape, generator=generator, dtype=dtype)
    return torch.randn(grad.shape, generator=generator, dtype=dtype)


def _make_inputs(rule: Rule, dtype: torch.dtype, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """The kernel's positional arguments: params, grads, each state list, then steps."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32  # fp64 values fp32 cannot hold
    params = [torch.randn(shape, generator=generator, dtype=draw).to(dtype) for shape in SHAPES]
    grads = [torch.randn(shape, generator=generator, dtype=draw).to(dtype) for shape in SHAPES]
    states = [
        [_initial_state(name, g, step == 1, generator) for g, step in zip(grads, START_STEPS)]
        for name in rule.state_names
    ]
    steps = [[torch.tensor(step) for step in START_STEPS]] if rule.reads_step else []
    return [params, grads, *states, *steps]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-15, msg=lambda m: f"{what}: {m}")
    elif actual.dtype == torch.bfloat16:
        # Within one bf16 ulp: the interpreter truncates fp32 -> bf16 where torch
        # (and triton on a GPU) rounds to nearest.
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-6, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ADOPT's clip (step - 1) ** clip_exponent is exp(log(0) * e) = 0 at step 1: right, but numpy warns.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("rule_name, options", list(_cases()))
def test_triton_matches_reference(rule_name, options, dtype, weight_decay):
    rule = RULES[rule_name]
    generator = torch.Generator().manual_seed(0)
    inputs = _make_inputs(rule, dtype, generator)
    arg_names = ["params", "grads", *rule.state_names, *(["steps"] if rule.reads_step else [])]
    for step_index in range(STEPS_PER_CASE):
        # A new lr every step: hyperparameters are read inside the kernel, never baked in.
        # float64, as the optimizers pass them.
        hyperparameters = {
            name: torch.tensor(value, dtype=torch.float64)
            for name, value in dict(rule.hyperparameters, lr=1e-2 * (step_index + 1), weight_decay=weight_decay).items()
        }
        expected = [[t.clone() for t in tensors] for tensors in inputs]
        rule.kernel.reference(*expected, **hyperparameters, **options)
        rule.kernel(*inputs, backend="triton", **hyperparameters, **options)

        for name, actual_list, expected_list in zip(arg_names, inputs, expected):
            for index, (actual, wanted) in enumerate(zip(actual_list, expected_list)):
                _assert_close(actual, wanted, f"step {step_index + 1}, {name}[{index}]")

        grads = inputs[1]
        grads[:] = [torch.randn(g.shape, generator=generator, dtype=math_dtype(g)).to(dtype) for g in grads]
        if rule.reads_step:
            torch._foreach_add_(inputs[-1], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_onebit_adam_update_matches_the_reference(dtype):
    """1-bit Adam's update (moments read, not written; the variance's bias correction at the step it
    froze), tensors at different steps, an lr that changes between calls."""
    generator = torch.Generator().manual_seed(3)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.randn(shape, generator=generator, dtype=draw).to(dtype) for shape in SHAPES]
    exp_avgs = [torch.randn(shape, generator=generator, dtype=math_dtype(p)) for shape, p in zip(SHAPES, params)]
    exp_avg_sqs = [torch.rand(shape, generator=generator, dtype=math_dtype(p)) for shape, p in zip(SHAPES, params)]
    steps = [torch.tensor(step) for step in (2.0, 12.0, 1003.0)]
    variance_steps = [torch.tensor(step) for step in (1.0, 10.0, 100.0)]
    for lr in (1e-2, 3e-3):
        hyperparameters = {
            name: torch.tensor(value, dtype=torch.float64)
            for name, value in dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1).items()
        }
        moments = [[t.clone() for t in exp_avgs], [t.clone() for t in exp_avg_sqs]]
        expected = [p.clone() for p in params]
        onebit_adam_update.reference(expected, *moments, steps, variance_steps, **hyperparameters)
        onebit_adam_update(params, *moments, steps, variance_steps, backend="triton", **hyperparameters)
        for index, (actual, wanted) in enumerate(zip(params, expected)):
            _assert_close(actual, wanted, f"lr {lr}, params[{index}]")
        for got, before in zip([*moments[0], *moments[1]], [*exp_avgs, *exp_avg_sqs]):
            assert torch.equal(got, before)


def test_non_contiguous_and_empty_tensors():
    """Transposed tensors are updated in place through contiguous copies, a one-element
    tensor like any other, and empty ones are skipped."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(5, 33), (1,), (0,)]
    params = [torch.randn(shape, generator=generator).t() for shape in shapes]
    grads = [torch.randn(shape, generator=generator).t() for shape in shapes]
    exp_avgs = [torch.randn(shape, generator=generator).t() for shape in shapes]
    exp_avg_sqs = [torch.rand(shape, generator=generator).t() for shape in shapes]
    steps = [torch.tensor(3.0)] * len(shapes)
    inputs = [params, grads, exp_avgs, exp_avg_sqs, steps]
    assert not params[0].is_contiguous()
    hyperparameters = {
        name: torch.tensor(value)
        for name, value in dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1).items()
    }
    expected = [[t.clone() for t in tensors] for tensors in inputs]
    adamw.reference(*expected, **hyperparameters, cautious=True)
    adamw(*inputs, backend="triton", **hyperparameters, cautious=True)
    for actual_list, expected_list in zip(inputs, expected):
        for actual, wanted in zip(actual_list, expected_list):
            _assert_close(actual, wanted, "adamw on transposed tensors")


def test_mismatched_shapes_raise():
    hyperparameters = {name: torch.tensor(0.5) for name in ("lr", "beta1", "beta2", "weight_decay")}
    with pytest.raises(ValueError, match="shape"):
        lion([torch.zeros(4)], [torch.zeros(5)], [torch.zeros(4)], backend="triton", **hyperparameters)


def test_dispatch_reaches_the_triton_implementation():
    for name, rule in RULES.items():
        module = importlib.import_module(f"lightning_converge.kernels.triton.{name}")
        assert rule.kernel.implementation("triton", CPU) is getattr(module, name)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """Without it, "triton" on CPU falls back to "auto"'s choice (warnings: tests/test_gpu_path.py)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("triton", CPU) == "compiled"


def test_package_imports_without_triton():
    """The triton implementations are loaded on first use: with triton unimportable, the
    kernels and optimizers still import and run on the other backends."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lightning_converge.kernels import lion\n"
        "import lightning_converge.optim\n"
        "hyper = {n: torch.tensor(0.5) for n in ('lr', 'beta1', 'beta2', 'weight_decay')}\n"
        "lion([torch.ones(3)], [torch.ones(3)], [torch.zeros(3)], backend='reference', **hyper)\n"
        "assert not any(m.startswith('lightning_converge.kernels.triton') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_elementwise_kernel_compiles_for_cuda():
    """The interpreter accepts code the compiler rejects (pointer casts, constexpr tuples, globals):
    compile each multi-tensor kernel, the compressors' included, for an sm_90 GPU, which needs no GPU, in a process
    without ``TRITON_INTERPRET``."""
    script = """
import importlib, inspect
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# module: (kernel, number of tensor operands, reads the step, static options)
KERNELS = {
    "adamw": ("_adamw_kernel", 4, True, {}),
    "lion": ("_lion_kernel", 3, False, {}),
    "adan": ("_adan_kernel", 6, True, {"NO_PROX": False}),
    "adopt": ("_adopt_kernel", 4, True, {"DECOUPLE": True, "CLIP_EXPONENT": 0.25}),
    "ademamix": ("_ademamix_kernel", 5, True, {"ALPHA_WARMUP": 10, "BETA3_WARMUP": 20}),
    "ema": ("_ema_update_kernel", 2, False, {}),
    "grokfast": ("_grokfast_ema_kernel", 2, False, {}),
    "diloco": ("_diloco_outer_step_kernel", 3, False, {"NESTEROV": True}),
}
for module, (name, operands, reads_step, options) in KERNELS.items():
    kernel = getattr(importlib.import_module(f"lightning_converge.kernels.triton.{module}"), name)
    update_rule = "counts_ptr" in inspect.signature(kernel.fn).parameters
    dtypes = (tl.bfloat16, tl.bfloat16) + (tl.float32,) * (operands - 2 + reads_step)
    constexprs = dict(options, BLOCK=1024, DTYPES=dtypes)
    if update_rule:
        constexprs.update(CAUTIOUS=True, COUNT_PASS=False)
    signature = {}
    for parameter in inspect.signature(kernel.fn).parameters:
        if parameter in constexprs:
            signature[parameter] = "constexpr"
        elif parameter in ("tensors", "blocks"):
            signature[parameter] = "*i64"
        elif parameter == "counts_ptr":
            signature[parameter] = "*i32"
        else:  # hyperparameters: float64 for the update rules
            signature[parameter] = "*fp64" if update_rule else "*fp32"
    triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

# 1-bit Adam's update: the parameter, both moments, the step and the step the variance froze at.
kernel = importlib.import_module("lightning_converge.kernels.triton.onebit_adam")._onebit_adam_update_kernel
constexprs = dict(BLOCK=1024, DTYPES=(tl.bfloat16,) + (tl.float32,) * 4)
signature = {
    parameter: "constexpr" if parameter in constexprs else "*i64" if parameter in ("tensors", "blocks") else "*fp64"
    for parameter in inspect.signature(kernel.fn).parameters
}
triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

# The blockwise compressors: value, encoding, per-block scales, and the residual with error feedback.
COMPRESSORS = {"int8_quantize": ("_int8_quantize_kernel", tl.int8), "sign_quantize": ("_sign_quantize_kernel", tl.uint8)}
for module, (name, encoded) in COMPRESSORS.items():
    kernel = getattr(importlib.import_module(f"lightning_converge.kernels.triton.{module}"), name)
    for feedback in (False, True):
        dtypes = (tl.bfloat16, encoded, tl.float32) + ((tl.float32,) if feedback else ())
        constexprs = dict(BLOCK=256, DTYPES=dtypes, FEEDBACK=feedback)
        signature = {"tensors": "*i64", "blocks": "*i64", **{name: "constexpr" for name in constexprs}}
        triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
"""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
