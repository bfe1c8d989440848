"""lightning_converge: callbacks, strategies and fused kernels that make Lightning training
converge faster and communicate less."""

__version__ = "0.1.0"
