"""Per-rank checkpoint state (:mod:`lightning_converge.strategies.rank_state`): each rank writes its own file.

The first tests call the module's functions for two ranks in one process (a stand-in strategy); the
distributed ones read one launch of tests/scripts/rank_state_fit.py (1-bit Adam with Grokfast on two
gloo processes, whose per-rank states differ), whose saves run with every data-moving collective
replaced by one that raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_converge.strategies.rank_state import (
    CHECKPOINT_KEY,
    load_rank_states,
    remove_rank_states,
    save_rank_states,
)

SCRIPTS = Path(__file__).parent / "scripts"


def same(a, b) -> bool:
    """Equal nested states: the same keys and lengths, equal tensors (dtype included) and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def stand_in_strategy(rank: int, world_size: int):
    """What rank_state reads of a strategy, for rank ``rank`` of ``world_size``: a strategy that leaves
    gradients local, with one callback whose state follows the gradients and one whose state does not."""
    strategy = SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        is_global_zero=rank == 0,
        checkpoint_io=TorchCheckpointIO(),
        gradients_differ_between_ranks=True,
    )
    callbacks = [
        SimpleNamespace(state_key="Filter", state_follows_gradients=True),
        SimpleNamespace(state_key="Average", state_follows_gradients=False),
    ]
    strategy.lightning_module = SimpleNamespace(trainer=SimpleNamespace(strategy=strategy, callbacks=callbacks))
    return strategy


def rank_checkpoint(rank: int) -> tuple[dict, dict]:
    """A checkpoint as Lightning assembles it on ``rank`` (callback states differ by rank) and the
    strategy's own per-rank state on that rank."""
    checkpoint = {
        "state_dict": {"w": torch.ones(3)},
        "optimizer_states": [{}],
        "callbacks": {"Filter": {"slow": [torch.full((4,), float(rank))]}, "Average": {"n": 7}},
    }
    return checkpoint, {"compressed_ddp": {"residuals": [torch.arange(5.0) + rank], "steps": 3 + rank}}


@pytest.fixture
def saved_by_two_ranks(tmp_path):
    """The checkpoint file rank 0 writes at ``tmp_path/model.ckpt`` after both ranks saved."""
    path = tmp_path / "model.ckpt"
    for rank in (1, 0):  # rank 0 last: its checkpoint is the one written
        checkpoint, strategy_states = rank_checkpoint(rank)
        strategy = stand_in_strategy(rank, 2)
        save_rank_states(strategy, checkpoint, path, strategy_states)
    strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    return path


def test_each_rank_writes_a_file_holding_only_its_own_state(saved_by_two_ranks):
    checkpoint = torch.load(saved_by_two_ranks, weights_only=True)
    assert checkpoint[CHECKPOINT_KEY] == {
        "world_size": 2,
        "directory": "model.ckpt.rank_states",
        "files": ["rank0.pt", "rank1.pt"],
        "callbacks": ["Filter"],
    }
    directory = saved_by_two_ranks.parent / "model.ckpt.rank_states"
    assert sorted(os.listdir(directory)) == ["rank0.pt", "rank1.pt"]
    for rank in (0, 1):
        rank_file = torch.load(directory / f"rank{rank}.pt", weights_only=True)
        full, strategy_states = rank_checkpoint(rank)
        own_callbacks = {"Filter": full["callbacks"]["Filter"]}
        assert same(rank_file, {"rank": rank, "world_size": 2, "strategy": strategy_states, "callbacks": own_callbacks})


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_loads_its_own_file_and_callback_states(saved_by_two_ranks, rank):
    strategy = stand_in_strategy(rank, 2)
    checkpoint = strategy.checkpoint_io.load_checkpoint(saved_by_two_ranks, weights_only=True)
    strategy_states = load_rank_states(strategy, checkpoint, saved_by_two_ranks, weights_only=True)
    full, expected = rank_checkpoint(rank)
    assert same(strategy_states, expected)
    # this rank's per-rank callback state replaces rank 0's; the others stay as saved
    assert same(checkpoint["callbacks"], full["callbacks"])
    assert CHECKPOINT_KEY not in checkpoint


def test_a_checkpoint_moved_with_its_directory_or_reached_through_a_link_finds_its_files(saved_by_two_ranks):
    moved = saved_by_two_ranks.parent / "moved"
    moved.mkdir()
    for name in ("model.ckpt", "model.ckpt.rank_states"):
        (saved_by_two_ranks.parent / name).rename(moved / name)
    (moved / "last.ckpt").symlink_to("model.ckpt")  # ModelCheckpoint(save_last="link")
    for path in (moved / "model.ckpt", moved / "last.ckpt"):
        strategy = stand_in_strategy(1, 2)
        states = load_rank_states(strategy, torch.load(path, weights_only=True), path)
        assert same(states, rank_checkpoint(1)[1])


def test_another_number_of_ranks_starts_the_per_rank_state_afresh_with_a_warning(saved_by_two_ranks):
    strategy = stand_in_strategy(0, 3)
    checkpoint = torch.load(saved_by_two_ranks, weights_only=True)
    with pytest.warns(UserWarning, match=r"saved by 2 ranks and is resumed by 3: it starts afresh .*\['Filter'\]"):
        assert load_rank_states(strategy, checkpoint, saved_by_two_ranks) == {}
    assert checkpoint["callbacks"] == {"Average": {"n": 7}}  # the per-rank filter starts afresh


def test_a_missing_rank_file_is_named(saved_by_two_ranks):
    (saved_by_two_ranks.parent / "model.ckpt.rank_states" / "rank1.pt").unlink()
    checkpoint = torch.load(saved_by_two_ranks, weights_only=True)
    with pytest.raises(FileNotFoundError, match=r"rank 1's state .*model.ckpt.rank_states/rank1.pt"):
        load_rank_states(stand_in_strategy(1, 2), checkpoint, saved_by_two_ranks)


def test_removing_a_checkpoint_removes_its_rank_files_on_rank_0(saved_by_two_ranks):
    directory = saved_by_two_ranks.parent / "model.ckpt.rank_states"
    remove_rank_states(stand_in_strategy(1, 2), saved_by_two_ranks)
    assert directory.is_dir()
    remove_rank_states(stand_in_strategy(0, 2), saved_by_two_ranks)
    assert not directory.exists()
    remove_rank_states(stand_in_strategy(0, 2), saved_by_two_ranks)  # nothing left to remove: no error


# ------------------------------------------------------------------ two gloo processes


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """tests/scripts/rank_state_fit.py's output directory and each rank's runs."""
    out_dir = tmp_path_factory.mktemp("rank_state")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "rank_state_fit.py"), str(out_dir)],
        env=env, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out_dir, [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.distributed
def test_each_rank_saves_its_own_state_without_a_collective(two_rank_runs):
    # The saves ran with every data-moving collective raising; each rank's file holds what that rank had.
    out_dir, ranks = two_rank_runs
    checkpoint = torch.load(out_dir / "after_fit.ckpt", weights_only=True)
    record = checkpoint[CHECKPOINT_KEY]
    assert record["world_size"] == 2 and len(record["callbacks"]) == 1  # Grokfast's
    (grokfast_key,) = record["callbacks"]
    for rank, runs in enumerate(ranks):
        rank_file = torch.load(out_dir / record["directory"] / record["files"][rank], weights_only=True)
        assert rank_file["rank"] == rank
        assert same(rank_file["strategy"], {"onebit_adam": runs["first"]["saved"]["strategy"]})
        assert same(rank_file["callbacks"], {grokfast_key: runs["first"]["saved"]["grokfast"]})
    # the ranks' states differ: a file holding another rank's would not pass the above
    assert not same(ranks[0]["first"]["saved"]["grokfast"], ranks[1]["first"]["saved"]["grokfast"])
    assert not same(ranks[0]["first"]["saved"]["strategy"], ranks[1]["first"]["saved"]["strategy"])


@pytest.mark.distributed
def test_model_checkpoint_rotation_removes_the_rank_files(two_rank_runs):
    out_dir, _ = two_rank_runs
    kept = ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt"]  # save_top_k=2 of four epochs
    assert sorted(os.listdir(out_dir / "rotation")) == sorted(kept + [f"{name}.rank_states" for name in kept])
    for name in kept:
        assert sorted(os.listdir(out_dir / "rotation" / f"{name}.rank_states")) == ["rank0.pt", "rank1.pt"]


@pytest.mark.distributed
@pytest.mark.parametrize("resumed", ["during_fit", "after_fit"])
def test_resumed_runs_continue_exactly(two_rank_runs, resumed):
    # Resumed from the checkpoint after the third epoch of the straight run, or from one saved after a
    # two-epoch fit (loaded with weights_only=True): four epochs in all, as the straight run.
    _, ranks = two_rank_runs
    for runs in ranks:
        assert same(runs[resumed]["params"], runs["straight"]["params"])
