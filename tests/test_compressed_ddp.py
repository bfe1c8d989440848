"""Compressed data parallelism and 1-bit Adam under two-process DDP (gloo, CPU), and their set-up checks.

The distributed tests share one launch of tests/scripts/compressed_ddp_fit.py,
which runs every scenario (short fits of the same tiny regression) and saves
what each rank saw; the tests below read those results.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_converge  # noqa: F401  (registers the strategies)
from lightning_converge.comm import (
    FP16Compressor,
    Int8Compressor,
    OneBitCompressor,
    PowerSGDCompressor,
    SignCompressor,
    TopKCompressor,
)
from lightning_converge.strategies import CompressedDDPStrategy, OneBitAdamStrategy

SCRIPTS = Path(__file__).parent / "scripts"

# The script's model: Linear(6, 32), Linear(32, 32), Linear(32, 1), one DDP bucket.
SHAPES = [(32, 6), (32,), (32, 32), (32,), (1, 32), (1,)]
NUMEL = sum(math.prod(shape) for shape in SHAPES)
FP32_BYTES = 4 * NUMEL


def onebit_bytes(numel: int, block_size: int, world_size: int) -> int:
    """An all-to-all of every chunk and an all-gather of one: signs and a scale per block."""
    blocks_per_chunk = math.ceil(math.ceil(numel / block_size) / world_size)
    chunk_bytes = blocks_per_chunk * block_size // 8 + 4 * blocks_per_chunk
    return (world_size + 1) * chunk_bytes


# Bytes each rank sends per step, from the tensor sizes each compressor puts on the wire
# (options as in the script).
EXPECTED_BYTES = {
    "fp16": 2 * NUMEL,
    "bf16": 2 * NUMEL,
    "int8": NUMEL + 4 * math.ceil(NUMEL / 256),
    "sign": math.ceil(NUMEL / 8) + 4 * math.ceil(NUMEL / 128),
    "ternary": math.ceil(NUMEL / 4) + 4 * len(SHAPES),
    "topk": 8 * math.ceil(0.1 * NUMEL),
    # rank 2: P and Q of the two matrices worth compressing; the 1 x 32 matrix and the vectors as they are
    "powersgd": 4 * (2 * (32 + 6) + 2 * (32 + 32) + 32 + 32 + 32 + 1),
    "onebit": onebit_bytes(NUMEL, 128, 2),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: scenario -> params, per-step bytes and agreement, final loss."""
    out_dir = tmp_path_factory.mktemp("compressed_ddp")
    # The reference backend: the compiled kernels are tested on their own, compiling here would only cost time.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "compressed_ddp_fit.py"), str(out_dir)], check=True, env=env, timeout=600
    )
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The four-rank scenarios' results, rank by rank."""
    out_dir = tmp_path_factory.mktemp("compressed_ddp_4")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "compressed_ddp_fit.py"), str(out_dir), "4"], check=True, env=env, timeout=600
    )
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(4)]


def same(params_a, params_b) -> bool:
    return all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


@pytest.mark.distributed
def test_ranks_hold_identical_parameters_after_every_step(ranks):
    rank0, rank1 = ranks
    for scenario, result in rank0.items():
        if isinstance(result, dict):
            assert result["ranks_agree"] and all(result["ranks_agree"]), scenario
            assert same(result["params"], rank1[scenario]["params"]), scenario
            assert math.isfinite(result["loss"]), scenario


@pytest.mark.distributed
def test_compressor_none_is_exactly_ddp(ranks):
    rank0 = ranks[0]
    assert same(rank0["none"]["params"], rank0["ddp"]["params"])
    assert rank0["none"]["bytes_sent"] == [FP32_BYTES] * 4
    assert rank0["none"]["compression_ratio"] == [1.0] * 4


@pytest.mark.distributed
def test_onebit_adam_before_freeze_step_is_exactly_ddp_with_adamw(ranks):
    rank0 = ranks[0]
    assert same(rank0["onebit_warmup"]["params"], rank0["ddp"]["params"])
    assert rank0["onebit_warmup"]["bytes_sent"] == [FP32_BYTES] * 4


@pytest.mark.distributed
@pytest.mark.parametrize("compressor", sorted(EXPECTED_BYTES))
def test_bytes_sent_and_logged_match_the_tensors_on_the_wire(ranks, compressor):
    for rank in ranks:
        result = rank[compressor]
        assert result["bytes_sent"] == [EXPECTED_BYTES[compressor]] * 3
        assert result["logged_bytes_sent"] == [float(EXPECTED_BYTES[compressor])] * 3
        expected_ratio = FP32_BYTES / EXPECTED_BYTES[compressor]
        assert result["compression_ratio"] == pytest.approx([expected_ratio] * 3)


@pytest.mark.distributed
def test_gradient_accumulation_with_bf16_mixed_communicates_once_per_optimizer_step(ranks):
    # Two optimizer steps of two micro-batches each: one int8 exchange per step, none for the first micro-batch.
    assert ranks[0]["int8_accumulate_bf16"]["bytes_sent"] == [EXPECTED_BYTES["int8"]] * 2


@pytest.mark.distributed
def test_onebit_adam_compresses_momentum_after_freeze_step(ranks):
    bytes_sent = ranks[0]["onebit_adam"]["bytes_sent"]
    assert bytes_sent == [FP32_BYTES] * 2 + [onebit_bytes(NUMEL, 128, 2)] * 4


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", ["onebit_adam", "topk_resume", "powersgd_resume"])
def test_resumed_runs_continue_exactly(ranks, scenario):
    """One epoch, a checkpoint, one more epoch from it == two epochs straight (on both ranks)."""
    for rank in ranks:
        assert same(rank[f"{scenario}_resumed"]["params"], rank[scenario]["params"])


@pytest.mark.distributed
def test_onebit_adam_refuses_other_optimizers_before_training(ranks):
    assert ranks[0]["onebit_sgd_error"] == (
        "1-bit Adam needs exactly one lightning_converge.optim.AdamW optimizer, got ['SGD']"
    )


@pytest.mark.parametrize(
    ("name", "strategy_type", "compressor_type"),
    [
        ("ddp_compressed", CompressedDDPStrategy, Int8Compressor),
        ("ddp_int8", CompressedDDPStrategy, Int8Compressor),
        ("ddp_sign", CompressedDDPStrategy, SignCompressor),
        ("ddp_powersgd", CompressedDDPStrategy, PowerSGDCompressor),
        ("ddp_topk", CompressedDDPStrategy, TopKCompressor),
        ("ddp_fp16", CompressedDDPStrategy, FP16Compressor),
        ("onebit_adam", OneBitAdamStrategy, OneBitCompressor),
    ],
)
def test_strategies_resolve_by_name(name, strategy_type, compressor_type):
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is strategy_type
    assert type(trainer.strategy.compressor) is compressor_type


def test_unknown_strategy_names_raise_at_trainer_construction():
    with pytest.raises(ValueError, match="invalid strategy name"):
        L.Trainer(strategy="ddp_int9", accelerator="cpu", devices=2, logger=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compressor": "int9"}, "unknown compressor 'int9'; choose 'none' or one of"),
        ({"compressor": "int8", "ratio": 0.1}, "the 'int8' compressor has no option 'ratio'"),
        ({"compressor": "int8", "block_size": 3}, "block_size must be an integer >= 8"),
        ({"compressor": "topk", "ratio": 2.0}, "ratio must be a number in (0.0, 1.0]"),
        ({"compressor": "none", "error_feedback": True}, "compressor='none' (plain DDP) takes no options"),
        ({"start_step": -1}, "start_step must be an integer >= 0"),
    ],
)
def test_bad_compressors_and_options_raise_at_construction(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CompressedDDPStrategy(**options)


def test_ddp_arguments_and_compressor_options_are_told_apart():
    strategy = CompressedDDPStrategy(
        "powersgd", rank=4, process_group_backend="gloo", ddp_kwargs={"bucket_cap_mb": 1}
    )
    assert strategy.compressor.rank == 4
    assert strategy.process_group_backend == "gloo"
    assert strategy._ddp_kwargs == {"bucket_cap_mb": 1}


@pytest.mark.distributed
def test_four_ranks_compressor_none_is_ddp_and_every_method_keeps_the_ranks_identical(four_ranks):
    for rank in four_ranks:
        assert same(rank["none"]["params"], rank["ddp"]["params"])
        for name in ("int8", "sign", "powersgd", "onebit", "onebit_adam"):
            assert all(rank[name]["ranks_agree"]), name
            assert same(rank[name]["params"], four_ranks[0][name]["params"]), name
            assert not same(rank[name]["params"], rank["ddp"]["params"]), name  # compression changed something
