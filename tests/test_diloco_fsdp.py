"""DiLoCo over FSDP2 replicas (``ShardedDiLoCoStrategy``, ``strategy="diloco_fsdp"``).

One launch of tests/scripts/diloco_fsdp_fit.py on 4 gloo processes (2 replicas x 2 shards) runs every sharded
scenario, one on 2 processes resumes its checkpoints on other meshes and runs DiLoCo over DDP on the same data
(each DDP worker's batch is the union of its replica's two shard ranks' batches); the tests compare what each
rank saved. The argument and mesh checks run
here, without processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from lightning_converge.sharding import read_checkpoint
from lightning_converge.strategies import ShardedDiLoCoStrategy, ShardedStreamingDiLoCoStrategy

ROOT = Path(__file__).parents[1]
SCRIPTS = Path(__file__).parent / "scripts"

# The sharded and the DDP runs differ only in the order of float additions: each replica's gradient is the
# mean of two 4-sample means averaged by FSDP2's reduce-scatter instead of one 8-sample mean, and the outer
# step's average adds the same numbers shard by shard. That is a few float32 ulps per step (eps = 1.2e-7) on
# values of order 1, carried through 9 AdamW steps and 3 Nesterov outer steps: measured 7.5e-8 at most. The
# tolerance allows about 10 ulps on values up to 1; a wrong split of the data, a gradient averaged over the
# wrong ranks or a missed outer step moves the parameters by 1e-3 to 1e-1 (they move 0.15 in all).
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each rank saved: {"ddp": [2 ranks], "sharded": [4 ranks]}, and where ("out_dir")."""
    out_dir = tmp_path_factory.mktemp("diloco_fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    results = {"out_dir": out_dir}
    for mode, world_size in (("sharded", 4), ("ddp", 2)):  # the ddp launch resumes the sharded checkpoints
        subprocess.run(
            [sys.executable, str(SCRIPTS / "diloco_fsdp_fit.py"), str(out_dir), mode], check=True, env=env, timeout=600
        )
        results[mode] = [torch.load(out_dir / f"{mode}_rank{r}.pt", weights_only=False) for r in range(world_size)]
    return results


@pytest.mark.distributed
def test_two_replicas_of_two_shards_train_the_model_of_diloco_over_two_ddp_workers(runs):
    ddp = runs["ddp"][0]["straight"]
    assert ddp["outer_steps"] == 3  # >= 2 outer steps, so the outer momentum took part
    moved = max((ddp["params"][name] - ddp["initial"][name]).abs().max() for name in ddp["params"])
    assert moved > 0.05
    for rank, results in enumerate(runs["sharded"]):
        sharded = results["straight"]
        assert sharded["outer_steps"] == 3
        assert sharded["params"].keys() == ddp["params"].keys()
        for name, expected in ddp["params"].items():
            torch.testing.assert_close(sharded["params"][name], expected, **TOLERANCE, msg=f"rank {rank} {name}")


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["straight", "streaming"])
def test_validation_inside_an_inner_phase_evaluates_the_global_parameters_as_over_ddp(runs, run):
    """Validation after steps 4 and 8 (inside inner phases) gives DiLoCo over DDP's losses (it evaluates the
    global parameters, tested in test_diloco.py), and puts the local shards back: training goes on as over DDP
    (the tests above)."""
    expected = runs["ddp"][0][run]["val_losses"]
    assert len(expected) == 2
    for results in runs["sharded"]:
        torch.testing.assert_close(results[run]["val_losses"], expected, **TOLERANCE)


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["streaming", "delayed", "ema", "lawa"])
def test_streaming_delayed_and_averaged_diloco_over_two_replicas_of_two_shards_equal_them_over_ddp(runs, run):
    """Streaming DiLoCo (2 fragments, overlap 1, mixing 0.5), DiLoCo with ``delay=1``, and DiLoCo with EMA or
    LAWA (each averaging the global parameters on the shards; the model ends as the average)."""
    ddp = runs["ddp"][0][run]
    assert ddp["outer_steps"] >= (4 if run == "streaming" else 3)  # every fragment synced twice or more
    for rank, results in enumerate(runs["sharded"]):
        sharded = results[run]
        assert sharded["outer_steps"] == ddp["outer_steps"]
        for name, expected in ddp["params"].items():
            torch.testing.assert_close(sharded["params"][name], expected, **TOLERANCE, msg=f"rank {rank} {name}")


@pytest.mark.distributed
def test_the_outer_state_lives_on_each_ranks_shards_and_only_the_replicas_exchange(runs):
    """The global parameters and the outer momentum have the local shards' shapes (the head's (1, 8) weight is
    all on one shard rank, none on the other); the two shard ranks of a replica together send the bytes of one
    DDP worker: each rank averages only its own shard, with its counterpart in the other replica."""
    full_numels = [p.numel() for p in runs["ddp"][0]["straight"]["params"].values()]
    sharded = [results["straight"] for results in runs["sharded"]]
    for state in sharded:
        assert state["momentum_shapes"] == state["global_shapes"] == state["local_shapes"]
    assert sharded[0]["local_shapes"][-2:] == [(1, 8), (1,)] and sharded[1]["local_shapes"][-2:] == [(0, 8), (0,)]
    for replica in (0, 1):
        first, second = sharded[2 * replica], sharded[2 * replica + 1]
        numels = [
            torch.Size(a).numel() + torch.Size(b).numel()
            for a, b in zip(first["momentum_shapes"], second["momentum_shapes"])
        ]
        assert numels == full_numels
        assert first["bytes_sent"] + second["bytes_sent"] == runs["ddp"][replica]["straight"]["bytes_sent"]


@pytest.mark.distributed
@pytest.mark.parametrize("checkpoint", ["distributed", "full"])
def test_resuming_from_a_checkpoint_inside_an_inner_phase_continues_exactly(runs, checkpoint):
    straight = "straight" if checkpoint == "distributed" else "straight_full"
    for rank, results in enumerate(runs["sharded"]):
        resumed = results[f"resumed_{checkpoint}"]
        assert resumed["outer_steps"] == results[straight]["outer_steps"]
        assert resumed["bytes_sent"] == results[straight]["bytes_sent"]
        for name, expected in results[straight]["params"].items():
            assert torch.equal(resumed["params"][name], expected), f"rank {rank} {name}"


@pytest.mark.distributed
def test_streaming_resumes_exactly_from_a_checkpoint_with_an_average_in_flight(runs):
    """The checkpoint after fragment 0's sync holds its average, not yet applied; the resumed run applies it."""
    for rank, results in enumerate(runs["sharded"]):
        assert results["streaming"]["records"][0]["outer"]["pending_averages"][0] is not None
        for name, expected in results["streaming"]["params"].items():
            assert torch.equal(results["streaming_resumed"]["params"][name], expected), f"rank {rank} {name}"


#: The checkpoints: (file, the run that saved it, its record among the run's).
SAVES = {
    "distributed": ("during_distributed.ckpt", "straight", 0),
    "full": ("during_full.ckpt", "straight_full", 0),
    "after_fit": ("after_distributed.ckpt", "straight", 1),
    "streaming": ("streaming.ckpt", "streaming", 0),
}
#: What DTensor.full_tensor (a gather of sharded state) runs: the collective a distributed save must not run.
TENSOR_ALL_GATHER = "c10d_functional.all_gather_into_tensor"


def outer_state_of(diloco: dict) -> dict:
    """A checkpoint's ``checkpoint["diloco"]`` (full tensors) in the form of the script's ``outer_state``."""
    return {
        "global_params": diloco["global_params"],
        "momentum_buffers": diloco["outer_optimizer"]["momentum_buffers"],
        "pending_averages": [saved["pending_average"] for saved in diloco["fragments"]],
    }


def assert_outer_state_equal(state: dict, expected: dict, msg: str) -> None:
    """Two ``outer_state`` records hold equal tensors."""
    for key in ("global_params", "momentum_buffers", "pending_averages"):
        assert len(state[key]) == len(expected[key]), f"{msg} {key}"
        for index, (a, b) in enumerate(zip(state[key], expected[key])):
            if a is None or b is None:
                assert a is b, f"{msg} {key}[{index}]"
            elif isinstance(a, list):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"{msg} {key}[{index}]"
            else:
                assert torch.equal(a, b), f"{msg} {key}[{index}]"


@pytest.mark.distributed
@pytest.mark.parametrize("checkpoint", ["distributed", "after_fit", "full"])
def test_a_distributed_save_gathers_no_outer_state_and_a_single_file_save_gathers_it(runs, checkpoint):
    """A distributed checkpoint's save (the model, the inner optimizer, the outer state), during or after
    ``fit``, runs no tensor all-gather, only DCP's planning exchanges; a single-file save gathers the sharded
    state."""
    _, run, index = SAVES[checkpoint]
    for rank, results in enumerate(runs["sharded"]):
        counts = results[run]["records"][index]["counts"]
        if checkpoint != "full":
            assert TENSOR_ALL_GATHER not in counts, f"rank {rank}: {counts}"
        else:
            assert counts.get(TENSOR_ALL_GATHER, 0) > 0, f"rank {rank}: {counts}"


@pytest.mark.distributed
@pytest.mark.parametrize("checkpoint", ["distributed", "after_fit", "full", "streaming"])
def test_the_checkpoint_holds_the_outer_state_the_ranks_held(runs, checkpoint):
    """The distributed checkpoints keep the outer state (global parameters, outer momentum, an average in
    flight) in DCP's shards, written by every rank, with records in rank 0's metadata file; read back whole it
    is the state the ranks held when saving (gathered after the save; after ``fit``, the state when training
    ended, which such a checkpoint keeps). The single-file checkpoint holds it as full tensors."""
    file, run, index = SAVES[checkpoint]
    path = runs["out_dir"] / file
    if checkpoint != "full":
        assert sorted(p.name for p in path.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
        meta = torch.load(path / "meta.pt", weights_only=True)["diloco"]
        records = [*meta["global_params"], *meta["outer_optimizer"]["momentum_buffers"]]
        records += [record for saved in meta["fragments"] for record in saved["pending_average"] or []]
        assert all(isinstance(record, dict) and record["placements"] == [["shard", 0]] for record in records)
    saved = outer_state_of(read_checkpoint(path)["diloco"])
    for rank, results in enumerate(runs["sharded"]):
        assert_outer_state_equal(saved, results[run]["records"][index]["outer"], f"rank {rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("checkpoint", ["distributed", "full"])
@pytest.mark.parametrize("mesh", ["2x1", "1x2"])
def test_a_checkpoint_of_two_replicas_of_two_shards_resumes_on_another_mesh_with_the_global_state(
    runs, checkpoint, mesh
):
    """Resumed on 2 ranks, as 2 replicas of 1 shard or 1 replica of 2 shards, the outer state (global
    parameters, outer momentum) is the one the 4 ranks held when saving, resharded; the per-rank local shards
    cannot be matched to the new ranks, so the interrupted inner phase restarts from the global parameters (as
    ``diloco`` on another number of workers, tests/test_diloco.py)."""
    _, run, index = SAVES[checkpoint]
    live = runs["sharded"][0][run]["records"][index]["outer"]
    for rank, results in enumerate(runs["ddp"]):
        resumed = results[f"{checkpoint}_on_{mesh}"]
        assert_outer_state_equal(resumed["records"][0], live, f"rank {rank}")
        for (name, param), global_param in zip(resumed["params"].items(), live["global_params"], strict=True):
            assert torch.equal(param, global_param), f"rank {rank} {name}"


@pytest.mark.distributed
def test_a_checkpoint_resumed_on_as_many_ranks_in_another_mesh_is_refused(runs):
    """2 replicas x 2 shards resumed as 4 x 1: each rank would read a local state of other shards' shapes."""
    for results in runs["sharded"]:
        error = results["other_mesh_error"]
        assert "saved by 2 replicas x 2 shards and is resumed as 4 x 1" in error
        assert "Resume with replicas=2" in error


@pytest.mark.distributed
def test_models_not_sharded_within_a_replica_and_strategies_that_cannot_shard_are_refused_before_training(runs):
    results = runs["sharded"][0]
    for scenario in ("unsharded_error", "sharded_over_world_error"):
        assert "not sharded over self.device_mesh['data_parallel']" in results[scenario]
    assert "AsyncDiLoCoStrategy cannot train a sharded model" in results["async_error"]
    assert "use ShardedDiLoCoStrategy (strategy='diloco_fsdp')" in results["ddp_diloco_error"]


# ---------------------------------------------------------------------------------------- without processes


@pytest.mark.parametrize(
    "name, cls", [("diloco_fsdp", ShardedDiLoCoStrategy), ("streaming_diloco_fsdp", ShardedStreamingDiLoCoStrategy)]
)
def test_registered_by_name_with_one_replica_per_node(name, cls):
    assert StrategyRegistry[name]["strategy"] is cls
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=4, logger=False)
    assert type(trainer.strategy) is cls and trainer.strategy.replicas == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(replicas=0), ValueError, "replicas"),
        (dict(replicas=1.5), (TypeError, ValueError), "replicas"),
        (dict(replica=2), TypeError, r"did you mean 'replicas'\?"),
        (dict(inner_steps=0), ValueError, "inner_steps must be >= 1"),
        (dict(outer_momentum=1.0), ValueError, "outer_momentum"),
        (dict(outer_optimizer=lambda params: torch.optim.Adam(params)), ValueError, "outer_optimizer must be one of"),
        (dict(find_unused_parameters=True), TypeError, "does not wrap the model"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShardedDiLoCoStrategy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fragment_assignment="balanced"), ValueError, "'strided' or 'contiguous', got 'balanced'"),
        (dict(fragment_assignment="random"), ValueError, "fragment_assignment"),
        (dict(num_fragments=0), ValueError, "num_fragments"),
        (dict(inner_steps=8, num_fragments=4, overlap_steps=2), ValueError, "per-fragment"),
        (dict(num_fragment=2), TypeError, r"did you mean 'num_fragments'\?"),
        (dict(delay=1), TypeError, "delay"),
    ],
)
def test_bad_streaming_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShardedStreamingDiLoCoStrategy(**kwargs)


def test_replicas_that_do_not_divide_the_processes_raise_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"replicas=3 does not divide the 4 processes"):
        L.Trainer(strategy=ShardedDiLoCoStrategy(replicas=3), accelerator="cpu", devices=4, logger=False)


SHARDED_DILOCO_YAML = """
trainer:
  accelerator: cpu
  devices: 4
  strategy:
    class_path: lightning_converge.strategies.ShardedDiLoCoStrategy
    init_args:
      replicas: 2
      inner_steps: 16
      outer_lr: 0.5
      save_distributed_checkpoint: false
      timeout: 60
"""


def test_a_lightningcli_yaml_builds_the_strategy_with_its_options(tmp_path, monkeypatch):
    from lightning_converge.cli import ConvergeCLI

    monkeypatch.chdir(ROOT)
    strategy_config = tmp_path / "strategy.yaml"
    strategy_config.write_text(SHARDED_DILOCO_YAML)
    configs = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(strategy_config)]
    strategy = ConvergeCLI(args=configs, run=False, parser_kwargs={"parser_mode": "omegaconf"}).trainer.strategy
    assert type(strategy) is ShardedDiLoCoStrategy and strategy.replicas == 2
    assert strategy._schedule.inner_steps(0) == 16 and strategy._outer_lr(0) == 0.5
    assert strategy._save_distributed_checkpoint is False and strategy._timeout.total_seconds() == 60
