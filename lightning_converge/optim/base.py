"""What every optimizer of this pack shares: checked hyperparameters, state in the
parameters' precision class (fp32, or fp64 for fp64 parameters), hyperparameters
as float64 0-d tensors, one kernel call per parameter group, and the conventions of
``torch.optim`` (state dicts and their hooks, pickling, complex parameters)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import Kernel, ScalarSlots, validate_backend

# A hyperparameter's check: given its name and value, what is wrong with it (the
# whole sentence, naming the argument and the allowed values), or None.
Check = Callable[[str, Any], Optional[str]]


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number or a one-element real tensor, else None."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            return None
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def non_negative(name: str, value: Any) -> str | None:
    """Learning rates, epsilons, weight decays: finite and >= 0."""
    real = _real(value)
    if real is None or not 0 <= real < math.inf:
        return f"{name} must be a finite real number >= 0 (or a one-element tensor), got {value!r}"
    return None


def beta_tuple(count: int) -> Check:
    """``count`` EMA coefficients, each in [0, 1)."""

    def check(name: str, value: Any) -> str | None:
        if not isinstance(value, (tuple, list)) or len(value) != count:
            return f"{name} must hold {count} numbers, each in [0, 1), got {value!r}"
        for index, beta in enumerate(value):
            real = _real(beta)
            if real is None or not 0 <= real < 1:
                return f"{name}[{index}] must be a real number in [0, 1), got {beta!r}"
        return None

    return check


def flag(name: str, value: Any) -> str | None:
    if not isinstance(value, bool):
        return f"{name} must be True or False, got {value!r}"
    return None


def optional_step_count(name: str, value: Any) -> str | None:
    """Warm-up lengths: None (no warm-up) or a number of steps."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return f"{name} must be None or an int >= 1, got {value!r}"
    return None


def optional_non_negative(name: str, value: Any) -> str | None:
    if value is not None and non_negative(name, value):
        return f"{name} must be None or a finite real number >= 0, got {value!r}"
    return None


def only(expected: Any, owner: str) -> Check:
    """An option of ``owner`` (a torch.optim class whose state dicts load here) that
    this rule does not implement: only its value ``expected`` is accepted."""

    def check(name: str, value: Any) -> str | None:
        if value != expected:
            return f"{name}={value!r} (an option of {owner}) is not implemented here; only {name}={expected!r} is"
        return None

    return check


def real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as pairs of reals (``torch.view_as_real``), as torch.optim updates them."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the pack's optimizers: a ``torch.optim.Optimizer`` whose step is one
    fused kernel call per parameter group.

    Subclasses name their per-parameter ``state_names`` (tensors shaped like the
    parameter), their ``kernel``, the checks of their ``hyperparameters`` (every
    constructor argument and group key, plus options of torch.optim classes whose
    state dicts they load), and map a group to the kernel's arguments in
    :meth:`kernel_args`. Parameters without a gradient this step are skipped and
    their state is left untouched.

    Precision: state is fp32 for fp32, bf16 and fp16 parameters and fp64 for fp64
    parameters, and the kernels compute in that precision. Complex parameters are
    updated as pairs of real numbers (``torch.view_as_real``), as torch.optim does;
    their state is complex. Hyperparameters reach the kernels as float64 0-d
    tensors, so ``1 - beta``, bias corrections and warm-ups are formed before any
    rounding and a schedule never recompiles. Those tensors persist, per group, on
    the parameters' device, and are refilled in place at each step
    (:class:`~lightning_converge.kernels.dispatch.ScalarSlots`): a step neither
    allocates them anew nor waits for a host-to-device copy. They are a cache,
    absent from ``state_dict`` and pickles.
    """

    kernel: ClassVar[Kernel]
    state_names: ClassVar[tuple[str, ...]]
    hyperparameters: ClassVar[dict[str, Check]]
    # Whether the kernel reads the step count (bias corrections, warm-ups).
    kernel_reads_step: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any], backend: str = "auto") -> None:
        self.backend = validate_backend(backend)
        self._check_hyperparameters(defaults, where="")
        self._scalars = ScalarSlots()  # keyed by (group index, hyperparameter name)
        super().__init__(params, defaults)

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        """Raise a ``ValueError`` for the first hyperparameter of ``group`` its check refuses.

        Keys the class does not know are left alone, as torch.optim does (schedulers
        add ``initial_lr``; torch.optim's state dicts bring ``foreach`` and the like).
        """
        for name, check in self.hyperparameters.items():
            if name in group and (problem := check(name, group[name])):
                raise ValueError(f"{type(self).__name__}: {where}{problem}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``, with the group's hyperparameters checked
        and its parameters distinct (a fused step would update a repeated one twice)."""
        index = len(self.param_groups)
        self._check_hyperparameters(param_group, where=f"parameter group {index}: ")
        with warnings.catch_warnings():  # torch.optim's warning of repeated parameters: an error here
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len(params) != len(set(params)):
            del self.param_groups[-1]
            raise ValueError(f"{type(self).__name__}: parameter group {index} holds the same parameter twice")

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (changing hyperparameters, passed as 0-d tensors; static options)."""
        raise NotImplementedError

    @staticmethod
    def state_dtype(param: Tensor) -> torch.dtype:
        """fp32 state for fp32, bf16 and fp16 parameters, fp64 for fp64; complex for complex."""
        real = torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32
        return real.to_complex() if param.is_complex() else real

    def init_state(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """Create the state of a parameter on its first step: zeros unless overridden."""
        for name in self.state_names:
            state[name] = torch.zeros_like(param, dtype=self.state_dtype(param), memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient: a kernel call per group.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs
        first, with gradients enabled, and its loss is returned. State is created on
        a parameter's first step (see :meth:`init_state`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.update_group(index, group, params)
        return loss

    def update_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params``, the parameters of ``group`` (at ``index`` in ``param_groups``)
        that have a gradient: called by :meth:`step` once per group with any, after the
        closure. Creates missing state, counts the step, then makes one kernel call."""
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                self.init_state(p, state)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        changing, static = self.kernel_args(group)
        device = params[0].device
        scalars = {
            name: self._scalars((index, name), value, device, torch.float64) for name, value in changing.items()
        }
        buffers = [[real_view(self.state[p][name]) for p in params] for name in self.state_names]
        if self.kernel_reads_step:
            buffers.append(steps)
        type(self).kernel(
            [real_view(p) for p in params],
            [real_view(p.grad) for p in params],
            *buffers,
            backend=self.backend,
            **scalars,
            **static,
        )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps defaults, state and param_groups only: deepcopy, pickle and
        # torch.save(optimizer) would drop the backend.
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and the last stage of :meth:`load_state_dict`: groups saved by
        torch.optim (or by an older version) take this class's defaults for the keys
        they lack, and a step saved as a number becomes a tensor."""
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")  # pickled before the backend was kept
        self._scalars = ScalarSlots()  # a cache, never pickled: refilled at the next step
        for group in self.param_groups:
            for name in self.hyperparameters.keys() & self.defaults.keys():  # not torch's own additions
                group.setdefault(name, self.defaults[name])
            for p in group["params"]:
                param_state = self.state.get(p)
                if param_state and "step" in param_state:
                    # A copy: stepping must not count up the tensor of the dict it came from.
                    step = torch.as_tensor(param_state["step"], dtype=torch.float32, device=p.device)
                    param_state["step"] = step.clone()

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping the state in :meth:`state_dtype`.

        torch.optim casts loaded state to the parameter's dtype, which would round a
        bf16 parameter's fp32 moments to bf16. So the pre-hooks run first, as in
        torch (a dict one of them returns is what loads); its groups are checked
        (before anything changes); torch.optim loads it; the state is put back in its
        own precision from that dict; then the post-hooks run, and what they change
        stays. Unlike torch.optim, the loaded state is a copy: stepping never changes
        the dict it came from.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for index, group in enumerate(state_dict["param_groups"]):
            self._check_hyperparameters(group, where=f"parameter group {index}: ")
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                if name != "step" and isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                    self.state[p][name] = value.to(device=p.device, dtype=self.state_dtype(p), copy=True)
        for post_hook in post_hooks.values():
            post_hook(self)
