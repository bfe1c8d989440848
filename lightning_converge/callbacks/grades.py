"""GradES ("GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping")."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import Tensor
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel

from lightning_converge.checks import check_choice, check_in_range, check_int, check_probability
from lightning_converge.schedules import ScheduleLike, as_schedule

METRICS = ("grad_l1", "update_l1")

# Regular expressions searched in parameter names; only 2-D parameters are monitored.
DEFAULT_PATTERNS = (
    # Hugging Face Llama, Qwen, Mistral, Gemma, CLIP: attention and (gated) FFN projections.
    r"\b(q|k|v|o|gate|up|down)_proj\.weight$",
    # BERT, RoBERTa: self-attention, attention output, FFN.
    r"\b(query|key|value)\.weight$",
    r"\b(intermediate|output)\.dense\.weight$",
    # GPT-2, whose Conv1D weights are 2-D too.
    r"\b(c_attn|c_proj|c_fc)\.weight$",
    # torch.nn.MultiheadAttention, and the FFN of nn.TransformerEncoderLayer/DecoderLayer.
    r"\bin_proj_weight$",
    r"\bout_proj\.weight$",
    r"\blinear[12]\.weight$",
    # T5.
    r"\b(SelfAttention|EncDecAttention)\.[qkvo]\.weight$",
    r"\bDenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
    # Generic names: Meta's Llama (wq, w1), GPT-NeoX and Falcon, OPT, ViT and timm.
    r"\b(wq|wk|wv|wo|w1|w2|w3|qkv|query_key_value|dense_h_to_4h|dense_4h_to_h|fc1|fc2)\.weight$",
    r"\battn\.proj\.weight$",
)


class GradES(pl.Callback):
    """Freeze each attention/FFN matrix once it stops learning; stop when enough are frozen.

    Monitored: the 2-D parameters whose name matches one of ``patterns`` (regular
    expressions, searched; default :data:`DEFAULT_PATTERNS`, covering Hugging Face
    Llama/Qwen, BERT, GPT-2, T5, ``torch.nn.MultiheadAttention`` and common generic
    names). Every ``every_n_steps`` optimizer steps, once ``grace_period`` (a fraction of
    ``trainer.estimated_stepping_batches``) has passed, each unfrozen matrix gets a statistic:

    * ``metric="update_l1"`` (default): the L1 norm of its weight change made by that
      step's optimizer update, what the authors' package measures. Measuring one step,
      not the whole interval, keeps ``tau`` meaning the same for every ``every_n_steps``.
    * ``metric="grad_l1"``: the L1 norm of its gradient at that step (the paper's criterion).

    The L1 norm is a raw sum over the matrix, as in the authors' package; with
    ``normalize`` it is divided by the matrix's size (a mean absolute value), which
    makes one ``tau`` fit matrices of different sizes. A matrix whose statistic is
    below ``tau`` (a number or a schedule of the step) is frozen. When the frozen
    fraction of the monitored matrices reaches ``max_frozen_ratio``, training stops
    through ``trainer.should_stop``, Lightning's normal path.

    Defaults: those of the authors' package (``GradEarlyStoppingConfig``): ``tau=1e-4``
    on the raw ``update_l1`` sum, a check every step, and a grace period of 30% of the
    training steps (their ``alpha=0.3``). No matrix is judged in the grace period:
    from a random initialization a matrix's gradient can be tiny at first (attention
    q/k projections, while attention is near uniform), and a gradient criterion
    without a grace period freezes them at the first step. Under Adam-type
    optimizers the weight change follows the learning rate, not the gradient's
    size, so ``tau=1e-4`` freezes only matrices that practically stopped moving;
    tune ``tau`` per model and metric (the paper does), for instance from the
    statistics logged in a first run.

    Only matrices that received a gradient at a check are judged; a check whose step
    moved none of them (an fp16 step the grad scaler skipped, or a zero learning
    rate) decides nothing, and non-finite gradients never freeze anything.

    With several optimizers (manual optimization), each optimizer step measures the
    matrices that optimizer updates, and only those; all steps of a check batch
    are judged together after the batch. A check batch is one that starts at a
    ``trainer.global_step`` past the grace period and a multiple of ``every_n_steps``
    (Lightning counts each optimizer's step in ``global_step``).

    Freezing sets ``requires_grad=False`` (backward no longer computes the weight
    gradient) and ``grad=None``: ``torch.optim`` optimizers and this pack's skip
    parameters without a gradient, so neither momentum nor AdamW's decoupled weight
    decay moves a frozen matrix again. Under DDP the model is wrapped again after a
    freeze, because the reducer of the old wrapper would wait for gradients that
    frozen matrices no longer produce. The statistics are averaged across ranks
    before deciding, so every rank freezes the same matrices at the same step.
    Strategies that wrap the model otherwise (FSDP, DeepSpeed) are refused at the first freeze.

    When it runs: ``setup`` finds the monitored matrices (and rejects patterns that
    match none); ``on_train_start``, after any checkpoint is restored, re-freezes
    the matrices a resumed run had frozen; ``on_train_batch_start`` decides whether
    the batch is a check; ``on_before_optimizer_step`` (gradients accumulated,
    unscaled and all-reduced) measures the stepping optimizer's matrices;
    ``on_train_batch_end``, after the optimizer steps, decides, freezes and logs
    ``grades/frozen_fraction``; ``on_fit_end`` prints a summary on rank 0 when ``verbose``.

    ``frozen_at`` maps each frozen matrix's name to the step it was frozen at; it is
    the checkpointed state.
    """

    def __init__(
        self,
        tau: ScheduleLike = 1e-4,
        metric: str = "update_l1",
        normalize: bool = False,
        every_n_steps: int = 1,
        grace_period: float = 0.3,
        max_frozen_ratio: float = 1.0,
        patterns: Optional[Sequence[str]] = None,
        verbose: bool = True,
    ) -> None:
        self.tau = as_schedule(tau, "tau")
        _check_tau(self.tau(0))  # schedules are pure: a bad value at step 0 is caught before training
        self.metric = check_choice("metric", metric, METRICS, owner="GradES")
        self.normalize = normalize
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1, owner="GradES")
        self.grace_period = check_probability("grace_period", grace_period, owner="GradES")  # of the total steps
        self.max_frozen_ratio = check_in_range(
            "max_frozen_ratio", max_frozen_ratio, 0, 1, low_open=True, owner="GradES"
        )
        self._user_patterns = patterns is not None
        self.patterns = tuple(DEFAULT_PATTERNS if patterns is None else patterns)
        if not self.patterns:
            raise ValueError("patterns must hold at least one regular expression, or be None for the defaults")
        try:
            self._regexes = [re.compile(pattern) for pattern in self.patterns]
        except re.error as error:
            raise ValueError(f"patterns holds an invalid regular expression: {error}") from error
        self.verbose = verbose
        self.frozen_at: dict[str, int] = {}
        self._monitored: dict[str, Parameter] = {}
        self._grace_steps = 0
        self._stopped_at: Optional[int] = None
        # The step a check batch started at, None in other batches (set in on_train_batch_start).
        self._check_step: Optional[int] = None
        # One entry per optimizer step of the check batch, taken before the step and consumed after
        # the batch: the judged matrices' names and their gradient L1 norms ("grad_l1") or copies of
        # their weights ("update_l1", None for a matrix without a gradient).
        self._pending: list[tuple[list[str], Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fires before the strategy wraps the model: find the monitored matrices."""
        if stage == "fit":
            self._monitored = self._find_monitored(pl_module)

    def _find_monitored(self, pl_module: pl.LightningModule) -> dict[str, Parameter]:
        matrices = {name: p for name, p in pl_module.named_parameters() if p.dim() == 2 and p.requires_grad}
        if self._user_patterns:
            # A user's pattern that matches nothing is most likely a typo.
            unmatched = [
                pattern
                for pattern, regex in zip(self.patterns, self._regexes)
                if not any(regex.search(name) for name in matrices)
            ]
            if unmatched:
                raise ValueError(
                    f"patterns {unmatched} match no trainable 2-D parameter; "
                    f"the model's are: {_preview(matrices)}"
                )
        monitored = {name: p for name, p in matrices.items() if any(r.search(name) for r in self._regexes)}
        if not monitored:
            raise ValueError(
                "the default patterns match no trainable 2-D parameter; pass patterns= "
                f"naming the attention and FFN matrices among: {_preview(matrices)}"
            )
        return monitored

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fires once before the first step, after any checkpoint is restored: fix the
        grace period in steps and re-freeze what a resumed run had frozen."""
        total_steps = trainer.estimated_stepping_batches
        if self.grace_period > 0 and math.isinf(total_steps):
            raise ValueError(
                "grace_period is a fraction of the total steps, but this Trainer's are unbounded: "
                "set max_steps or max_epochs"
            )
        self._grace_steps = math.ceil(self.grace_period * total_steps) if self.grace_period > 0 else 0
        unknown = sorted(set(self.frozen_at) - set(self._monitored))
        if unknown:
            raise ValueError(f"the checkpoint's GradES state froze {unknown}, which are not monitored in this model")
        if self.frozen_at:
            self._freeze(trainer, self.frozen_at)
            self._stop_if_enough_frozen(trainer, trainer.global_step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Fires before each training batch: is it a check (past the grace period, on the interval)?"""
        step = trainer.global_step
        self._check_step = step if step >= self._grace_steps and step % self.every_n_steps == 0 else None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Fires before each optimizer step, with accumulated, unscaled, all-reduced gradients: in a
        check batch, measure the gradients of the matrices this optimizer updates, or copy their
        weights to measure the update."""
        if self._check_step is None:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        measured_already = {name for names, _ in self._pending for name in names}
        names = [
            name
            for name, p in self._monitored.items()
            if id(p) in in_optimizer and name not in self.frozen_at and name not in measured_already
        ]
        if not names:
            return
        params = [self._monitored[name] for name in names]
        if self.metric == "grad_l1":
            measured: Any = _l1_norms([p.grad for p in params], pl_module.device)
        else:
            measured = [None if p.grad is None else p.detach().clone() for p in params]
        self._pending.append((names, measured))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fires after every batch; after a check batch's optimizer steps: decide, freeze, log, maybe stop."""
        if not self._pending:
            return
        step, pending = self._check_step, self._pending
        self._pending = []
        # One statistic per measured matrix, optimizer step after optimizer step.
        stats = torch.cat([self._statistics(names, measured, pl_module.device) for names, measured in pending])
        # One all-reduce: every rank then holds the same numbers and takes the same decisions.
        stats = trainer.strategy.reduce(stats, reduce_op="mean")
        names = [name for names, _ in pending for name in names]
        if self.normalize:
            stats = stats / torch.tensor([self._monitored[name].numel() for name in names], device=stats.device)
        if self.metric == "update_l1":
            # An optimizer step that moved none of its matrices was skipped, or its learning rate was
            # zero: it decides nothing about them.
            for judged in stats.split([len(step_names) for step_names, _ in pending]):
                if bool((judged[~judged.isnan()] == 0).all()):
                    judged.fill_(math.nan)
        tau = _check_tau(self.tau(step))
        # NaN (not judged) and inf (overflowed gradient) compare False: never frozen.
        newly_frozen = [name for name, stat in zip(names, stats.tolist()) if stat < tau]
        if newly_frozen:
            self._freeze(trainer, newly_frozen)
            self.frozen_at.update(dict.fromkeys(newly_frozen, step))
        pl_module.log("grades/frozen_fraction", self.frozen_fraction)
        self._stop_if_enough_frozen(trainer, step)

    def _statistics(self, names: list[str], measured: Any, device: torch.device) -> Tensor:
        """The L1 norms of one optimizer step's matrices: measured before the step (``grad_l1``), or
        of the weight change from the copies taken before the step (``update_l1``)."""
        if self.metric == "grad_l1":
            return measured
        params = [self._monitored[name] for name in names]
        with torch.no_grad():
            updates = [None if before is None else before.sub_(p) for p, before in zip(params, measured)]
        return _l1_norms(updates, device)

    @property
    def frozen_fraction(self) -> float:
        """The fraction of the monitored matrices that are frozen."""
        return len(self.frozen_at) / len(self._monitored) if self._monitored else 0.0

    def _freeze(self, trainer: pl.Trainer, names: Iterable[str]) -> None:
        for name in names:
            param = self._monitored[name]
            param.requires_grad_(False)
            param.grad = None  # optimizers skip a parameter without a gradient: no momentum, no weight decay
        _rewrap_ddp(trainer.strategy)

    def _stop_if_enough_frozen(self, trainer: pl.Trainer, step: int) -> None:
        if self.frozen_fraction >= self.max_frozen_ratio and not trainer.should_stop:
            trainer.should_stop = True
            self._stopped_at = step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fires once when fitting ends: print a summary on rank 0."""
        if self.verbose and trainer.is_global_zero:
            print(self.summary())

    def summary(self) -> str:
        """One or two lines: how many matrices were frozen, when, and whether training stopped."""
        total = len(self._monitored)
        if not self.frozen_at:
            return f"GradES: froze none of the {total} monitored matrices."
        first, last = min(self.frozen_at.values()), max(self.frozen_at.values())
        when = f"at step {first}" if first == last else f"between steps {first} and {last}"
        text = f"GradES: froze {len(self.frozen_at)} of {total} monitored matrices ({self.frozen_fraction:.0%}) {when}."
        if self._stopped_at is not None:
            text += f"\nGradES: stopped training at step {self._stopped_at} (max_frozen_ratio={self.max_frozen_ratio})."
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_at": dict(self.frozen_at)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen_at = dict(state_dict["frozen_at"])


def _rewrap_ddp(strategy: Strategy) -> None:
    """Wrap the model in DDP again, so that its reducer covers only the trainable parameters.

    DDP builds its reducer for the parameters that required a gradient when it wrapped
    the model; with ``find_unused_parameters=False`` it would then wait forever for
    gradients of frozen parameters. ``configure_ddp`` wraps with the strategy's own
    arguments and registers its communication hooks again. All ranks freeze at the
    same step, so all take part in the new wrapper's collective set-up together.
    """
    model = strategy.model
    if model is strategy.lightning_module:
        return  # nothing wraps the module: backward reads requires_grad afresh
    if not (isinstance(strategy, DDPStrategy) and isinstance(model, DistributedDataParallel)):
        raise RuntimeError(
            f"GradES can freeze parameters under single-device and DDP strategies; "
            f"{type(strategy).__name__} wraps the model in {type(model).__name__}"
        )
    strategy.model = strategy.lightning_module
    # DDP refuses a module with nothing to train; with nothing to all-reduce, no wrapper is needed.
    if any(p.requires_grad for p in strategy.lightning_module.parameters()):
        strategy.configure_ddp()


def _l1_norms(tensors: Sequence[Optional[Tensor]], device: torch.device) -> Tensor:
    """Each tensor's L1 norm in fp32, NaN where there is no tensor (a matrix not judged)."""
    norms = torch.full((len(tensors),), math.nan, device=device)
    present = [i for i, tensor in enumerate(tensors) if tensor is not None]
    if present:
        norms[present] = torch.stack(torch._foreach_norm([tensors[i] for i in present], 1, dtype=torch.float32))
    return norms


def _check_tau(value: float) -> float:
    return check_in_range("tau", value, 0, owner="GradES")


def _preview(names: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` names, for error messages."""
    names = list(names)
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
