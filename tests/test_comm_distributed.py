"""The exchange of the blockwise compressors (int8, sign, onebit) on 2 and 4 gloo processes.

Each rank reduces a few steps of its own gradients; the test then computes, in one
process and with the quantizers written out here, what the exchange must give. In
two phases (4 ranks; onebit on 2 too): every rank's payload decoded, cut into one
chunk per rank, averaged per chunk and quantized again with the chunk owner's
server error. All-gathered (int8 and sign on 2 ranks): the average of every rank's
decoded payload. It also counts the bytes the collectives return (by wrapping
torch.distributed's functions, not from the Exchange's own counts): about two
payloads per rank, whatever the number of ranks.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_converge.comm import Exchange, Layout, ScaledReduce, make_compressor

# Odd sizes; the second layout is smaller than 4 blocks, so with 4 ranks some chunks are empty.
LAYOUTS = {
    "large": Layout(("w", "b", "v"), (torch.Size([33, 17]), torch.Size([17]), torch.Size([301]))),
    "small": Layout(("w", "b"), (torch.Size([9, 11]), torch.Size([3]))),
}
BLOCK = 64
STEPS = 3
COMPRESSORS = ("int8", "sign", "onebit")
# The smallest number of ranks each averages in two phases (below it: an all-gather).
TWO_PHASE_FROM = {"int8": 3, "sign": 3, "onebit": 1}


def gradient(rank: int, step: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + rank)) + 0.3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One of 4 processes: the scenarios on ranks 0 and 1 (a group of two), then on all four."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    pair = dist.new_group([0, 1])  # every rank takes part in making it
    received_by_collectives = [0]

    def counting(collective):
        def run(output, *args, **kwargs):
            received_by_collectives[0] += output.numel() * output.element_size()
            return collective(output, *args, **kwargs)

        return run

    # Exchange looks the collectives up when it calls them, so wrapping them here counts what it receives.
    dist.all_to_all_single = counting(dist.all_to_all_single)
    dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor)
    out = {}
    for world_size, group in ((2, pair), (4, None)):
        if rank >= world_size:
            continue
        for name in COMPRESSORS:
            for layout_name, layout in LAYOUTS.items():
                compressor = make_compressor(name, block_size=BLOCK, backend="reference")
                exchange = Exchange(group)
                averages, received = [], []
                for step in range(STEPS):
                    received_by_collectives[0] = 0
                    averages.append(compressor.reduce(gradient(rank, step, layout.numel), layout, exchange, step))
                    stats = exchange.take_stats()
                    received.append((stats.bytes_received, received_by_collectives[0]))
                out[world_size, name, layout_name] = {"averages": averages, "received": received}
            out[world_size, name, "overflow"] = _overflow_steps(name, rank, world_size, group)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _overflow_steps(name: str, rank: int, world_size: int, group) -> list[tuple[bool, bool, bool]]:
    """fp16 AMP: loss-scaled gradients, the last rank's holding an inf at step 1. Per step: (finite_step,
    all NaN, equal to the same compressor fed the unscaled finite steps only)."""
    layout = LAYOUTS["large"]
    scaled, plain = (make_compressor(name, block_size=BLOCK, backend="reference") for _ in range(2))
    reducer, exchange, scale = ScaledReduce(scaled), Exchange(group), 2.0**10
    steps = []
    for step in range(STEPS):
        grad = gradient(rank, step, layout.numel)
        scaled_grad = grad * scale
        if step == 1 and rank == world_size - 1:
            scaled_grad[5] = math.inf
        average = reducer.reduce(scaled_grad, layout, exchange, step, scale)
        finite = reducer.finish_step()
        same = finite and torch.equal(average / scale, plain.reduce(grad.clone(), layout, exchange, step))
        steps.append((finite, bool(average.isnan().all()), same))
    return steps


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    """Every rank's results, from one launch of 4 processes."""
    out_dir = tmp_path_factory.mktemp("comm_distributed")
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=4, start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(4)]


@pytest.fixture(params=[2, 4], ids=["2_ranks", "4_ranks"])
def world(request, four_processes):
    """(world size, the results of its ranks under that world size)."""
    world_size = request.param
    return world_size, [
        {key[1:]: value for key, value in rank.items() if key[0] == world_size} for rank in four_processes[:world_size]
    ]


# The quantizers, written out: (payload, decoded values) of x, blockwise.
def int8_round_trip(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale > 0, scale, 1.0))
    return [q.view(-1)[: x.numel()].to(torch.int8), scale.view(-1)], (q * scale).view(-1)[: x.numel()]


def sign_round_trip(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    padded = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK))
    counts = torch.full((padded.numel() // BLOCK, 1), float(BLOCK))
    counts[-1] = x.numel() - (counts.numel() - 1) * BLOCK  # the last block may be short
    scale = padded.view(-1, BLOCK).abs().sum(dim=1, keepdim=True) / counts
    signs = torch.where(padded.view(-1, BLOCK) >= 0, 1.0, -1.0)
    packed_bytes = math.ceil(x.numel() / 8)
    return [torch.empty(packed_bytes, dtype=torch.uint8), scale.view(-1)], (signs * scale).view(-1)[: x.numel()]


ROUND_TRIPS = {"int8": int8_round_trip, "sign": sign_round_trip, "onebit": sign_round_trip}


def expected_averages(name: str, layout: Layout, world_size: int) -> list[torch.Tensor]:
    """Every rank's values (+ its residual) quantized and decoded; in two phases, each chunk of whole blocks
    averaged over the ranks and quantized again (+ its owner's server error), the chunks put back together;
    else the decoded values averaged."""
    round_trip, numel = ROUND_TRIPS[name], layout.numel
    two_phase = world_size >= TWO_PHASE_FROM[name]
    chunk = math.ceil(math.ceil(numel / BLOCK) / world_size) * BLOCK
    bounds = [(min(r * chunk, numel), min((r + 1) * chunk, numel)) for r in range(world_size)]
    residuals = [torch.zeros(numel) for _ in range(world_size)]
    server_errors = [torch.zeros(end - start) for start, end in bounds]
    averages = []
    for step in range(STEPS):
        decoded = []
        for rank in range(world_size):
            x = gradient(rank, step, numel) + residuals[rank]
            decoded.append(round_trip(x)[1])
            residuals[rank] = x - decoded[-1]
        if not two_phase:
            averages.append(sum(decoded) / world_size)
            continue
        pieces = []
        for owner, (start, end) in enumerate(bounds):
            y = sum(d[start:end] for d in decoded) / world_size + server_errors[owner]
            piece = round_trip(y)[1] if end > start else y
            server_errors[owner] = y - piece
            pieces.append(piece)
        averages.append(torch.cat(pieces))
    return averages


def payload_bytes(name: str, numel: int) -> int:
    payload, _ = ROUND_TRIPS[name](torch.zeros(numel))
    return sum(t.numel() * t.element_size() for t in payload)


@pytest.mark.distributed
@pytest.mark.parametrize("name", COMPRESSORS)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_two_phase_average_equals_the_chunked_average_written_out(world, name, layout_name):
    world_size, ranks = world
    expected = expected_averages(name, LAYOUTS[layout_name], world_size)
    for rank in ranks:
        for got, want in zip(rank[name, layout_name]["averages"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # every rank decodes the same bytes: the same average, bit for bit
    for rank in ranks[1:]:
        for got, first in zip(rank[name, layout_name]["averages"], ranks[0][name, layout_name]["averages"]):
            assert torch.equal(got, first)


@pytest.mark.distributed
@pytest.mark.parametrize("name", COMPRESSORS)
def test_each_rank_receives_about_two_payloads_whatever_the_number_of_ranks(world, name):
    world_size, ranks = world
    numel = LAYOUTS["large"].numel
    if world_size >= TWO_PHASE_FROM[name]:  # an all-to-all: its chunk from every rank; an all-gather: every chunk
        chunk = math.ceil(math.ceil(numel / BLOCK) / world_size) * BLOCK
        expected = 2 * world_size * payload_bytes(name, chunk)
    else:  # an all-gather of every rank's payload
        expected = world_size * payload_bytes(name, numel)
    # O(numel): two payloads, and at most a padded block more per rank and phase
    assert expected <= 2 * payload_bytes(name, numel) + 2 * world_size * payload_bytes(name, BLOCK)
    for rank in ranks:
        for counted, by_collectives in rank[name, "large"]["received"]:
            assert counted == by_collectives == expected


@pytest.mark.distributed
@pytest.mark.parametrize("name", COMPRESSORS)
def test_an_overflow_on_one_rank_is_seen_by_every_rank_and_leaves_no_trace(world, name):
    """The finite flag rides with the first collective (the all-to-all in two phases): every rank skips the
    step, and the steps after it equal a compressor that never saw it."""
    _, ranks = world
    for rank in ranks:
        assert rank[name, "overflow"] == [(True, False, True), (False, True, False), (True, False, True)]
