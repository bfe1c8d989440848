"""lightning_converge: callbacks, strategies and fused kernels that make Lightning training
converge faster and communicate less."""

from lightning_converge import callbacks, guidance, kernels, optim, schedules, strategies

__version__ = "0.1.0"
