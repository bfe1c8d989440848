"""Training strategies; importing this package registers them with Lightning's ``StrategyRegistry`` by name."""

from lightning_converge.strategies.compressed_ddp import CompressedDDPStrategy as CompressedDDPStrategy
from lightning_converge.strategies.diloco import DiLoCoStrategy as DiLoCoStrategy
from lightning_converge.strategies.diloco import StreamingDiLoCoStrategy as StreamingDiLoCoStrategy
from lightning_converge.strategies.onebit_adam import OneBitAdamStrategy as OneBitAdamStrategy
