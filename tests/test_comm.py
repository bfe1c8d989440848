"""The compressors of lightning_converge.comm in one process (a world of one rank).

Each compressor round-trips within its stated error, error feedback keeps the
sum of what was sent within a bounded residual of the sum of the true
gradients, the bytes counted are the bytes of the payload tensors, state saves
and resumes exactly, and bad names and options raise before anything runs.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from lightning_converge.comm import (
    COMPRESSORS,
    Exchange,
    FlatState,
    Layout,
    FP16Compressor,
    OneBitCompressor,
    PowerSGDCompressor,
    ScaledReduce,
    TernaryCompressor,
    TopKCompressor,
    make_compressor,
    register_compressor,
)

# Odd sizes: a matrix, a vector, a conv-like kernel, a larger matrix (1,336 values).
LAYOUT = Layout(
    ("w1", "b1", "conv", "w2"),
    (torch.Size([33, 17]), torch.Size([17]), torch.Size([5, 3, 2]), torch.Size([20, 37])),
)
# Options that keep these tests small and exact: the reference backend, several blocks per bucket.
OPTIONS = {
    "fp16": {},
    "bf16": {},
    "int8": {"block_size": 64, "backend": "reference"},
    "sign": {"block_size": 64, "backend": "reference"},
    "ternary": {},
    "topk": {"ratio": 0.1},
    "powersgd": {"rank": 2},
    "onebit": {"block_size": 64, "backend": "reference"},
}


def gradient(seed: int, numel: int = LAYOUT.numel) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def round_trip(name: str, grad: torch.Tensor, **options) -> torch.Tensor:
    compressor = make_compressor(name, error_feedback=False, **{**OPTIONS[name], **options})
    return compressor.reduce(grad.clone(), LAYOUT, Exchange())


def test_every_compressor_is_tested():
    assert set(OPTIONS) == set(COMPRESSORS)


@pytest.mark.parametrize(("name", "relative_error"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_casts_round_trip_within_their_precision(name, relative_error):
    grad = gradient(0)
    out = round_trip(name, grad)
    assert ((out - grad).abs() <= relative_error * grad.abs()).all()


def test_int8_round_trips_within_half_a_step_per_block():
    grad = gradient(0)
    grad[:64] = 0.0  # an all-zero block stays zero
    out = round_trip("int8", grad)
    blocks = torch.nn.functional.pad(grad, (0, -grad.numel() % 64)).view(-1, 64)
    half_step = (blocks.abs().amax(1, keepdim=True) / 127 / 2).expand_as(blocks).reshape(-1)[: grad.numel()]
    assert ((out - grad).abs() <= half_step * (1 + 1e-6)).all()
    assert (out[:64] == 0).all()


def test_sign_sends_mean_magnitude_times_sign_per_block():
    grad = gradient(0)
    out = round_trip("sign", grad)
    for start in range(0, grad.numel(), 64):
        block, sent = grad[start : start + 64], out[start : start + 64]
        scale = block.abs().mean()
        torch.testing.assert_close(sent, torch.where(block >= 0, scale, -scale))
        # The stated error: ||x - scale * sign(x)||^2 = ||x||^2 - ||x||_1^2 / n.
        expected = block.square().sum() - block.abs().sum() ** 2 / block.numel()
        torch.testing.assert_close((block - sent).square().sum(), expected, rtol=1e-4, atol=1e-5)


def test_ternary_sends_scaled_ternary_values_and_is_unbiased():
    grad = gradient(0)
    compressor = TernaryCompressor(clip=None)
    exchange = Exchange()
    draws = torch.stack([compressor.reduce(grad.clone(), LAYOUT, exchange) for _ in range(2000)])
    for piece, sent in zip(grad.split(LAYOUT.numels), draws.split(LAYOUT.numels, dim=1)):
        scale = piece.abs().max()
        assert torch.isin(sent, torch.stack([-scale, torch.zeros(()), scale])).all()
        # Each value is scale * Bernoulli(|x| / scale): its mean over 2000 draws is within 5 standard errors.
        standard_error = (piece.abs() * (scale - piece.abs())).sqrt() / math.sqrt(len(draws))
        assert ((sent.mean(0) - piece).abs() <= 5 * standard_error + 1e-6).all()


def test_ternary_clips_to_a_multiple_of_the_standard_deviation():
    grad = gradient(0)
    grad[0] = 100.0  # an outlier in w1
    out = round_trip("ternary", grad, clip=2.5)
    w1 = grad[: LAYOUT.numels[0]]
    assert out[: LAYOUT.numels[0]].abs().max() <= 2.5 * w1.std(correction=0) + 1e-5


def test_topk_sends_the_largest_magnitudes_exactly():
    grad = gradient(0)
    out = round_trip("topk", grad)
    k = math.ceil(0.1 * grad.numel())
    kept = grad.abs().topk(k).indices
    assert out.count_nonzero() == k
    torch.testing.assert_close(out[kept], grad[kept], rtol=0, atol=0)


def test_topk_sparsity_warm_up_falls_geometrically_to_the_ratio():
    compressor = TopKCompressor(ratio=0.01, warmup_steps=4, warmup_ratio=0.25)
    assert [compressor.kept_ratio(step) for step in (0, 4, 10)] == [0.25, 0.01, 0.01]
    assert compressor.kept_ratio(2) == pytest.approx(0.05)


def test_topk_momentum_correction_masks_the_sent_momentum():
    compressor = TopKCompressor(ratio=0.1, momentum=0.9)
    grad = gradient(0)
    out = compressor.reduce(grad.clone(), LAYOUT, Exchange())
    state = compressor.elements.buffers(LAYOUT, grad.device)
    sent = out != 0
    # First step: momentum = grad; where it was sent, momentum and residual are cleared.
    assert (state["momentum"][sent] == 0).all() and (state["residual"][sent] == 0).all()
    torch.testing.assert_close(state["momentum"][~sent], grad[~sent])


def test_topk_local_clipping_bounds_each_tensor_norm():
    grad = gradient(0) * 100
    out = round_trip("topk", grad, ratio=1.0, clip_norm=1.0)  # ratio 1: everything is sent
    for piece in out.split(LAYOUT.numels):
        assert piece.norm() <= 1.0 + 1e-4


def test_powersgd_is_exact_on_low_rank_matrices_and_vectors():
    generator = torch.Generator().manual_seed(0)

    def rank_two(shape: torch.Size) -> torch.Tensor:
        if len(shape) == 1:
            return torch.randn(shape, generator=generator)
        return torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, shape[1:].numel(), generator=generator)

    grad = torch.cat([rank_two(shape).reshape(-1) for shape in LAYOUT.shapes])
    torch.testing.assert_close(round_trip("powersgd", grad), grad, rtol=1e-4, atol=1e-4)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    compressor = PowerSGDCompressor(rank=2, error_feedback=False)
    grad, exchange = gradient(0), Exchange()
    for _ in range(30):  # the same gradient: the warm start runs power iteration
        out = compressor.reduce(grad.clone(), LAYOUT, exchange)
    matrix = grad[-740:].view(20, 37)
    singular_values = torch.linalg.svdvals(matrix)
    best_error = singular_values[2:].square().sum().sqrt()
    assert (out[-740:].view(20, 37) - matrix).norm() <= 1.05 * best_error


def test_onebit_round_trip_is_a_contraction():
    grad = gradient(0)
    out = round_trip("onebit", grad)
    assert (out - grad).norm() < grad.norm()
    assert torch.equal(out.sign(), torch.where(grad >= 0, 1.0, -1.0))  # two sign compressions keep the signs


# Error feedback: with one rank, what was sent over T steps plus the residual is what was given.
FEEDBACK_CASES = {name: OPTIONS[name] for name in ("fp16", "bf16", "int8", "sign", "topk", "powersgd", "onebit")}
FEEDBACK_CASES["ternary"] = {"clip": 1.0}  # error feedback needs a contractive compressor


def total_residual(compressor) -> torch.Tensor:
    residual = compressor.elements.buffers(LAYOUT, torch.device("cpu"))["residual"].clone()
    if isinstance(compressor, OneBitCompressor):  # with one rank, the server error covers the whole buffer
        residual += compressor._server_errors[LAYOUT.names]
    return residual


@pytest.mark.parametrize("name", sorted(FEEDBACK_CASES))
def test_error_feedback_tracks_the_accumulated_gradient(name):
    compressor = make_compressor(name, error_feedback=True, **FEEDBACK_CASES[name])
    exchange = Exchange()
    given = torch.zeros(LAYOUT.numel)
    sent = torch.zeros(LAYOUT.numel)
    largest = 0.0
    for step in range(60):
        grad = gradient(step) + 0.3  # a persistent direction, which compression must not lose
        given += grad
        sent += compressor.reduce(grad.clone(), LAYOUT, exchange, step)
        largest = max(largest, grad.norm().item())
    residual = total_residual(compressor)
    torch.testing.assert_close(given - sent, residual, rtol=1e-4, atol=1e-3)
    assert residual.norm() <= 10 * largest


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_bytes_counted_are_the_payload_sizes(name):
    compressor = make_compressor(name, **OPTIONS[name])
    exchange = Exchange()
    compressor.reduce(gradient(0), LAYOUT, exchange)
    n = LAYOUT.numel
    matrices = [(33, 17), (5, 6), (20, 37)]  # conv viewed as 5 x 6; rank 2 compresses all three
    expected = {
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": n + 4 * math.ceil(n / 64),
        "sign": math.ceil(n / 8) + 4 * math.ceil(n / 64),
        "ternary": math.ceil(n / 4) + 4 * len(LAYOUT.shapes),
        "topk": 8 * math.ceil(0.1 * n),
        "powersgd": 4 * (sum(2 * (rows + cols) for rows, cols in matrices) + 17),
        # one rank serves the whole buffer: an all-to-all and an all-gather of its signs and scales
        "onebit": 2 * (math.ceil(n / 64) * 64 // 8 + 4 * math.ceil(n / 64)),
    }[name]
    stats = exchange.take_stats()
    assert stats.bytes_sent == expected
    assert exchange.take_stats().bytes_sent == 0


def test_exchange_counts_collectives_by_their_tensor_sizes():
    exchange = Exchange()
    exchange.all_reduce([torch.zeros(10), torch.zeros(3)])
    gathered = exchange.all_gather([torch.zeros(5, dtype=torch.int8), torch.ones(2)])
    exchange.count_uncompressed(torch.zeros(100))
    stats = exchange.take_stats()
    assert (stats.bytes_sent, stats.bytes_received, stats.uncompressed_bytes) == (52 + 13, 52 + 13, 400)
    assert stats.compression_ratio == pytest.approx(400 / 65)
    assert torch.equal(gathered[0][1], torch.ones(2))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_state_saves_and_resumes_exactly(name):
    options = {**OPTIONS[name], **({"error_feedback": True, "clip": 1.0} if name == "ternary" else {})}
    if name == "topk":
        options["momentum"] = 0.9
    original = make_compressor(name, **options)
    for step in range(3):
        original.reduce(gradient(step), LAYOUT, Exchange(), step)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_compressor(name, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3, 5):
        expected = original.reduce(gradient(step), LAYOUT, Exchange(), step)
        assert torch.equal(resumed.reduce(gradient(step), LAYOUT, Exchange(), step), expected)


def test_flat_state_survives_regrouping_and_saving():
    state = FlatState(["residual"])
    first = Layout(("a", "b", "c"), (torch.Size([2]), torch.Size([3]), torch.Size([1])))
    state.buffers(first, torch.device("cpu"))["residual"].copy_(torch.arange(6.0))
    # DDP regroups: c and a in one bucket, b in another.
    regrouped = state.buffers(Layout(("c", "a"), (torch.Size([1]), torch.Size([2]))), torch.device("cpu"))
    assert regrouped["residual"].tolist() == [5.0, 0.0, 1.0]
    saved = state.state_dict()
    assert saved["residual"]["b"].tolist() == [2.0, 3.0, 4.0]
    restored = FlatState(["residual"])
    restored.load_state_dict(saved)
    assert restored.buffers(first, torch.device("cpu"))["residual"].tolist() == list(range(6))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("int9", {}, "unknown compressor 'int9'"),
        ("int8", {"block_size": 100}, "power of two"),
        ("sign", {"block_size": 4}, "block_size must be an integer >= 8"),
        ("topk", {"ratio": 0.0}, "ratio must be a number in (0.0, 1.0]"),
        ("topk", {"momentum": 1.0}, "momentum must be a number in [0.0, 1.0)"),
        ("topk", {"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ("topk", {"clip_norm": -1.0}, "clip_norm must be a number"),
        ("powersgd", {"rank": 0}, "rank must be an integer >= 1"),
        ("ternary", {"clip": 0.0}, "clip must be a number"),
        ("fp16", {"error_feedback": "yes"}, "error_feedback must be True or False"),
        ("onebit", {"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_names_and_options_raise_value_errors(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_compressor(name, **options)


def test_unknown_options_are_named_with_the_closest_valid_one():
    message = "the 'int8' compressor got unknown option 'blocksize' (did you mean 'block_size'?)"
    with pytest.raises(TypeError, match=re.escape(message)):
        make_compressor("int8", blocksize=128)


class HalfCast(FP16Compressor):
    """A user's compressor: fp16 on the wire, without error feedback by default."""

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)


def test_a_registered_compressor_is_usable_by_name_in_every_strategy():
    from lightning_converge.strategies import CompressedDDPStrategy, DiLoCoStrategy

    register_compressor("halfcast", HalfCast)
    try:
        assert type(make_compressor("halfcast")) is HalfCast
        assert type(CompressedDDPStrategy("halfcast").compressor) is HalfCast
        assert type(DiLoCoStrategy(compressor="halfcast")._exchange.compressor) is HalfCast
        with pytest.raises(ValueError, match="taken by HalfCast; pass override=True"):
            register_compressor("halfcast", FP16Compressor)
        with pytest.raises(TypeError, match="subclass of lightning_converge.comm.Compressor"):
            register_compressor("dict", dict)
        with pytest.raises(ValueError, match="other than 'none'"):
            register_compressor("none", HalfCast)
    finally:
        COMPRESSORS.pop("halfcast")


SCALAR_LAYOUT = Layout(LAYOUT.names + ("gain",), LAYOUT.shapes + (torch.Size([]),))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_scalar_parameter_is_sent_by_every_compressor(name):
    """A 0-d tensor has no spread (TernGrad clipped it to 0): its value must get through, over steps."""
    compressor = make_compressor(name, **OPTIONS[name])
    steps, sent = 20, 0.0
    for step in range(steps):
        grad = torch.cat([gradient(step), torch.tensor([0.5])])
        sent += float(compressor.reduce(grad, SCALAR_LAYOUT, Exchange(), step)[-1])
    # Everything sent eventually with error feedback (up to a residual of a few steps); exactly without it.
    assert 0.25 * steps < sent <= 0.5 * steps + 2.0


def test_ternary_sends_a_constant_tensor_exactly():
    layout = Layout(("constant",), (torch.Size([50]),))
    out = TernaryCompressor().reduce(torch.full((50,), -0.25), layout, Exchange())
    assert torch.equal(out, torch.full((50,), -0.25))


def test_a_flag_rides_with_the_next_collective_and_counts_its_bytes():
    exchange = Exchange()
    exchange.carry_flag(torch.tensor(True))
    exchange.all_reduce([torch.zeros(3, dtype=torch.float16)])
    assert bool(exchange.flag_on_every_rank()) and exchange.take_stats().bytes_sent == 2 * 4
    exchange.carry_flag(torch.tensor(False))
    gathered = exchange.all_gather([torch.arange(5, dtype=torch.int8)])
    assert not bool(exchange.flag_on_every_rank()) and exchange.take_stats().bytes_sent == 5 + 1
    assert gathered[0][0].tolist() == list(range(5))
    exchange.carry_flag(torch.tensor(True))
    received = exchange.all_to_all([torch.ones(1, 4)])
    assert bool(exchange.flag_on_every_rank()) and exchange.take_stats().bytes_sent == 4 * 4 + 1
    assert received[0][0].tolist() == [1.0] * 4
    exchange.carry_flag(torch.tensor(False))  # no collective carried it: it goes on its own
    assert not bool(exchange.flag_on_every_rank()) and exchange.take_stats().bytes_sent == 4


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_scaled_reduce_works_in_unscaled_units_and_overflow_steps_leave_no_trace(name):
    """Loss-scaled gradients with overflow steps between, against the same compressor fed the unscaled
    finite gradients only: the same averages (times the scale) and the same state, bit for bit."""
    options = {**OPTIONS[name], **({"error_feedback": True, "clip": 1.0} if name == "ternary" else {})}
    scaled, plain = make_compressor(name, **options), make_compressor(name, **options)
    reducer = ScaledReduce(scaled)
    # The scale changes between steps, as a GradScaler's does (powers of two: the division is exact).
    schedule = [(2.0**10, None), (2.0**11, math.inf), (2.0**10, math.nan), (2.0**9, None), (2.0**12, None)]
    for step, (scale, bad_value) in enumerate(schedule):
        grad = gradient(step)
        scaled_grad = grad * scale
        if bad_value is not None:
            scaled_grad[100] = bad_value
        out = reducer.reduce(scaled_grad, LAYOUT, Exchange(), step, scale)
        assert reducer.finish_step() == (bad_value is None)
        if bad_value is not None:
            assert out.isnan().all()  # the scaler sees the overflow and skips the step
            continue
        expected = plain.reduce(grad.clone(), LAYOUT, Exchange(), step)
        assert torch.equal(out / scale, expected)
    for (key, a), (_, b) in zip(_flat_items(scaled.state_dict()), _flat_items(plain.state_dict()), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


def _flat_items(value, prefix=""):
    """(path, leaf) pairs of a nested state dict, in a stable order."""
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in _flat_items(value[key], f"{prefix}/{key}")]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _flat_items(v, f"{prefix}/{i}")]
    return [(prefix, value)]
