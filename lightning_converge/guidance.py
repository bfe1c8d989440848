"""Classifier-free guidance combiners for diffusion and flow-matching sampling loops.

A combiner turns one sampler step's conditional and unconditional predictions
and a guidance scale ``w`` into the guided prediction:
``combine(cond, uncond, scale) -> Tensor``. ``w = 1`` gives ``cond``, ``w = 0``
gives ``uncond``.

- :func:`cfg`: plain classifier-free guidance.
- :class:`APG`: adaptive projected guidance, which keeps high scales from
  oversaturating.
- :class:`Guidance`: any combiner with a scale that follows a schedule
  (:mod:`lightning_converge.schedules`) of the sampler's step index or noise
  level; :func:`guidance_interval` builds the one that guides only inside a
  noise-level interval.

Predictions have shape ``(batch, ...)`` with any number of trailing dims. The
scale is a number, a 0-d tensor or a ``(batch,)`` tensor (one scale per sample).
The arithmetic runs in at least fp32 and the result has ``cond``'s dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_converge.schedules import Interval, Schedule, as_schedule

Scale = Union[float, Tensor]
Combiner = Callable[[Tensor, Tensor, Scale], Tensor]


def _check_predictions(cond: Tensor, uncond: Tensor) -> None:
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    if cond.ndim == 0:
        raise ValueError("cond and uncond need a batch dimension, got 0-d tensors")


def _in_compute_dtype(tensor: Tensor) -> Tensor:
    # bf16/fp16 lose too much in the difference of two close predictions; fp64 stays fp64.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _per_sample(scale: Scale, like: Tensor) -> Scale:
    """A ``(batch,)`` scale as a tensor that broadcasts over ``like``'s trailing dims."""
    if isinstance(scale, Tensor):
        scale = scale.to(device=like.device, dtype=like.dtype)
        if scale.ndim == 1:
            return scale.reshape(-1, *[1] * (like.ndim - 1))
    return scale


def cfg(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): ``cond + (w - 1) * (cond - uncond)``,
    which equals ``uncond + w * (cond - uncond)``."""
    _check_predictions(cond, uncond)
    c, u = _in_compute_dtype(cond), _in_compute_dtype(uncond)
    return (c + (_per_sample(scale, c) - 1) * (c - u)).to(cond.dtype)


class APG:
    """Adaptive Projected Guidance (Sadat et al., 2024, arXiv 2410.02416).

    Per sampler step, with ``w`` the guidance scale::

        diff = cond - uncond
        diff = diff + momentum * previous_diff     # if momentum != 0; previous_diff is the
                                                    # diff this line produced last step
        diff = diff * min(1, norm_threshold / ||diff||)                # if norm_threshold > 0
        parallel = (<diff, cond> / <cond, cond>) * cond;  orthogonal = diff - parallel
        pred = cond + (w - 1) * (orthogonal + eta * parallel)

    Norms and projections are per sample, over all non-batch dims. The paper
    applies this to the denoised-sample (x0) prediction: convert epsilon- or
    v-predictions first. ``eta=1`` with no rescaling and no momentum is plain
    :func:`cfg`; the paper finds the parallel part causes oversaturation, hence
    the default ``eta=0``.

    Args:
        eta: weight of the component of ``diff`` parallel to ``cond``.
        norm_threshold: the ``r`` that caps each sample's ``||diff||``; 0 (the
            default) does not rescale, as in the APG authors' code and diffusers'
            ``AdaptiveProjectedGuidance``.
        momentum: the paper's ``beta``, in ``(-1, 0]``. A negative value subtracts
            the running average of earlier steps' differences; 0 keeps no state.

    With momentum the object holds one running difference per sample: call
    :meth:`reset` before each new sampling run.
    """

    def __init__(self, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0) -> None:
        if not math.isfinite(eta):
            raise ValueError(f"APG: eta must be a finite number, got {eta!r}")
        if not (math.isfinite(norm_threshold) and norm_threshold >= 0):
            raise ValueError(
                f"APG: norm_threshold must be a finite number >= 0 (0: no rescaling), got {norm_threshold!r}"
            )
        if not -1.0 < momentum <= 0.0:
            raise ValueError(f"APG: momentum must be in (-1, 0], got {momentum!r}")
        self.eta = float(eta)
        self.norm_threshold = float(norm_threshold)
        self.momentum = float(momentum)
        self.running_diff: Optional[Tensor] = None

    def reset(self) -> None:
        """Forget the running difference (start of a new sampling run)."""
        self.running_diff = None

    def __call__(self, cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
        _check_predictions(cond, uncond)
        c = _in_compute_dtype(cond)
        diff = c - _in_compute_dtype(uncond)
        if self.momentum != 0.0:
            diff = self._with_momentum(diff)

        batch = c.shape[0]
        diff = diff.reshape(batch, -1)
        if self.norm_threshold > 0:
            norm = diff.norm(dim=1, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        direction = F.normalize(c.reshape(batch, -1), dim=1)
        parallel = (diff * direction).sum(dim=1, keepdim=True) * direction
        orthogonal = diff - parallel
        update = (orthogonal + self.eta * parallel).reshape(c.shape)
        return (c + (_per_sample(scale, c) - 1) * update).to(cond.dtype)

    def _with_momentum(self, diff: Tensor) -> Tensor:
        if self.running_diff is not None:
            if self.running_diff.shape != diff.shape:
                raise ValueError(
                    f"APG: the running difference has shape {tuple(self.running_diff.shape)} but this step's "
                    f"predictions have shape {tuple(diff.shape)}; call reset() before each new sampling run"
                )
            diff = diff + self.momentum * self.running_diff
        self.running_diff = diff
        return diff


class Guidance:
    """A combiner whose scale follows a schedule of the sampler's step index or noise level.

    ``guide(cond, uncond, step)`` uses the scale ``schedule(step)``. Where that
    scale is 1 it returns ``cond`` without calling the combiner (so APG's
    momentum only sees guided steps), and ``uncond`` may be ``None``: ask
    :meth:`needs_uncond` first and skip the unconditional forward pass::

        guide = Guidance(scale=Power(1.0, 7.5, steps=num_steps - 1), combiner=APG())
        guide.reset()
        for i, sigma in enumerate(sigmas):
            cond = denoise(x, sigma, prompt)
            uncond = denoise(x, sigma, None) if guide.needs_uncond(i) else None
            x = sampler_step(x, guide(cond, uncond, i), sigma)
    """

    def __init__(self, scale: Union[float, Schedule], combiner: Combiner = cfg) -> None:
        self.scale = as_schedule(scale, name="scale")
        self.combiner = combiner

    def scale_at(self, step: Union[float, Tensor]) -> float:
        """The guidance scale at a step index or noise level (a 0-d tensor is accepted)."""
        return self.scale(step.item() if isinstance(step, Tensor) else step)

    def needs_uncond(self, step: Union[float, Tensor]) -> bool:
        """Whether this step guides at all, i.e. needs the unconditional prediction."""
        return self.scale_at(step) != 1.0

    def reset(self) -> None:
        """Reset the combiner's per-run state, if it keeps any (see :meth:`APG.reset`)."""
        reset = getattr(self.combiner, "reset", None)
        if reset is not None:
            reset()

    def __call__(self, cond: Tensor, uncond: Optional[Tensor], step: Union[float, Tensor]) -> Tensor:
        scale = self.scale_at(step)
        if scale == 1.0:
            return cond
        if uncond is None:
            raise ValueError(f"Guidance: the scale at step {step} is {scale}, so uncond is needed, got None")
        return self.combiner(cond, uncond, scale)


def guidance_interval(scale: float, sigma_lo: float, sigma_hi: float, combiner: Combiner = cfg) -> Guidance:
    """Guidance only while the noise level is in ``[sigma_lo, sigma_hi)``, scale 1 (no
    guidance, no unconditional pass) elsewhere.

    From "Applying Guidance in a Limited Interval Improves Sample and Distribution
    Quality in Diffusion Models" (Kynkäänniemi et al., 2024). Call the result with
    each step's noise level ``sigma``. The paper writes the interval
    ``(sigma_lo, sigma_hi]``; the two differ only at a noise level equal to a bound.
    """
    return Guidance(Interval(inside=scale, outside=1.0, lo=sigma_lo, hi=sigma_hi), combiner)
