"""GradES: which matrices it freezes and when, that frozen weights never move again,
resuming, stopping, and freezing under a 2-process DDP run.

Run as a script (``python tests/test_grades.py OUT_DIR``) this file is the DDP run
itself: Lightning's launcher starts the second rank by running the script again.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import GradES
from trainers import make_trainer

MATRICES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
WEIGHTS = tuple(f"{name}.weight" for name in MATRICES)  # parameter names, as GradES reports them


class GatedBlocks(pl.LightningModule):
    """Residual blocks named like Llama's projections. From step ``dead_from[name]`` on,
    block ``name``'s output is multiplied by zero, so its matrix's gradient is exactly zero."""

    def __init__(self, dead_from: dict[str, int], optimizer: str = "adamw", samples: int = 48) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name in MATRICES:
            setattr(self, name, nn.Linear(4, 4, bias=False))
        self.head = nn.Linear(4, 1)  # not monitored: its name matches no pattern
        self.dead_from = dead_from
        self.optimizer = optimizer
        self.samples = samples

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x
        for name in MATRICES:
            gate = 0.0 if self.global_step >= self.dead_from.get(name, math.inf) else 1.0
            h = h + gate * torch.tanh(getattr(self, name)(h))
        return (self.head(h) - y).pow(2).mean()

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        x, y = torch.randn(self.samples, 4, generator=generator), torch.randn(self.samples, 1, generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=2)


class RecordWeights(pl.Callback):
    """The monitored weights after each optimizer step (place it after GradES)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        self.after_step.append({name: params[name].detach().clone() for name in WEIGHTS})


def assert_frozen_weights_never_move(recorder: RecordWeights, frozen_at: dict[str, int]) -> None:
    for name, step in frozen_at.items():
        frozen = recorder.after_step[step][name]
        for later in recorder.after_step[step:]:
            assert torch.equal(later[name], frozen), name


def test_grad_l1_freezes_exactly_the_vanished_matrices_after_the_grace_period():
    grades = GradES(tau=1e-6, metric="grad_l1", grace_period=0.25, verbose=False)
    recorder = RecordWeights()
    model = GatedBlocks(dead_from={"k_proj": 0, "up_proj": 0, "v_proj": 5})
    trainer = make_trainer(max_steps=12, callbacks=[grades, recorder])
    trainer.fit(model)

    # The grace period is 3 of 12 steps: k_proj and up_proj had zero gradients from the start.
    assert grades.frozen_at == {"k_proj.weight": 3, "up_proj.weight": 3, "v_proj.weight": 5}
    assert trainer.global_step == 12
    assert trainer.callback_metrics["grades/frozen_fraction"] == pytest.approx(3 / 5)
    for name, weight in model.named_parameters():
        assert weight.requires_grad == (name not in grades.frozen_at)
        assert (weight.grad is None) == (name in grades.frozen_at)
    # AdamW's decoupled decay moved the zero-gradient matrices until they were frozen, never after.
    assert not torch.equal(recorder.after_step[2]["k_proj.weight"], recorder.after_step[3]["k_proj.weight"])
    assert_frozen_weights_never_move(recorder, grades.frozen_at)


def test_update_l1_measures_the_weight_change_at_check_steps():
    # Plain SGD: a matrix with a zero gradient does not move, the others do.
    grades = GradES(tau=1e-7, metric="update_l1", normalize=True, every_n_steps=2, grace_period=0, verbose=False)
    recorder = RecordWeights()
    model = GatedBlocks(dead_from={"k_proj": 0, "v_proj": 3}, optimizer="sgd")
    trainer = make_trainer(max_steps=8, callbacks=[grades, recorder])
    trainer.fit(model)

    # Checks at steps 0, 2, 4, 6: v_proj stops moving at step 3 and is caught at step 4.
    assert grades.frozen_at == {"k_proj.weight": 0, "v_proj.weight": 4}
    assert_frozen_weights_never_move(recorder, grades.frozen_at)


def test_enough_frozen_matrices_stop_training(capsys):
    grades = GradES(tau=1e-6, metric="grad_l1", grace_period=0, max_frozen_ratio=0.4)
    trainer = make_trainer(max_steps=10, callbacks=[grades])
    trainer.fit(GatedBlocks(dead_from={"k_proj": 0, "up_proj": 0}))

    assert grades.frozen_at == {"k_proj.weight": 0, "up_proj.weight": 0}
    assert trainer.global_step == 1
    summary = capsys.readouterr().out
    assert "froze 2 of 5 monitored matrices" in summary
    assert "stopped training at step 0" in summary


def test_resumed_run_refreezes_before_its_first_step(tmp_path):
    first = make_trainer(max_steps=4, callbacks=[GradES(tau=1e-6, metric="grad_l1", grace_period=0, verbose=False)])
    first.fit(GatedBlocks(dead_from={"k_proj": 0}, samples=8))  # ends with the epoch
    checkpoint = tmp_path / "frozen.ckpt"
    first.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["callbacks"]["GradES"] == {"frozen_at": {"k_proj.weight": 0}}

    class AtFirstStep(pl.Callback):
        """k_proj's weight as the resumed run's first step finds it."""

        def __init__(self) -> None:
            self.requires_grad, self.weight = None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.weight is None:
                self.requires_grad = pl_module.k_proj.weight.requires_grad
                self.weight = pl_module.k_proj.weight.detach().clone()

    probe, grades = AtFirstStep(), GradES(tau=1e-6, metric="grad_l1", grace_period=0, verbose=False)
    model = GatedBlocks(dead_from={"k_proj": 0}, samples=8)  # a fresh model: everything trainable
    make_trainer(max_steps=8, callbacks=[grades, probe]).fit(model, ckpt_path=checkpoint)

    assert probe.requires_grad is False
    assert torch.equal(model.k_proj.weight, probe.weight)
    assert grades.frozen_at == {"k_proj.weight": 0}


class TwoOptimizers(GatedBlocks):
    """Manual optimization with two SGD optimizers: one for q_proj and k_proj, one for the rest.
    Each batch steps the first, then the second (two steps of ``global_step``)."""

    FIRST = ("q_proj", "k_proj")

    def __init__(self, dead_from: dict[str, int]) -> None:
        super().__init__(dead_from)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        first = [p for name, p in self.named_parameters() if name.split(".")[0] in self.FIRST]
        second = [p for name, p in self.named_parameters() if name.split(".")[0] not in self.FIRST]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)


@pytest.mark.parametrize("metric", ["update_l1", "grad_l1"])
def test_two_optimizers_each_measure_their_own_matrices(metric):
    # k_proj (first optimizer) and up_proj (second) have zero gradients from the start: plain SGD
    # leaves them where they are. Every other matrix trains under its own optimizer.
    grades, recorder = GradES(tau=1e-7, metric=metric, grace_period=0, verbose=False), RecordWeights()
    model = TwoOptimizers(dead_from={"k_proj": 0, "up_proj": 0})
    make_trainer(max_steps=8, callbacks=[grades, recorder]).fit(model)

    # Frozen at the first batch, which starts at step 0; q_proj, stepped by the first optimizer
    # only, is judged by the weight change that optimizer made.
    assert grades.frozen_at == {"k_proj.weight": 0, "up_proj.weight": 0}
    assert not torch.equal(recorder.after_step[0]["q_proj.weight"], recorder.after_step[-1]["q_proj.weight"])
    assert_frozen_weights_never_move(recorder, grades.frozen_at)


def test_defaults_judge_nothing_during_the_grace_period():
    # The defaults (the authors' package): update_l1, tau 1e-4, a check every step, grace period 30%.
    grades, recorder = GradES(verbose=False), RecordWeights()
    model = GatedBlocks(dead_from={"k_proj": 0, "up_proj": 0}, optimizer="sgd")
    max_steps = 10
    make_trainer(max_steps=max_steps, callbacks=[grades, recorder]).fit(model)

    grace_steps = math.ceil(0.3 * max_steps)
    # Under SGD a zero gradient leaves a matrix exactly where it is (an update of L1 norm 0): both
    # are frozen at the first check after the grace period, none earlier.
    assert grades.frozen_at == {"k_proj.weight": grace_steps, "up_proj.weight": grace_steps}
    assert_frozen_weights_never_move(recorder, grades.frozen_at)


class TinyAttention(pl.LightningModule):
    """One attention block and a gated-free FFN named like Llama's, initialized as Hugging Face
    does (normal, std 0.02), trained from scratch on a next-token task with AdamW."""

    def __init__(self, dim: int = 32, vocab: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(dim, dim, bias=False))
        self.up_proj, self.down_proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        h = self.embed(tokens)
        attended = nn.functional.scaled_dot_product_attention(
            self.q_proj(h), self.k_proj(h), self.v_proj(h), is_causal=True
        )
        h = h + self.o_proj(attended)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        tokens = torch.randint(0, 16, (64, 8), generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(tokens, tokens.roll(1, dims=1)), batch_size=16)


def test_from_scratch_defaults_do_not_freeze_attention_at_the_first_steps():
    # What went wrong before: with near-uniform attention at initialization the q/k projections'
    # gradients are tiny (about 1e-8 here), so a gradient criterion judged from step 0 freezes them at once.
    hasty = GradES(tau=1e-6, metric="grad_l1", grace_period=0, verbose=False)
    make_trainer(max_steps=2, callbacks=[hasty]).fit(TinyAttention())
    assert hasty.frozen_at == {"q_proj.weight": 0, "k_proj.weight": 0}

    model = TinyAttention()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    defaults = GradES(verbose=False)
    make_trainer(max_steps=12, callbacks=[defaults]).fit(model)
    assert defaults.frozen_at == {}
    for name in ("q_proj.weight", "k_proj.weight"):
        assert getattr(model, name.split(".")[0]).weight.requires_grad
        assert not torch.equal(dict(model.named_parameters())[name], initial[name]), name


@pytest.mark.distributed
def test_ddp_freezing_mid_run_keeps_ranks_in_agreement(tmp_path):
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for outcome in ranks:
        # Grace period: ceil(0.25 * 10) = 3 steps. Two freezes, so the DDP model is wrapped twice anew.
        assert outcome["frozen_at"] == {"k_proj.weight": 3, "v_proj.weight": 4}
        assert outcome["global_step"] == 10
        assert outcome["requires_grad"] == {name: name not in ("k_proj.weight", "v_proj.weight") for name in WEIGHTS}
        assert outcome["frozen_weights_moved"] is False
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name


def ddp_main(out_dir: Path) -> None:
    """The DDP run: 2 CPU processes, gloo, find_unused_parameters=False (plain ``strategy="ddp"``)."""
    torch.set_num_threads(1)
    grades, recorder = GradES(tau=1e-6, metric="grad_l1", grace_period=0.25), RecordWeights()
    model = GatedBlocks(dead_from={"k_proj": 0, "v_proj": 4}, samples=40)
    trainer = make_trainer(strategy="ddp", devices=2, max_steps=10, callbacks=[grades, recorder])
    trainer.fit(model)
    moved = any(
        not torch.equal(later[name], recorder.after_step[step][name])
        for name, step in grades.frozen_at.items()
        for later in recorder.after_step[step:]
    )
    outcome = {
        "frozen_at": grades.frozen_at,
        "global_step": trainer.global_step,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters() if name in WEIGHTS},
        "frozen_weights_moved": moved,
        "weights": {name: p.detach() for name, p in model.named_parameters()},
    }
    torch.save(outcome, out_dir / f"rank{trainer.global_rank}.pt")


def test_patterns_that_match_nothing_raise_before_training():
    with pytest.raises(ValueError, match=r"patterns \['nothing_here'\] match no"):
        make_trainer(max_steps=1, callbacks=[GradES(tau=0.1, patterns=["q_proj", "nothing_here"])]).fit(
            GatedBlocks(dead_from={})
        )

    class Unnamed(GatedBlocks):
        def __init__(self):
            super().__init__(dead_from={})
            for name in MATRICES:
                delattr(self, name)
            self.layer = nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.head(self.layer(batch[0])).mean()

    with pytest.raises(ValueError, match="default patterns match no"):
        make_trainer(max_steps=1, callbacks=[GradES(tau=0.1)]).fit(Unnamed())


def test_default_patterns_cover_common_transformers():
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.output.dense.weight",
        "bert.encoder.layer.0.intermediate.dense.weight",
        "bert.encoder.layer.0.output.dense.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.linear1.weight",
    ]
    not_monitored = ["bert.pooler.dense.weight", "model.embed_tokens.weight", "lm_head.weight"]
    regexes = GradES(tau=0.1)._regexes
    for name in names:
        assert any(r.search(name) for r in regexes), name
    for name in not_monitored:
        assert not any(r.search(name) for r in regexes), name


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(tau=-1.0), "tau"),
        (dict(tau=lambda step: -0.5), "tau"),
        (dict(tau=0.1, metric="grad_l2"), "metric"),
        (dict(tau=0.1, every_n_steps=0), "every_n_steps"),
        (dict(tau=0.1, grace_period=1.5), "grace_period"),
        (dict(tau=0.1, max_frozen_ratio=0.0), "max_frozen_ratio"),
        (dict(tau=0.1, patterns=[]), "patterns"),
        (dict(tau=0.1, patterns=["q_proj("]), "patterns"),
    ],
)
def test_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        GradES(**kwargs)


if __name__ == "__main__":
    ddp_main(Path(sys.argv[1]))
