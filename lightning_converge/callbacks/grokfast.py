"""Grokfast ("Grokfast: Accelerated Grokking by Amplifying Slow Gradients", Lee et al., 2024)."""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_converge.checks import check_choice, check_in_range, check_int
from lightning_converge.kernels.dispatch import ScalarSlots, validate_backend
from lightning_converge.kernels.finite import all_finite
from lightning_converge.kernels.grokfast import grokfast_ema
from lightning_converge.schedules import ScheduleLike, as_schedule
from lightning_converge.sharding import attach, local, restored_state, saved_states

FILTERS = ("ema", "ma")
FILTER_TYPES = ("mean", "sum")


class Grokfast(pl.Callback):
    """Amplify the slow component of the gradients: ``grad += lamb * slow``.

    Two filters, with the numbers of the paper's official code:

    * ``filter="ema"``: ``slow = alpha * slow + (1 - alpha) * grad``, where ``slow``
      starts as the parameter's first gradient. The pass is the fused
      :func:`~lightning_converge.kernels.grokfast.grokfast_ema` kernel (``backend``).
    * ``filter="ma"``: ``slow`` is the mean (``filter_type="mean"``) or the sum
      (``"sum"``) of the last ``window_size`` gradients; with ``warmup`` it is applied
      only once the window is full. A ring buffer and a running fp32 sum make each
      step cost O(parameters), not O(parameters * window_size).

    ``alpha`` and ``lamb`` are numbers or schedules (callables of ``trainer.global_step``).

    When it runs: in ``on_before_optimizer_step``, once per optimizer step. The
    gradients there are already accumulated over ``accumulate_grad_batches``,
    unscaled by fp16 AMP and, under DDP, averaged across ranks, so every rank
    filters the same gradients and keeps the same state. Lightning clips gradients
    after this hook, so clipping sees the filtered gradients.

    Only parameters of the optimizer being stepped that have a gradient this step
    are filtered; the others keep their state untouched. A step whose gradients are
    not all finite (an fp16 overflow: the grad scaler will skip that step) changes
    neither the gradients nor the filter. The EMA filter decides that on the
    device, without a host synchronization: the finiteness flag turns the step's
    ``alpha`` and ``lamb`` into 1 and 0 (which change nothing) and the kernel leaves
    the slow of inf/NaN elements alone; the flag is read back only at steps where a
    parameter gets its first gradient (its slow starts as its first finite
    gradient). The MA filter is decided on the device too: its ring position is a
    device-side count of the finite steps, a non-finite step writes the ring slot
    back with what it held and leaves the running sum and the gradients as they
    were. The filter keeps copies of gradients,
    never references to the live ``.grad`` tensors, which are zeroed in place or freed.

    Sharded parameters (FSDP2's DTensors): the filter works on each rank's shard of the
    gradients, its state has the shards' shapes, and a step sends nothing; a checkpoint
    holds the state sharded (a distributed checkpoint, each rank writing its shards) or
    gathered into full tensors (a single-file one), and a resumed run (on any number of
    ranks) takes this rank's shards of it (:mod:`lightning_converge.sharding`).
    ``grokfast/slow_norm`` is then the norm over this rank's shards (rank 0's is logged),
    not over the whole gradients.

    State, by parameter name, in :meth:`state_dict` (tensors and plain values only),
    so a resumed run continues exactly. Under strategies where each rank steps on
    its own gradients (DiLoCo, 1-bit Adam after ``freeze_step``) the state differs
    between ranks, and the strategy saves every rank's in the checkpoint
    (:mod:`lightning_converge.strategies.rank_state`). Logs ``grokfast/slow_norm``,
    the L2 norm of this step's slow gradients.
    """

    #: The state follows the gradients this rank sees: saved per rank where they differ between ranks.
    state_follows_gradients = True

    def __init__(
        self,
        filter: str = "ema",
        alpha: ScheduleLike = 0.98,
        lamb: ScheduleLike = 2.0,
        window_size: int = 100,
        filter_type: str = "mean",
        warmup: bool = True,
        backend: str = "auto",
    ) -> None:
        self.filter = check_choice("filter", filter, FILTERS, owner="Grokfast")
        self.alpha = as_schedule(alpha, "alpha")
        self.lamb = as_schedule(lamb, "lamb")
        # Schedules are pure functions of the step: a bad value at step 0 is caught before training.
        _check_alpha(self.alpha(0))
        _check_lamb(self.lamb(0))
        self.window_size = check_int("window_size", window_size, 1, owner="Grokfast")
        self.filter_type = check_choice("filter_type", filter_type, FILTER_TYPES, owner="Grokfast")
        self.warmup = warmup
        self.backend = validate_backend(backend)
        # "ema": the slow gradient. "ma": the last window_size gradients (a ring, in the
        # gradients' dtype, so the running sum subtracts exactly what it added), their
        # fp32 running sum, and how many gradients each parameter has pushed (a 0-d int64
        # tensor next to the gradients: the ring position is chosen on the device).
        self._slow: dict[str, Tensor] = {}
        self._window: dict[str, Tensor] = {}
        self._window_sum: dict[str, Tensor] = {}
        self._pushed: dict[str, Tensor] = {}
        self._names_by_id: dict[int, str] = {}
        self._params: dict[str, Tensor] = {}  # the module's parameters by name, as it holds them (DTensors or not)
        self._scalars = ScalarSlots()  # alpha and lamb on the gradients' device, refilled each step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fires at the start of every stage, before a checkpoint is restored: sharded state in checkpoints
        goes through the strategy's distributed checkpoint (:func:`~lightning_converge.sharding.attach`)."""
        attach(trainer.strategy)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fires once, after the strategy moved the model and any checkpoint was restored:
        map parameters to their names and move restored state next to its parameter."""
        params = dict(pl_module.named_parameters())
        self._params = params
        self._names_by_id = {id(p): name for name, p in params.items()}
        for states in (self._slow, self._window_sum):
            for name, tensor in states.items():
                if name not in params:
                    raise ValueError(f"Grokfast state names parameter {name!r}, which the model does not have")
                states[name] = restored_state(tensor, params[name]).to(params[name].device)
        for name, window in self._window.items():  # (window_size, *shape): cut each slot
            if name not in params:
                raise ValueError(f"Grokfast state names parameter {name!r}, which the model does not have")
            self._window[name] = restored_state(window, params[name], leading=1).to(params[name].device)
        for name, count in self._pushed.items():  # the MA ring's position, one count per parameter
            if name not in params:
                raise ValueError(f"Grokfast state names parameter {name!r}, which the model does not have")
            self._pushed[name] = count.to(params[name].device)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Fires once per optimizer step, after accumulation, unscaling and the DDP all-reduce: filter."""
        names, grads = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self._names_by_id:
                    names.append(self._names_by_id[id(p)])
                    grads.append(local(p.grad))  # this rank's shard of a sharded gradient
        if not grads:
            return
        finite = all_finite(grads, backend=self.backend)  # a 0-d bool tensor on the gradients' device
        step = trainer.global_step
        lamb = _check_lamb(self.lamb(step))
        if self.filter == "ema":
            if any(name not in self._slow for name in names) and not finite:
                # Read back only while a parameter is new: its slow starts as its first finite gradient.
                return
            slows = self._filter_ema(names, grads, _check_alpha(self.alpha(step)), lamb, finite)
        else:
            slows = self._filter_ma(names, grads, lamb, finite)
        pl_module.log("grokfast/slow_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(slows))))

    def _filter_ema(
        self, names: Sequence[str], grads: list[Tensor], alpha: float, lamb: float, finite: Tensor
    ) -> list[Tensor]:
        for name, grad in zip(names, grads):
            if name not in self._slow:
                self._slow[name] = grad.detach().to(torch.float32, copy=True)
        slows = [self._slow[name] for name in names]
        device = grads[0].device
        # Skipping a non-finite step on the device: alpha 1 keeps every slow, lamb 0 every gradient.
        not_finite = finite.logical_not()
        alpha_slot = self._scalars("alpha", alpha, device).masked_fill_(not_finite, 1.0)
        lamb_slot = self._scalars("lamb", lamb, device).masked_fill_(not_finite, 0.0)
        grokfast_ema(grads, slows, alpha=alpha_slot, lamb=lamb_slot, backend=self.backend)
        return slows

    def _filter_ma(self, names: Sequence[str], grads: list[Tensor], lamb: float, finite: Tensor) -> list[Tensor]:
        slows = []
        for name, grad in zip(names, grads):
            if name not in self._window:
                self._window[name] = grad.new_zeros((self.window_size, *grad.shape))
                self._window_sum[name] = torch.zeros_like(grad, dtype=torch.float32)
                self._pushed[name] = torch.zeros((), dtype=torch.int64, device=grad.device)
            window, window_sum, pushed = self._window[name], self._window_sum[name], self._pushed[name]
            # The slot of the gradient leaving the window (zeros while the window fills), indexed on the device.
            position = (pushed % self.window_size).reshape(1)
            oldest = window.index_select(0, position).squeeze(0)
            # A non-finite step pushes nothing: the slot gets its own value back, the sum stays.
            window.index_copy_(0, position, torch.where(finite, grad, oldest).unsqueeze(0))
            window_sum.copy_(torch.where(finite, window_sum - oldest + grad, window_sum))
            pushed.add_(finite)
            filled = pushed.clamp(max=self.window_size)
            slow = window_sum / filled.clamp(min=1) if self.filter_type == "mean" else window_sum
            apply = finite & (filled == self.window_size) if self.warmup else finite
            grad.copy_(torch.where(apply, grad.add(slow, alpha=lamb), grad))
            slows.append(slow)
        return slows

    def state_dict(self) -> dict[str, Any]:
        """The state by parameter name; for sharded parameters DTensors of this rank's shards (nothing gathered:
        :mod:`lightning_converge.sharding`)."""
        if self.filter == "ema":
            return {"filter": "ema", "slow": saved_states(self._slow, self._params)}
        return {
            "filter": "ma",
            "window_size": self.window_size,
            "window": saved_states(self._window, self._params, leading=1),
            "window_sum": saved_states(self._window_sum, self._params),
            "pushed": dict(self._pushed),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["filter"] != self.filter:
            raise ValueError(
                f"the checkpoint holds Grokfast state of filter={state_dict['filter']!r}, "
                f"but this callback has filter={self.filter!r}"
            )
        self._params = {}  # the restored state is not this rank's shards until training starts
        if self.filter == "ema":
            self._slow = dict(state_dict["slow"])
            return
        if state_dict["window_size"] != self.window_size:
            raise ValueError(
                f"the checkpoint holds Grokfast windows of window_size={state_dict['window_size']}, "
                f"but this callback has window_size={self.window_size}"
            )
        self._window = dict(state_dict["window"])
        self._window_sum = dict(state_dict["window_sum"])
        # Checkpoints of earlier versions count pushes in Python ints.
        self._pushed = {name: torch.as_tensor(count, dtype=torch.int64) for name, count in state_dict["pushed"].items()}


def _check_alpha(value: float) -> float:
    return check_in_range("alpha", value, 0, 1, high_open=True, owner="Grokfast")


def _check_lamb(value: float) -> float:
    return check_in_range("lamb", value, owner="Grokfast")


