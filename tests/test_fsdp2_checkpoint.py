"""Checkpoints of callback state under FSDP2 (:mod:`lightning_converge.sharding`): saved sharded through the
distributed checkpoint with no gather, gathered into a single-file checkpoint otherwise, and restored on
another number of ranks equal to what was saved.

One launch of tests/scripts/fsdp2_checkpoint.py saves with 2 gloo processes (both
``save_distributed_checkpoint`` settings), one loads with 1 process and one with 4; the tests compare the
loaded state (as full tensors) with the saved run's. Exact resume on the same 2 ranks, during and after fit,
with every callback, is tests/test_fsdp2.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_converge.callbacks.posthoc_ema import sigma_rel_to_gamma, solve_weights
from lightning_converge.sharding import (
    RECORD_KEY,
    prepare_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    restored_state,
    saved_state,
)

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(Path(__file__).parent))
from test_fsdp2 import assert_same

SETTINGS = pytest.mark.parametrize("distributed", [True, False], ids=["distributed_checkpoint", "full_checkpoint"])
#: What DTensor.full_tensor (and so a gathered state) runs: the collective a sharded save must not run.
TENSOR_ALL_GATHER = "c10d_functional.all_gather_into_tensor"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2_checkpoint")


def launch(out_dir: Path, phase: str, devices: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp2_checkpoint.py"), str(out_dir), phase, str(devices)],
        check=True,
        env=env,
        timeout=600,
    )
    return [torch.load(out_dir / f"{phase}_{devices}_rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.fixture(scope="module")
def saved(out_dir):
    return launch(out_dir, "save", 2)


@pytest.fixture(scope="module")
def loaded_on_1(saved, out_dir):
    return launch(out_dir, "load", 1)[0]


@pytest.fixture(scope="module")
def loaded_on_4(saved, out_dir):
    return launch(out_dir, "load", 4)[0]


def saves_by_name(results: dict) -> dict:
    """The saves of one setting: ``during`` (after the first epoch), ``end`` (ModelCheckpoint's at the last
    epoch) and ``after`` (Trainer.save_checkpoint after fit)."""
    by_name = {}
    for save in results["saves"]:
        name = "after" if "after_" in save["path"] else "during" if "epoch=0" in save["path"] else "end"
        by_name[name] = save
    return by_name


@pytest.mark.distributed
def test_distributed_checkpoint_save_gathers_nothing(saved):
    """A distributed checkpoint's save (callbacks' state_dict, EMA's averaged weights, the strategy's write)
    runs no tensor all-gather: only DCP's own planning exchanges, the same at every save although the later
    checkpoints hold more state (LAWA snapshots, PostHocEMA snapshot records). A single-file checkpoint
    gathers each sharded state tensor (and the model), more as the state grows."""
    for results in saved:
        sharded = saves_by_name(results[True])
        assert all(TENSOR_ALL_GATHER not in save["counts"] for save in sharded.values())
        assert sharded["during"]["counts"] == sharded["end"]["counts"] == sharded["after"]["counts"]
        whole = saves_by_name(results[False])
        assert 0 < whole["during"]["counts"][TENSOR_ALL_GATHER] < whole["end"]["counts"][TENSOR_ALL_GATHER]


@pytest.mark.distributed
def test_distributed_checkpoint_holds_the_state_sharded(saved, out_dir):
    """The callbacks' state lies in the DCP shards (every rank's file), rank 0's metadata file holds records;
    read back as full tensors it is the state the ranks held. The single-file checkpoint holds full tensors."""
    state = saved[0][True]["saves"][-1]["callbacks"]
    checkpoint_dir = out_dir / "after_1.ckpt"
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    meta = torch.load(checkpoint_dir / "meta.pt", weights_only=True)
    ema_key = next(key for key in meta["callbacks"] if key.startswith("EMA"))
    record = meta["callbacks"][ema_key]["averages"]["head.weight"]
    assert record["shape"] == [1, 8] and record["placements"] == [["shard", 0]]
    read = read_checkpoint(checkpoint_dir)
    assert_same(state["EMA"], read["callbacks"][ema_key], "EMA in the distributed checkpoint")
    full = torch.load(out_dir / "after_0.ckpt", weights_only=True)
    ema_key = next(key for key in full["callbacks"] if key.startswith("EMA"))
    assert_same(saved[0][False]["saves"][-1]["callbacks"]["EMA"], full["callbacks"][ema_key], "EMA in the file")


@pytest.mark.distributed
@SETTINGS
@pytest.mark.parametrize("checkpoint", ["during", "after"])
def test_resumed_on_one_rank_restores_the_saved_state(saved, loaded_on_1, distributed, checkpoint):
    """A checkpoint written by 2 processes, resumed by 1: when training starts every callback holds the state
    the 2 ranks saved (EMA, LAWA, PostHocEMA profiles and snapshots, Grokfast's filter) and the model the
    live weights, as full tensors; the distributed checkpoint resharded by DCP, the single file cut."""
    save = saves_by_name(saved[0][distributed])[checkpoint]
    restored = loaded_on_1[distributed][checkpoint]
    assert_same(save["callbacks"], restored["callbacks"], f"{checkpoint} callbacks")
    assert_same(save["live"], restored["live"], f"{checkpoint} live weights")
    assert save["step"] == restored["step"]


@pytest.mark.distributed
@pytest.mark.slow
@SETTINGS
def test_resumed_on_four_ranks_restores_the_saved_state(saved, loaded_on_4, distributed):
    """The same on 4 processes: the (1, 8) head's shards are empty on three of them."""
    save = saves_by_name(saved[0][distributed])["after"]
    restored = loaded_on_4[distributed]["after"]
    assert_same(save["callbacks"], restored["callbacks"], "callbacks")
    assert_same(save["live"], restored["live"], "live weights")
    assert_same(saved[0][distributed]["reconstructed"], restored["reconstructed"], "reconstruction")


@pytest.mark.distributed
@SETTINGS
def test_posthoc_snapshots_are_per_rank_shards(saved, out_dir, distributed):
    """PostHocEMA under FSDP2 keeps each rank's shards of every snapshot (in memory, or written by every rank
    into a distributed checkpoint per snapshot): the shapes of that rank's parameter shards."""
    for results in saved:
        shards = results[distributed]
        assert shards["snapshot_steps"] == [2, 4, 6]
        assert len(shards["snapshot_shapes"]) == 3 * 2  # 3 snapshots of 2 profiles
        assert all(shapes == shards["param_shard_shapes"] for shapes in shards["snapshot_shapes"])
    assert saved[1][distributed]["param_shard_shapes"]["head.weight"] == (0, 8)
    if distributed:
        for step in (2, 4, 6):
            files = sorted(p.name for p in (out_dir / "1" / "snapshots" / f"step={step}").iterdir())
            assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.distributed
@SETTINGS
def test_posthoc_reconstruction_from_sharded_snapshots(saved, loaded_on_1, distributed):
    """``reconstruct`` on 2 ranks (each combines its shards, then gathers) equals the paper's least squares
    written out over the full snapshots (read back as full tensors on 1 rank), and a run resumed on 1 rank
    reconstructs the same from the 2 ranks' snapshots; ``swap_in`` puts this rank's shards of it in place,
    with no tensor all-gather."""
    sigma_rel = 0.15  # the script's SIGMA_REL
    restored = loaded_on_1[distributed]["after"]
    snapshots = restored["callbacks"]["PostHocEMA"]["snapshots"]
    profiles = [full_profiles(snapshot, i) for i, snapshot in enumerate(snapshots)]
    gammas = [sigma_rel_to_gamma(s) for s in (0.1, 0.2)]
    steps = [snapshot["step"] for snapshot in snapshots]
    coefficients = solve_weights(
        [t for t in steps for _ in gammas], [g for _ in steps for g in gammas], steps[-1], sigma_rel_to_gamma(sigma_rel)
    ).tolist()
    expected = {}
    for x, profile in zip(coefficients, [p for snapshot in profiles for p in snapshot]):
        for name, tensor in profile.items():
            expected[name] = expected.get(name, 0) + tensor.double() * x
    for rank, results in enumerate(saved):
        reconstructed = results[distributed]["reconstructed"]
        assert reconstructed.keys() == expected.keys()
        for name, tensor in reconstructed.items():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=1e-6, atol=1e-7)
            assert torch.equal(results[distributed]["swapped_in_shards"][name], shard_of(tensor, rank, 2))
        assert TENSOR_ALL_GATHER not in results[distributed]["swap_in_counts"]
        if not distributed:  # snapshots in memory: swapping a reconstruction in communicates nothing
            assert results[distributed]["swap_in_counts"] == {}
    assert_same(saved[0][distributed]["reconstructed"], restored["reconstructed"], "reconstructed on 1 rank")


def full_profiles(snapshot: dict, index: int) -> list[dict]:
    """A snapshot's profiles as full tensors: from the restored state (in memory), or its distributed
    checkpoint directory converted to one file (on disk)."""
    if "profiles" in snapshot:
        return snapshot["profiles"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    converted = Path(snapshot["path"]).with_name(f"converted_{index}.pt")
    dcp_to_torch_save(snapshot["path"], converted)
    return torch.load(converted, weights_only=True)["profiles"]


def shard_of(tensor: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """Rank ``rank``'s dim-0 shard of ``tensor`` as FSDP2 cuts it (torch.chunk; empty past the last chunk)."""
    chunks = torch.chunk(tensor, ranks)
    return chunks[rank] if rank < len(chunks) else tensor[:0]


@pytest.fixture
def one_rank_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    dist.destroy_process_group()


@SETTINGS
def test_mechanism_round_trip_with_leading_dimensions(one_rank_mesh, tmp_path, distributed):
    """The API the callbacks and strategies use, on one rank: state sharded like a parameter, with and without
    leading unsharded dimensions (Grokfast's ring), goes through ``prepare_checkpoint`` into what the strategy
    writes (DCP shards and records, or full tensors), and ``restore_checkpoint`` / ``restored_state`` give
    back this rank's shards; plain values and unsharded tensors stay where they were."""
    module = torch.nn.Linear(4, 3)
    module.weight = torch.nn.Parameter(distribute_tensor(module.weight.detach(), one_rank_mesh, [Shard(0)]))
    ring, average, count = torch.randn(2, 3, 4), torch.randn(3, 4), torch.tensor(5)
    checkpoint = {
        "state_dict": {"weight": module.weight.detach()},
        "callbacks": {"Filter": {"ring": [saved_state(ring, module.weight, leading=1)], "count": count}},
        "average": {"weight": saved_state(average, module.weight), "bias": module.bias.detach()},
        "epoch": 3,
    }
    prepare_checkpoint(checkpoint, distributed)
    stored = checkpoint["callbacks"]["Filter"]["ring"][0]
    if not distributed:  # gathered: full tensors (on one rank, the shards themselves)
        assert type(stored) is torch.Tensor and torch.equal(stored, ring)
        assert type(checkpoint["average"]["weight"]) is torch.Tensor
        return
    assert stored[RECORD_KEY].startswith("_sharded_state/") and stored["placements"] == [["shard", 1]]
    assert stored["mesh_dim_names"] == ["data_parallel"] and stored["shape"] == [2, 3, 4]
    dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=tmp_path / "ckpt")
    torch.save(checkpoint, tmp_path / "ckpt" / "meta.pt")
    loaded = torch.load(tmp_path / "ckpt" / "meta.pt", weights_only=True)
    restore_checkpoint(loaded, tmp_path / "ckpt", module)
    assert torch.equal(restored_state(loaded["callbacks"]["Filter"]["ring"][0], module.weight, leading=1), ring)
    assert torch.equal(restored_state(loaded["average"]["weight"], module.weight), average)
    assert torch.equal(loaded["callbacks"]["Filter"]["count"], count) and loaded["epoch"] == 3
    read = read_checkpoint(tmp_path / "ckpt")
    assert torch.equal(read["callbacks"]["Filter"]["ring"][0], ring)
    assert list(read["state_dict"]) == ["weight"]  # the model's entries only
    with pytest.raises(ValueError, match=r"a restored state of shape \(3, 4\) for a parameter of shape \(4, 4\)"):
        restored_state(average, torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), one_rank_mesh, [Shard(0)])))
