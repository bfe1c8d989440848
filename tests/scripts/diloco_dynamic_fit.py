"""Fit the tiny regression of ``diloco_fit.py`` under two-worker DiLoCo with dynamic local updates, once per
scenario, and save what each rank saw.

Run by tests/test_diloco_dynamic.py as ``python diloco_dynamic_fit.py OUT_DIR SCENARIO [SCENARIO ...]`` on both
ranks. Each scenario writes ``OUT_DIR/SCENARIO_rank{r}.pt``: the final parameters, the global parameters after
every outer update, the rounds (the speeds each round's inner steps came from, and this worker's inner steps),
the speed this worker sent at every sync, the steps at which it really stepped its optimizer, and counters.

In ``measured`` rank 1 sleeps before every optimizer step (so in its real steps only; the strategy knows nothing
of it). The other scenarios force the speeds with :data:`FORCED_SPEEDS` (test-only: the strategy's speed
reading is replaced), so their inner steps, and so their parameters, are known in advance.
"""

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from diloco_fit import Recording, fit  # noqa: E402

from lightning_converge.strategies import DiLoCoStrategy  # noqa: E402

# Outer updates applied before the sync -> each rank's speed sent there (inner steps a second).
FORCED_SPEEDS = {0: [1.0, 0.5], 1: [0.25, 1.0], 2: [1.0, 1.0]}
SLEEP_SECONDS = 0.2


class DynamicDiLoCo(Recording, DiLoCoStrategy):
    """Dynamic local updates, recording each round's speeds and inner steps and the speed sent at each sync;
    with ``forced``, the speed sent is ``forced[outer updates so far][rank]`` instead of the measured one."""

    def __init__(self, *args, forced=None, **kwargs) -> None:
        super().__init__(*args, dynamic_inner_steps=True, backend="reference", **kwargs)
        self.rounds = []
        self.sent_speeds = []
        measure = self._dynamic.measured_speed

        def measured_speed():
            speed = forced[self.outer_steps][self.global_rank] if forced else measure()
            self.sent_speeds.append(speed)
            return speed

        self._dynamic.measured_speed = measured_speed

    def _start_round(self) -> None:
        super()._start_round()
        self.rounds.append((self._schedule.round_start, self._dynamic.speeds, self._dynamic.inner_steps))


class RealSteps(L.Callback):
    """The steps (``trainer.global_step`` before the step) at which this worker's optimizer really stepped;
    with ``sleep`` seconds, it also sleeps then (a slow worker's real steps)."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(trainer.global_step)
        time.sleep(self.sleep)


def save(out_dir, name, trainer, model):
    strategy = trainer.strategy
    real = next(c for c in trainer.callbacks if isinstance(c, RealSteps))
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "globals_after_update": strategy.globals_after_update,
            "events": strategy.events,
            "rounds": strategy.rounds,
            "sent_speeds": strategy.sent_speeds,
            "real_steps": real.steps,
            "outer_steps": strategy.outer_steps,
            "global_step": trainer.global_step,
            "bytes_sent": strategy.bytes_sent,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
        },
        Path(out_dir) / f"{name}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    for name in names:
        if name == "measured":  # rank 1 sleeps in its real steps: 3 rounds of 4 steps
            rank = int(__import__("os").environ["LOCAL_RANK"])
            slow = RealSteps(sleep=SLEEP_SECONDS if rank == 1 else 0.0)
            save(out_dir, name, *fit(DynamicDiLoCo(inner_steps=4), "SGD", 12, [slow]))
        elif name in ("forced", "forced_fp16"):  # rounds of 4 steps, the third cut at step 10: a last sync
            compressor = "fp16" if name == "forced_fp16" else None
            strategy = DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS, compressor=compressor)
            save(out_dir, name, *fit(strategy, "SGD", 10, [RealSteps()]))
        elif name == "forced_accumulate_bf16":  # 2 micro-batches a step, bf16 autocast
            strategy = DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS)
            run = fit(strategy, "AdamW", 10, [RealSteps()], accumulate_grad_batches=2, precision="bf16-mixed")
            save(out_dir, name, *run)
        elif name == "resumed":  # checkpoints every 3 steps; resumed from step 6, inside the second round
            ckpt_dir = out_dir / "resumed_checkpoints"
            every_3_steps = ModelCheckpoint(ckpt_dir, save_top_k=-1, every_n_train_steps=3)
            strategy = DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS)
            save(out_dir, name, *fit(strategy, "AdamW", 10, [RealSteps(), every_3_steps]))
            strategy = DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS)
            run = fit(strategy, "AdamW", 10, [RealSteps()], ckpt_path=ckpt_dir / "epoch=0-step=6.ckpt")
            save(out_dir, f"{name}_resumed", *run)
        elif name == "after_fit":  # stopped at step 6, inside the second round, saved after fit, resumed to 10
            trainer, model = fit(DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS), "AdamW", 6, [RealSteps()])
            checkpoint = out_dir / "after_fit.ckpt"
            trainer.save_checkpoint(checkpoint)
            strategy = DynamicDiLoCo(inner_steps=4, forced=FORCED_SPEEDS)
            save(out_dir, "after_fit_resumed", *fit(strategy, "AdamW", 10, [RealSteps()], ckpt_path=checkpoint))
        else:
            raise ValueError(f"unknown scenario {name!r}")
