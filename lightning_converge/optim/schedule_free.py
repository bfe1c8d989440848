"""Schedule-Free SGD and AdamW ("The Road Less Scheduled", Defazio et al., 2024).

The same updates, hyperparameters and state dicts as the authors' package ``schedulefree``
(``SGDScheduleFree``, ``AdamWScheduleFree``): a state dict saved by one loads into the other.
Differences: the optimizers start in train mode (``step()`` works without calling
``train()`` first), the step is one fused kernel per parameter group, state is fp32 for
bf16/fp16 parameters, and the gradients are left as they were (the reference divides them
in place).

**Train and eval modes.** In train mode the parameters hold ``y``, the point where gradients
are taken; the weights to evaluate and to keep are the average ``x``. ``eval()`` writes ``x``
into the parameters, ``train()`` writes ``y`` back (each is one interpolation with the state
``z``; a round trip is exact up to rounding). Under Lightning nothing is needed: the
:class:`~lightning_converge.callbacks.ScheduleFreeMode` callback, which Lightning adds to every
``Trainer`` by itself (entry point ``lightning.pytorch.callbacks_factory``), switches modes
around validation, test and prediction and puts ``x`` in every checkpoint's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_converge.kernels.schedule_free import schedule_free_adamw, schedule_free_sgd
from lightning_converge.optim.base import Check, FusedOptimizer, _real, beta_tuple, non_negative, real_view


def _step_count(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"{name} must be an int >= 0, got {value!r}"
    return None


def _interpolation_coefficient(name: str, value: Any) -> str | None:
    """beta1 / momentum: x is recovered from y and z by dividing by it, so 0 is refused."""
    real = _real(value)
    if real is None or not 0 < real < 1:
        return f"{name} must be a real number in (0, 1) (Schedule-Free divides by it to form x), got {value!r}"
    return None


def _schedule_free_betas(name: str, value: Any) -> str | None:
    return beta_tuple(2)(name, value) or _interpolation_coefficient(f"{name}[0]", value[0])


def _larger(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    """``max(a, b)``, as a float64 tensor (no host sync) when either is a tensor."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return max(a, b)


def _ratio_or_zero(weight: float | Tensor, weight_sum: float | Tensor) -> float | Tensor:
    """``weight / weight_sum``, 0 while the sum is 0 (a learning rate of 0 so far), as the reference."""
    if isinstance(weight_sum, Tensor):
        return torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight_sum))
    return weight / weight_sum if weight_sum != 0 else 0.0


class _ScheduleFree(FusedOptimizer):
    """What the Schedule-Free rules share: the running average weights, the modes, the state ``z``.

    Each parameter group keeps, as the reference does, its step count ``k``, the largest
    learning rate so far ``lr_max``, the sum ``weight_sum`` of the average's weights, the
    learning rate after warm-up ``scheduled_lr`` (for logging) and ``train_mode``. They are
    plain numbers (float64 tensors when ``lr`` is a tensor), so a step reads nothing back
    from the device.
    """

    kernel_reads_step = False
    # The group key of the interpolation coefficient between z and x ("betas"[0], "momentum").
    coefficient_key: str

    @staticmethod
    def running_defaults() -> dict[str, Any]:
        """Group entries that the optimizer advances at each step, as named by the reference; and
        ``foreach``, unused here, which the reference reads from the state dicts it loads."""
        return dict(k=0, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, train_mode=True, foreach=None)

    def coefficient(self, group: dict[str, Any]) -> float:
        value = group[self.coefficient_key]
        return value[0] if isinstance(value, (tuple, list)) else value

    def init_state(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """``z`` starts at the parameter (then x = y = z); the other state at zero."""
        super().init_state(param, state)
        state["z"].copy_(param.detach())

    def _advance(self, group: dict[str, Any]) -> None:
        """Count this step in the group: warm-up, the largest lr so far and the average's weight sum."""
        k = group["k"]
        warmup = group["warmup_steps"]
        lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = _larger(lr, group["lr_max"])
        group["weight_sum"] = group["weight_sum"] + self._average_weight(group, k + 1)
        group["k"] = k + 1

    @staticmethod
    def _average_weight(group: dict[str, Any], k: int) -> float | Tensor:
        """The weight of step ``k`` (counted from 1) in the average x: ``k**r * lr_max**weight_lr_power``."""
        return (k ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])

    def average_scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        """After :meth:`_advance`: the warmed-up lr and ``ckp1``, the weight of this step's point in x."""
        weight = self._average_weight(group, group["k"])
        return dict(lr=group["scheduled_lr"], ckp1=_ratio_or_zero(weight, group["weight_sum"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update at y of every parameter that has a gradient; every group counts the step
        (as the reference: warm-up and the average's weights follow the optimizer's steps).
        ``closure`` (optional) runs first, with gradients enabled; its loss is returned.

        Raises a ``RuntimeError`` in eval mode: the parameters then hold x, not y.
        """
        if not self.train_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() in eval mode: the parameters hold the average x, and gradients "
                "must be taken at y. Call optimizer.train() before training (under Lightning the ScheduleFreeMode "
                "callback does it)."
            )
        loss = None
        if closure is not None:  # before the groups count the step, as the reference
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._advance(group)
        super().step()
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also loads the reference package's state dicts, which count steps per group only."""
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                param_state = self.state.get(p)
                if param_state and "step" not in param_state:
                    param_state["step"] = torch.tensor(float(group["k"]), device=p.device)

    @torch.no_grad()
    def _move_parameters(self, train_mode: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train_mode:
                continue
            beta = self.coefficient(group)
            # y = lerp(x, z, 1 - beta); x = lerp(y, z, 1 - 1/beta).
            weight = 1 - beta if train_mode else 1 - 1 / beta
            for p in group["params"]:
                if "z" in self.state.get(p, {}):
                    real_view(p).copy_(self._interpolate_with_z(p, weight))
            group["train_mode"] = train_mode

    def _interpolate_with_z(self, p: Tensor, weight: float) -> Tensor:
        """``lerp(p, z, weight)`` in the state's precision, as real views (complex parameters)."""
        z = real_view(self.state[p]["z"])
        return torch.lerp(real_view(p).to(device=z.device, dtype=z.dtype), z, weight)

    def eval(self) -> None:
        """Make the parameters hold x, the average to evaluate and save (a no-op in eval mode)."""
        self._move_parameters(train_mode=False)

    def train(self) -> None:
        """Make the parameters hold y, where training takes gradients (a no-op in train mode)."""
        self._move_parameters(train_mode=True)

    @property
    def train_mode(self) -> bool:
        """Whether the parameters hold y (train mode) rather than x."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def averaged_parameters(self) -> dict[Tensor, Tensor]:
        """x for each parameter with state, as new tensors in the parameter's dtype, whatever the mode;
        the parameters are left alone (checkpoints of a run in train mode store these)."""
        averaged = {}
        for group in self.param_groups:
            beta = self.coefficient(group)
            for p in group["params"]:
                if "z" not in self.state.get(p, {}):
                    continue
                if not group["train_mode"]:
                    averaged[p] = p.detach().clone()
                    continue
                x = self._interpolate_with_z(p, 1 - 1 / beta).to(device=p.device)
                averaged[p] = (torch.view_as_complex(x) if p.is_complex() else x).to(p.dtype)
        return averaged


_SHARED_CHECKS: dict[str, Check] = dict(
    lr=non_negative,
    weight_decay=non_negative,
    warmup_steps=_step_count,
    r=non_negative,
    weight_lr_power=non_negative,
)


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-Free SGD ("The Road Less Scheduled"): SGD with momentum, no learning-rate schedule.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (after warm-up).
        momentum: the interpolation ``y = (1 - momentum) * z + momentum * x``, in (0, 1).
        weight_decay: L2 penalty, taken at y.
        warmup_steps: linear warm-up of the learning rate over this many steps.
        r: the average weighs step ``k`` by ``k**r``.
        weight_lr_power: and by the largest learning rate so far to this power.
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``.

    State per parameter: ``z``. See the module docstring for train and eval modes.
    """

    kernel = schedule_free_sgd
    state_names = ("z",)
    coefficient_key = "momentum"
    hyperparameters = dict(_SHARED_CHECKS, momentum=_interpolation_coefficient)

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            **self.running_defaults(),
        )
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        changing = dict(self.average_scalars(group), momentum=group["momentum"], weight_decay=group["weight_decay"])
        return changing, {}


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-Free AdamW ("The Road Less Scheduled"): AdamW without a learning-rate schedule.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (after warm-up).
        betas: ``beta1``, the interpolation ``y = (1 - beta1) * z + beta1 * x`` in (0, 1),
            and ``beta2``, the second moment's EMA coefficient in [0, 1).
        eps: added to the denominator.
        weight_decay: L2 penalty on the normalized gradient, taken at y (as the reference).
        warmup_steps: linear warm-up of the learning rate over this many steps.
        r: the average weighs step ``k`` by ``k**r``.
        weight_lr_power: and by the largest learning rate so far to this power.
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``.

    State per parameter: ``z`` and ``exp_avg_sq`` (the memory of AdamW: z replaces the
    momentum). See the module docstring for train and eval modes.
    """

    kernel = schedule_free_adamw
    state_names = ("z", "exp_avg_sq")
    coefficient_key = "betas"
    hyperparameters = dict(_SHARED_CHECKS, betas=_schedule_free_betas, eps=non_negative)

    def __init__(
        self,
        params: Any,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            **self.running_defaults(),
        )
        super().__init__(params, defaults, backend)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        beta1, beta2 = group["betas"]
        changing = dict(
            self.average_scalars(group),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction2=1 - beta2 ** group["k"],
        )
        return changing, {}
