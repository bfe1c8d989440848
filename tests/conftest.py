import os

# Triton kernels run on the CPU under its interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests pick backends explicitly; a developer's override must not change what they check.
os.environ.pop("LIGHTNING_CONVERGE_BACKEND", None)
