"""What every optimizer of this pack shares: state in fp32, hyperparameters as 0-d
tensors, one kernel call per parameter group."""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import Kernel, scalar, validate_backend


def check_lr(lr: float) -> None:
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")


def check_betas(betas: Iterable[float], count: int) -> None:
    betas = tuple(betas)
    if len(betas) != count:
        raise ValueError(f"betas must hold {count} values, got {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")


def check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the pack's optimizers: a ``torch.optim.Optimizer`` whose step is one
    fused kernel call per parameter group.

    Subclasses name their per-parameter ``state_names`` (fp32 tensors shaped like
    the parameter), their ``kernel``, and map a group to the kernel's
    hyperparameters in :meth:`kernel_args`. Parameters without a gradient this
    step are skipped and their state is left untouched.
    """

    kernel: ClassVar[Kernel]
    state_names: ClassVar[tuple[str, ...]]
    # Whether the kernel reads the step count (bias corrections, warm-ups).
    kernel_reads_step: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any], backend: str = "auto") -> None:
        self.backend = validate_backend(backend)
        super().__init__(params, defaults)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """Return (changing hyperparameters, passed as 0-d tensors; static options)."""
        raise NotImplementedError

    def init_state(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """Create the state of a parameter on its first step: zeros unless overridden."""
        for name in self.state_names:
            state[name] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    self.init_state(p, state)
                grads.append(p.grad)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            changing, static = self.kernel_args(group)
            device = params[0].device
            scalars = {name: scalar(value, device) for name, value in changing.items()}
            buffers = [[self.state[p][name] for p in params] for name in self.state_names]
            if self.kernel_reads_step:
                buffers.append(steps)
            type(self).kernel(params, grads, *buffers, backend=self.backend, **scalars, **static)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim casts loaded state to the parameter's dtype; ours stays fp32
        # (bf16 parameters keep fp32 moments), so put the saved values back as fp32.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][name] = value.to(device=p.device, dtype=torch.float32, copy=True)
