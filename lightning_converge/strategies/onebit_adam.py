"""1-bit Adam ("1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence
Speed", Tang et al., 2021) as a strategy for :class:`lightning_converge.optim.AdamW`."""

# No ``from __future__ import annotations``: jsonargparse (LightningCLI) reads the signature's types.
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.checks import check_int
from lightning_converge.comm import Layout, OneBitCompressor
from lightning_converge.kernels.dispatch import ScalarSlots
from lightning_converge.kernels.onebit_adam import onebit_adam_update
from lightning_converge.optim import AdamW
from lightning_converge.strategies.comm_hook import CommHookDDPStrategy
from lightning_converge.strategies.ddp_options import reject_options


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
    all-reduce. Every parameter whose variance has had ``freeze_step`` steps
    takes part in each compressed step (a missing gradient counts as zero), so
    every rank exchanges the same flat momentum. A parameter with fewer steps
    (its first gradient came late, or it missed warm-up steps) keeps warming up
    on its own: its gradient is averaged in full precision and AdamW steps it as
    usual until it has had ``freeze_step`` steps.

    Args:
        freeze_step: warm-up steps with full-precision communication (>= 1). The
            frozen variance comes from them and must have settled: frozen after a
            handful of steps, entries whose early gradients were near zero keep a
            tiny variance and take huge steps (training diverges, compressed or not).
        block_size: values per scale of the 1-bit compression (a power of two >= 8).
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper
            (``find_unused_parameters``, ``bucket_cap_mb``, ...).
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
        precision_plugin, process_group_backend, timeout, start_method:
            :class:`~lightning.pytorch.strategies.DDPStrategy`'s.
        **kwargs: taken only to explain mistakes: a DDP wrapper option given here
            raises a ``TypeError`` saying to pass it in ``ddp_kwargs``; anything
            else raises as unknown, with the closest valid name.

    The LightningModule's optimizer must be one
    :class:`~lightning_converge.optim.AdamW` without cautious masking; anything
    else raises a ``ValueError`` when ``fit`` sets up, before training, as does a
    gradient scaler (``precision="16-mixed"``; use ``"bf16-mixed"``).

    When each hook fires (see also :class:`~lightning_converge.strategies.comm_hook.CommHookDDPStrategy`):

    * the communication hook: in warm-up it averages each bucket; in the
      compression stage it hands each rank's gradients back unchanged.
    * :meth:`optimizer_step` (automatic optimization, or ``optimizer.step()`` in
      manual optimization): in warm-up, the usual step. In the compression stage
      Lightning's precision plugin runs the step as always (the closure:
      forward and backward, or nothing in manual optimization; then
      ``on_before_optimizer_step`` and gradient clipping), and where it would
      call ``optimizer.step()`` the 1-bit Adam step above runs instead (torch's
      optimizer step hooks do not run then), every step, whatever the closure
      returns. Then it logs the step's bytes.

    State: the momentum, frozen variance, per-parameter ``step`` and
    ``variance_step`` (when the variance froze) live in the optimizer's state,
    identical on every rank; the worker and server errors, which differ per rank,
    are written by each rank to its own file beside the checkpoint (key ``"onebit_adam"``, see
    :mod:`~lightning_converge.strategies.rank_state`). A resumed run
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
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        reject_options(type(self), kwargs)
        self.freeze_step = check_int("freeze_step", freeze_step, 1, owner=type(self).__name__)
        self.compressor = OneBitCompressor(error_feedback=True, block_size=block_size)
        self._scalars = ScalarSlots()  # the update's hyperparameters, refilled in place every step
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            ddp_kwargs=ddp_kwargs,
        )

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

    def reduce_bucket(self, buffer: Tensor, layout: Layout) -> "Tensor | torch.futures.Future[Tensor]":
        return buffer if self.compressing else self.exchange.average_async(buffer)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        if not self.compressing:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def step(closure: Optional[Callable[[], Any]] = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.compressed_step(optimizer)
            return loss

        # The precision plugin runs Lightning's part of the step (the closure, on_before_optimizer_step,
        # gradient clipping) and calls optimizer.step(closure): for this one call, that is the 1-bit step.
        with _step_replaced(optimizer, step):
            return super().optimizer_step(optimizer, closure, model, **kwargs)

    @torch.no_grad()
    def compressed_step(self, optimizer: AdamW) -> None:
        """One step of the compression stage, in place on the parameters and the optimizer's state.

        The parameters whose variance is frozen, or has had ``freeze_step`` steps of its
        own, exchange their momenta in 1 bit (a missing gradient counts as zero). A
        parameter whose first gradient came later is still in its own warm-up: its
        gradient is averaged in full precision and it takes AdamW's usual step, until
        it has had ``freeze_step`` steps. Both sets are the same on every rank (the
        optimizer's state is, and under DDP a gradient is missing on every rank or none).
        """
        settled = [
            [p for p in group["params"] if self._variance_settled(optimizer.state.get(p))]
            for group in optimizer.param_groups
        ]
        settled_ids = {id(p) for group_params in settled for p in group_params}
        warming = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) not in settled_ids
        ]
        groups = [(group, params) for group, params in zip(optimizer.param_groups, settled) if params]
        if groups:
            self._onebit_adam_step(optimizer, groups)
        if warming:
            self._warm_up_step(optimizer, warming)

    def _variance_settled(self, state: Optional[dict[str, Any]]) -> bool:
        if not state:
            return False
        return "variance_step" in state or int(state["step"]) >= self.freeze_step

    def _onebit_adam_step(self, optimizer: AdamW, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        params = [p for _, group_params in groups for p in group_params]
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
            states = [optimizer.state[p] for p in group_params]
            _adam_update(group, group_params, states, optimizer.backend, self._scalars)

    def _warm_up_step(self, optimizer: AdamW, warming: list[Tensor]) -> None:
        """Average ``warming``'s gradients in full precision and take AdamW's step on them alone."""
        grads = [p.grad for p in warming]
        flat = self.exchange.average(torch.cat([g.reshape(-1) for g in grads]))
        pieces = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads)])
        warming_ids = {id(p) for p in warming}
        hidden = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in warming_ids]
        hidden_grads = [p.grad for p in hidden]
        for p in hidden:
            p.grad = None  # AdamW steps the parameters that have a gradient
        try:
            type(optimizer).step(optimizer)  # the class's step, not the replacement in force
        finally:
            for p, grad in zip(hidden, hidden_grads):
                p.grad = grad

    def comm_state_dict(self) -> dict[str, Any]:
        return {**super().comm_state_dict(), "compressor": self.compressor.state_dict()}

    def load_comm_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_comm_state_dict(state_dict)
        self.compressor.load_state_dict(state_dict["compressor"])

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        description = "1-bit Adam for lightning_converge.optim.AdamW"
        strategy_registry.register("onebit_adam", cls, description=description, override=True)


def _adam_update(
    group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]], backend: str, slots: ScalarSlots
) -> None:
    """The Adam step with the frozen variance for one parameter group (its moments already updated)."""
    beta1, beta2 = group["betas"]
    changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
    device = params[0].device
    onebit_adam_update(
        params,
        *([state[name] for state in states] for name in ("exp_avg", "exp_avg_sq", "step", "variance_step")),
        backend=backend,
        **{name: slots((id(group), name), value, device, torch.float64) for name, value in changing.items()},
    )


def check_optimizers(optimizers: list[Optimizer]) -> None:
    """Raise a ``ValueError`` unless ``optimizers`` is one AdamW of this pack without cautious masking."""
    if len(optimizers) != 1 or not isinstance(optimizers[0], AdamW):
        found = [type(o).__name__ for o in optimizers]
        raise ValueError(f"1-bit Adam needs exactly one lightning_converge.optim.AdamW optimizer, got {found}")
    if any(group["cautious"] for group in optimizers[0].param_groups):
        raise ValueError("1-bit Adam does not support cautious masking (AdamW(cautious=True))")


OneBitAdamStrategy.register_strategies(StrategyRegistry)


@contextmanager
def _step_replaced(optimizer: Optimizer, step: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``optimizer.step`` is ``step`` (an instance attribute hides the class's)."""
    previous = vars(optimizer).get("step")
    optimizer.step = step
    try:
        yield
    finally:
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous
