import os

import pytest

# Triton kernels run on the CPU under its interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests pick backends explicitly; a developer's override must not change what they check.
os.environ.pop("LIGHTNING_CONVERGE_BACKEND", None)


@pytest.fixture
def single_process_group():
    """A one-worker fit opens a process group in this process and sets the launcher's environment
    variables: undo both, so later tests start clean."""
    import torch.distributed

    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
