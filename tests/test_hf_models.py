"""The pack on a Hugging Face model built from a config (no download): what a new user tries first.

A tiny ``LlamaForCausalLM`` trained with our AdamW and every callback at once, on the
default kernel backend; a checkpoint saved by hand after ``fit`` must resume to the
model an uninterrupted run trains. Then the second wave on the same model: Schedule-Free
AdamW with ScheduleFreeMode, Muon (its split on the HF parameter names, tied embeddings
included) and PostHocEMA, each against a reference computation, each resumed likewise.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from test_posthoc_ema import Recorder, combine, profile_weights
from test_schedule_free import entry_point  # noqa: F401  (the fixture: ScheduleFreeMode as Lightning adds it)
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import EMA, LAWA, GradES, Grokfast, PostHocEMA
from lightning_converge.callbacks.posthoc_ema import sigma_rel_to_gamma
from lightning_converge.optim import AdamW, Muon, ScheduleFreeAdamW, muon_parameter_groups

transformers = pytest.importorskip("transformers")
schedulefree = pytest.importorskip("schedulefree")

VOCAB, SEQUENCE = 64, 16


def default_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return AdamW(module.parameters(), lr=3e-3, weight_decay=0.1)  # backend: the default, "auto"


class TinyLlama(pl.LightningModule):
    def __init__(
        self,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] = default_optimizer,
        tied: bool = False,
    ) -> None:
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQUENCE,
            tie_word_embeddings=tied,
        )
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(config)
        self.make_optimizer = make_optimizer

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, labels=tokens).loss

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.loss(tokens)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self)


def tokens() -> DataLoader:
    # One batch per epoch: every step sees the same data, so a resumed epoch repeats nothing.
    data = torch.randint(0, VOCAB, (4, SEQUENCE), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(data), batch_size=4)


def first_wave_callbacks() -> list[pl.Callback]:
    return [
        Grokfast(alpha=0.9, lamb=1.0),
        GradES(grace_period=0.0),
        EMA(decay=0.9),
        LAWA(k=2, every_n_steps=2, validate_with="live", keep_average_on_train_end=False),
    ]


def fit(
    model: TinyLlama, max_steps: int, root, ckpt_path=None, callbacks: list[pl.Callback] | None = None
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=first_wave_callbacks() if callbacks is None else callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, tokens(), ckpt_path=ckpt_path)
    return trainer


def saved_after_fit(trainer: pl.Trainer, path) -> dict:
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


def test_every_callback_on_a_tiny_llama_resumes_exactly_from_a_checkpoint_saved_after_fit(tmp_path):
    straight = saved_after_fit(fit(TinyLlama(), 8, tmp_path), tmp_path / "straight.ckpt")

    first = TinyLlama()
    stopped = saved_after_fit(fit(first, 5, tmp_path), tmp_path / "stopped.ckpt")
    # The model fit ended with, and the checkpoint's, is the EMA's average; the live weights are kept beside it.
    assert any(not torch.equal(stopped["state_dict"][k], stopped["live_state_dict"][k]) for k in stopped["state_dict"])
    for name, value in first.state_dict().items():
        assert torch.equal(stopped["state_dict"][name], value), name

    resumed = saved_after_fit(
        fit(TinyLlama(), 8, tmp_path, ckpt_path=tmp_path / "stopped.ckpt"), tmp_path / "resumed.ckpt"
    )
    for key in ("state_dict", "live_state_dict"):
        for name, expected in straight[key].items():
            assert torch.equal(resumed[key][name], expected), f"{key}[{name!r}]"
    assert resumed["global_step"] == straight["global_step"] == 8


# --- the second wave on the same model ------------------------------------------------------------

# Llama's hidden matrices, written out from its architecture: the attention and MLP projections.
LLAMA_HIDDEN_MATRIX = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
MUON = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95}
ADAMW = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def make_muon(module: torch.nn.Module) -> Muon:
    return Muon(module, **MUON, **{f"adamw_{name}": value for name, value in ADAMW.items()})


def assert_resumes_exactly(make_model: Callable[[], TinyLlama], make_callbacks, tmp_path, steps=(3, 6)) -> dict:
    """Fit ``steps[1]`` straight, and ``steps[0]`` then resumed from a checkpoint saved by hand after that
    fit: the two checkpoints saved at the end hold the same tensors (every one, callbacks' included).
    Returns the straight run's checkpoint."""
    half, full = steps
    straight = saved_after_fit(fit(make_model(), full, tmp_path, callbacks=make_callbacks()), tmp_path / "straight.ckpt")
    saved_after_fit(fit(make_model(), half, tmp_path, callbacks=make_callbacks()), tmp_path / "stopped.ckpt")
    resumed = fit(make_model(), full, tmp_path, ckpt_path=tmp_path / "stopped.ckpt", callbacks=make_callbacks())
    resumed = saved_after_fit(resumed, tmp_path / "resumed.ckpt")
    assert resumed["global_step"] == straight["global_step"] == full

    def assert_same(actual, expected, where):
        if isinstance(expected, dict):
            assert actual.keys() == expected.keys(), where
            for key in expected:
                assert_same(actual[key], expected[key], f"{where}[{key!r}]")
        elif isinstance(expected, (list, tuple)):
            assert len(actual) == len(expected), where
            for index, (a, e) in enumerate(zip(actual, expected)):
                assert_same(a, e, f"{where}[{index}]")
        elif isinstance(expected, torch.Tensor):
            assert torch.equal(actual, expected), where

    for key in ("state_dict", "live_state_dict", "callbacks", "optimizer_states"):
        if key in straight:
            assert_same(resumed[key], straight[key], key)
    return straight


def by_hand(model: TinyLlama, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    (batch,) = tokens().dataset.tensors
    for _ in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        model.loss(batch).backward()
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_muon_splits_llamas_projections_from_its_embeddings_head_and_norms(tied):
    """The documented rule on HF's names: the attention and MLP projections go to Muon; the token
    embedding, the head (tied: the same tensor, listed once, as the embedding) and the norms to AdamW,
    whether Muon gets the module or its ``named_parameters()``."""
    llama = TinyLlama(tied=tied).model
    names = [name for name, _ in llama.named_parameters()]
    hidden = sorted(name for name in names if LLAMA_HIDDEN_MATRIX.match(name))
    assert len(hidden) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert ("lm_head.weight" in names) != tied and "model.embed_tokens.weight" in names
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied
    by_id = {id(p): name for name, p in llama.named_parameters()}
    for source in (llama, llama.named_parameters()):
        groups = muon_parameter_groups(source)
        split = {group["use_muon"]: sorted(by_id[id(p)] for p in group["params"]) for group in groups}
        assert split == {True: hidden, False: sorted(set(names) - set(hidden))}


def test_muon_on_a_tied_llama_equals_torch_muon_and_adamw_and_resumes_exactly(tmp_path):
    """Two steps on the default backend against torch.optim.Muon on the projections (named by the
    pattern above) and torch.optim.AdamW on the rest; a fit resumed after 3 of 6 steps ends identically.

    Only two steps against torch: from the third on, fp32 roundings done in another order flip bf16
    ulps of a direction and Newton-Schulz amplifies them (measured here: 1e-4 at step 3, 3e-3 at step
    6, the same with torch's own per-matrix iteration in place of ours)."""
    model = TinyLlama(make_muon, tied=True)
    fit(model, 2, tmp_path, callbacks=[])
    reference = TinyLlama(tied=True)
    hidden = [p for name, p in reference.model.named_parameters() if LLAMA_HIDDEN_MATRIX.match(name)]
    rest = [p for p in reference.parameters() if all(p is not h for h in hidden)]
    by_hand(reference, [torch.optim.Muon(hidden, **MUON), torch.optim.AdamW(rest, **ADAMW)], 2)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert_resumes_exactly(lambda: TinyLlama(make_muon, tied=True), list, tmp_path, steps=(3, 6))


def test_schedule_free_adamw_on_a_llama_fits_to_x_and_resumes_exactly(tmp_path, entry_point):  # noqa: F811
    """ScheduleFreeMode (from the entry point) leaves the fitted model and the checkpoint at x, as
    ``AdamWScheduleFree`` after ``eval()``; y beside it; a fit resumed after 3 steps ends identically."""
    hyperparameters = {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01}
    make = lambda module: ScheduleFreeAdamW(module.parameters(), **hyperparameters)
    straight = assert_resumes_exactly(lambda: TinyLlama(make), list, tmp_path)
    reference = TinyLlama()
    optimizer = schedulefree.AdamWScheduleFree(reference.parameters(), **hyperparameters)
    optimizer.train()
    by_hand(reference, [optimizer], 6)
    y = {name: p.detach().clone() for name, p in reference.named_parameters()}
    optimizer.eval()
    for name, x in reference.named_parameters():
        torch.testing.assert_close(straight["state_dict"][name], x.detach(), msg=name)
        torch.testing.assert_close(straight["live_state_dict"][name], y[name], msg=name)
    assert not torch.equal(reference.model.lm_head.weight, y["model.lm_head.weight"])  # x and y differ


def test_posthoc_ema_on_a_llama_follows_the_power_function_profile_and_resumes_exactly(tmp_path):
    """Each profile after 6 steps is the power-function EMA written out over the recorded weights; its
    snapshots, profiles and the reconstruction survive a resume after 3 steps."""
    sigma_rels = (0.05, 0.10)
    recorder = Recorder()
    posthoc = PostHocEMA(sigma_rels=sigma_rels, every_n_steps=2)
    fit(TinyLlama(), 6, tmp_path, callbacks=[recorder, posthoc])
    for index, sigma_rel in enumerate(sigma_rels):
        tracked = posthoc.state_dict()["profiles"][index]
        expected = combine(profile_weights(6, sigma_rel_to_gamma(sigma_rel), 6), recorder.after_step)
        assert tracked.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(tracked[name].double(), tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert posthoc.snapshot_steps == [2, 4, 6]
    callbacks = lambda: [PostHocEMA(sigma_rels=sigma_rels, every_n_steps=2)]
    straight = assert_resumes_exactly(TinyLlama, callbacks, tmp_path)
    reconstructed = posthoc.reconstruct(0.07)
    model = TinyLlama()
    missing, unexpected = model.load_state_dict(reconstructed, strict=False)
    assert not unexpected and not [name for name in missing if not name.endswith("rotary_emb.inv_freq")]
    # The straight run of assert_resumes_exactly trained the same steps: its live weights are the recorder's,
    # and its checkpoint's state_dict the first profile.
    first_profile = posthoc.state_dict()["profiles"][0]
    for name, tensor in recorder.after_step[-1].items():
        assert torch.equal(straight["live_state_dict"][name].double(), tensor), name
        assert torch.equal(straight["state_dict"][name], first_profile[name]), name
