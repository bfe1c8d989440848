"""The `lightning-converge` LightningCLI runs the shipped configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from lightning_converge.cli import main

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
