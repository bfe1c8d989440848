"""1-bit Adam in one process: its update kernel, and the checks made before training.

The two-process runs (warm-up equal to DDP + AdamW, the compression stage,
exact resumes) are in tests/test_compressed_ddp.py, which launches all
distributed scenarios in one script.
"""

from __future__ import annotations

import re

import pytest
import torch

from lightning_converge.kernels import adamw, onebit_adam_update, scalar
from lightning_converge.optim import AdamW
from lightning_converge.strategies import OneBitAdamStrategy
from lightning_converge.strategies.onebit_adam import check_optimizers

HYPERPARAMETERS = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SHAPES = [(7,), (5, 3)]


def random_state(seed: int):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator) for shape in SHAPES]
    grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
    exp_avgs = [torch.randn(shape, generator=generator) for shape in SHAPES]
    exp_avg_sqs = [torch.rand(shape, generator=generator) for shape in SHAPES]
    steps = [torch.tensor(4.0), torch.tensor(30.0)]
    return params, grads, exp_avgs, exp_avg_sqs, steps


def scalars():
    return {name: scalar(value, torch.device("cpu")) for name, value in HYPERPARAMETERS.items()}


def test_update_is_adamws_step_with_the_moments_given():
    """With the variance frozen at this very step, 1-bit Adam's update is AdamW's."""
    params, grads, exp_avgs, exp_avg_sqs, steps = random_state(0)
    expected = [p.clone() for p in params]
    adamw(expected, grads, exp_avgs, exp_avg_sqs, steps, backend="reference", **scalars())
    # adamw updated the moments in place; the 1-bit update takes them as they are now.
    onebit_adam_update(params, exp_avgs, exp_avg_sqs, steps, steps, backend="reference", **scalars())
    for actual, wanted in zip(params, expected):
        assert torch.equal(actual, wanted)


def test_update_uses_the_bias_correction_of_the_step_the_variance_froze():
    params, _, exp_avgs, exp_avg_sqs, steps = random_state(1)
    variance_steps = [torch.tensor(2.0), torch.tensor(10.0)]
    expected = []
    for p, m, v, step, frozen in zip(params, exp_avgs, exp_avg_sqs, steps, variance_steps):
        h = HYPERPARAMETERS
        denom = (v / (1 - h["beta2"] ** frozen)).sqrt() + h["eps"]
        expected.append(p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * m / (1 - h["beta1"] ** step) / denom)
    onebit_adam_update(params, exp_avgs, exp_avg_sqs, steps, variance_steps, backend="reference", **scalars())
    for actual, wanted in zip(params, expected):
        torch.testing.assert_close(actual, wanted)


def test_compiled_update_matches_the_reference_and_a_new_lr_does_not_recompile():
    expected, _, exp_avgs, exp_avg_sqs, steps = random_state(2)
    actual = [p.clone() for p in expected]
    variance_steps = [torch.tensor(3.0), torch.tensor(3.0)]
    graphs = None
    for lr in (1e-2, 3e-3):  # a schedule changes lr every step
        hyperparameters = {**scalars(), "lr": torch.tensor(lr)}
        state = (exp_avgs, exp_avg_sqs, steps, variance_steps)
        onebit_adam_update(expected, *state, backend="reference", **hyperparameters)
        onebit_adam_update(actual, *state, backend="compiled", **hyperparameters)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
        if graphs is None:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_only_one_adamw_without_cautious_masking_is_accepted():
    params = [torch.nn.Parameter(torch.zeros(3))]
    check_optimizers([AdamW(params)])
    with pytest.raises(ValueError, match=r"needs exactly one lightning_converge.optim.AdamW optimizer, got \['SGD'\]"):
        check_optimizers([torch.optim.SGD(params, lr=0.1)])
    with pytest.raises(ValueError, match="got \\['AdamW', 'AdamW'\\]"):
        check_optimizers([AdamW(params), AdamW(params)])
    with pytest.raises(ValueError, match="cautious masking"):
        check_optimizers([AdamW(params, cautious=True)])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"freeze_step": 0}, ValueError, "freeze_step must be an integer >= 1"),
        ({"block_size": 12}, ValueError, "block_size must be a power of two"),
        (
            {"freeze_steps": 1},
            TypeError,
            "OneBitAdamStrategy got unknown option 'freeze_steps' (did you mean 'freeze_step'?)",
        ),
        (
            {"find_unused_parameters": True},
            TypeError,
            "OneBitAdamStrategy: 'find_unused_parameters' is an option of the DistributedDataParallel wrapper; "
            "pass ddp_kwargs={'find_unused_parameters': True}",
        ),
    ],
)
def test_bad_options_raise_at_construction(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        OneBitAdamStrategy(**options)


def test_ddp_arguments_and_ddp_kwargs_are_taken():
    strategy = OneBitAdamStrategy(freeze_step=3, process_group_backend="gloo", ddp_kwargs={"static_graph": True})
    assert strategy.process_group_backend == "gloo" and strategy._ddp_kwargs == {"static_graph": True}
