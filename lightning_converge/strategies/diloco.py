"""DiLoCo and Streaming DiLoCo: data-parallel training that communicates every H steps, not every step.

* :class:`DiLoCoStrategy` ("DiLoCo: Distributed Low-Communication Training of
  Language Models", Douillard et al., 2023), registered as ``strategy="diloco"``.
  Each worker runs the user's optimizer (the *inner* optimizer, from
  ``configure_optimizers``) alone for ``inner_steps`` steps, with no gradient
  all-reduce. Then the workers average their *pseudo-gradients* (global
  parameters minus local parameters) in one all-reduce, an *outer* optimizer
  (SGD with Nesterov momentum, lr 0.7, momentum 0.9 in the paper) applies the
  average to the global parameters, and every worker continues from the new
  global parameters. ``inner_steps`` may be a schedule, such as
  :class:`~lightning_converge.schedules.QSR` (Quadratic Synchronization Rule),
  which is given the inner optimizer's live learning rate.
  ``delay=1`` overlaps the all-reduce with the next inner phase: the average
  is applied one outer step late, the "delayed outer gradients" of "Eager
  Updates For Overlapped Communication and Computation in DiLoCo" (Kale et al.,
  2025).
* :class:`StreamingDiLoCoStrategy` ("Streaming DiLoCo with overlapping
  communication", Douillard et al., 2025), registered as
  ``strategy="streaming_diloco"``: the parameters are split into
  ``num_fragments`` fragments (whole layers, strided, by default; or equal runs
  of the parameters, ``fragment_assignment="balanced"``) that synchronize in
  turn, so the peak bandwidth falls by ``num_fragments``; each fragment's all-reduce starts
  ``overlap_steps`` inner steps before it is applied, and the new global value
  is mixed into the local one with ``mixing_alpha``.

Both are one engine: DiLoCo is Streaming DiLoCo with one fragment, no overlap
and no mixing (plus, with ``delay=1``, an overlap of a whole outer step).

**Schedule.** Training is cut into *rounds* of H inner steps (H is
``inner_steps``, evaluated when the round starts). Fragment ``f`` (0-based,
of F) synchronizes ``(f + 1) * H // F`` steps into each round, so the last
fragment syncs when the round ends; with one fragment that is every H steps.
"Synchronizes" means: its pseudo-gradient is taken and its all-reduce starts
after that inner step; the result is applied ``overlap_steps`` steps later (at
once when 0), or with ``delay=1`` when the fragment next syncs. Steps count the
inner optimizer's steps since the start of training (``trainer.global_step``
with one optimizer and no resets).

**Inside Lightning.** The strategy is a :class:`~lightning.pytorch.strategies.DDPStrategy`
(launchers, samplers, the process group and checkpoints work as for
``"ddp"``) that does not wrap the model in ``DistributedDataParallel``:
:meth:`DiLoCoStrategy.configure_ddp`, where DDP would wrap it, instead
broadcasts rank 0's parameters and buffers, opens a separate process group for
the pseudo-gradients (so Lightning's own collectives never queue behind an
overlapped all-reduce) and builds the outer state. The outer state (an fp32
copy of the global parameters and the outer optimizer's state) lives on
``outer_state_device``, CPU by default. The all-reduce runs on the
parameters' device, in fp32 unless a ``compressor`` is given.

Each inner step logs ``diloco/outer_step`` (outer updates applied so far, one
per fragment sync); ``comm/bytes_sent`` and ``comm/bytes_received``, the bytes
of pseudo-gradient this worker sent and received in the exchanges completed
during that step (0 in most steps), and ``comm/bytes_sent_total`` and
``comm/bytes_received_total``, the same since training started; and
``comm/wait_seconds`` (time spent blocked, waiting for exchanges to complete).
Bytes follow the convention of :class:`lightning_converge.comm.Exchange`: the
sizes of the tensors handed to the collective and returned by it, compressed
when a ``compressor`` is set (an fp32 all-reduce of N numbers sends 4 N bytes
and receives 4 N), not the ring algorithm's ``2 (n - 1) / n`` multiple on the wire.

``delay=1`` in detail: at each outer step the worker takes its pseudo-gradient
(measured from the parameters its inner phase started from) and starts its
all-reduce, applies the previous outer step's average, which had a whole inner
phase to arrive, and starts the next inner phase from the resulting global
parameters. Every average thus reaches the global parameters exactly one outer
step late. At the first outer step there is nothing to apply yet: the next
phase goes on from where the first ended (returning to the initial parameters
would throw the first phase's progress away and send the same direction twice),
and its pseudo-gradient is measured from there, so each phase's progress is
sent once.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_converge.comm import Compressor, Exchange, Layout, make_compressor
from lightning_converge.kernels import diloco_outer_step, ema_update, scalar
from lightning_converge.kernels.dispatch import validate_backend
from lightning_converge.schedules import Schedule, as_schedule, takes_lr
from lightning_converge.strategies.ddp_options import check_unwrapped, reject_options
from lightning_converge.strategies.rank_state import cpu_copy, load_rank_states, save_rank_states

OuterOptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]

# Built-in outer optimizers, run by the fused ``diloco_outer_step`` kernel: name -> nesterov.
_BUILT_IN_OUTER_OPTIMIZERS = {"nesterov": True, "sgd": False}
_FRAGMENT_ASSIGNMENTS = ("strided", "contiguous", "balanced")
# A part of a parameter tensor: (its index, first element, end element) in the flattened tensor.
Piece = tuple[int, int, int]


def _layer_of(name: str) -> Optional[str]:
    """The layer a parameter belongs to: its module path up to the first integer index
    (``"blocks.3.attn.qkv.weight"`` -> ``"blocks.3"``), or None outside any indexed container
    (embeddings, a final norm, the head)."""
    parts = name.split(".")
    for end, part in enumerate(parts[:-1], start=1):
        if part.isdigit():
            return ".".join(parts[:end])
    return None


def assign_fragments(
    names: Sequence[str], numels: Sequence[int], num_fragments: int, assignment: str
) -> list[list[int]]:
    """Split parameter tensors (given by name and size, in model order) into ``num_fragments`` fragments
    of indices, by layer.

    Layers are the entries of indexed containers (``nn.ModuleList``, ``nn.Sequential``):
    ``"strided"`` puts layer ``l`` in fragment ``l % num_fragments`` (each fragment spans the depth
    of the network, as in Streaming DiLoCo), ``"contiguous"`` gives each fragment a run of
    consecutive layers. Tensors outside any layer go, largest first, to the fragment holding the
    fewest elements, which keeps the largest fragment (the peak bytes of a sync) small. A model
    with fewer layers than fragments is split the same way with each tensor as a layer.
    """
    if num_fragments > len(names):
        raise ValueError(f"num_fragments={num_fragments} is larger than the number of parameter tensors ({len(names)})")
    layers: dict[str, list[int]] = {}
    outside: list[int] = []
    for index, name in enumerate(names):
        layer = _layer_of(name)
        if layer is None:
            outside.append(index)
        else:
            layers.setdefault(layer, []).append(index)
    units = list(layers.values())
    if len(units) < num_fragments:
        units, outside = [[index] for index in range(len(names))], []
    if assignment == "strided":
        runs = [units[f::num_fragments] for f in range(num_fragments)]
    else:
        bounds = torch.arange(len(units)).tensor_split(num_fragments)
        runs = [units[int(run[0]) : int(run[-1]) + 1] for run in bounds]
    fragments = [[index for unit in run for index in unit] for run in runs]
    sizes = [sum(numels[index] for index in fragment) for fragment in fragments]
    for index in sorted(outside, key=lambda i: -numels[i]):
        lightest = min(range(num_fragments), key=sizes.__getitem__)
        fragments[lightest].append(index)
        sizes[lightest] += numels[index]
    return [sorted(fragment) for fragment in fragments]


def split_evenly(numels: Sequence[int], num_fragments: int) -> list[list[Piece]]:
    """Cut the parameters, laid end to end in model order, into ``num_fragments`` runs of equal length
    (to one element), each a list of pieces: whole tensors, and parts of the tensors cut at its ends."""
    if num_fragments > len(numels):
        raise ValueError(
            f"num_fragments={num_fragments} is larger than the number of parameter tensors ({len(numels)})"
        )
    total = sum(numels)
    bounds = [round(f * total / num_fragments) for f in range(num_fragments + 1)]
    fragments: list[list[Piece]] = [[] for _ in range(num_fragments)]
    offset = 0
    for index, numel in enumerate(numels):
        for f, fragment in enumerate(fragments):
            start, end = max(bounds[f], offset), min(bounds[f + 1], offset + numel)
            if start < end:
                fragment.append((index, start - offset, end - offset))
        offset += numel
    return fragments


def _piece_of(tensors: Sequence[Tensor], piece: Piece) -> Tensor:
    """The piece of ``tensors[index]``: the tensor itself when whole, else a flat view of its part."""
    index, start, end = piece
    tensor = tensors[index]
    return tensor if end - start == tensor.numel() else tensor.view(-1)[start:end]
def _available_device(device: Union[str, torch.device], option: str) -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError naming ``option`` if it is malformed or absent here.

    CUDA is counted without initializing it (as Lightning does), so a later fork stays safe.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{option} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if device.type == "cuda":
        count = num_cuda_devices()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{option}={str(device)!r}, but this machine has {count} CUDA devices")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
        if module is not None and hasattr(module, "is_available") and not module.is_available():
            raise ValueError(f"{option}={str(device)!r}, but no {device.type} device is available here")
    return device


@dataclass
class _PendingSync:
    """One fragment's pseudo-gradient on its way through the all-reduce, not yet applied.

    ``apply_at_step`` is the inner step after which the average is applied, or
    None for "when the fragment next syncs" (``delay=1``). ``exchange`` resolves
    to the average over the workers (flat fp32, on the parameters' device) and
    the bytes this worker sent; once it has, or for an average restored from a
    checkpoint, it is None and ``average`` holds the result.
    """

    apply_at_step: Optional[int]
    exchange: Optional[torch.futures.Future] = None
    average: Optional[Tensor] = None


@dataclass
class _Fragment:
    """Parameters that synchronize together: pieces of the strategy's parameter tensors, mostly whole."""

    index: int
    pieces: list[Piece]
    # Names and shapes of the pieces, in the order of the flat pseudo-gradient (what compressors read).
    layout: Layout
    pending: Optional[_PendingSync] = None
    # True while the local parameters hold nothing unsent: they equal the global ones, or (delay=1,
    # right after the first sync) the origin of the next inner phase.
    in_sync: bool = True
    # Where this worker's inner phase started (fp32, on the outer-state device), when not at the
    # global parameters: with delay=1, between the first sync and the second.
    origin: Optional[list[Tensor]] = None


class DiLoCoStrategy(DDPStrategy):
    """DiLoCo: local training for ``inner_steps`` steps, then one outer step on the averaged pseudo-gradients.

    Args:
        inner_steps: H, the inner steps between synchronizations: an int >= 1,
            or a schedule evaluated at the step each round starts (rounded to the
            nearest int). A schedule whose ``__call__`` takes ``lr``, such as
            :class:`~lightning_converge.schedules.QSR`, is also given the inner
            optimizer's current learning rate (``lr=``), which must be the same on
            every worker (any step-based lr schedule is).
        outer_optimizer: ``"nesterov"`` (SGD with Nesterov momentum, the paper's)
            or ``"sgd"`` (heavy-ball momentum), both run by the fused
            :func:`~lightning_converge.kernels.diloco_outer_step` kernel; or a
            callable taking the list of global parameters (fp32 tensors on
            ``outer_state_device``) and returning a ``torch.optim.Optimizer``,
            e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``, which then
            owns its own hyperparameters.
        outer_lr: the built-in outer optimizers' learning rate, a number or a
            schedule of the inner step. ``1.0`` with ``outer_momentum=0`` makes
            the global parameters the plain average of the local ones.
        outer_momentum: the built-in outer optimizers' momentum, in [0, 1).
        compressor: how pseudo-gradients travel: None sends them as fp32; a
            name from :data:`lightning_converge.comm.COMPRESSORS` (``"fp16"``,
            ``"bf16"``, ``"int8"``, ``"sign"``, ...) or a
            :class:`~lightning_converge.comm.Compressor` (to set its options)
            compresses them, with error feedback across outer steps when the
            compressor has it. The outer step is fp32 either way. A compressor's
            collectives block, so they run on a thread of their own to overlap
            with the inner steps.
        delay: 0 waits for each all-reduce before continuing. 1 starts it and
            goes on with the next inner phase from the newest global parameters
            without its result; the average is applied at the next outer step,
            one outer step late, when the next all-reduce starts. The all-reduce is
            then hidden behind a whole inner phase (details below).
        outer_state_device: where the global parameters and the outer
            optimizer's state are kept; checked when the strategy is built (a
            ``"cuda"`` device on a machine without one raises then).
        backend: backend of the fused kernels (``"auto"``, ``"reference"``,
            ``"compiled"``, ``"triton"``), see :mod:`lightning_converge.kernels`.
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
            precision_plugin: as for :class:`~lightning.pytorch.strategies.DDPStrategy`;
            the Trainer sets them.
        process_group_backend, start_method: as for
            :class:`~lightning.pytorch.strategies.DDPStrategy`.
        timeout: seconds (or a ``timedelta``) a collective may wait before it
            fails; this is the process groups' timeout, so a worker that dies or
            hangs makes the others raise within it instead of waiting forever.
        ddp_kwargs: options of the ``DistributedDataParallel`` wrapper, the same
            argument as in the pack's other strategies. The model is not wrapped
            here, so any value other than the wrapper's default raises, as does
            a wrapper option or a DDP communication hook given as a keyword.

    Only one inner optimizer is supported.

    **One model.** Between syncs each worker's parameters are its own; the
    model the workers agree on is the global parameters
    (:meth:`agreed_parameters`). Validation inside ``fit`` evaluates it
    (swapped into the module, on every worker alike; or, when a callback
    evaluates with an average of it, that average), and checkpoints save it as
    ``state_dict``. When ``fit`` ends (:meth:`finish_local_training`), in-flight
    all-reduces are applied and each fragment whose local parameters hold unsent
    progress takes one last, blocking outer step, so every worker ends with the
    same (global) parameters. EMA and LAWA average the global parameters and call
    :meth:`finish_local_training` before writing their average into the model;
    Switch EMA switches the global parameters (:meth:`move_global_parameters`).

    **Checkpoints** hold, besides what ``"ddp"`` saves, ``checkpoint["diloco"]``:
    the global parameters, the outer optimizer's state, the position in the
    schedule and the averaged pseudo-gradients still to be applied (the strategy
    waits for in-flight all-reduces when saving); and in
    ``checkpoint["rank_states"]`` (:mod:`~lightning_converge.strategies.rank_state`)
    every worker's local model state, inner-optimizer state and error-feedback
    residuals, and its callbacks' per-worker states (Grokfast's filter: each
    worker filters its own gradients). A run resumed from a checkpoint taken in
    the middle of an inner phase continues exactly. So does one resumed from a
    checkpoint saved after ``fit``: it holds the state kept when training ended,
    before the last sync, while its ``state_dict`` is the synced model. Resumed
    with a different number of workers, the interrupted inner phase restarts
    from the global parameters (with a warning).
    """

    # Workers step on their own gradients: Grokfast's state is saved per worker (see rank_state).
    gradients_differ_between_ranks = True

    def __init__(
        self,
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        outer_optimizer: Union[str, OuterOptimizerFactory] = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        delay: int = 0,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        *,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        reject_options(type(self), kwargs, wraps_model=False)
        check_unwrapped(type(self), ddp_kwargs)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=timeout)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if isinstance(outer_optimizer, str):
            if outer_optimizer not in _BUILT_IN_OUTER_OPTIMIZERS:
                raise ValueError(
                    f"outer_optimizer must be one of {sorted(_BUILT_IN_OUTER_OPTIMIZERS)} or a callable "
                    f"params -> torch.optim.Optimizer, got {outer_optimizer!r}"
                )
        elif not callable(outer_optimizer):
            raise TypeError(
                f"outer_optimizer must be a name or a callable params -> torch.optim.Optimizer, got {outer_optimizer!r}"
            )
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum!r}")
        if isinstance(outer_lr, (int, float)) and not (math.isfinite(outer_lr) and outer_lr > 0):
            raise ValueError(f"outer_lr must be a finite number > 0, got {outer_lr!r}")
        if delay not in (0, 1) or isinstance(delay, bool):
            raise ValueError(f"delay must be 0 or 1 (outer steps by which the outer update lags), got {delay!r}")
        if isinstance(compressor, str):
            compressor = make_compressor(compressor)
        elif not (compressor is None or isinstance(compressor, Compressor)):
            raise TypeError(f"compressor must be None, a compressor's name or a Compressor, got {compressor!r}")

        self._inner_steps = as_schedule(inner_steps, "inner_steps")
        self._inner_steps_takes_lr = takes_lr(self._inner_steps)
        self._outer_optimizer_spec = outer_optimizer
        self._outer_lr = as_schedule(outer_lr, "outer_lr")
        self._outer_momentum = float(outer_momentum)
        self._compressor = compressor
        self._delay = delay
        self._outer_device = _available_device(outer_state_device, "outer_state_device")
        self._backend = validate_backend(backend)
        # The streaming options; a DiLoCo round is one fragment, applied at once, replacing the local values.
        self._num_fragments = 1
        self._overlap_steps = 0
        self._mixing_alpha = 0.0
        self._fragment_assignment = "contiguous"
        if not callable(inner_steps):
            self._check_round_length(inner_steps)

        # Set up by configure_ddp when fitting starts.
        self._group: Optional[dist.ProcessGroup] = None
        # With a compressor: its byte-counting collectives, and the thread they run on (they block).
        self._exchange: Optional[Exchange] = None
        self._comm_thread: Optional[ThreadPoolExecutor] = None
        self._params: list[torch.nn.Parameter] = []
        self._local_params: list[Tensor] = []
        self._global_params: list[Tensor] = []
        self._momentum_buffers: list[Tensor] = []
        self._outer_optimizer: Optional[Optimizer] = None
        self._fragments: list[_Fragment] = []
        # Position in the schedule and counters: what a checkpoint restores.
        self._inner_step = 0
        self._round_start = 0
        self._round_length = 0
        self._outer_steps = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._wait_seconds = 0.0
        # Whether the module holds the global parameters for evaluation (its local ones: `_local_params`).
        self._evaluating_global = False
        # (shared state, this worker's state) kept by finish_local_training for checkpoints saved after fit.
        self._state_at_train_end: Optional[tuple[dict[str, Any], dict[str, Any]]] = None
        # Bytes of the exchanges completed since the last inner step was logged.
        self._step_bytes_sent = 0
        self._step_bytes_received = 0

    # ------------------------------------------------------------------ public read-outs

    @property
    def outer_steps(self) -> int:
        """Outer updates applied so far (one per fragment sync)."""
        return self._outer_steps

    @property
    def bytes_sent(self) -> int:
        """Bytes of pseudo-gradient this worker has sent in the exchanges completed so far."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes of averaged pseudo-gradient this worker has received in the exchanges completed so far."""
        return self._bytes_received

    @property
    def wait_seconds(self) -> float:
        """Seconds this worker has spent blocked, waiting for exchanges to complete."""
        return self._wait_seconds

    @property
    def global_parameters(self) -> list[Tensor]:
        """The global parameters (fp32, on ``outer_state_device``), in ``module.parameters()`` order."""
        return self._global_params

    # ------------------------------------------------------------------ Lightning hooks

    def configure_ddp(self) -> None:
        """Fires in ``setup`` when fitting starts, where ``DDPStrategy`` would wrap the model.

        The model stays unwrapped (no per-step gradient all-reduce). Instead:
        rank 0's parameters and buffers are broadcast, a separate process group is
        opened for the pseudo-gradients, and the outer state is built from the
        (now identical) parameters.
        """
        module = self.lightning_module
        _sync_module_states(module)
        self._state_at_train_end = None
        self._group = dist.new_group(backend=dist.get_backend(), timeout=self._timeout)
        if self._compressor is not None:
            self._exchange = Exchange(self._group)
            self._comm_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange")
        names, params = zip(*module.named_parameters())
        self._params = list(params)
        # Views of this worker's parameter storages, which stay put while evaluation swaps other weights in.
        self._local_params = [p.detach() for p in params]
        numels = [p.numel() for p in params]
        if self._fragment_assignment == "balanced":
            assignment = split_evenly(numels, self._num_fragments)
        else:
            by_layer = assign_fragments(names, numels, self._num_fragments, self._fragment_assignment)
            assignment = [[(i, 0, numels[i]) for i in indices] for indices in by_layer]
        self._fragments = [
            _Fragment(index, pieces, self._layout(names, pieces)) for index, pieces in enumerate(assignment)
        ]
        self._global_params = [p.detach().to(self._outer_device, torch.float32, copy=True) for p in self._params]
        if isinstance(self._outer_optimizer_spec, str):
            self._momentum_buffers = [torch.zeros_like(g) for g in self._global_params]
        else:
            self._outer_optimizer = self._outer_optimizer_spec(self._global_params)
            if not isinstance(self._outer_optimizer, Optimizer):
                raise TypeError(
                    f"outer_optimizer must return a torch.optim.Optimizer, got {type(self._outer_optimizer).__name__}"
                )

    def _layout(self, names: Sequence[str], pieces: list[Piece]) -> Layout:
        """The compressors' view of a fragment: each piece's name and shape (a part of a tensor: flat)."""
        shapes = [_piece_of(self._params, piece).shape for piece in pieces]
        return Layout(
            tuple(names[i] if end - start == self._params[i].numel() else f"{names[i]}[{start}:{end}]"
                  for i, start, end in pieces),
            tuple(shapes),
        )

    def _pieces(self, tensors: Sequence[Tensor], fragment: _Fragment) -> list[Tensor]:
        """The fragment's pieces of ``tensors`` (the local or global parameters, the momentum buffers)."""
        return [_piece_of(tensors, piece) for piece in fragment.pieces]

    def setup(self, trainer: Any) -> None:
        """Fires once per ``fit``/``validate``/... before the loops run: DDP's setup, then, when fitting,
        the check that there is one inner optimizer and the length of the first round."""
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports one inner optimizer, "
                f"configure_optimizers returned {len(self.optimizers)}"
            )
        self._start_round()

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Fires for every step of the inner optimizer (automatic or manual optimization): the step,
        then the syncs and outer updates the schedule puts after it."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._after_inner_step()
        return output

    def on_train_end(self) -> None:
        """Fires when ``fit`` finishes training (not on an exception), after the callbacks' ``on_train_end``:
        :meth:`finish_local_training`, unless a callback has already called it."""
        self.finish_local_training()

    @torch.no_grad()
    def finish_local_training(self) -> None:
        """End the workers' local training when ``fit`` ends, once: every worker ends with the global parameters.

        First the state training needs to continue (every worker's local parameters, inner-optimizer
        state and error-feedback residuals, the outer state, the position in the schedule) is kept,
        as CPU copies, for checkpoints saved after ``fit``: a run resumed from one continues as if it
        had not stopped. Then what is in flight is applied, and each fragment whose local parameters
        hold unsent progress takes one last, blocking outer step; the local parameters are replaced
        by the global ones. Callbacks that write into the model when training ends (EMA, LAWA with
        ``keep_average_on_train_end``) call this first, from their own ``on_train_end``, which
        Lightning runs before the strategy's.
        """
        if self._state_at_train_end is not None or not self._fragments:
            return
        self._state_at_train_end = (cpu_copy(self._shared_state()), cpu_copy(self._worker_state()))
        for fragment in self._fragments:
            overlapped = fragment.pending is not None and fragment.pending.apply_at_step is not None
            if overlapped:  # its time has not come; it must not be lost
                self._apply_outer_update(fragment)
            if not fragment.in_sync:  # a delay=1 update still pending is applied inside, as at any sync
                self._start_sync(fragment, apply_at_step=self._inner_step)
            if fragment.pending is not None:
                self._apply_outer_update(fragment, mixing_alpha=0.0)  # replace, so all workers end identical

    def agreed_parameters(self) -> Optional[list[Tensor]]:
        """The parameters the workers agree on while each trains a local copy: the global parameters
        (fp32, on ``outer_state_device``, in ``module.parameters()`` order), from the start of ``fit`` to
        :meth:`finish_local_training`; None otherwise (the model's own parameters are then the agreed ones).

        Averaging callbacks (EMA, LAWA) average these, not a worker's local parameters."""
        if not self._fragments or self._state_at_train_end is not None:
            return None
        return self._global_params

    @torch.no_grad()
    def move_global_parameters(self, values: Sequence[Tensor]) -> None:
        """Replace the global parameters by ``values`` (one per parameter, in ``module.parameters()``
        order, the same on every worker), and move every worker's local parameters, and the origin of
        its inner phase, by as much: the progress of the inner phase carries over, the pseudo-gradients
        stay what they were. Switch EMA (``EMA(switch_every_epoch=True)``) switches the model this way."""
        shifts = [value.to(g.device, g.dtype) - g for g, value in zip(self._global_params, values, strict=True)]
        for global_param, value in zip(self._global_params, values):
            global_param.copy_(value)
        for fragment in self._fragments:
            locals_ = self._pieces(self._local_params, fragment)
            if fragment.in_sync and fragment.origin is None:  # exactly the global values, on every worker
                for local, global_piece in zip(locals_, self._pieces(self._global_params, fragment)):
                    local.copy_(global_piece)
                continue
            for local, shift in zip(locals_, self._pieces(shifts, fragment)):
                local.add_(shift.to(local.device, local.dtype))
            for origin, shift in zip(fragment.origin or [], self._pieces(shifts, fragment)):
                origin.add_(shift)

    def on_validation_start(self) -> None:
        """Fires before each validation (the sanity check included), after the callbacks' hook: while the
        workers train local copies, the model evaluates the global parameters, the same on every worker
        and the model checkpoints save, unless a callback evaluates with an average of them (EMA or LAWA
        with ``validate_with="average"``)."""
        self._swap_in_global_parameters()

    def on_validation_end(self) -> None:
        """Fires after each validation, after the callbacks' hook: the local parameters come back."""
        self._swap_out_global_parameters()

    def _swap_in_global_parameters(self) -> None:
        agreed = self.agreed_parameters()
        callbacks = self.lightning_module.trainer.callbacks
        if agreed is None or self._evaluating_global:
            return
        if any(getattr(callback, "evaluates_with_average", False) for callback in callbacks):
            return
        for param, global_param in zip(self._params, agreed):
            param.data = global_param.to(param.device, param.dtype, copy=True)
        self._evaluating_global = True

    def _swap_out_global_parameters(self) -> None:
        if not self._evaluating_global:
            return
        for param, local in zip(self._params, self._local_params):
            param.data = local
        self._evaluating_global = False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Fires when a checkpoint is assembled: while the workers train local copies, the model's state
        with the global parameters in place of this worker's local ones (the model the workers agree on)."""
        agreed = self.agreed_parameters()
        if agreed is None:
            return super().lightning_module_state_dict()
        return self._module_state_with(agreed)

    def _module_state_with(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """The module's state dict with ``params`` (one per parameter, in ``module.parameters()`` order) as
        its parameters, in their dtypes."""
        state = super().lightning_module_state_dict()
        index_of = {id(p): i for i, p in enumerate(self._params)}
        for name, param in self.lightning_module.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = params[index_of[id(param)]].to(param.dtype)
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Fires on every rank when a checkpoint is saved: adds ``checkpoint["diloco"]`` and every worker's
        local state (collective: gathered on rank 0, see :mod:`~lightning_converge.strategies.rank_state`),
        unless the checkpoint holds weights only. After ``fit``, both are the state kept when training ended."""
        if self._fragments and "optimizer_states" in checkpoint:
            if self._state_at_train_end is None:
                shared, worker = self._shared_state(), self._worker_state()
            else:
                shared, worker = self._state_at_train_end
            checkpoint["diloco"] = shared
            save_rank_states(self, checkpoint, {"diloco": worker})
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Fires on every rank when ``fit`` resumes, before ``setup``: reads the checkpoint and hands this
        worker its own local state (and its callbacks' per-rank states)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        states = load_rank_states(self, checkpoint)
        if "diloco" in checkpoint:
            checkpoint["diloco"]["worker"] = states.get("diloco")
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Fires when resuming ``fit``, after ``setup``: Lightning restores the inner optimizer from
        rank 0's state, then each worker restores its own local state and the outer state."""
        super().load_optimizer_state_dict(checkpoint)
        if "diloco" in checkpoint:
            self._restore_checkpoint_state(checkpoint["diloco"])

    def teardown(self) -> None:
        """Fires when the trainer finishes a stage, also after an exception: closes the pseudo-gradient
        process group (an all-reduce still in flight is abandoned)."""
        self._swap_out_global_parameters()
        if self._group is not None:
            for fragment in self._fragments:
                fragment.pending = None
            if self._comm_thread is not None:
                self._comm_thread.shutdown(wait=False, cancel_futures=True)
                self._comm_thread = None
            dist.destroy_process_group(self._group)
            self._group = None
        super().teardown()

    # ------------------------------------------------------------------ the schedule

    def _check_round_length(self, length: Any) -> int:
        """Return ``length`` as the number of inner steps of a round, or raise naming what is wrong with it."""
        if not (isinstance(length, (int, float)) and not isinstance(length, bool) and math.isfinite(length)):
            raise ValueError(f"inner_steps must be an integer >= 1 or a schedule of the step, got {length!r}")
        length = round(length)
        if length < 1:
            raise ValueError(f"inner_steps must be >= 1, got {length}")
        if length < self._num_fragments:
            raise ValueError(
                f"inner_steps={length} is smaller than num_fragments={self._num_fragments}: "
                "each fragment needs a sync step of its own in every round"
            )
        period = length // self._num_fragments
        if self._overlap_steps >= period:
            raise ValueError(
                f"overlap_steps={self._overlap_steps} must be smaller than the per-fragment period "
                f"inner_steps // num_fragments = {length} // {self._num_fragments} = {period}: a fragment's "
                "all-reduce has to be applied before the next fragment's starts"
            )
        return length

    def _start_round(self) -> None:
        """Begin a round of inner steps at the current step; its length comes from ``inner_steps`` now."""
        if self._inner_steps_takes_lr:
            length = self._inner_steps(self._inner_step, lr=self.optimizers[0].param_groups[0]["lr"])
        else:
            length = self._inner_steps(self._inner_step)
        self._round_start = self._inner_step
        self._round_length = self._check_round_length(length)

    def _sync_step(self, fragment: _Fragment) -> int:
        """The inner step of the current round after which ``fragment`` syncs."""
        return self._round_start + (fragment.index + 1) * self._round_length // self._num_fragments

    @torch.no_grad()
    def _after_inner_step(self) -> None:
        """Count the step; start the syncs and apply the updates due after it; log the counters."""
        self._inner_step += 1
        step = self._inner_step
        for fragment in self._fragments:
            fragment.in_sync = False
        for fragment in self._fragments:
            if step == self._sync_step(fragment):
                self._start_sync(fragment, apply_at_step=None if self._delay else step + self._overlap_steps)
        for fragment in self._fragments:
            if fragment.pending is not None and fragment.pending.apply_at_step == step:
                self._apply_outer_update(fragment)
        if step == self._round_start + self._round_length:
            self._start_round()
        module = self.lightning_module
        for name, value in (
            ("diloco/outer_step", self._outer_steps),
            ("comm/bytes_sent", self._step_bytes_sent),
            ("comm/bytes_received", self._step_bytes_received),
            ("comm/bytes_sent_total", self._bytes_sent),
            ("comm/bytes_received_total", self._bytes_received),
            ("comm/wait_seconds", self._wait_seconds),
        ):
            module.log(name, float(value), on_step=True, on_epoch=False)
        self._step_bytes_sent = self._step_bytes_received = 0

    # ------------------------------------------------------------------ one sync

    def _start_sync(self, fragment: _Fragment, apply_at_step: Optional[int]) -> None:
        """Take the fragment's pseudo-gradient and start its all-reduce.

        The pseudo-gradient is measured from where the inner phase started: the
        global parameters, or the fragment's ``origin``. With ``delay=1`` the next
        inner phase then starts from the newest global parameters, the previous
        outer step's average (which had a whole inner phase to arrive) applied;
        at the first outer step, with nothing to apply, it starts where this one
        ended, which becomes its origin.
        """
        local_params = self._pieces(self._local_params, fragment)
        origin = fragment.origin or self._pieces(self._global_params, fragment)
        pseudo_gradient = torch.cat(
            [(start.to(local.device) - local.float()).reshape(-1) for start, local in zip(origin, local_params)]
        )
        fragment.origin = None
        if self._delay:
            if fragment.pending is not None:
                self._apply_outer_update(fragment)
            else:
                fragment.origin = [p.detach().to(self._outer_device, torch.float32, copy=True) for p in local_params]
                fragment.in_sync = True  # the next phase starts here: a sync now would send zeros
        try:
            exchange = self._start_exchange(fragment, pseudo_gradient)
        except RuntimeError as error:
            raise self._communication_error(error) from error
        fragment.pending = _PendingSync(apply_at_step, exchange)

    def _start_exchange(self, fragment: _Fragment, pseudo_gradient: Tensor) -> torch.futures.Future:
        """Start averaging ``pseudo_gradient`` over the workers; the future resolves to
        (average, bytes sent, bytes received)."""
        if self._compressor is None:
            size = pseudo_gradient.numel() * pseudo_gradient.element_size()  # in and out: one fp32 tensor
            work = dist.all_reduce(pseudo_gradient, group=self._group, async_op=True)
            return work.get_future().then(lambda done: (done.value()[0].div_(self.world_size), size, size))
        future = torch.futures.Future()
        step = self._inner_step

        def reduce() -> None:
            try:
                average = self._compressor.reduce(pseudo_gradient, fragment.layout, self._exchange, step)
                stats = self._exchange.take_stats()
                future.set_result((average, stats.bytes_sent, stats.bytes_received))
            except Exception as error:  # raised again in the training thread, by wait()
                future.set_exception(error)

        self._comm_thread.submit(reduce)
        return future

    def _resolve(self, pending: _PendingSync) -> Tensor:
        """Wait for the exchange (timed), count its bytes, and return the averaged pseudo-gradient."""
        if pending.exchange is not None:
            started = time.perf_counter()
            try:
                pending.average, sent, received = pending.exchange.wait()
            except RuntimeError as error:
                raise self._communication_error(error) from error
            self._wait_seconds += time.perf_counter() - started
            self._bytes_sent += sent
            self._bytes_received += received
            self._step_bytes_sent += sent
            self._step_bytes_received += received
            pending.exchange = None
        return pending.average

    def _apply_outer_update(self, fragment: _Fragment, mixing_alpha: Optional[float] = None) -> None:
        """Apply the fragment's pending average: one outer step on its global parameters, then the
        local parameters move to the new global ones (``mixing_alpha``, the strategy's by default)."""
        averaged = self._resolve(fragment.pending).to(self._outer_device)
        fragment.pending = None
        global_params = self._pieces(self._global_params, fragment)
        pseudo_grads = [
            chunk.view_as(g) for chunk, g in zip(averaged.split([g.numel() for g in global_params]), global_params)
        ]
        if self._outer_optimizer is None:
            diloco_outer_step(
                global_params,
                pseudo_grads,
                self._pieces(self._momentum_buffers, fragment),
                lr=scalar(self._outer_lr(self._inner_step), self._outer_device),
                momentum=scalar(self._outer_momentum, self._outer_device),
                nesterov=_BUILT_IN_OUTER_OPTIMIZERS[self._outer_optimizer_spec],
                backend=self._backend,
            )
        else:
            # Only this fragment has gradients: torch optimizers skip (and keep the state of) the rest.
            for param, grad in zip(global_params, pseudo_grads):
                param.grad = grad
            self._outer_optimizer.step()
            for param in global_params:
                param.grad = None
        self._pull_global(fragment, self._mixing_alpha if mixing_alpha is None else mixing_alpha)
        self._outer_steps += 1

    def _pull_global(self, fragment: _Fragment, mixing_alpha: float) -> None:
        """``local = mixing_alpha * local + (1 - mixing_alpha) * global`` for the fragment (0 replaces)."""
        local_params = self._pieces(self._local_params, fragment)
        device = local_params[0].device
        ema_update(
            local_params,
            [g.to(device) for g in self._pieces(self._global_params, fragment)],
            decay=scalar(mixing_alpha, device),
            backend=self._backend,
        )
        fragment.in_sync = mixing_alpha == 0.0

    def _communication_error(self, error: BaseException) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}: the exchange of pseudo-gradients failed on rank {self.global_rank} after inner "
            f"step {self._inner_step}. Another worker has probably died or stopped responding "
            f"(process-group timeout: {self._timeout}). Cause: {error}"
        )

    # ------------------------------------------------------------------ checkpoints

    def _shared_state(self) -> dict[str, Any]:
        """What every worker holds alike: the outer state, the schedule's position and the averages
        still to be applied (in-flight exchanges are waited for)."""
        for fragment in self._fragments:
            if fragment.pending is not None:
                self._resolve(fragment.pending)
        if self._outer_optimizer is None:
            outer_optimizer_state = {"momentum_buffers": self._momentum_buffers}
        else:
            outer_optimizer_state = self._outer_optimizer.state_dict()
        return {
            "inner_step": self._inner_step,
            "round_start": self._round_start,
            "round_length": self._round_length,
            "outer_steps": self._outer_steps,
            "bytes_sent": self._bytes_sent,
            "bytes_received": self._bytes_received,
            "global_params": self._global_params,
            "outer_optimizer": outer_optimizer_state,
            "fragments": [
                {
                    "pieces": fragment.pieces,
                    "in_sync": fragment.in_sync,
                    "pending_average": None if fragment.pending is None else fragment.pending.average,
                    "pending_apply_at_step": None if fragment.pending is None else fragment.pending.apply_at_step,
                }
                for fragment in self._fragments
            ],
        }

    def _worker_state(self) -> dict[str, Any]:
        """This worker's own state: its local model and inner optimizer, error-feedback residuals, where
        its inner phases started, and its time spent waiting."""
        return {
            # Also while evaluation has other weights swapped into the module (checkpoints saved then).
            "model": self._module_state_with(self._local_params),
            "optimizer": self.optimizers[0].state_dict(),
            "compressor": None if self._compressor is None else self._compressor.state_dict(),
            "fragment_origins": [fragment.origin for fragment in self._fragments],
            "wait_seconds": self._wait_seconds,
        }

    def _restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        saved_assignment = [[tuple(piece) for piece in saved["pieces"]] for saved in state["fragments"]]
        if saved_assignment != [fragment.pieces for fragment in self._fragments]:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's fragments {saved_assignment} differ from this run's "
                f"{[fragment.pieces for fragment in self._fragments]} (num_fragments, fragment_assignment "
                "and the model must be those of the run that saved it)"
            )
        self._inner_step = state["inner_step"]
        self._round_start = state["round_start"]
        self._round_length = state["round_length"]
        self._outer_steps = state["outer_steps"]
        self._bytes_sent = state["bytes_sent"]
        self._bytes_received = state.get("bytes_received", 0)
        for current, saved in zip(self._global_params, state["global_params"]):
            current.copy_(saved)
        if self._outer_optimizer is None:
            for current, saved in zip(self._momentum_buffers, state["outer_optimizer"]["momentum_buffers"]):
                current.copy_(saved)
        else:
            self._outer_optimizer.load_state_dict(state["outer_optimizer"])
        device = self.root_device
        for fragment, saved in zip(self._fragments, state["fragments"]):
            fragment.in_sync = saved["in_sync"]
            average = saved["pending_average"]
            fragment.pending = (
                None if average is None else _PendingSync(saved["pending_apply_at_step"], average=average.to(device))
            )
        worker = state.get("worker")
        if worker is not None:
            self.lightning_module.load_state_dict(worker["model"])
            self.optimizers[0].load_state_dict(worker["optimizer"])
            _optimizer_to_device(self.optimizers[0], self.root_device)
            if self._compressor is not None:
                self._compressor.load_state_dict(worker["compressor"])
            for fragment, origin in zip(self._fragments, worker["fragment_origins"]):
                fragment.origin = None if origin is None else [t.to(self._outer_device) for t in origin]
            self._wait_seconds = worker["wait_seconds"]
        else:
            # Resumed by another number of workers (rank_state warned): start from the global parameters.
            for param, global_param in zip(self._params, self._global_params):
                param.detach().copy_(global_param)
            rank_zero_warn(
                f"{type(self).__name__}: the workers' local states cannot be matched to this run's workers: "
                "the interrupted inner phase restarts from the global parameters."
            )
            for fragment in self._fragments:
                fragment.in_sync = True
                fragment.origin = None

    # ------------------------------------------------------------------ registration

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "diloco",
            cls,
            description="DiLoCo: inner optimizer alone for inner_steps steps, then an outer Nesterov step "
            "on the averaged pseudo-gradients",
            override=True,
        )


class StreamingDiLoCoStrategy(DiLoCoStrategy):
    """Streaming DiLoCo: fragments of the parameters synchronize in turn, overlapped with training.

    Args:
        inner_steps: H, the steps between two syncs of the same fragment (an int
            or a schedule, as for :class:`DiLoCoStrategy`).
        num_fragments: F, how many fragments the parameter tensors are split
            into; fragment ``f`` syncs ``(f + 1) * H // F`` steps into each round of
            H steps. At most the number of parameter tensors, and at most H.
        overlap_steps: tau, the inner steps between the start of a fragment's
            all-reduce and the application of its result; must be smaller than
            the per-fragment period ``H // F``, so one all-reduce is in flight at
            a time.
        mixing_alpha: when a fragment's new global value arrives, its local
            parameters become ``mixing_alpha * local + (1 - mixing_alpha) *
            global``: 0 replaces them (plain DiLoCo), larger values keep some of
            the ``overlap_steps`` of local progress made while the all-reduce ran.
        fragment_assignment: by layer (the entries of ``nn.ModuleList`` /
            ``nn.Sequential`` containers): ``"strided"`` puts layer ``l`` in
            fragment ``l % F`` (the paper's choice: each fragment spans the depth
            of the network); ``"contiguous"`` gives each fragment a run of
            consecutive layers. Tensors outside the layers (embeddings, head) go
            to the lightest fragments; see :func:`assign_fragments`. Whole
            tensors cannot always make equal fragments (a GPT's embeddings and
            head add to one block's bytes): ``"balanced"`` cuts the parameters,
            laid end to end, into F equal runs (:func:`split_evenly`), so each
            sync sends 1/F of the bytes; it needs a built-in ``outer_optimizer``.

    The other arguments are :class:`DiLoCoStrategy`'s, without ``delay``
    (``overlap_steps`` is the overlap here). The outer state stays fp32 whatever
    the ``compressor`` does to the exchanged pseudo-gradients.
    """

    def __init__(
        self,
        inner_steps: Union[int, Schedule, Callable[[int], float]] = 500,
        num_fragments: int = 4,
        overlap_steps: int = 1,
        mixing_alpha: float = 0.5,
        fragment_assignment: str = "strided",
        outer_optimizer: Union[str, OuterOptimizerFactory] = "nesterov",
        outer_lr: Union[float, Schedule] = 0.7,
        outer_momentum: float = 0.9,
        compressor: Union[str, Compressor, None] = None,
        outer_state_device: Union[str, torch.device] = "cpu",
        backend: str = "auto",
        *,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[float, timedelta, None] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        ddp_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            inner_steps=inner_steps,
            outer_optimizer=outer_optimizer,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            compressor=compressor,
            delay=0,  # overlap_steps is the overlap here
            outer_state_device=outer_state_device,
            backend=backend,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            ddp_kwargs=ddp_kwargs,
            **kwargs,
        )
        if not (isinstance(num_fragments, int) and not isinstance(num_fragments, bool) and num_fragments >= 1):
            raise ValueError(f"num_fragments must be an integer >= 1, got {num_fragments!r}")
        if not (isinstance(overlap_steps, int) and not isinstance(overlap_steps, bool) and overlap_steps >= 0):
            raise ValueError(f"overlap_steps must be an integer >= 0, got {overlap_steps!r}")
        if not 0.0 <= mixing_alpha <= 1.0:
            raise ValueError(f"mixing_alpha must be in [0, 1], got {mixing_alpha!r}")
        if fragment_assignment not in _FRAGMENT_ASSIGNMENTS:
            raise ValueError(f"fragment_assignment must be one of {_FRAGMENT_ASSIGNMENTS}, got {fragment_assignment!r}")
        if fragment_assignment == "balanced" and not isinstance(outer_optimizer, str):
            raise ValueError(
                "fragment_assignment='balanced' cuts tensors into parts, which a torch.optim outer optimizer "
                f"cannot step one at a time: use outer_optimizer in {tuple(_BUILT_IN_OUTER_OPTIMIZERS)}"
            )
        self._num_fragments = num_fragments
        self._overlap_steps = overlap_steps
        self._mixing_alpha = float(mixing_alpha)
        self._fragment_assignment = fragment_assignment
        if not callable(inner_steps):
            self._check_round_length(inner_steps)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "streaming_diloco",
            cls,
            description="Streaming DiLoCo: parameter fragments synchronized in turn, overlapped with inner steps",
            override=True,
        )


DiLoCoStrategy.register_strategies(StrategyRegistry)
StreamingDiLoCoStrategy.register_strategies(StrategyRegistry)
