"""``lightning-converge``: a LightningCLI that knows this pack's strategies, callbacks and optimizers.

    lightning-converge fit --config configs/demo.yaml
    lightning-converge fit --config configs/demo.yaml --trainer.max_steps 100

Importing :mod:`lightning_converge` first registers every strategy name, so
``trainer.strategy: diloco`` resolves in YAML and on the command line.
Configs are parsed with ``parser_mode="omegaconf"`` so they may interpolate.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

import lightning_converge  # noqa: F401  (registers the strategies by name)


class ConvergeCLI(LightningCLI):
    """LightningCLI that reports where the run's logs and checkpoints went."""

    def after_fit(self) -> None:
        trainer = self.trainer
        # log_dir is broadcast from rank 0 under DDP: every rank must ask for it.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            print(f"\nlogs and checkpoints: {os.path.abspath(log_dir)}")
            checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
            if checkpoint:
                print(f"best checkpoint: {os.path.abspath(checkpoint)}")


def main(args: list[str] | None = None) -> None:
    # Like `python -m`, let class_paths name modules of the current project (examples/, configs' models).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    ConvergeCLI(parser_kwargs={"parser_mode": "omegaconf"}, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
