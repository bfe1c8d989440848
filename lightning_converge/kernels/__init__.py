"""Every fused pass over parameters, gradients or optimizer state, written once.

Each name below is a :class:`~lightning_converge.kernels.dispatch.Kernel`: call it
with ``backend="auto" | "reference" | "compiled" | "triton"``. ``"auto"`` runs triton
on CUDA and elsewhere compiles a pass only once compiling it pays
(:meth:`~lightning_converge.kernels.dispatch.Kernel.calls_before_compiling`).
"""

from lightning_converge.kernels.adamw import adamw
from lightning_converge.kernels.ademamix import ademamix
from lightning_converge.kernels.adan import adan
from lightning_converge.kernels.adopt import adopt
from lightning_converge.kernels.diloco import diloco_outer_step
from lightning_converge.kernels.dispatch import BACKENDS, Kernel, resolve_backend, scalar
from lightning_converge.kernels.ema import ema_update
from lightning_converge.kernels.finite import all_finite
from lightning_converge.kernels.grokfast import grokfast_ema
from lightning_converge.kernels.int8_quantize import int8_quantize
from lightning_converge.kernels.lion import lion
from lightning_converge.kernels.muon import muon_apply, muon_momentum, newton_schulz
from lightning_converge.kernels.onebit_adam import onebit_adam_update
from lightning_converge.kernels.schedule_free import schedule_free_adamw, schedule_free_sgd
from lightning_converge.kernels.sign_quantize import sign_quantize

__all__ = [
    "BACKENDS",
    "Kernel",
    "resolve_backend",
    "scalar",
    "adamw",
    "ademamix",
    "adan",
    "adopt",
    "all_finite",
    "diloco_outer_step",
    "ema_update",
    "grokfast_ema",
    "int8_quantize",
    "lion",
    "muon_apply",
    "muon_momentum",
    "newton_schulz",
    "onebit_adam_update",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "sign_quantize",
]
