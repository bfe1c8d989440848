"""The `lightning-converge` LightningCLI runs the shipped configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_muon import TinyLM
from test_muon import batch as muon_batch
from torch.utils.data import DataLoader

from lightning_converge.cli import main
from lightning_converge.optim import Muon, muon_parameter_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _isolated_run(monkeypatch):
    # LightningCLI warns when pytest's own arguments sit in sys.argv beside `args`.
    monkeypatch.setattr(sys, "argv", ["lightning-converge"])
    environ = dict(os.environ)
    yield
    # A config with a distributed strategy (diloco) opens a process group and sets
    # MASTER_PORT & co. in this process: later tests' launchers would inherit them.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_a_few_steps(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # class_paths such as examples.grokking resolve from the project root
    main(
        [
            "fit",
            "--config", str(config),
            "--trainer.max_steps", "3",
            "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "null",
            "--trainer.check_val_every_n_epoch", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false",
        ]
    )
    assert "logs and checkpoints:" in capsys.readouterr().out


def test_unknown_argument_is_rejected_before_training(capsys):
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.init_args.no_such_argument", "1"])
    assert error.value.code != 0


COMPRESSED_DDP_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  strategy:
    class_path: lightning_converge.strategies.CompressedDDPStrategy
    init_args:
      start_step: 5
      compressor:
        class_path: lightning_converge.comm.PowerSGDCompressor
        init_args: {rank: 4}
      ddp_kwargs: {find_unused_parameters: true}
"""


def test_compressor_options_in_yaml_reach_the_strategy_and_print_config_shows_them(tmp_path, monkeypatch, capsys):
    import yaml

    from lightning_converge.cli import ConvergeCLI
    from lightning_converge.comm import PowerSGDCompressor
    from lightning_converge.strategies import CompressedDDPStrategy

    monkeypatch.chdir(ROOT)
    strategy_config = tmp_path / "strategy.yaml"
    strategy_config.write_text(COMPRESSED_DDP_YAML)
    configs = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(strategy_config)]

    cli = ConvergeCLI(args=configs, run=False, parser_kwargs={"parser_mode": "omegaconf"})
    strategy = cli.trainer.strategy
    assert type(strategy) is CompressedDDPStrategy and strategy.start_step == 5
    assert type(strategy.compressor) is PowerSGDCompressor and strategy.compressor.rank == 4
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}

    with pytest.raises(SystemExit):
        main(["fit", *configs, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]
    assert printed["start_step"] == 5
    assert printed["compressor"]["class_path"].endswith("PowerSGDCompressor")
    # Every option of the compressor is shown, the defaults too.
    assert printed["compressor"]["init_args"] == {"error_feedback": True, "rank": 4, "seed": 0}


def test_package_metadata_declares_an_spdx_license_and_only_dependencies_in_use():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX string: setuptools >= 77 warns about the old table
    sources = "\n".join(
        path.read_text() for folder in ("lightning_converge", "examples") for path in (ROOT / folder).rglob("*.py")
    )
    # LightningCLI imports these for us: jsonargparse always, omegaconf for parser_mode="omegaconf".
    used_by_lightning_cli = {"jsonargparse": "LightningCLI", "omegaconf": '"parser_mode": "omegaconf"'}
    for requirement in project["dependencies"]:
        module = requirement.split("[")[0].split(">")[0].split("=")[0].strip()
        used = f"import {module}" in sources or f"from {module}" in sources
        assert used or used_by_lightning_cli.get(module, "\0") in sources, f"{module} is declared but never used"


class MuonCliModule(pl.LightningModule):
    """test_muon's TinyLM (embedding, hidden matrices, norm, head) without ``configure_optimizers``:
    the ``optimizer:`` and ``lr_scheduler:`` blocks of a config give it one. One batch an epoch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM()

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(tokens).logsumexp(-1).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader([muon_batch(0)], batch_size=None)


MUON_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: test_cli.MuonCliModule
optimizer:
  class_path: lightning_converge.optim.Muon
  init_args: {lr: 0.02, weight_decay: 0.1, momentum: 0.9, adamw_lr: 3.0e-3, adamw_betas: [0.9, 0.95],
              adamw_eps: 1.0e-8, adamw_weight_decay: 0.01, backend: reference}
lr_scheduler:
  class_path: torch.optim.lr_scheduler.StepLR
  init_args: {step_size: 1, gamma: 0.5}
"""


def test_an_optimizer_block_selects_muon_which_splits_the_module_by_name(tmp_path):
    """The YAML's ``optimizer:`` block builds Muon from the module's named parameters, so it sorts them
    as from the module itself; three epochs with the ``lr_scheduler:`` block equal torch.optim.Muon on
    the hidden matrices and torch.optim.AdamW on the rest, each under the same StepLR."""
    from test_muon import assert_params_close, torch_pair

    from lightning_converge.cli import ConvergeCLI

    config = tmp_path / "muon.yaml"
    config.write_text(MUON_YAML)
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    cli = ConvergeCLI(args=args, parser_kwargs={"parser_mode": "omegaconf"})
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is Muon and cli.trainer.global_step == 3
    split = lambda groups: [(g["use_muon"], [id(p) for p in g["params"]]) for g in groups]
    assert split(optimizer.param_groups) == split(muon_parameter_groups(cli.model))
    assert [g["lr"] for g in optimizer.param_groups] == [0.02 * 0.5**3, 3e-3 * 0.5**3]

    torch.manual_seed(0)
    reference = TinyLM()
    optimizers = torch_pair(reference)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in optimizers]
    for _ in range(3):
        for o in optimizers:
            o.zero_grad()
        reference(muon_batch(0)).logsumexp(-1).mean().backward()
        for o, scheduler in zip(optimizers, schedulers):
            o.step()
            scheduler.step()
    assert_params_close(cli.model.model, reference, rtol=1e-4, atol=1e-4)


def test_lightning_cli_alone_refuses_muon_saying_what_to_use(tmp_path):
    """LightningCLI itself passes ``model.parameters()``: Muon's error names the two ways that work."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "muon.yaml"
    config.write_text(MUON_YAML)
    with pytest.raises(TypeError, match=r"plain list of tensors.*Muon\(self, \.\.\.\).*ConvergeCLI"):
        LightningCLI(args=["--config", str(config)], run=False)
