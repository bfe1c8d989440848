"""LightningModules and DataModules used by configs/ and benchmarks/."""
