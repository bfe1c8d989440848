"""Muon for the hidden matrices, AdamW for everything else, in one optimizer."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from lightning_converge.kernels import adamw
from lightning_converge.kernels.muon import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    lr_ratio,
    muon_apply,
    muon_momentum,
    newton_schulz,
)
from lightning_converge.optim.base import FusedOptimizer, _real, beta_tuple, flag, non_negative

# Names of the module that holds a model's output projection (the last part of its
# qualified name): what GPT-2/Llama (``lm_head``), timm (``head``), classifiers
# (``classifier``, ``score``), BERT (``decoder``) and many hand-written models call it.
HEAD_NAMES = frozenset(
    {"lm_head", "head", "classifier", "score", "decoder", "output", "output_layer", "output_proj", "output_projection"}
)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _is_embedding_name(name: str) -> bool:
    """Whether a parameter's qualified name marks an embedding: its module's or its own name
    contains ``emb`` (``embed_tokens``, ``word_embeddings``, ``pos_emb``) or is ``wte``/``wpe``."""
    return any("emb" in part or part in ("wte", "wpe") for part in name.split(".")[-2:])


def _is_head_name(name: str) -> bool:
    """Whether a parameter belongs to a module named like an output projection (:data:`HEAD_NAMES`)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in HEAD_NAMES


def muon_parameter_groups(model: nn.Module | Iterable[tuple[str, Tensor]]) -> list[dict[str, Any]]:
    """Split a model's parameters into a Muon group and an AdamW group (``use_muon`` True/False).

    ``model`` is a module or what ``named_parameters()`` yields. A parameter goes to Muon
    when it is a real 2-D matrix that is neither an embedding nor the output head:

    * embeddings: weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules (given a module),
      and parameters whose own or module's name contains ``emb`` or is ``wte``/``wpe``;
    * heads: parameters of a module whose name (the last part) is one of :data:`HEAD_NAMES`
      (``lm_head``, ``head``, ``classifier``, ``output``...). A head tied to the embedding
      is one tensor, listed once by ``named_parameters()``: an embedding either way;
    * everything not 2-D (biases, norms' scales, convolutions' kernels) and complex
      parameters go to AdamW too.

    Groups without parameters are left out. Frozen parameters (``requires_grad=False``) are
    kept: they are skipped at each step while they have no gradient, as in torch.optim.
    To override the rule, pass your own groups with ``use_muon`` to :class:`Muon`.
    """
    if isinstance(model, nn.Module):
        embeddings = {
            id(module.weight) for module in model.modules() if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        }
        named = list(model.named_parameters())
    else:
        embeddings = set()
        named = list(model)
    muon, other = [], []
    for name, param in named:
        hidden_matrix = (
            param.ndim == 2
            and param.is_floating_point()
            and id(param) not in embeddings
            and not _is_embedding_name(name)
            and not _is_head_name(name)
        )
        (muon if hidden_matrix else other).append(param)
    groups = [dict(params=muon, use_muon=True), dict(params=other, use_muon=False)]
    return [group for group in groups if group["params"]]


def _momentum(name: str, value: Any) -> str | None:
    real = _real(value)
    if real is None or not 0 <= real < 1:
        return f"{name} must be a real number in [0, 1), got {value!r}"
    return None


def _coefficients(name: str, value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(_real(c) is None for c in value):
        return f"{name} must hold 3 real numbers (a, b, c) of the quintic Newton-Schulz iteration, got {value!r}"
    return None


def _ns_steps(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 100:
        return f"{name} must be an int in [1, 100), got {value!r}"
    return None


def _adjust_lr_fn(name: str, value: Any) -> str | None:
    if value not in ADJUST_LR_FNS:
        return f"{name} must be one of {ADJUST_LR_FNS}, got {value!r}"
    return None


class Muon(FusedOptimizer):
    """Muon ("Muon: An optimizer for hidden layers in neural networks", K. Jordan et al.) on
    the hidden 2-D matrices and AdamW on the rest (embeddings, heads, norms, biases): one
    optimizer, one ``state_dict``, one ``param_groups`` list that learning-rate schedulers
    scale (each group keeps its own ``lr``, so a scheduler keeps their ratio).

    On a Muon group the update equals ``torch.optim.Muon``'s::

        m = momentum * m + (1 - momentum) * g
        d = (1 - momentum) * g + momentum * m        (nesterov; else d = m)
        o = NewtonSchulz5(d)                         (bf16, quintic 3.4445, -4.7750, 2.0315)
        p = p * (1 - lr * weight_decay) - lr * ratio(shape) * o

    with ``ratio`` from ``adjust_lr_fn`` (:func:`~lightning_converge.kernels.muon.lr_ratio`).
    On an AdamW group it equals :class:`~lightning_converge.optim.AdamW` (and ``torch.optim.AdamW``).

    Cost. The two elementwise stages are fused kernels (``backend``: reference, compiled,
    triton). The Newton-Schulz iteration is 5 x 3 matrix products per matrix, about
    ``15 * min(A,B)**2 * max(A,B) * 2`` flops for an ``A x B`` matrix, batched over the
    matrices of one shape (one ``baddbmm`` over the stack, in bf16).

    Data-parallel training. Under DDP every rank holds the same averaged gradient, so
    every rank computes the same momentum and orthogonalizes it itself: the ranks stay
    identical with no extra communication, each paying the full iteration. Sharded
    training (FSDP2, ZeRO) is not supported by this class: the iteration needs each whole
    matrix, so every matrix's momentum would have to be gathered on one rank (one
    all-gather per matrix and step, about what DDP's all-reduce moves), orthogonalized
    there (or redundantly everywhere) and scattered back. Not implemented here.

    Args:
        params: a module, its ``named_parameters()``, or parameter groups (dicts) that each
            say ``use_muon`` (True: 2-D real parameters only). A module or named parameters
            are split by :func:`muon_parameter_groups` (which documents the rule). A plain
            list of tensors is refused: nothing in it tells an embedding from a hidden matrix.
            From a LightningCLI ``optimizer:`` block, :class:`~lightning_converge.cli.ConvergeCLI`
            passes ``named_parameters()`` (``takes_named_parameters``).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            the Muon groups' hyperparameters, as in ``torch.optim.Muon`` (``eps`` bounds the
            norm the iteration divides by).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW groups' ``lr``,
            ``betas``, ``eps`` and ``weight_decay`` (defaults: ``torch.optim.AdamW``'s), unless
            a group sets its own.
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``, for both rules.
    """

    # LightningCLI's `optimizer:` block builds it from named_parameters() under ConvergeCLI (cli.py).
    takes_named_parameters = True
    # The AdamW groups run the base class's update: its kernel and state.
    kernel = adamw
    state_names = ("exp_avg", "exp_avg_sq")
    hyperparameters = dict(
        lr=non_negative,
        weight_decay=non_negative,
        eps=non_negative,
        momentum=_momentum,
        nesterov=flag,
        ns_coefficients=_coefficients,
        ns_steps=_ns_steps,
        adjust_lr_fn=_adjust_lr_fn,
        betas=beta_tuple(2),
        use_muon=flag,
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-2,
        backend: str = "auto",
    ) -> None:
        self.adamw_defaults = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)
        for name, value in self.adamw_defaults.items():
            check = beta_tuple(2) if name == "betas" else non_negative
            if problem := check(f"adamw_{name}", value):
                raise ValueError(f"Muon: {problem}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            betas=tuple(adamw_betas),
        )
        super().__init__(self._groups(params), defaults, backend)
        self._workspace: dict[tuple[int, torch.Size], tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _groups(params: Any) -> list[dict[str, Any]]:
        if isinstance(params, nn.Module):
            return muon_parameter_groups(params)
        if isinstance(params, Tensor):
            raise TypeError("Muon: params must be a module, its named_parameters() or parameter groups, got a tensor")
        params = list(params)
        if not params:
            return params  # torch.optim's own error: "optimizer got an empty parameter list"
        if all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in params):
            return muon_parameter_groups(params)
        if all(isinstance(item, dict) for item in params):
            return params
        raise TypeError(
            "Muon: params must be a module, its named_parameters(), or parameter groups (dicts) that each say "
            "use_muon=True/False; a plain list of tensors does not tell embeddings and heads (AdamW) from "
            "hidden matrices (Muon). In configure_optimizers pass Muon(self, ...) or self.named_parameters() "
            "(which torch.optim's optimizers accept too); for a LightningCLI `optimizer:` block use "
            "lightning_converge.cli.ConvergeCLI (the `lightning-converge` command), which passes named_parameters()"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``; the group must say ``use_muon``. An AdamW group
        takes the ``adamw_*`` defaults for the keys it does not set; a Muon group must hold
        real 2-D parameters only (what ``torch.optim.Muon`` accepts)."""
        index = len(self.param_groups)
        if "use_muon" not in param_group:
            raise ValueError(f"Muon: parameter group {index} must say use_muon=True (2-D matrices) or False (AdamW)")
        if param_group["use_muon"] is True:
            params = param_group["params"]
            for param in [params] if isinstance(params, Tensor) else params:
                if param.ndim != 2 or param.is_complex():
                    kind = "complex" if param.is_complex() else f"{param.ndim}-D"
                    raise ValueError(
                        f"Muon: parameter group {index} has use_muon=True but holds a {kind} parameter of shape "
                        f"{tuple(param.shape)}; Muon takes real 2-D matrices only (as torch.optim.Muon): "
                        "put it in a group with use_muon=False"
                    )
        else:
            param_group = {**self.adamw_defaults, **param_group}
        super().add_param_group(param_group)

    def kernel_args(self, group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The AdamW groups' arguments (the Muon groups take :meth:`update_group`'s own path)."""
        beta1, beta2 = group["betas"]
        changing = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return changing, dict(cautious=False)

    def update_group(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """AdamW groups: the base class's fused AdamW step. Muon groups, per shape of matrix:
        the fused momentum pass (writing the bf16 directions into one stacked tensor), the
        batched Newton-Schulz iteration, the fused decay-and-apply pass."""
        if not group["use_muon"]:
            super().update_group(index, group, params)
            return
        by_shape: dict[torch.Size, list[Tensor]] = {}
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype(p))
            by_shape.setdefault(p.shape, []).append(p)
        device = params[0].device
        scalars = {
            name: self._scalars((index, name), group[name], device, torch.float64)
            for name in ("lr", "weight_decay", "momentum")
        }
        for shape, matrices in by_shape.items():
            directions, orthogonalized = self._stacks(index, shape, len(matrices), device)
            muon_momentum(
                [p.grad for p in matrices],
                [self.state[p]["momentum_buffer"] for p in matrices],
                list(directions.unbind(0)),
                momentum=scalars["momentum"],
                nesterov=group["nesterov"],
                backend=self.backend,
            )
            newton_schulz(directions, group["ns_coefficients"], group["ns_steps"], group["eps"], out=orthogonalized)
            ratio = lr_ratio(group["adjust_lr_fn"], shape)
            ratio = self._scalars((index, "lr_ratio", shape), ratio, device, torch.float64)
            muon_apply(
                matrices,
                list(orthogonalized.unbind(0)),
                lr=scalars["lr"],
                weight_decay=scalars["weight_decay"],
                lr_ratio=ratio,
                backend=self.backend,
            )

    def _stacks(self, index: int, shape: torch.Size, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Two bf16 ``count x shape`` tensors, the directions and their orthogonalization, kept from
        step to step (a workspace of 4 bytes per matrix element, not state): the fused passes
        then see the same addresses every step (the triton launcher's tables stay cached)."""
        key = (index, shape)
        stacks = self._workspace.get(key)
        if stacks is None or stacks[0].size(0) != count or stacks[0].device != device:
            stacks = self._workspace[key] = tuple(
                torch.empty((count, *shape), dtype=torch.bfloat16, device=device) for _ in range(2)
            )
        return stacks

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "adamw_defaults": self.adamw_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = {}  # a cache, never pickled: rebuilt at the next step
