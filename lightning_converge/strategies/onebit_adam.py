"""1-bit Adam ("1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence
Speed", Tang et al., 2021) as a strategy for :class:`lightning_converge.optim.AdamW`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.comm import Layout, OneBitCompressor
from lightning_converge.comm.base import check_int
from lightning_converge.kernels.dispatch import scalar
from lightning_converge.kernels.onebit_adam import onebit_adam_update
from lightning_converge.optim import AdamW
from lightning_converge.strategies.comm_hook import DDP_STRATEGY_ARGUMENTS, CommHookDDPStrategy


class OneBitAdamStrategy(CommHookDDPStrategy):
    """DeepSpeed's 1-bit Adam for :class:`~lightning_converge.optim.AdamW`, registered as ``strategy="onebit_adam"``.

    Two stages, decided by the number of optimizer steps taken (``trainer.global_step``):

    * warm-up, the first ``freeze_step`` steps: plain DDP. Gradients are averaged in
      full precision (the same arithmetic as ``strategy="ddp"``) and AdamW steps as
      usual, so the parameters match DDP + AdamW exactly.
    * compression, from then on: gradients are not communicated. The variance
      ``exp_avg_sq`` is frozen (bias-corrected at the step it froze). Each rank
      updates its momentum with its own gradient,
      ``m = beta1 * m + (1 - beta1) * g``, and the ranks average their momenta with
      the error-compensated 1-bit all-reduce of
      :class:`~lightning_converge.comm.OneBitCompressor` (worker and server errors);
      every rank adopts the average as its momentum and takes the Adam step
      ``p -= lr * (m / (1 - beta1^t)) / (sqrt(v_frozen) + eps)`` with AdamW's
      decoupled weight decay (the fused
      :func:`~lightning_converge.kernels.onebit_adam.onebit_adam_update` kernel, on
      the optimizer's backend).

    In the compression stage each rank sends ``(1 + 1 / world_size) / 8`` bytes per
    parameter (plus a 4-byte scale per block), against 4 for DDP's fp32
    all-reduce. All the optimizer's parameters with state take part in each
    compressed step (a missing gradient counts as zero), so every rank exchanges
    the same flat momentum.

    Args:
        freeze_step: warm-up steps with full-precision communication (>= 1). The
            frozen variance comes from them and must have settled: frozen after a
            handful of steps, entries whose early gradients were near zero keep a
            tiny variance and take huge steps (training diverges, compressed or not).
        block_size: values per scale of the 1-bit compression (a power of two >= 8).
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper.
        **ddp_arguments: :class:`~lightning.pytorch.strategies.DDPStrategy`'s own
            arguments (``process_group_backend``, ``timeout``, ...).

    The LightningModule's optimizer must be one
    :class:`~lightning_converge.optim.AdamW` without cautious masking; anything
    else raises a ``ValueError`` when ``fit`` sets up, before training, as does a
    gradient scaler (``precision="16-mixed"``; use ``"bf16-mixed"``).

    When each hook fires (see also :class:`~lightning_converge.strategies.comm_hook.CommHookDDPStrategy`):

    * the communication hook: in warm-up it averages each bucket; in the
      compression stage it hands each rank's gradients back unchanged.
    * :meth:`optimizer_step`: in warm-up, the usual step. In the compression
      stage it runs the closure as Lightning would (forward, backward,
      ``on_before_optimizer_step``, gradient clipping) and then the 1-bit Adam
      step above instead of ``optimizer.step()`` (torch's optimizer step hooks
      do not run then). A step whose closure returns None (no loss) is skipped.
      Then it logs the step's bytes.

    State: the momentum, frozen variance, per-parameter ``step`` and
    ``variance_step`` (when the variance froze) live in the optimizer's state,
    identical on every rank; the worker and server errors, which differ per rank,
    are saved in checkpoints under ``"onebit_adam"`` (every rank's). A resumed run
    continues exactly.
    """

    checkpoint_key = "onebit_adam"
    # From freeze_step on, each rank's step sees its own gradients: Grokfast's state is saved per rank.
    gradients_differ_between_ranks = True

    def __init__(
        self,
        freeze_step: int = 100,
        block_size: int = 1024,
        *,
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **ddp_arguments: Any,
    ) -> None:
        unknown = sorted(set(ddp_arguments) - set(DDP_STRATEGY_ARGUMENTS))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}")
        check_int("freeze_step", freeze_step, 1)
        self.freeze_step = freeze_step
        self.compressor = OneBitCompressor(error_feedback=True, block_size=block_size)
        super().__init__(ddp_kwargs=ddp_kwargs, **ddp_arguments)

    @property
    def compressing(self) -> bool:
        """Whether this step is in the compression stage."""
        return self.optimizer_steps_done >= self.freeze_step

    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        super().setup_optimizers(trainer)
        check_optimizers(self.optimizers)
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"{type(self).__name__} does not support a gradient scaler (precision='16-mixed'); use 'bf16-mixed'"
            )

    def reduce_bucket(self, buffer: Tensor, layout: Layout) -> Tensor:
        return buffer if self.compressing else self.exchange.average(buffer)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        if not self.compressing:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        model = model if model is not None else self.lightning_module
        # What the precision plugin runs inside optimizer.step(closure): the closure, then the
        # on_before_optimizer_step hooks and gradient clipping.
        loss = self.precision_plugin._wrap_closure(model, optimizer, closure)
        if loss is not None:
            self.compressed_step(optimizer)
        self.log_comm_stats()
        return loss

    @torch.no_grad()
    def compressed_step(self, optimizer: AdamW) -> None:
        """One step of the compression stage, in place on the parameters and the optimizer's state."""
        # The parameters that took part in the warm-up, by group: the same on every rank.
        groups = [(group, [p for p in group["params"] if optimizer.state.get(p)]) for group in optimizer.param_groups]
        groups = [(group, params) for group, params in groups if params]
        params = [p for _, group_params in groups for p in group_params]
        if not params:
            return
        states = [optimizer.state[p] for p in params]
        for state in states:
            if "variance_step" not in state:  # the first compressed step: the variance freezes here
                state["variance_step"] = state["step"].clone()
            state["step"] += 1

        # Each rank's momentum from its own gradient, then the ranks agree on their compressed average.
        for group, group_params in groups:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group_params]
            grads = [g.float() for g in grads]
            torch._foreach_lerp_([optimizer.state[p]["exp_avg"] for p in group_params], grads, 1 - group["betas"][0])
        momenta = [state["exp_avg"] for state in states]
        flat = torch.cat([m.reshape(-1) for m in momenta])
        averaged = self.compressor.reduce(flat, self.layout_of(params), self.exchange)
        for momentum, piece in zip(momenta, averaged.split([m.numel() for m in momenta])):
            momentum.copy_(piece.view_as(momentum))

        for group, group_params in groups:
            _adam_update(group, group_params, [optimizer.state[p] for p in group_params], optimizer.backend)

    def comm_state_dict(self) -> dict[str, Any]:
        return {"compressor": self.compressor.state_dict()}

    def load_comm_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state_dict["compressor"])

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        description = "1-bit Adam for lightning_converge.optim.AdamW"
        strategy_registry.register("onebit_adam", cls, description=description, override=True)


def _adam_update(group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]], backend: str) -> None:
    """The Adam step with the frozen variance for one parameter group (its moments already updated)."""
    beta1, beta2 = group["betas"]
    changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
    device = params[0].device
    onebit_adam_update(
        params,
        *([state[name] for state in states] for name in ("exp_avg", "exp_avg_sq", "step", "variance_step")),
        backend=backend,
        **{name: scalar(value, device) for name, value in changing.items()},
    )


def check_optimizers(optimizers: list[Optimizer]) -> None:
    """Raise a ``ValueError`` unless ``optimizers`` is one AdamW of this pack without cautious masking."""
    if len(optimizers) != 1 or not isinstance(optimizers[0], AdamW):
        found = [type(o).__name__ for o in optimizers]
        raise ValueError(f"1-bit Adam needs exactly one lightning_converge.optim.AdamW optimizer, got {found}")
    if any(group["cautious"] for group in optimizers[0].param_groups):
        raise ValueError("1-bit Adam does not support cautious masking (AdamW(cautious=True))")


OneBitAdamStrategy.register_strategies(StrategyRegistry)
