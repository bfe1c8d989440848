"""One dispatch point for every fused pass.

A :class:`Kernel` holds one update rule written three ways:

* ``reference``: plain torch ops over lists of tensors. It is the specification.
* ``compiled``: ``torch.compile`` of the reference; the CPU default. Inductor fuses
  the whole list into a few C++ loops, so one pass reads and writes each byte once.
* ``triton``: ``@triton.jit`` kernels; the CUDA default, testable on CPU with
  ``TRITON_INTERPRET=1``.

Hyperparameters that change during training (lr, betas, step, decay) are passed
as 0-d tensors so that the compiled graph never specializes on their values: a
learning-rate schedule does not recompile.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Any, Callable, Sequence

import torch

BACKENDS = ("auto", "reference", "compiled", "triton")
BACKEND_ENV = "LIGHTNING_CONVERGE_BACKEND"

# One code object serves every optimizer and parameter group; each distinct list
# of shapes is a separate compiled graph, so allow more than dynamo's default of 8.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
torch._dynamo.config.accumulated_cache_size_limit = max(
    torch._dynamo.config.accumulated_cache_size_limit, 512
)


def validate_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise a ``ValueError`` naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Choose the concrete backend for tensors on ``device``.

    ``LIGHTNING_CONVERGE_BACKEND`` overrides ``"auto"`` (and only ``"auto"``: an
    explicit argument wins). ``"auto"`` means triton on CUDA when it is installed,
    else compiled. A backend that cannot run on ``device`` raises.
    """
    validate_backend(backend)
    if backend == "auto":
        backend = validate_backend(os.environ.get(BACKEND_ENV, "auto"))
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "compiled"
    if backend == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors here: it needs CUDA, "
            "or TRITON_INTERPRET=1 on CPU, and the triton package. "
            "Use backend='compiled' or 'reference'."
        )
    return backend


def _first_device(args: Sequence[Any]) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    raise ValueError("a kernel needs at least one tensor argument")


class Kernel:
    """A fused pass with a reference, a compiled and (optionally) a triton implementation.

    Call it like the reference, plus ``backend=``. The triton implementation is
    registered lazily by :meth:`register_triton` (modules in ``kernels/triton/``) and has
    the reference's signature.

    ``step_factors`` (optional) computes per-tensor scalars from the ``steps`` list,
    such as bias corrections, once per tensor and eagerly, before the elementwise
    ``body`` runs; they reach the body as extra keyword arguments. Inside compiled
    code they would be recomputed for every vector of elements: inductor compiles
    with errno-preserving libm calls, so ``beta ** step`` is not hoisted out of the
    loop (measured: 25% of an AdamW step). It takes ``steps`` and the kernel's
    keyword arguments that it names. The triton implementation gets the plain
    arguments and computes these scalars itself, once per program.
    """

    def __init__(
        self,
        body: Callable[..., Any],
        step_factors: Callable[..., dict[str, Any]] | None = None,
    ):
        self.body = body
        self.step_factors = step_factors
        self.__name__ = body.__name__
        self.__doc__ = body.__doc__
        if step_factors is not None:
            self._steps_index = list(inspect.signature(body).parameters).index("steps")
            self._factor_arguments = [n for n in inspect.signature(step_factors).parameters if n != "steps"]
        self.reference = self._with_step_factors(body)
        self._compiled: Callable[..., Any] | None = None
        self._triton: Callable[..., Any] | None = None
        self._triton_loader: Callable[[], Callable[..., Any]] | None = None

    def _with_step_factors(self, body: Callable[..., Any]) -> Callable[..., Any]:
        if self.step_factors is None:
            return body

        @functools.wraps(self.body)
        def run(*args: Any, **kwargs: Any) -> Any:
            named = {name: kwargs[name] for name in self._factor_arguments if name in kwargs}
            return body(*args, **kwargs, **self.step_factors(args[self._steps_index], **named))

        return run

    @property
    def compiled(self) -> Callable[..., Any]:
        if self._compiled is None:
            compiled = torch.compile(self.body, fullgraph=True)
            self._compiled = self._with_step_factors(compiled)
        return self._compiled

    def register_triton(self, loader: Callable[[], Callable[..., Any]]) -> None:
        """Register a zero-argument loader that imports triton lazily and returns the implementation."""
        self._triton_loader = loader

    @property
    def triton(self) -> Callable[..., Any]:
        if self._triton is None:
            if self._triton_loader is None:
                raise NotImplementedError(f"kernel {self.__name__!r} has no triton implementation")
            self._triton = self._triton_loader()
        return self._triton

    def implementation(self, backend: str, device: torch.device) -> Callable[..., Any]:
        name = resolve_backend(backend, device)
        if name == "triton" and backend == "auto" and self._triton_loader is None:
            name = "compiled"  # a pass without a triton version runs compiled on CUDA too
        if name == "reference":
            return self.reference
        if name == "compiled":
            return self.compiled
        return self.triton

    def __call__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        return self.implementation(backend, _first_device(args))(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Kernel({self.__name__})"


def kernel(
    body: Callable[..., Any] | None = None,
    *,
    step_factors: Callable[..., dict[str, Any]] | None = None,
) -> Any:
    """Decorator: turn a reference implementation into a dispatching :class:`Kernel`.

    ``@kernel``, or ``@kernel(step_factors=...)``.
    """
    if body is None:
        return functools.partial(Kernel, step_factors=step_factors)
    return Kernel(body, step_factors)


def scalar(value: float | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-d tensor on ``device``: how changing hyperparameters enter kernels.

    The optimizers ask for float64: the scalars the kernels derive from a
    hyperparameter (``1 - beta2``, bias corrections) are then formed before
    anything is rounded to the parameters' precision. In fp32, 0.9999 is
    0.99989998, so ``1 - beta2`` would be off by 1.7e-4 relative.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def math_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a kernel computes in for ``tensor``: float64 for float64 tensors, else
    float32 (bf16 and fp16 values are computed in fp32 and rounded when stored)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
