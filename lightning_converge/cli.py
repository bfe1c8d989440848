"""``lightning-converge``: a LightningCLI that knows this pack's strategies, callbacks and optimizers.

    lightning-converge fit --config configs/demo.yaml
    lightning-converge fit --config configs/demo.yaml --trainer.max_steps 100

Importing :mod:`lightning_converge` first registers every strategy name, so
``trainer.strategy: diloco`` resolves in YAML and on the command line.
Configs are parsed with ``parser_mode="omegaconf"`` so they may interpolate.

A top-level ``optimizer:`` block may name :class:`~lightning_converge.optim.Muon`
(LightningCLI's own would hand it ``model.parameters()``, which Muon refuses: see
:class:`ConvergeCLI`)::

    optimizer:
      class_path: lightning_converge.optim.Muon
      init_args: {lr: 0.02, adamw_lr: 3.0e-4}
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

import lightning_converge  # noqa: F401  (registers the strategies by name)


class ConvergeCLI(LightningCLI):
    """LightningCLI that reports where the run's logs and checkpoints went, and builds the optimizer
    of a top-level ``optimizer:`` block from the module's ``named_parameters()`` when its class sets
    ``takes_named_parameters = True`` (:class:`~lightning_converge.optim.Muon` does: it tells
    embeddings and heads from hidden matrices by name). LightningCLI passes ``model.parameters()``,
    which carries no names; every other optimizer still gets that.
    """

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """LightningCLI's step (from ``instantiate_classes``, once the model is built and before the
        Trainer) that builds the ``optimizer:`` / ``lr_scheduler:`` blocks into the model's
        ``configure_optimizers``; here with named parameters for the optimizers that take them.
        A private hook of LightningCLI (Lightning 2.6), tested in ``tests/test_cli.py``."""
        if not getattr(self._automatic_optimizer_class(subcommand), "takes_named_parameters", False):
            super()._add_configure_optimizers_method_to_model(subcommand)
            return
        # LightningCLI builds the optimizer from `self.model.parameters()`: for that one call an
        # instance attribute shadows the method with `named_parameters`.
        self.model.parameters = self.model.named_parameters
        try:
            super()._add_configure_optimizers_method_to_model(subcommand)
        finally:
            del self.model.parameters

    def _automatic_optimizer_class(self, subcommand: str | None) -> Any:
        """The class of the optimizer LightningCLI builds for ``configure_optimizers`` (the one
        optimizer argument group linked to ``"AUTOMATIC"``), None without one."""
        parser = self._parser(subcommand)
        automatic = [(key, cls) for key, (cls, link_to) in parser._optimizers.items() if link_to == "AUTOMATIC"]
        if not self.auto_configure_optimizers or len(automatic) != 1:
            return None  # none, or several: LightningCLI explains the latter
        key, registered = automatic[0]
        if not isinstance(registered, tuple):
            return registered  # a single class, no class_path in the config
        init = self._get(self.config_init, key)
        class_path = init.get("class_path") if init else None
        if not class_path:
            return None
        module, name = class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

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
