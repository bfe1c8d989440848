"""The pack on a Hugging Face model built from a config (no download): what a new user tries first.

A tiny ``LlamaForCausalLM`` trained with our AdamW and every callback at once, on the
default kernel backend; a checkpoint saved by hand after ``fit`` must resume to the
model an uninterrupted run trains.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_converge.callbacks import EMA, LAWA, GradES, Grokfast
from lightning_converge.optim import AdamW

transformers = pytest.importorskip("transformers")

VOCAB, SEQUENCE = 64, 16


class TinyLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQUENCE,
        )
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)  # backend: the default, "auto"


def tokens() -> DataLoader:
    # One batch per epoch: every step sees the same data, so a resumed epoch repeats nothing.
    data = torch.randint(0, VOCAB, (4, SEQUENCE), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(data), batch_size=4)


def callbacks() -> list[pl.Callback]:
    return [
        Grokfast(alpha=0.9, lamb=1.0),
        GradES(grace_period=0.0),
        EMA(decay=0.9),
        LAWA(k=2, every_n_steps=2, validate_with="live", keep_average_on_train_end=False),
    ]


def fit(model: TinyLlama, max_steps: int, root, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks(),
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
