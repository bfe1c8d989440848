"""A quiet CPU Trainer for tests: no logger, progress bar, summary or checkpoints."""

import lightning.pytorch as pl


def make_trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return pl.Trainer(**{**options, **kwargs})
