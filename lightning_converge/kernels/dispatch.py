"""One dispatch point for every fused pass.

A :class:`Kernel` holds one update rule written three ways:

* ``reference``: plain torch ops over lists of tensors. It is the specification.
* ``compiled``: ``torch.compile`` of the reference. Inductor fuses the whole list
  into a few C++ loops, so one pass reads and writes each byte once.
* ``triton``: ``@triton.jit`` kernels; the CUDA default, testable on CPU with
  ``TRITON_INTERPRET=1``.

``"auto"`` on CPU (and on CUDA for a pass without a triton version) compiles a pass
only once compiling pays: a call runs the reference until the reference has done,
for that list of tensors, about the work that compiling it costs; then that list
runs compiled (see :meth:`Kernel.calls_before_compiling`). Short runs and small
models never pay the compiler; long runs reach the compiled pass's bandwidth.

Hyperparameters that change during training (lr, betas, step, decay) are passed
as 0-d tensors so that the compiled graph never specializes on their values: a
learning-rate schedule does not recompile.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings
from typing import Any, Callable, Sequence

import torch

BACKENDS = ("auto", "reference", "compiled", "triton")
BACKEND_ENV = "LIGHTNING_CONVERGE_BACKEND"

# One code object serves every optimizer and parameter group; each distinct list
# of shapes is a separate compiled graph, so a kernel may need more graphs than
# dynamo's default limit of 8 per function. Only our kernels get the higher limit.
RECOMPILE_LIMIT = 64

# The cost model of "auto", fitted to AdamW on a 2-core CPU with a cold compile
# cache: compiling paid for itself after 8,700 calls on 16 tensors of 4 k values
# and after 340 calls on 16 tensors of 512 k. Compiling costs about 0.5 s per
# tensor in the list (dynamo traces the loop unrolled, inductor emits C++ for
# each tensor); per call the reference loses about 0.05 ms of overhead per tensor
# plus 0.17 ms per MB of arguments. In bytes of arguments: compiling one tensor
# costs what the reference loses over COMPILE_COST_BYTES_PER_TENSOR, and a
# tensor's overhead per call is worth CALL_OVERHEAD_BYTES_PER_TENSOR.
# benchmarks/first_fit.py checks the break-even on 28 M parameters.
COMPILE_COST_BYTES_PER_TENSOR = 3 * 2**30
CALL_OVERHEAD_BYTES_PER_TENSOR = 2**18 + 2**16


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


def requested_backend(backend: str) -> str:
    """The backend asked for: an explicit ``backend`` argument, else ``LIGHTNING_CONVERGE_BACKEND``, else ``"auto"``."""
    validate_backend(backend)
    if backend == "auto":
        backend = validate_backend(os.environ.get(BACKEND_ENV, "auto"))
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Choose the concrete backend for tensors on ``device``.

    ``LIGHTNING_CONVERGE_BACKEND`` overrides ``"auto"`` (and only ``"auto"``: an
    explicit argument wins). ``"auto"`` means triton on CUDA when it is installed,
    else compiled (which, under ``"auto"``, compiles each pass once it pays:
    see :class:`Kernel`); on CUDA without triton it says so, once per process.
    ``"triton"`` where triton cannot run (tensors not on CUDA, unless
    ``TRITON_INTERPRET=1`` on CPU; triton not installed) falls back to what
    ``"auto"`` runs there, compiled: :class:`Kernel` warns once per kernel.
    """
    global _said_triton_is_missing
    backend = requested_backend(backend)
    if backend == "auto" and device.type == "cuda" and not triton_available() and not _said_triton_is_missing:
        _said_triton_is_missing = True
        warnings.warn(
            "lightning_converge: triton is not installed, so backend='auto' runs the compiled "
            "kernels on CUDA, not the triton ones; install triton for them.",
            stacklevel=3,
        )
    if backend == "auto" or (backend == "triton" and not _triton_runs_on(device)):
        backend = "triton" if device.type == "cuda" and triton_available() else "compiled"
    return backend


# Whether "auto" has said that triton is missing on CUDA (once per process).
_said_triton_is_missing = False


def _first_device(args: Sequence[Any]) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    raise ValueError("a kernel needs at least one tensor argument")


def _signature(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    """What makes dynamo compile a separate graph: the first list's shapes, each
    argument's dtype (or ``None``) and the static (non-tensor) options."""
    dtypes = tuple(
        arg.dtype if isinstance(arg, torch.Tensor)
        else arg[0].dtype if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor)
        else None
        for arg in args
    )
    options = tuple((name, value) for name, value in kwargs.items() if isinstance(value, (bool, int, float, str)))
    return tuple(t.shape for t in args[0]), dtypes, options


def _argument_bytes(args: Sequence[Any]) -> int:
    """Bytes of every tensor a call is given, in lists or alone."""
    tensors = [t for arg in args for t in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _compile(body: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(body)`` allowed :data:`RECOMPILE_LIMIT` graphs, leaving dynamo's global config alone.

    Where ``torch.compile`` has no ``recompile_limit`` (older torch), dynamo's global
    limit applies: a kernel's lists beyond it run eagerly, with dynamo's warning.
    """
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(body, fullgraph=True, recompile_limit=RECOMPILE_LIMIT)
    return torch.compile(body, fullgraph=True)


class Kernel:
    """A fused pass with a reference, a compiled and (optionally) a triton implementation.

    Call it like the reference, plus ``backend=``. The triton implementation is
    registered lazily by :meth:`register_triton` (modules in ``kernels/triton/``) and has
    the reference's signature.

    Under ``"auto"`` where the compiled backend is chosen, each distinct list of
    tensors (shapes, dtypes, static options: what makes dynamo compile a separate
    graph) runs the reference for its first :meth:`calls_before_compiling` calls, then
    compiled. The decision depends on shapes and call counts only, so every rank of a
    data-parallel run switches at the same step. ``backend="compiled"`` (or
    ``LIGHTNING_CONVERGE_BACKEND=compiled``) compiles from the first call.

    ``step_factors`` (optional) computes per-tensor scalars from step counts,
    such as bias corrections, once per tensor and eagerly, before the elementwise
    ``body`` runs; they reach the body as extra keyword arguments. Inside compiled
    code they would be recomputed for every vector of elements: inductor compiles
    with errno-preserving libm calls, so ``beta ** step`` is not hoisted out of the
    loop (measured: 25% of an AdamW step). It takes, by name, the kernel's
    arguments it names (``steps``, ``beta1``, ...; positional or keyword). The
    triton implementation gets the plain arguments and computes these scalars
    itself, once per program.
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
            positions = list(inspect.signature(body).parameters)
            # Each argument step_factors names, with its position in the body's signature.
            self._factor_arguments = [(n, positions.index(n)) for n in inspect.signature(step_factors).parameters]
        self.reference = self._with_step_factors(body)
        self._compiled: Callable[..., Any] | None = None
        self._triton: Callable[..., Any] | None = None
        self._triton_loader: Callable[[], Callable[..., Any]] | None = None
        # Per signature (see _signature): reference calls "auto" still runs before compiling.
        self._calls_left: dict[tuple, int] = {}
        self._fallback_warned = False  # whether backend="triton" has said it falls back (once per kernel)

    def _with_step_factors(self, body: Callable[..., Any]) -> Callable[..., Any]:
        if self.step_factors is None:
            return body

        @functools.wraps(self.body)
        def run(*args: Any, **kwargs: Any) -> Any:
            named = {
                name: kwargs[name] if name in kwargs else args[position]
                for name, position in self._factor_arguments
                if name in kwargs or position < len(args)
            }
            return body(*args, **kwargs, **self.step_factors(**named))

        return run

    @property
    def compiled(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = self._with_step_factors(_compile(self.body))
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

    def _choice(self, backend: str, device: torch.device) -> tuple[str, bool]:
        """The implementation that runs for ``device``, and whether "auto"'s compile policy applies to it.

        ``"triton"`` that cannot run here (a kernel without a triton version, tensors
        not on CUDA) falls back to what ``"auto"`` runs, with one warning per kernel.
        """
        requested = requested_backend(backend)
        name = resolve_backend(requested, device)
        if requested == "triton" and name != "triton":
            self._warn_fallback(
                f"cannot run on {device.type} tensors here (it needs CUDA, or TRITON_INTERPRET=1 on CPU, "
                "and the triton package)"
            )
        if name == "triton" and self._triton_loader is None:
            if requested == "triton":
                self._warn_fallback("has no triton version")
            name = "compiled"
        return name, name == "compiled" and requested != "compiled"

    def _warn_fallback(self, reason: str) -> None:
        if not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn(
                f"kernel {self.__name__!r}: backend='triton' {reason}; it runs what backend='auto' "
                "runs instead (the reference, compiled once compiling pays). This is said once per kernel.",
                stacklevel=4,
            )

    def implementation(self, backend: str, device: torch.device) -> Callable[..., Any]:
        """The implementation ``backend`` names for ``device`` (``"auto"``: before its compile policy)."""
        return getattr(self, self._choice(backend, device)[0])

    @staticmethod
    def calls_before_compiling(*args: Any) -> int:
        """How many calls with these arguments ``"auto"`` runs the reference before compiling.

        Compiling pays once the reference has lost to the compiled pass what compiling
        costs. Both grow with the number of tensors ``n`` in the list; per call the
        reference loses in proportion to the bytes ``B`` it is given plus a fixed
        overhead per tensor, so this is
        ``ceil(n * COMPILE_COST_BYTES_PER_TENSOR / (B + n * CALL_OVERHEAD_BYTES_PER_TENSOR))``:
        about 350 calls for AdamW on 28 M parameters in 51 tensors, about 7,800 on a
        tiny Llama's 115 k parameters in 21 tensors.
        """
        count = len(args[0])
        per_call = _argument_bytes(args) + count * CALL_OVERHEAD_BYTES_PER_TENSOR
        return -(-count * COMPILE_COST_BYTES_PER_TENSOR // per_call)

    def _compiles_now(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        """Under "auto": whether this call runs compiled (an empty list never does); counts the call."""
        if not args[0]:
            return False
        key = _signature(args, kwargs)
        left = self._calls_left.get(key)
        if left is None:
            left = self.calls_before_compiling(*args)
        self._calls_left[key] = max(left - 1, 0)
        return left == 0

    def __call__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        name, compile_policy = self._choice(backend, _first_device(args))
        if compile_policy and not self._compiles_now(args, kwargs):
            name = "reference"
        return getattr(self, name)(*args, **kwargs)

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

    Each call builds a new tensor (on CUDA, from a Python number, a blocking copy):
    what runs every step takes its scalars from :class:`ScalarSlots` instead.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


class ScalarSlots:
    """Persistent 0-d tensors through which changing hyperparameters enter repeated kernel calls.

    :func:`scalar` builds a new tensor from a Python number at every call; on CUDA
    each one is a blocking host-to-device copy, several per parameter group and
    step. A slot is allocated once per key (and device and dtype) and refilled in
    place at every call: ``fill_`` with a Python number is a kernel launch that
    carries the number as an argument, with no host synchronization. A tensor
    value is copied in (keep it on the slot's device to stay free of syncs).

    Every owner (an optimizer per parameter group, a callback) keeps its own slots
    and leaves them out of its ``state_dict`` and pickles: they are a cache, not
    state. A value handed to a kernel must not be kept past the call, since the
    next call overwrites it.
    """

    def __init__(self) -> None:
        self._slots: dict[Any, torch.Tensor] = {}

    def __call__(
        self, key: Any, value: float | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The slot of ``key`` on ``device`` in ``dtype``, now holding ``value``."""
        slot = self._slots.get(key)
        if slot is None or slot.device != device or slot.dtype != dtype:
            slot = self._slots[key] = torch.empty((), dtype=dtype, device=device)
        if isinstance(value, torch.Tensor):
            slot.copy_(value.detach().reshape(()))
        else:
            slot.fill_(value)
        return slot


def math_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a kernel computes in for ``tensor``: float64 for float64 tensors, else
    float32 (bf16 and fp16 values are computed in fp32 and rounded when stored)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
