"""Compressed data parallelism: DDP whose gradient all-reduce sends compressed gradients."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from lightning_converge.comm import COMPRESSORS, Layout, make_compressor
from lightning_converge.comm.base import check_int
from lightning_converge.strategies.comm_hook import CommHookDDPStrategy, pop_ddp_strategy_arguments

# Registered names -> compressor. "ddp_compressed" takes the default compressor.
_ALIASES = {
    "ddp_int8": "int8",
    "ddp_sign": "sign",
    "ddp_powersgd": "powersgd",
    "ddp_topk": "topk",
    "ddp_fp16": "fp16",
}


class CompressedDDPStrategy(CommHookDDPStrategy):
    """DDP that averages gradients through a compressor from :mod:`lightning_converge.comm`.

    Registered as ``strategy="ddp_compressed"`` (int8), and ``"ddp_int8"``,
    ``"ddp_sign"``, ``"ddp_powersgd"``, ``"ddp_topk"``, ``"ddp_fp16"`` (those
    compressors with their defaults), on ``import lightning_converge``.

    Args:
        compressor: ``"none"`` (plain DDP: every bucket is averaged in its own dtype,
            with the same arithmetic as DDP's built-in all-reduce, so parameters
            match ``strategy="ddp"`` exactly), or a name from
            :data:`lightning_converge.comm.COMPRESSORS`: ``"fp16"``, ``"bf16"``,
            ``"int8"``, ``"sign"``, ``"ternary"``, ``"topk"``, ``"powersgd"``, ``"onebit"``.
        error_feedback: carry what compression lost into the next step. None
            takes the compressor's default: on, except for ``"ternary"`` (unbiased,
            and not contractive: its residual would grow without bound).
        start_step: optimizer steps of plain averaging before compression starts
            (PowerSGD's paper and torch's hook warm up this way). Compressors that
            count steps (``topk``'s sparsity warm-up) count from here.
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper.
        **compressor_kwargs: the compressor's options, e.g. ``block_size`` (int8,
            sign), ``ratio`` / ``momentum`` (topk), ``rank`` (powersgd). Names of
            :class:`~lightning.pytorch.strategies.DDPStrategy`'s own arguments
            (``process_group_backend``, ``timeout``, ...) go to DDPStrategy.

    An unknown compressor or option, or an option out of range, raises a
    ``ValueError`` here, before any training.

    When each hook fires: see :class:`~lightning_converge.strategies.comm_hook.CommHookDDPStrategy`.
    The communication hook compresses each bucket (fp32 math whatever the
    gradients' dtype), exchanges it and hands back the average; each rank keeps
    its own error-feedback residuals and compressor state, saved in checkpoints
    under ``"compressed_ddp"`` (every rank's) so that a resumed run continues
    exactly. Gradient accumulation communicates once per optimizer step, and
    ``precision="bf16-mixed"`` compresses the fp32 gradients of the fp32 parameters.
    """

    checkpoint_key = "compressed_ddp"

    def __init__(
        self,
        compressor: str = "int8",
        error_feedback: Optional[bool] = None,
        start_step: int = 0,
        *,
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **compressor_kwargs: Any,
    ) -> None:
        ddp_arguments = pop_ddp_strategy_arguments(compressor_kwargs)
        check_int("start_step", start_step, 0)
        if compressor == "none":
            given = sorted(compressor_kwargs) + ([] if error_feedback is None else ["error_feedback"])
            if given:
                raise ValueError(f"compressor='none' (plain DDP) takes no options, got {given}")
            self.compressor = None
        elif compressor in COMPRESSORS:
            if error_feedback is not None:
                compressor_kwargs["error_feedback"] = error_feedback
            self.compressor = make_compressor(compressor, **compressor_kwargs)
        else:
            raise ValueError(f"unknown compressor {compressor!r}; choose 'none' or one of {sorted(COMPRESSORS)}")
        self.start_step = start_step
        super().__init__(ddp_kwargs=ddp_kwargs, **ddp_arguments)

    def reduce_bucket(self, buffer: Tensor, layout: Layout) -> Tensor:
        step = self.optimizer_steps_done - self.start_step
        if self.compressor is None or step < 0:
            return self.exchange.average(buffer)
        return self.compressor.reduce(buffer.float(), layout, self.exchange, step)

    def comm_state_dict(self) -> dict[str, Any]:
        return {} if self.compressor is None else {"compressor": self.compressor.state_dict()}

    def load_comm_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.compressor is not None and "compressor" in state_dict:
            self.compressor.load_state_dict(state_dict["compressor"])

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "ddp_compressed", cls, description="DDP with int8 gradient compression and error feedback", override=True
        )
        for name, compressor in _ALIASES.items():
            description = f"DDP with {compressor} gradient compression"
            strategy_registry.register(name, cls, description=description, override=True, compressor=compressor)


CompressedDDPStrategy.register_strategies(StrategyRegistry)
