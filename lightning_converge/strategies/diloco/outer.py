"""The outer loop's state: the global parameters, the pseudo-gradients that move them and the outer optimizer.

A worker's *pseudo-gradient* is where its inner phase started minus where it
ended (:func:`pseudo_gradient`). :class:`OuterState` holds the global parameters
(an fp32 copy, on ``outer_state_device``, CPU by default) and applies an averaged
pseudo-gradient to any part of them with the outer optimizer: a built-in one
(:data:`BUILT_IN_OUTER_OPTIMIZERS`, SGD with Nesterov or heavy-ball momentum, run
by the fused :func:`~lightning_converge.kernels.diloco_outer_step` kernel), or a
``torch.optim.Optimizer`` built by a callable over the global parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from lightning.fabric.accelerators.cuda import num_cuda_devices
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.checks import check_in_range, is_number
from lightning_converge.kernels import diloco_outer_step, scalar
from lightning_converge.schedules import Schedule
from lightning_converge.strategies.diloco.fragments import Piece, pieces_of

OuterOptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]

# Built-in outer optimizers, run by the fused ``diloco_outer_step`` kernel: name -> nesterov.
BUILT_IN_OUTER_OPTIMIZERS = {"nesterov": True, "sgd": False}


def check_outer_options(
    outer_optimizer: Union[str, OuterOptimizerFactory], outer_lr: Union[float, Schedule], outer_momentum: float
) -> None:
    """Raise, naming the argument and what it may be, if an outer-optimizer option is invalid."""
    if isinstance(outer_optimizer, str):
        if outer_optimizer not in BUILT_IN_OUTER_OPTIMIZERS:
            raise ValueError(
                f"outer_optimizer must be one of {sorted(BUILT_IN_OUTER_OPTIMIZERS)} or a callable "
                f"params -> torch.optim.Optimizer, got {outer_optimizer!r}"
            )
    elif not callable(outer_optimizer):
        raise TypeError(
            f"outer_optimizer must be a name or a callable params -> torch.optim.Optimizer, got {outer_optimizer!r}"
        )
    check_in_range("outer_momentum", outer_momentum, 0, 1, high_open=True)
    if is_number(outer_lr):  # a schedule's values are the user's
        check_in_range("outer_lr", outer_lr, 0, low_open=True)


def available_device(device: Union[str, torch.device], option: str) -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError naming ``option`` if it is malformed or absent here.

    CUDA is counted without initializing it (as Lightning does), so a later fork stays safe.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{option} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if device.type == "cuda":
        count = num_cuda_devices()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{option}={str(device)!r}, but this machine has {count} CUDA devices")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
        if module is not None and hasattr(module, "is_available") and not module.is_available():
            raise ValueError(f"{option}={str(device)!r}, but no {device.type} device is available here")
    return device


def pseudo_gradient(origin: Sequence[Tensor], local: Sequence[Tensor]) -> Tensor:
    """``origin - local`` (where an inner phase started minus where it ended), flat fp32 on the local
    parameters' device: what the workers average."""
    return torch.cat([(start.to(end.device) - end.float()).reshape(-1) for start, end in zip(origin, local)])


class OuterState:
    """The global parameters and the outer optimizer that moves them, one outer step per averaged
    pseudo-gradient.

    Args:
        params: the model's parameters, in ``module.parameters()`` order; the global parameters start
            as fp32 copies of them on ``device``.
        outer_optimizer: a name from :data:`BUILT_IN_OUTER_OPTIMIZERS`, or a callable taking the global
            parameters and returning a ``torch.optim.Optimizer`` (which owns its hyperparameters).
        outer_lr, outer_momentum: the built-in optimizers' learning rate (a schedule of the inner step)
            and momentum.
        device: where the global parameters and the outer optimizer's state live.
        backend: backend of the fused outer-step kernel.
        steps: outer steps already taken.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        outer_optimizer: Union[str, OuterOptimizerFactory],
        outer_lr: Schedule,
        outer_momentum: float,
        device: torch.device,
        backend: str,
        steps: int = 0,
    ) -> None:
        self.device = device
        self.params = [p.detach().to(device, torch.float32, copy=True) for p in params]
        # Outer updates applied so far.
        self.steps = steps
        self._lr = outer_lr
        self._momentum = outer_momentum
        self._backend = backend
        self.optimizer: Optional[Optimizer] = None
        self.momentum_buffers: list[Tensor] = []
        if isinstance(outer_optimizer, str):
            self._nesterov = BUILT_IN_OUTER_OPTIMIZERS[outer_optimizer]
            self.momentum_buffers = [torch.zeros_like(g) for g in self.params]
        else:
            self.optimizer = outer_optimizer(self.params)
            if not isinstance(self.optimizer, Optimizer):
                raise TypeError(
                    f"outer_optimizer must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}"
                )

    def step(self, pieces: Sequence[Piece], averaged: Tensor, inner_step: int) -> None:
        """One outer step on the ``pieces`` of the global parameters, with the averaged pseudo-gradient
        ``averaged`` (flat, laid out as the pieces), the learning rate being that of ``inner_step``."""
        global_params = pieces_of(self.params, pieces)
        averaged = averaged.to(self.device)
        grads = [
            chunk.view_as(g) for chunk, g in zip(averaged.split([g.numel() for g in global_params]), global_params)
        ]
        if self.optimizer is None:
            diloco_outer_step(
                global_params,
                grads,
                pieces_of(self.momentum_buffers, pieces),
                lr=scalar(self._lr(inner_step), self.device),
                momentum=scalar(self._momentum, self.device),
                nesterov=self._nesterov,
                backend=self._backend,
            )
        else:
            # Only these pieces have gradients: torch optimizers skip (and keep the state of) the rest.
            for param, grad in zip(global_params, grads):
                param.grad = grad
            self.optimizer.step()
            for param in global_params:
                param.grad = None
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The global parameters, the outer optimizer's state and the number of outer steps taken."""
        if self.optimizer is None:
            optimizer_state = {"momentum_buffers": self.momentum_buffers}
        else:
            optimizer_state = self.optimizer.state_dict()
        return {"outer_steps": self.steps, "global_params": self.params, "outer_optimizer": optimizer_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (other keys in ``state`` are ignored)."""
        self.steps = state["outer_steps"]
        for current, saved in zip(self.params, state["global_params"]):
            current.copy_(saved)
        if self.optimizer is None:
            for current, saved in zip(self.momentum_buffers, state["outer_optimizer"]["momentum_buffers"]):
                current.copy_(saved)
        else:
            self.optimizer.load_state_dict(state["outer_optimizer"])
