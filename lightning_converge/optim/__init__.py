"""``torch.optim.Optimizer`` classes built on the fused kernels of :mod:`lightning_converge.kernels`."""

from lightning_converge.optim.adamw import AdamW
from lightning_converge.optim.ademamix import AdEMAMix
from lightning_converge.optim.adan import Adan
from lightning_converge.optim.adopt import ADOPT
from lightning_converge.optim.base import FusedOptimizer
from lightning_converge.optim.lion import Lion
from lightning_converge.optim.muon import Muon, muon_parameter_groups
from lightning_converge.optim.schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD

__all__ = [
    "ADOPT",
    "AdEMAMix",
    "Adan",
    "AdamW",
    "FusedOptimizer",
    "Lion",
    "Muon",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "muon_parameter_groups",
]
