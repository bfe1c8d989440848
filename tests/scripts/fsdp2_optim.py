"""Every optimizer rule of this pack on FSDP2 (``fully_shard``, DTensor parameters) against the same rule
under DDP, on 2 gloo processes started here (``torch.multiprocessing``), without Lightning.

``python fsdp2_optim.py OUT_DIR PORT``: for each rule, one model is sharded with ``fully_shard`` and one is
wrapped in ``DistributedDataParallel``, both from the same initial weights; each rank feeds both the same
batches for a few steps. Rank 0 saves, per rule, the full parameters of both and whether every optimizer
state tensor of the sharded run is a DTensor holding only this rank's shard; and a run that freezes a
whole fully_shard group mid-training, against the same freeze on a whole model.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lightning_converge import optim

RULES = {
    "AdamW": lambda params: optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "AdamW_cautious": lambda params: optim.AdamW(params, lr=1e-2, weight_decay=0.1, cautious=True),
    "Adan": lambda params: optim.Adan(params, lr=1e-2, weight_decay=0.1),
    "Lion": lambda params: optim.Lion(params, lr=1e-3, weight_decay=0.1),
    "Lion_cautious": lambda params: optim.Lion(params, lr=1e-3, weight_decay=0.1, cautious=True),
    "AdEMAMix": lambda params: optim.AdEMAMix(params, lr=1e-2, weight_decay=0.1),
    "ADOPT": lambda params: optim.ADOPT(params, lr=1e-2, weight_decay=0.1),
}
STEPS = 4


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # The last Linear's (1, 7) weight leaves rank 1 an empty shard; odd sizes leave uneven shards.
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)
    )


def train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(STEPS):
        x = torch.randn(6, 5, generator=gen)
        loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True).sin())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def shard(net: torch.nn.Module, mesh) -> torch.nn.Module:
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def freeze_whole_group(mesh, rank: int) -> dict:
    """Freeze every parameter of one fully_shard group (the middle Linear) after two steps, as GradES does
    (requires_grad=False, grad=None): against a whole model whose gradients are averaged by hand."""
    whole, sharded = model(), shard(model(), mesh)
    results = {}
    for name, net in (("whole", whole), ("fsdp", sharded)):
        optimizer = optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(10 + rank)
        for step in range(STEPS):
            if step == 2:
                for p in net[2].parameters():
                    p.requires_grad_(False)
                    p.grad = None
            x = torch.randn(6, 5, generator=gen)
            loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True).sin())
            optimizer.zero_grad()
            loss.backward()
            if net is whole:
                for p in net.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= 2
            optimizer.step()
            if step == 1:
                results[f"{name}_at_freeze"] = [full(p) for p in net[2].parameters()]
        results[name] = [full(p) for p in net.parameters()]
    return results


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def run(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for name, make in RULES.items():
        ddp = DistributedDataParallel(model())
        train(ddp, make(ddp.parameters()), rank)
        sharded = shard(model(), mesh)
        optimizer = make(sharded.parameters())
        train(sharded, optimizer, rank)
        states = [(value, p) for p, state in optimizer.state.items() for key, value in state.items() if key != "step"]
        results[name] = {
            "ddp": [p.detach().clone() for p in ddp.module.parameters()],
            "fsdp": [p.full_tensor() for p in sharded.parameters()],
            "state_on_shards": all(
                isinstance(value, DTensor) and value.to_local().shape == p.to_local().shape for value, p in states
            ),
        }
    results["frozen_group"] = freeze_whole_group(mesh, rank)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "optim.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
