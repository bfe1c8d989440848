"""Run the compressed data-parallel scenarios under two-process DDP and save what each rank saw.

Run by tests/test_compressed_ddp.py as ``python compressed_ddp_fit.py OUT_DIR [4 | hardening]``
(Lightning's launcher starts the other ranks, which run the same scenarios; with
4, a smaller set of scenarios on four ranks; with hardening, the fp16-AMP, small-bucket,
scalar-parameter, manual-optimization and unused-parameter scenarios on two). Each scenario
is a short ``fit`` of the same tiny regression from the same initial weights; rank
``r`` saves ``OUT_DIR/rank{r}.pt``: a dict scenario -> {"initial_params", "params", "names", "bytes_sent",
"logged_bytes_sent" and the other logged "comm/*" values, "compression_ratio", "ranks_agree", "loss"}, plus the error
message of a fit that must fail.
"""

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_converge  # noqa: F401  (registers the strategies by name)
from lightning_converge.comm import TopKCompressor, make_compressor
from lightning_converge.optim import AdamW
from lightning_converge.strategies import CompressedDDPStrategy, OneBitAdamStrategy

# 48 samples, 8 per rank and step: an epoch is 3 steps, so a run stopped after 3 steps resumes at an epoch start.
NUM_SAMPLES = 48
BATCH_SIZE = 8


class Regression(L.LightningModule):
    """The tiny regression every scenario fits; the options add what a hardening scenario needs.

    ``scalar``: a 0-d ``gain`` multiplies the output. ``tiny``: one Linear(6, 1) (7 parameters).
    ``unused``: a parameter the forward never uses. ``late_step``: a parameter ``late`` used from
    that optimizer step on. ``manual``: manual optimization, the same steps as automatic.
    """

    def __init__(
        self,
        optimizer: str = "AdamW",
        scalar: bool = False,
        tiny: bool = False,
        unused: bool = False,
        late_step: int | None = None,
        manual: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        if tiny:
            self.net = torch.nn.Linear(6, 1)
        else:
            layers = [torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(32, 1))
        self.gain = torch.nn.Parameter(torch.tensor(1.0)) if scalar else None
        self.unused = torch.nn.Parameter(torch.ones(3)) if unused else None
        self.late = torch.nn.Parameter(torch.zeros(6)) if late_step is not None else None
        self.late_step = late_step
        self.optimizer = optimizer
        self.automatic_optimization = not manual

    def forward(self, x):
        out = self.net(x)
        if self.gain is not None:
            out = out * self.gain
        if self.late is not None and self.trainer.global_step >= self.late_step:
            out = out + x @ self.late[:, None]
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        optimizer.step()
        return None

    def train_dataloader(self):
        # Lightning's own sampler would shuffle; rank r takes samples r, r+2, ... in order.
        data = dataset()
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH_SIZE, sampler=sampler)

    def configure_optimizers(self):
        if self.optimizer == "SGD":
            return torch.optim.SGD(self.parameters(), lr=1e-2)
        return AdamW(self.parameters(), lr=1e-2)


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 6, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


LOGGED = ("bytes_sent", "bytes_received", "bytes_sent_total", "bytes_received_total", "compression_ratio")


class Record(L.Callback):
    """After each optimizer step: whether all ranks hold the same parameters, and the bytes the strategy
    counted (``last_comm_stats``) and logged (``comm/*``)."""

    def __init__(self) -> None:
        self.ranks_agree: list[bool] = []
        self.bytes_sent: list[int] = []
        self.logged: dict[str, list[float]] = {name: [] for name in LOGGED}

    def on_train_start(self, trainer, pl_module):
        self.find_unused_parameters = getattr(trainer.strategy.model, "find_unused_parameters", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        self.ranks_agree.append(bool((gathered == gathered[0]).all()))
        stats = getattr(trainer.strategy, "last_comm_stats", None)
        if stats is not None and "comm/bytes_sent" in trainer.callback_metrics:
            self.bytes_sent.append(stats.bytes_sent)
            for name in LOGGED:
                self.logged[name].append(float(trainer.callback_metrics[f"comm/{name}"]))


def fit(
    strategy,
    max_steps,
    ckpt_path=None,
    save_to=None,
    optimizer="AdamW",
    devices=2,
    model_options=None,
    **trainer_kwargs,
):
    model = Regression(optimizer, **(model_options or {}))
    initial = [p.detach().clone() for p in model.parameters()]
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return trainer, {
        "initial_params": initial,
        "params": [p.detach().clone() for p in model.parameters()],
        "names": [name for name, _ in model.named_parameters()],
        "bytes_sent": record.bytes_sent,
        **{f"logged_{name}": values for name, values in record.logged.items()},
        "compression_ratio": record.logged["compression_ratio"],
        "ranks_agree": record.ranks_agree,
        "find_unused_parameters": record.find_unused_parameters,
        "hyperparameters": {name: trainer.optimizers[0].param_groups[0][name] for name in ("lr", "weight_decay")},
        "loss": float(trainer.callback_metrics["train_loss"]),
    }


COMPRESSORS = {
    "fp16": {},
    "bf16": {},
    "int8": {},
    "sign": {"block_size": 128},
    "ternary": {},
    "topk": {"ratio": 0.1, "momentum": 0.9, "clip_norm": 1.0},
    "powersgd": {"rank": 2},
    "onebit": {"block_size": 128},
}


def main_four_ranks(out_dir: Path) -> None:
    """DDP, the uncompressed strategy and one compressor of each kind, on four ranks."""
    results = {}
    trainer, results["ddp"] = fit("ddp", 3, devices=4)
    _, results["none"] = fit(CompressedDDPStrategy("none"), 3, devices=4)
    for name in ("int8", "sign", "powersgd", "onebit"):
        _, results[name] = fit(CompressedDDPStrategy(make_compressor(name, **COMPRESSORS[name])), 3, devices=4)
    _, results["onebit_adam"] = fit(OneBitAdamStrategy(freeze_step=1, block_size=128), 3, devices=4)
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


def main(out_dir: Path) -> None:
    results = {}
    trainer, results["ddp"] = fit("ddp", 4)
    _, results["none"] = fit(CompressedDDPStrategy("none"), 4)
    _, results["onebit_warmup"] = fit(OneBitAdamStrategy(freeze_step=10), 4)
    for name, options in COMPRESSORS.items():
        _, results[name] = fit(CompressedDDPStrategy(make_compressor(name, **options)), 3)
    _, results["int8_accumulate_bf16"] = fit("ddp_int8", 2, accumulate_grad_batches=2, precision="bf16-mixed")

    # Resumes: two epochs (6 steps) straight, against one epoch, a checkpoint, and one more from it.
    # (Whole epochs: Lightning resumes a run stopped by max_steps mid-way through the epoch.)
    resumable = {
        "onebit_adam": lambda: OneBitAdamStrategy(freeze_step=2, block_size=128),
        "topk_resume": lambda: CompressedDDPStrategy(TopKCompressor(ratio=0.1, momentum=0.9)),
        "powersgd_resume": lambda: CompressedDDPStrategy("powersgd", start_step=1),
    }
    checkpoint = out_dir / "resume.ckpt"
    for name, make_strategy in resumable.items():
        _, results[name] = fit(make_strategy(), -1, max_epochs=2)
        fit(make_strategy(), -1, save_to=checkpoint, max_epochs=1)
        _, results[f"{name}_resumed"] = fit(make_strategy(), -1, ckpt_path=checkpoint, max_epochs=2)

    try:
        fit("onebit_adam", 1, optimizer="SGD")
        results["onebit_sgd_error"] = None
    except ValueError as error:
        results["onebit_sgd_error"] = str(error)
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


def fp16_with_scaler() -> MixedPrecision:
    """fp16 AMP with a scaler whose first ~25 steps overflow (Lightning has no CPU scaler of its own)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))


def main_hardening(out_dir: Path) -> None:
    """fp16 AMP overflow steps, scalar parameters, small buckets, manual optimization, late and unused
    parameters. Every strategy gets a short process-group timeout: a rank that hangs fails the run fast."""
    timeout = timedelta(seconds=60)
    results = {}
    amp_steps = 36  # about 27 overflow steps from 2**40, then training at 2**13 .. 2**16
    trainer, results["amp/ddp"] = fit("ddp", amp_steps, plugins=[fp16_with_scaler()], model_options={"scalar": True})
    results["amp/ddp"]["scale"] = trainer.precision_plugin.scaler.get_scale()
    for name in ["none", *COMPRESSORS]:
        compressor = "none" if name == "none" else make_compressor(name, **COMPRESSORS[name])
        strategy = CompressedDDPStrategy(compressor, timeout=timeout)
        trainer, results[f"amp/{name}"] = fit(
            strategy, amp_steps, plugins=[fp16_with_scaler()], model_options={"scalar": True}
        )
        results[f"amp/{name}"]["scale"] = trainer.precision_plugin.scaler.get_scale()
    for name, options in COMPRESSORS.items():
        strategy = CompressedDDPStrategy(make_compressor(name, **options), timeout=timeout)
        _, results[f"scalar/{name}"] = fit(strategy, 3, model_options={"scalar": True})
    try:
        fit(OneBitAdamStrategy(timeout=timeout), 1, plugins=[fp16_with_scaler()])
        results["onebit_scaler_error"] = None
    except ValueError as error:
        results["onebit_scaler_error"] = str(error)

    # 7 parameters, one block of 1024: the second rank's chunk of the 1-bit all-reduce is empty.
    _, results["onebit_tiny"] = fit(OneBitAdamStrategy(freeze_step=2, timeout=timeout), 5, model_options={"tiny": True})
    for mode in ("automatic", "manual"):
        strategy = OneBitAdamStrategy(freeze_step=2, block_size=128, timeout=timeout)
        _, results[f"onebit_{mode}"] = fit(strategy, 6, model_options={"manual": mode == "manual"})
    strategy = OneBitAdamStrategy(
        freeze_step=2, block_size=128, timeout=timeout, ddp_kwargs={"find_unused_parameters": True}
    )
    trainer, results["onebit_late"] = fit(strategy, 8, model_options={"late_step": 4})
    late = trainer.lightning_module.late
    results["onebit_late"]["late_state"] = {
        name: value.clone() for name, value in trainer.optimizers[0].state[late].items()
    }
    strategy = CompressedDDPStrategy("int8", timeout=timeout, ddp_kwargs={"find_unused_parameters": True})
    trainer, results["int8_unused"] = fit(strategy, 3, model_options={"unused": True})
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["4"]:
        main_four_ranks(Path(sys.argv[1]))
    elif sys.argv[2:] == ["hardening"]:
        main_hardening(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
