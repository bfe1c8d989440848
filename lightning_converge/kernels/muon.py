"""Muon ("Muon: An optimizer for hidden layers in neural networks", K. Jordan et al.): the
elementwise passes around the Newton-Schulz orthogonalization, and the orthogonalization
itself, batched over matrices of one shape. The same update as ``torch.optim.Muon``.

One Muon step over a list of 2-D parameters is three stages:

1. :func:`muon_momentum` (fused pass): the momentum EMA, then the Nesterov (or plain)
   direction, written in bf16 where the orthogonalization reads it;
2. :func:`newton_schulz` (matrix products): the directions of every matrix of one shape
   stacked and orthogonalized together by ``baddbmm``, in bf16 as torch does;
3. :func:`muon_apply` (fused pass): decoupled weight decay and the scaled orthogonal update.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from lightning_converge.kernels.dispatch import kernel, math_dtype

# Keller Jordan's quintic iteration, tuned for the slope at zero (torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


@kernel
def muon_momentum(
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    directions: list[Tensor],
    *,
    momentum: Tensor,
    nesterov: bool = True,
) -> None:
    """The momentum EMA ``m = momentum*m + (1-momentum)*g``, in place, and the direction to
    orthogonalize, written into ``directions`` (shaped like the gradients; bf16 from the optimizer):
    ``(1-momentum)*g + momentum*m`` with ``nesterov``, else ``m``.

    Math in fp32 (fp64 for fp64 gradients), as ``torch.optim.Muon`` computes in the
    gradient's precision; the direction is rounded to bf16 once, as torch's
    ``grad.bfloat16()`` before the iteration.
    """
    for g, m, d in zip(grads, momentum_buffers, directions):
        g_ = g.to(math_dtype(m))
        m.lerp_(g_, 1 - momentum)
        d.copy_(torch.lerp(g_, m, momentum) if nesterov else m)


@kernel
def muon_apply(
    params: list[Tensor],
    orthogonalized: list[Tensor],
    *,
    lr: Tensor,
    weight_decay: Tensor,
    lr_ratio: Tensor,
) -> None:
    """``p = p * (1 - lr*weight_decay) - lr*lr_ratio * o``, in place: decoupled weight decay
    at the learning rate, the orthogonal update at the shape-adjusted one (``lr_ratio``, see
    :func:`lr_ratio`). Math in fp32 (fp64 for fp64 parameters)."""
    for p, o in zip(params, orthogonalized):
        dtype = math_dtype(p)
        p.copy_(p.to(dtype) * (1 - lr * weight_decay) - (lr * lr_ratio) * o.to(dtype))


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor ``torch.optim.Muon`` applies to the learning rate of an ``A x B`` matrix,
    so that orthogonal updates of every shape have a comparable size.

    ``None`` or ``"original"`` (Keller Jordan's): ``sqrt(max(1, A/B))``.
    ``"match_rms_adamw"`` (Moonshot's "Muon is Scalable for LLM Training"): ``0.2*sqrt(max(A, B))``,
    an update of AdamW's typical RMS, so AdamW's learning rate and weight decay carry over.
    """
    rows, columns = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, columns) ** 0.5
    return max(1.0, rows / columns) ** 0.5


def newton_schulz(
    directions: Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    out: Tensor | None = None,
) -> Tensor:
    """Approximately orthogonalize each matrix of the batch ``directions`` (``n x A x B``).

    ``torch.optim.Muon``'s iteration, batched: in bf16, each matrix divided by its
    Frobenius norm (at least ``eps``), wide side last (tall matrices are transposed and
    back), then ``steps`` times ``X = a*X + (b*G + c*G@G) @ X`` with ``G = X @ X^T``, each
    product one ``baddbmm`` over the whole batch. Returns the result, bf16 ``n x A x B``:
    ``out`` (a bf16 ``n x A x B`` tensor, written in place) if given, else a new tensor.
    The iteration does not reach ``U V^T`` exactly: the singular values land roughly in
    [0.7, 1.2], which is what Muon wants.
    """
    a, b, c = coefficients
    x = directions.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    # baddbmm's out= into a transposed view takes a slow path (hundreds of times slower on CPU):
    # a tall matrix's result is copied into out instead.
    last_into = out if out is not None and not tall else None
    for step in range(steps):
        gram = torch.bmm(x, x.mT)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a, out=last_into if step == steps - 1 else None)
    x = x.mT if tall else x
    if out is None:
        return x
    if tall:
        out.copy_(x)
    return out


muon_momentum.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.muon").muon_momentum)
muon_apply.register_triton(lambda: importlib.import_module("lightning_converge.kernels.triton.muon").muon_apply)
