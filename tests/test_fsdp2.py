"""Callbacks on FSDP2 (Lightning's ModelParallelStrategy with ``fully_shard``, 2 gloo processes on CPU).

One launch of tests/scripts/fsdp2_fit.py per ``save_distributed_checkpoint`` setting runs every scenario
(every callback attached to one Trainer) and saves what each rank saw; the tests compare the sharded runs
against plain DDP on the same data, and resumed runs against the straight one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
CALLBACKS = ("Grokfast", "EMA", "LAWA", "PostHocEMA", "Anneal", "GradES")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=[True, False], ids=["distributed_checkpoint", "full_checkpoint"])
def ranks(request, tmp_path_factory):
    """Both ranks' results for one save_distributed_checkpoint setting."""
    out_dir = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp2_fit.py"), str(out_dir), str(int(request.param))],
        check=True,
        env=env,
        timeout=600,
    )
    return [torch.load(out_dir / f"{int(request.param)}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_same(a, b, where: str) -> None:
    """Exactly equal tensors (or plain values), walking dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["fsdp", "resumed_during", "resumed_after"])
def test_callbacks_under_fsdp2_train_ddps_model(ranks, run):
    """FSDP2 with every callback equals DDP (model and every callback's state, which the script gathers
    into full tensors), straight and resumed from checkpoints taken during and after fit."""
    for rank, results in enumerate(ranks):
        assert set(results[run]["callbacks"]) == set(CALLBACKS)
        assert_same(results["ddp"]["params"], results[run]["params"], f"rank {rank} {run} params")
        assert_same(results["ddp"]["callbacks"], results[run]["callbacks"], f"rank {rank} {run} callbacks")


@pytest.mark.distributed
def test_second_epoch_changed_the_model_and_state_is_saved_whole(ranks):
    """The resumed runs' equality means something: the second epoch (the part they resume) changed the
    model. The callbacks' state (gathered by the script) has the full shapes, also of a parameter whose shard
    is empty."""
    results = ranks[0]
    assert any(
        not torch.equal(a, b) for a, b in zip(results["first"]["params"].values(), results["fsdp"]["params"].values())
    )
    ema = results["fsdp"]["callbacks"]["EMA"]["averages"]
    assert ema["head.weight"].shape == (1, 8)  # the full tensor, though rank 1's shard of it is empty


@pytest.mark.distributed
def test_checkpoint_saved_during_validation_keeps_the_live_weights(ranks):
    """Saved while validation holds EMA's average in the shards: the live weights under ``live_state_dict``,
    the average under ``ema_state_dict`` (sharded in a distributed checkpoint, read back as full tensors)."""
    for results in ranks:
        during = results["fsdp"]["during_validation"]
        assert_same(during["live"], during["saved_live"], "live_state_dict")
        assert_same(during["held"], during["saved_average"], "ema_state_dict")
        assert any(not torch.equal(during["live"][name], during["held"][name]) for name in during["live"])


@pytest.mark.distributed
def test_grades_freezes_the_same_matrices_at_the_same_steps_as_ddp(ranks):
    """GradES adds up its per-shard statistics over the shards: it freezes what DDP freezes, when DDP does
    (the callbacks' states compared above hold ``frozen_at``), and FSDP2 then leaves those matrices alone."""
    for results in ranks:
        frozen_at = results["ddp"]["callbacks"]["GradES"]["frozen_at"]
        assert 0 < len(frozen_at) < 4  # some frozen, training went on
        assert results["fsdp"]["callbacks"]["GradES"]["frozen_at"] == frozen_at


@pytest.mark.distributed
def test_evaluation_with_the_average_swaps_shards_in_place(ranks):
    """Validation under FSDP2 sees EMA's average (its loss equals DDP's, which evaluates the average too);
    swapping it in and out copies each rank's shards in place and communicates nothing, where a forward
    pass (counted the same way) all-gathers."""
    for results in ranks:
        fsdp = results["fsdp"]
        assert torch.equal(results["ddp"]["val_loss"], fsdp["val_loss"])
        assert fsdp["forward_collectives"] > 0
        assert fsdp["swap_collectives"] == 0
        for live, swapped, out, average in zip(
            fsdp["live_shards"], fsdp["swapped_in_shards"], fsdp["swapped_out_shards"], fsdp["average_shards"]
        ):
            assert torch.equal(swapped, average) and torch.equal(out, live)
            assert average.numel() == 0 or not torch.equal(live, average)


@pytest.fixture(scope="module")
def optimizer_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp2_optim")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp2_optim.py"), str(out_dir), str(free_port())],
        check=True,
        env=env,
        timeout=600,
    )
    return torch.load(out_dir / "optim.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("rule", ["AdamW", "AdamW_cautious", "Adan", "Lion", "Lion_cautious", "AdEMAMix", "ADOPT"])
def test_optimizer_rule_on_dtensor_parameters_equals_ddp(optimizer_results, rule):
    """Each rule stepping FSDP2's DTensor parameters trains DDP's model (cautious masking included: its
    per-tensor count is over the whole tensor, not the shard), with state on each rank's shard."""
    result = optimizer_results[rule]
    for ddp, fsdp in zip(result["ddp"], result["fsdp"], strict=True):
        assert torch.equal(ddp, fsdp)
    assert result["state_on_shards"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategy, name", [("ddp_compressed", "CompressedDDPStrategy"), ("onebit_adam", "OneBitAdamStrategy")]
)
def test_strategies_that_cannot_shard_refuse_a_sharded_model(ranks, strategy, name):
    """A model sharded with fully_shard in configure_model, under a DDP-based strategy: a clear error at
    set-up, naming the strategy, the sharded parameters and what to use instead."""
    for results in ranks:
        error = results[f"{strategy}_error"]
        assert f"{name} cannot train a sharded model" in error
        assert "blocks.0.attn.weight" in error and "ModelParallelStrategy" in error


@pytest.mark.distributed
def test_freezing_a_whole_fully_shard_group_mid_training(optimizer_results):
    """What GradES does to a sharded matrix (requires_grad=False, grad=None), to every parameter of one
    fully_shard group after two steps: FSDP2 trains on as a whole model does, and the group stays put."""
    result = optimizer_results["frozen_group"]
    for whole, fsdp in zip(result["whole"], result["fsdp"], strict=True):
        assert torch.equal(whole, fsdp)
    for at_freeze, after in zip(result["fsdp_at_freeze"], result["fsdp"][2:4]):
        assert torch.equal(at_freeze, after)
