"""Post-hoc EMA: "Analyzing and Improving the Training Dynamics of Diffusion Models" (Karras et al. 2024,
EDM2, arXiv 2312.02696, section 3 and appendix C).

A power-function EMA averages the weights seen up to step ``t`` with a profile
``p(tau) ~ tau ** gamma`` on ``[0, t]``: its update is ``average = beta_t * average + (1 - beta_t) * weights``
with ``beta_t = (1 - 1 / t) ** (gamma + 1)`` (``t`` counts the updates from 1, so the first one copies).
Unrolled, the average after ``t`` updates gives weight ``(tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) /
t ** (gamma + 1)`` to the weights after step ``tau``: exactly the continuous profile integrated over
``[tau - 1, tau]``. Its width is measured by ``sigma_rel``, the profile's standard deviation relative to
``t``, ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`` (at most 0.3003).

:class:`PostHocEMA` keeps a few such averages (``sigma_rels``), stores snapshots of them every few
steps, and after training reconstructs the average of any other ``sigma_rel`` as the least-squares
combination of the snapshots whose profile is closest (in L2 over ``[0, t]``) to the profile asked for
(the paper's Algorithm 3). So the EMA length can be chosen by a validation metric after training, from
one run.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from lightning_converge.callbacks.averaging import AveragingCallback, accumulation_dtype, is_count
from lightning_converge.kernels.dispatch import ScalarSlots, math_dtype
from lightning_converge.kernels.ema import ema_update
from lightning_converge.sharding import full, reshard, restored_state

#: The largest ``sigma_rel`` a power-function profile has (at ``gamma`` = -0.382).
MAX_SIGMA_REL = 0.3003
#: What ``snapshot_dtype`` may name (None keeps the profiles' dtype).
SNAPSHOT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile of relative width ``sigma_rel``: the largest
    real root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s)``, ``s = sigma_rel ** -2``
    (the paper's Algorithm 2)."""
    s = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile ``tau ** gamma`` (the paper's equation 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_inner_products(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """``integral p_a(tau) p_b(tau) dtau`` of the power-function profiles ``p(tau) = (gamma + 1) tau ** gamma /
    t ** (gamma + 1)`` on ``[0, t]``, broadcast over the arguments (the paper's ``p_dot_p``)."""
    t_ratio = t_a / t_b
    t_exp = torch.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = torch.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp / ((gamma_a + gamma_b + 1) * t_max)


def solve_weights(t_i: Sequence[float], gamma_i: Sequence[float], t_r: float, gamma_r: float) -> Tensor:
    """Coefficients ``x`` (float64, one per snapshot) such that ``sum_i x_i p(t_i, gamma_i)`` is the
    least-squares approximation of the profile ``p(t_r, gamma_r)`` (the paper's Algorithm 3: the normal
    equations ``A x = b``, solved by ``lstsq`` as the paper does, which survives nearly collinear snapshots)."""
    t = torch.tensor(t_i, dtype=torch.float64)
    gamma = torch.tensor(gamma_i, dtype=torch.float64)
    gram = profile_inner_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    target = profile_inner_products(
        t[:, None],
        gamma[:, None],
        torch.tensor([[float(t_r)]], dtype=torch.float64),
        torch.tensor([[float(gamma_r)]], dtype=torch.float64),
    )
    return torch.linalg.lstsq(gram, target).solution[:, 0]


def _checked_sigma_rel(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= MAX_SIGMA_REL:
        raise ValueError(f"PostHocEMA: {argument} must be a number in (0, {MAX_SIGMA_REL}], got {value!r}")
    return float(value)


class PostHocEMA(AveragingCallback):
    """Track power-function EMAs of the weights, snapshot them every ``every_n_steps`` optimizer steps, and
    reconstruct the EMA of any ``sigma_rel`` after training (Karras et al., EDM2).

    Args:
        sigma_rels: the relative widths of the tracked profiles, at least two different ones in
            (0, 0.3003]; the paper's defaults, 0.05 and 0.10. The first is the average that evaluation during
            ``fit``, checkpoints and ``keep_average_on_train_end`` use.
        every_n_steps: a snapshot of every profile after every ``every_n_steps``-th optimizer step
            (``trainer.global_step`` a multiple of it), and one when training ends.
        snapshot_dir: where snapshots go, one file per snapshot (``step=<t>.pt``), written by global rank 0
            (sharded parameters: one distributed-checkpoint directory ``step=<t>``, every rank its shards);
            it must be visible to every rank that reconstructs (a shared filesystem). None: kept in host
            memory on every rank, and saved in checkpoints.
        snapshot_dtype: None (the profiles' dtype, fp32 for fp32/bf16/fp16 weights), ``"bfloat16"`` or
            ``"float16"``: what snapshots are stored in. Half precision halves their size, but its rounding,
            amplified by the reconstruction's coefficients (up to tens, of both signs), can exceed the
            reconstruction's own error.
        include_buffers: also average the floating-point buffers saved with the model (BatchNorm statistics).
        validate_with: ``"average"`` evaluates validation and test with the first profile (or, inside
            :meth:`swap_in`, with the reconstruction); ``"live"`` leaves the model alone.
        keep_average_on_train_end: copy the first profile into the model when training ends. Off by
            default: the point is to choose afterwards (:meth:`evaluate`, :meth:`reconstruct`).
        device: where the profiles live; None: with each parameter.
        backend: the :func:`~lightning_converge.kernels.ema.ema_update` backend.

    The profiles are fp32 for bf16/fp16 weights (else the weights' dtype), each updated by one fused
    ``ema_update`` after every optimizer step, with ``beta_t`` in a persistent 0-d slot (no host sync).
    ``t`` counts this callback's updates, so a fit that starts from pretrained weights starts its profiles
    there. A snapshot copies the profiles to the host (one device-to-host transfer every
    ``every_n_steps`` steps).

    After ``fit``:

    - :meth:`reconstruct` returns the weights of any ``sigma_rel`` (by tensor name, fp32), ready for
      ``model.load_state_dict(weights, strict=False)``;
    - :meth:`swap_in` is a context manager that puts them in the model (and makes ``trainer.validate``
      evaluate them) and puts the previous weights back on exit;
    - :meth:`evaluate` runs ``trainer.validate`` for each ``sigma_rel`` of a sweep and returns the metrics.

    When each hook fires and what it does here (the rest, shared with EMA and LAWA, are described in
    :class:`~lightning_converge.callbacks.averaging.AveragingCallback`):

    - ``on_train_batch_end`` (after each training batch, after its optimizer step if it made one): if
      ``global_step`` moved, updates every profile (inf/NaN live elements are left out, as in
      :class:`~lightning_converge.callbacks.ema.EMA`), logs ``posthoc_ema/beta`` of the first profile,
      and takes a snapshot when one is due.
    - ``on_train_epoch_end`` (after the epoch's last batch and its epoch-end validation): warns if a live
      weight is inf/NaN on any rank (one finiteness pass an epoch).
    - ``on_train_start`` (after checkpoint restore): a run resumed from a checkpoint taken after ``fit``
      drops that fit's last snapshot if it was off the ``every_n_steps`` grid (the uninterrupted run has
      none there).
    - ``on_train_end`` (after the last epoch): takes a last snapshot unless one was taken at the last
      update; with ``snapshot_dir``, waits for rank 0's writes (a barrier) so every rank can read them.

    Under DDP every rank updates the same (synchronized) weights and decides alike from ``global_step``.

    Sharded parameters (FSDP2): the profiles and the snapshots hold each rank's shards; nothing is gathered
    during training. In memory, every rank keeps its own shards of each snapshot (checkpoints hold them as
    the other sharded state, :mod:`lightning_converge.sharding`); with ``snapshot_dir`` each snapshot is a
    distributed-checkpoint directory ``step=<t>`` to which every rank writes its shards (readable by another
    number of ranks). :meth:`swap_in` and :meth:`evaluate` combine the shards on each rank and gather nothing;
    :meth:`reconstruct` combines them on each rank, then gathers the result into full tensors (one all-gather
    per tensor: every rank calls it).

    Under DiLoCo / Streaming DiLoCo the profiles follow the global parameters at every step (constant
    between outer steps: the profile is that of the global parameters' trajectory).

    State (``state_dict``): ``sigma_rels``, the update count, the profiles by tensor name, and the snapshot
    index (each snapshot's step and either its file path or, kept in memory, its tensors); a resumed run
    continues exactly and reconstructs from the same snapshots.
    """

    checkpoint_key = "posthoc_ema_state_dict"

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 100,
        snapshot_dir: Optional[Union[str, Path]] = None,
        snapshot_dtype: Optional[str] = None,
        include_buffers: bool = False,
        validate_with: str = "average",
        keep_average_on_train_end: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            include_buffers=include_buffers,
            validate_with=validate_with,
            keep_average_on_train_end=keep_average_on_train_end,
            device=device,
            backend=backend,
        )
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or len(sigma_rels) < 2:
            raise ValueError(
                f"PostHocEMA: sigma_rels must be a sequence of at least two numbers in (0, {MAX_SIGMA_REL}], "
                f"got {sigma_rels!r}"
            )
        sigma_rels = tuple(_checked_sigma_rel(value, "sigma_rels") for value in sigma_rels)
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"PostHocEMA: sigma_rels must be different from each other, got {sigma_rels!r}")
        if not is_count(every_n_steps, minimum=1):
            raise ValueError(f"PostHocEMA: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if snapshot_dtype is not None and snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(
                f"PostHocEMA: snapshot_dtype must be None or one of {tuple(SNAPSHOT_DTYPES)}, got {snapshot_dtype!r}"
            )
        self.sigma_rels = sigma_rels
        self.gammas = tuple(sigma_rel_to_gamma(sigma_rel) for sigma_rel in sigma_rels)
        self.every_n_steps = every_n_steps
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.snapshot_dtype = snapshot_dtype
        self._profiles: list[dict[str, Tensor]] = []  # one per sigma_rel: tensor name -> average
        self._num_updates = 0
        # One per snapshot, oldest first: {"step": t, "path": str} on disk, {"step": t, "profiles": [...]} in memory.
        self._snapshots: list[dict[str, Any]] = []
        self._selected: Optional[list[Tensor]] = None  # a reconstruction swapped in by `swap_in`
        self._scalars = ScalarSlots()

    @property
    def state_key(self) -> str:
        # Several PostHocEMA callbacks (other sigma_rels or cadences) can share a Trainer and its checkpoints.
        return self._generate_state_key(
            sigma_rels=self.sigma_rels,
            every_n_steps=self.every_n_steps,
            snapshot_dir=None if self.snapshot_dir is None else str(self.snapshot_dir),
        )

    # -- the averaging base's interface --------------------------------------------------

    def _reset(self) -> None:
        self._profiles = []
        self._num_updates = 0
        self._snapshots = []

    def _align(self) -> None:
        if self._profiles:
            for profile in self._profiles:
                self._check_restored(profile)
            for snapshot in self._snapshots:
                for profile in snapshot.get("profiles", ()):
                    self._check_restored(profile)
            self._profiles = [
                {name: self._restored(name, profile[name]) for name in self._names} for profile in self._profiles
            ]
            for snapshot in self._snapshots:  # this rank's shards, kept on the host
                if "profiles" in snapshot:
                    snapshot["profiles"] = [
                        {name: restored_state(profile[name], self._tracked[name]).cpu() for name in self._names}
                        for profile in snapshot["profiles"]
                    ]
        else:
            self._profiles = [
                {
                    name: followed.detach().to(
                        device=self._state_device(live),
                        dtype=accumulation_dtype(live.dtype),
                        memory_format=torch.contiguous_format,
                        copy=True,
                    )
                    for name, live, followed in zip(self._names, self._live, self._followed)
                }
                for _ in self.sigma_rels
            ]

    def _average(self) -> Optional[list[Tensor]]:
        if self._selected is not None:
            return self._selected
        return list(self._profiles[0].values()) if self._profiles else None

    # -- training ------------------------------------------------------------------------

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._optimizer_stepped(trainer):
            return
        self._track(pl_module)
        self._num_updates += 1
        t = self._num_updates
        for gamma, profile in zip(self.gammas, self._profiles):
            averages = list(profile.values())
            currents = [followed.detach().to(average.device) for followed, average in zip(self._followed, averages)]
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
            decay = self._scalars(("beta", gamma), beta, averages[0].device)
            ema_update(averages, currents, decay=decay, backend=self.backend)
        pl_module.log("posthoc_ema/beta", (1.0 - 1.0 / t) ** (self.gammas[0] + 1.0))
        if trainer.global_step % self.every_n_steps == 0:
            self._take_snapshot(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._track(pl_module)
        # A whole pass over the weights: once an epoch, not in every update.
        self._live_is_finite(
            trainer, otherwise="the profiles left those elements out (they keep their last finite value)"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Resumed from a checkpoint taken after fit: its last snapshot marked where that fit ended, not a
        # step of the every_n_steps grid; the uninterrupted run has no such snapshot.
        if self._snapshots and self._snapshots[-1]["final"]:
            self._snapshots.pop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._num_updates and (not self._snapshots or self._snapshots[-1]["step"] != self._num_updates):
            self._take_snapshot(trainer, final=True)
        if self.snapshot_dir is not None:
            trainer.strategy.barrier("PostHocEMA snapshots written")
        super().on_train_end(trainer, pl_module)

    def _take_snapshot(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Store every profile as it is now, on the host: in memory on every rank, or in a file by rank 0.
        ``final``: taken because training ended, off the ``every_n_steps`` grid (dropped if training resumes).
        Sharded profiles: each rank keeps its own shards, or writes them into the snapshot's distributed
        checkpoint (every rank takes the snapshot); nothing is gathered."""
        entry: dict[str, Any] = {"step": self._num_updates, "final": final}
        if self.snapshot_dir is not None:
            name = f"step={self._num_updates}" + ("" if self._sharded else ".pt")
            entry["path"] = str(self.snapshot_dir / name)
            if not (trainer.is_global_zero or self._sharded):
                self._snapshots.append(entry)
                return
        dtype = None if self.snapshot_dtype is None else SNAPSHOT_DTYPES[self.snapshot_dtype]
        profiles = [
            {name: average.to("cpu", dtype=dtype or average.dtype, copy=True) for name, average in profile.items()}
            for profile in self._profiles
        ]
        if self.snapshot_dir is None:
            entry["profiles"] = profiles
        elif self._sharded:
            dcp.save({"profiles": [self._saved(profile) for profile in profiles]}, checkpoint_id=entry["path"])
        else:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"step": self._num_updates, "sigma_rels": list(self.sigma_rels), "profiles": profiles}, entry["path"]
            )
        self._snapshots.append(entry)

    # -- after training ------------------------------------------------------------------

    @property
    def snapshot_steps(self) -> list[int]:
        """The update counts ``t`` of the snapshots taken, oldest first."""
        return [snapshot["step"] for snapshot in self._snapshots]

    def _snapshot_profiles(self, snapshot: Mapping[str, Any]) -> list[dict[str, Tensor]]:
        """A snapshot's profiles on the host: full tensors, or this rank's shards when sharded."""
        if "profiles" in snapshot:
            return snapshot["profiles"]
        if not Path(snapshot["path"]).is_dir():
            return torch.load(snapshot["path"], map_location="cpu", weights_only=True)["profiles"]
        # A distributed checkpoint: each rank reads its shards, sharded as the parameters are now.
        dtype = None if self.snapshot_dtype is None else SNAPSHOT_DTYPES[self.snapshot_dtype]
        shards = [
            {
                name: torch.empty_like(average, dtype=dtype or average.dtype, device="cpu")
                for name, average in profile.items()
            }
            for profile in self._profiles
        ]
        dcp.load({"profiles": [self._saved(profile) for profile in shards]}, checkpoint_id=snapshot["path"])
        return shards

    @torch.no_grad()
    def reconstruct(self, sigma_rel: float, step: Optional[int] = None) -> dict[str, Tensor]:
        """The power-function EMA of width ``sigma_rel`` at update ``step`` (default: the last snapshot's),
        as the least-squares combination of the snapshots taken up to ``step`` (the paper's Algorithm 3):
        fp32 (fp64 for fp64 weights) tensors on the host, by tensor name.

        Its error is that of the profile fit, ``sum_tau (p_hat(tau) - p(tau)) * weights(tau)``: small when
        ``sigma_rel`` lies between (or near) the tracked ones and snapshots are dense (the paper's Figure 5).
        A snapshot's file is read once per call, one at a time.

        Sharded parameters: each rank combines its shards, then the result is gathered (an all-gather per
        tensor: every rank calls it); :meth:`swap_in` and :meth:`evaluate` use the shards, gathering nothing.
        """
        shards = self._reconstruct_shards(sigma_rel, step)
        if not self._sharded:
            return shards
        return {
            name: full(shard, self._tracked[name]).cpu() if name in self._tracked else shard
            for name, shard in shards.items()
        }

    @torch.no_grad()
    def _reconstruct_shards(self, sigma_rel: float, step: Optional[int]) -> dict[str, Tensor]:
        """:meth:`reconstruct` of this rank's shards (the full tensors when nothing is sharded)."""
        sigma_rel = _checked_sigma_rel(sigma_rel, "sigma_rel")
        if not self._snapshots:
            raise RuntimeError("PostHocEMA: no snapshots yet: reconstruct after fit (or after a snapshot is taken)")
        first, last = self._snapshots[0]["step"], self._snapshots[-1]["step"]
        step = last if step is None else step
        if not is_count(step, minimum=first) or step > last:
            raise ValueError(
                f"PostHocEMA: step must be an integer in [{first}, {last}] (the snapshots' steps), got {step!r}"
            )
        used = [snapshot for snapshot in self._snapshots if snapshot["step"] <= step]
        coefficients = solve_weights(
            [snapshot["step"] for snapshot in used for _ in self.gammas],
            [gamma for _ in used for gamma in self.gammas],
            step,
            sigma_rel_to_gamma(sigma_rel),
        ).tolist()
        coefficients = iter(coefficients)
        result: dict[str, Tensor] = {}
        for snapshot in used:
            for profile in self._snapshot_profiles(snapshot):
                x = next(coefficients)
                for name, tensor in profile.items():
                    term = tensor.to(math_dtype(tensor)) * x
                    result[name] = term if name not in result else result[name].add_(term)
        return result

    @contextlib.contextmanager
    def swap_in(self, pl_module: pl.LightningModule, sigma_rel: float, step: Optional[int] = None) -> Iterator[None]:
        """Within the ``with`` block the module holds the reconstruction of ``sigma_rel`` (:meth:`reconstruct`),
        and ``trainer.validate`` / ``test`` with this callback evaluate it; on exit the module gets the
        weights it held before back. The tensors keep their identity, as during evaluation with an average;
        sharded parameters get their shards of it copied in place."""
        self._track(pl_module)
        reconstructed = self._reconstruct_shards(sigma_rel, step)
        self._selected = [reconstructed[name] for name in self._names]
        if self._sharded:
            reshard(pl_module)
        before = [tensor.clone() if self._sharded else tensor.data for tensor in self._live]
        try:
            with torch.no_grad():
                for tensor, averaged in zip(self._live, self._selected):
                    if self._sharded:
                        tensor.copy_(averaged)
                    else:
                        tensor.data = averaged.to(device=tensor.device, dtype=tensor.dtype)
            yield
        finally:
            if self._sharded:
                reshard(pl_module)
            with torch.no_grad():
                for tensor, data in zip(self._live, before):
                    if self._sharded:
                        tensor.copy_(data)
                    else:
                        tensor.data = data
            self._selected = None

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        sigma_rels: Sequence[float],
        metric: Optional[str] = None,
        **validate_kwargs: Any,
    ) -> dict[float, Any]:
        """``trainer.validate(pl_module, **validate_kwargs)`` with the reconstruction of each ``sigma_rel``
        swapped in: ``{sigma_rel: metrics}`` (the dict of the first validation dataloader), or only the value
        of ``metric`` when given. Pick the best with e.g. ``min(results, key=results.get)``. Raises
        ``ValueError`` if another averaging callback of the trainer evaluates with its own average."""
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, AveragingCallback) and cb is not self and cb.validate_with == "average"
        ]
        if others:
            raise ValueError(
                f"PostHocEMA.evaluate: {others} would swap their own average in over the reconstruction: "
                "set validate_with='live' on them"
            )
        results: dict[float, Any] = {}
        for sigma_rel in sigma_rels:
            with self.swap_in(pl_module, sigma_rel):
                metrics = trainer.validate(pl_module, verbose=False, **validate_kwargs)[0]
            if metric is not None and metric not in metrics:
                raise ValueError(f"PostHocEMA: metric must be one of the logged {sorted(metrics)}, got {metric!r}")
            results[sigma_rel] = metrics if metric is None else metrics[metric]
        return results

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "num_updates": self._num_updates,
            "profiles": [self._saved(profile) for profile in self._profiles],
            # In memory, sharded: each rank's shards, as DTensors (the checkpoint's strategy writes them).
            "snapshots": [
                {**snapshot, "profiles": [self._saved(profile) for profile in snapshot["profiles"]]}
                if "profiles" in snapshot
                else dict(snapshot)
                for snapshot in self._snapshots
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if tuple(state_dict["sigma_rels"]) != self.sigma_rels:
            raise ValueError(
                f"PostHocEMA: the checkpoint tracked sigma_rels={tuple(state_dict['sigma_rels'])}, this callback "
                f"sigma_rels={self.sigma_rels}: resume with the same sigma_rels"
            )
        self._num_updates = int(state_dict["num_updates"])
        self._profiles = [dict(profile) for profile in state_dict["profiles"]]
        self._snapshots = [dict(snapshot) for snapshot in state_dict["snapshots"]]
        self._untrack()
