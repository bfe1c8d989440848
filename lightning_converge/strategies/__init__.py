"""Training strategies; importing this package registers them with Lightning's ``StrategyRegistry`` by name."""

from lightning_converge.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_converge.strategies.diloco import (
    AsyncDiLoCoStrategy,
    DiLoCoStrategy,
    ShardedDiLoCoStrategy,
    ShardedStreamingDiLoCoStrategy,
    StreamingDiLoCoStrategy,
)
from lightning_converge.strategies.onebit_adam import OneBitAdamStrategy

__all__ = [
    "AsyncDiLoCoStrategy",
    "CompressedDDPStrategy",
    "DiLoCoStrategy",
    "OneBitAdamStrategy",
    "ShardedDiLoCoStrategy",
    "ShardedStreamingDiLoCoStrategy",
    "StreamingDiLoCoStrategy",
]
