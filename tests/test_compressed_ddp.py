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


def chunked_bytes(numel: int, block_size: int, world_size: int, bits: int) -> tuple[int, int]:
    """Bytes sent and received by the two-phase exchange (ChunkedCompressor) of ``bits`` per value and
    an fp32 scale per block: an all-to-all of every rank's chunk, then an all-gather of the reduced one."""
    blocks_per_chunk = math.ceil(math.ceil(numel / block_size) / world_size)
    chunk_bytes = blocks_per_chunk * block_size * bits // 8 + 4 * blocks_per_chunk
    return (world_size + 1) * chunk_bytes, 2 * world_size * chunk_bytes


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
    "onebit": chunked_bytes(NUMEL, 128, 2, bits=1)[0],
}


# What each rank receives: the sum of an all-reduce, every rank's payload of an all-gather (int8 and
# sign all-gather on two ranks: ChunkedCompressor.two_phase_from).
EXPECTED_RECEIVED_BYTES = {
    **{name: EXPECTED_BYTES[name] for name in ("fp16", "bf16", "powersgd")},
    **{name: 2 * EXPECTED_BYTES[name] for name in ("int8", "sign", "ternary", "topk")},
    "onebit": chunked_bytes(NUMEL, 128, 2, bits=1)[1],
}


def launch(out_dir: Path, *mode: str) -> list[dict]:
    """Run the scenario script on its ranks (Lightning starts the others); each rank's results."""
    # The reference backend: the compiled kernels are tested on their own, compiling here would only cost time.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LIGHTNING_CONVERGE_BACKEND": "reference"}
    subprocess.run(
        [sys.executable, str(SCRIPTS / "compressed_ddp_fit.py"), str(out_dir), *mode], check=True, env=env, timeout=600
    )
    return [torch.load(path) for path in sorted(out_dir.glob("rank*.pt"))]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results: scenario -> params, per-step bytes and agreement, final loss."""
    return launch(tmp_path_factory.mktemp("compressed_ddp"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The four-rank scenarios' results, rank by rank."""
    return launch(tmp_path_factory.mktemp("compressed_ddp_4"), "4")


@pytest.fixture(scope="module")
def hardening(tmp_path_factory):
    """Both ranks' results of the fp16-AMP, scalar-parameter, small-bucket, manual-optimization and
    unused-parameter scenarios (every strategy with a 60 s process-group timeout: a hang fails fast)."""
    return launch(tmp_path_factory.mktemp("compressed_ddp_hardening"), "hardening")


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
@pytest.mark.parametrize("compressor", sorted(EXPECTED_BYTES))
def test_bytes_received_and_the_totals_are_logged_per_step(ranks, compressor):
    for rank in ranks:
        result = rank[compressor]
        sent, received = EXPECTED_BYTES[compressor], EXPECTED_RECEIVED_BYTES[compressor]
        assert result["logged_bytes_received"] == [float(received)] * 3
        assert result["logged_bytes_sent_total"] == [float(sent * step) for step in (1, 2, 3)]
        assert result["logged_bytes_received_total"] == [float(received * step) for step in (1, 2, 3)]


@pytest.mark.distributed
def test_byte_totals_continue_across_a_resume(ranks):
    straight, resumed = ranks[0]["topk_resume"], ranks[0]["topk_resume_resumed"]
    assert resumed["logged_bytes_sent_total"] == straight["logged_bytes_sent_total"][3:]


@pytest.mark.distributed
def test_gradient_accumulation_with_bf16_mixed_communicates_once_per_optimizer_step(ranks):
    # Two optimizer steps of two micro-batches each: one int8 exchange per step, none for the first micro-batch.
    assert ranks[0]["int8_accumulate_bf16"]["bytes_sent"] == [EXPECTED_BYTES["int8"]] * 2


@pytest.mark.distributed
def test_onebit_adam_compresses_momentum_after_freeze_step(ranks):
    bytes_sent = ranks[0]["onebit_adam"]["bytes_sent"]
    assert bytes_sent == [FP32_BYTES] * 2 + [chunked_bytes(NUMEL, 128, 2, bits=1)[0]] * 4


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
    ("options", "error", "message"),
    [
        ({"compressor": "int9"}, ValueError, "compressor must be 'none', a name from ["),
        ({"compressor": "int8", "block_size": 64}, TypeError,
         "'block_size' is an option of the compressor, not of CompressedDDPStrategy: pass "
         "compressor=Int8Compressor(block_size=64) (YAML: compressor: {class_path: "
         "lightning_converge.comm.Int8Compressor, init_args: {block_size: 64}})"),
        ({"compressor": "powersgd", "rank": 4, "error_feedback": False}, TypeError,
         "'rank', 'error_feedback' are options of the compressor, not of CompressedDDPStrategy: pass "
         "compressor=PowerSGDCompressor(rank=4, error_feedback=False)"),
        ({"compressor": "none", "error_feedback": True}, TypeError,
         "compressor='none' (plain DDP) takes no compressor options, got ['error_feedback']"),
        ({"find_unused_parameters": True}, TypeError,
         "CompressedDDPStrategy: 'find_unused_parameters' is an option of the DistributedDataParallel wrapper; "
         "pass ddp_kwargs={'find_unused_parameters': True}"),
        ({"start_stpe": 3}, TypeError,
         "CompressedDDPStrategy got unknown option 'start_stpe' (did you mean 'start_step'?)"),
        ({"start_step": -1}, ValueError, "start_step must be an integer >= 0"),
    ],
)
def test_bad_compressors_and_options_raise_at_construction(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        CompressedDDPStrategy(**options)


def test_compressor_instances_ddp_arguments_and_ddp_kwargs_each_go_their_way():
    compressor = PowerSGDCompressor(rank=4)
    strategy = CompressedDDPStrategy(compressor, process_group_backend="gloo", ddp_kwargs={"bucket_cap_mb": 1})
    assert strategy.compressor is compressor
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


@pytest.mark.distributed
@pytest.mark.parametrize("name, block_size, bits", [("int8", 256, 8), ("sign", 128, 1), ("onebit", 128, 1)])
def test_four_ranks_blockwise_compressors_receive_two_payloads_not_four(four_ranks, name, block_size, bits):
    sent, received = chunked_bytes(NUMEL, block_size, 4, bits)
    all_gathered = 4 * EXPECTED_BYTES[name] if name != "onebit" else None  # what an all-gather would receive
    for rank in four_ranks:
        assert rank[name]["bytes_sent"] == [sent] * 3
        assert rank[name]["logged_bytes_received"] == [float(received)] * 3
        # fewer, even for this small bucket, whose 4 chunks of whole blocks carry padding
        assert all_gathered is None or received < all_gathered


AMP_METHODS = ["none", *sorted(EXPECTED_BYTES)]


@pytest.mark.distributed
@pytest.mark.parametrize("method", AMP_METHODS)
def test_fp16_amp_overflow_steps_do_not_stop_any_compressor(hardening, method):
    """A GradScaler from 2**40 overflows for ~27 steps; every compressor then trains, as plain DDP does."""
    ddp = hardening[0]["amp/ddp"]
    for rank in hardening:
        result = rank[f"amp/{method}"]
        assert all(result["ranks_agree"]) and same(result["params"], hardening[0][f"amp/{method}"]["params"])
        assert math.isfinite(result["loss"])
        for name, before, after in zip(result["names"], result["initial_params"], result["params"], strict=True):
            assert not torch.equal(before, after), name
        # The scaler skipped the same steps and recovered to the same scale as under plain DDP.
        assert result["scale"] == ddp["scale"] == 2.0**16


@pytest.mark.distributed
def test_fp16_amp_with_exact_compression_is_plain_ddp(hardening):
    ddp, none, fp16 = (hardening[0][f"amp/{name}"] for name in ("ddp", "none", "fp16"))
    assert same(none["params"], ddp["params"])
    for actual, expected in zip(fp16["params"], ddp["params"], strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=5e-4)


@pytest.mark.distributed
def test_onebit_adam_refuses_a_gradient_scaler_before_training(hardening):
    assert hardening[0]["onebit_scaler_error"] == (
        "OneBitAdamStrategy does not support a gradient scaler (precision='16-mixed'); use 'bf16-mixed'"
    )


@pytest.mark.distributed
@pytest.mark.parametrize("compressor", sorted(EXPECTED_BYTES))
def test_a_scalar_parameter_trains_under_every_compressor(hardening, compressor):
    for rank in hardening:
        result = rank[f"scalar/{compressor}"]
        assert result["names"][0] == "gain" and result["initial_params"][0].dim() == 0
        # Not just AdamW's weight decay (all a gain whose gradient never arrives would get): Adam steps of ~lr.
        lr, weight_decay = result["hyperparameters"]["lr"], result["hyperparameters"]["weight_decay"]
        decayed_only = result["initial_params"][0] * (1 - lr * weight_decay) ** len(result["ranks_agree"])
        assert abs(float(result["params"][0] - decayed_only)) > 0.1 * lr
        assert all(result["ranks_agree"])


@pytest.mark.distributed
def test_onebit_adam_with_a_bucket_smaller_than_one_block_trains_past_freeze_step(hardening):
    """7 parameters, blocks of 1024, 2 ranks: the second rank's chunk of the 1-bit all-reduce is empty."""
    for rank in hardening:
        result = rank["onebit_tiny"]
        assert result["bytes_sent"] == [4 * 7] * 2 + [chunked_bytes(7, 1024, 2, bits=1)[0]] * 3
        assert all(result["ranks_agree"]) and math.isfinite(result["loss"])
        assert not same(result["params"], result["initial_params"])


@pytest.mark.distributed
def test_onebit_adam_under_manual_optimization_takes_the_same_steps_as_automatic(hardening):
    for rank in hardening:
        manual, automatic = rank["onebit_manual"], rank["onebit_automatic"]
        assert manual["bytes_sent"] == automatic["bytes_sent"]  # 2 steps of warm-up, 4 compressed
        assert same(manual["params"], automatic["params"])
        assert not same(manual["params"], manual["initial_params"])


@pytest.mark.distributed
def test_onebit_adam_trains_a_parameter_whose_first_gradient_comes_after_freeze_step(hardening):
    """``late`` joins at step 4 of 8 (freeze_step 2): two steps of its own warm-up, then two compressed."""
    for rank in hardening:
        result = rank["onebit_late"]
        assert result["names"][0] == "late" and result["find_unused_parameters"] is True
        assert not torch.equal(result["params"][0], result["initial_params"][0])
        assert all(result["ranks_agree"])
        state = result["late_state"]
        assert float(state["step"]) == 4 and float(state["variance_step"]) == 2


@pytest.mark.distributed
def test_ddp_kwargs_reach_distributed_data_parallel(hardening):
    """find_unused_parameters=True through ddp_kwargs: a model with a parameter it never uses trains."""
    for rank in hardening:
        result = rank["int8_unused"]
        assert result["find_unused_parameters"] is True
        assert result["names"][0] == "unused" and torch.equal(result["params"][0], result["initial_params"][0])
        assert not same(result["params"][1:], result["initial_params"][1:])
        assert all(result["ranks_agree"])
