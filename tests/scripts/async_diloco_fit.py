"""Fit the tiny regression of ``diloco_fit.py`` under asynchronous DiLoCo, one scenario per run, and save
what each rank saw.

Run by ``tests/test_async_diloco.py`` as ``python async_diloco_fit.py OUT_DIR SCENARIO [CKPT]`` on
every rank at once (environment as ``torchrun`` sets it; Lightning launches nothing itself). Writes
``OUT_DIR/SCENARIO_rank{r}.pt``: the final parameters, the worker's counters and last logged metrics,
and on rank 0 the server's arrivals in order and counters. Scenarios:

* ``slow``: two workers, rank 1 stalls until rank 0 has done 3 rounds, then sleeps before every
  step; dynamic local updates;
* ``four``: four workers with int8-compressed messages; the last stalls until every other has done 3
  rounds, then sleeps before every step;
* ``overlap``: two workers with overlapped round trips and int8-compressed messages, inner SGD; rank 1
  sleeps before every step and records every step (:class:`StepRecorder`); a checkpoint at step 6;
* ``killed``: sign-compressed messages, checkpoints every 4 steps; rank 1 exits at once (as a killed
  process) at step 6; rank 0 must fail with a clear error within the 5 s timeout (it writes
  ``killed_rank0.err``);
* ``resumed``: resumed from ``CKPT`` (the ``killed`` run's checkpoint at step 4) by two workers, with a
  validation at step 6 (which saves ``validation.ckpt``), to step 8; then a checkpoint saved after that
  fit (``after_fit.ckpt``) is resumed by a second fit in the same processes, to step 10
  (``after_fit_rank{r}.pt``).

Every worker also records, per round, where it started and the pseudo-gradient it computed (before any
compression), so a test can replay what the server must have applied.
"""

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from diloco_fit import Regression, SeenInValidation, Validated  # noqa: E402

from lightning_converge.comm import Int8Compressor, SignCompressor  # noqa: E402
from lightning_converge.strategies import AsyncDiLoCoStrategy  # noqa: E402
from lightning_converge.strategies.diloco import AsyncDiLoCoError, asynchronous  # noqa: E402

# Each round's (start point, pseudo-gradient), flat, as this worker computed them.
PSEUDO_GRADIENTS = []
_pseudo_gradient = asynchronous.pseudo_gradient


def recorded_pseudo_gradient(origin, local):
    result = _pseudo_gradient(origin, local)
    PSEUDO_GRADIENTS.append((torch.cat([o.reshape(-1) for o in origin]).clone(), result.clone()))
    return result


asynchronous.pseudo_gradient = recorded_pseudo_gradient


def int8():
    return Int8Compressor(block_size=16, backend="reference")


def sign():
    return SignCompressor(block_size=16, backend="reference")


# Read now: Lightning's teardown takes it out of the environment (a second fit needs it).
WORLD_SIZE = int(os.environ["WORLD_SIZE"])
SLEEP_SECONDS = 0.3  # the slow worker's extra time per step
TIMEOUT_SECONDS = 5.0


class SlowRank(L.Callback):
    """The last rank is the slow worker: before its first step it waits until every other rank has
    completed ``fast_rounds`` rounds (each signals it by a file in ``out_dir``; a fast worker that waited
    for the slow one at a round would never get there), then it sleeps ``seconds`` before every step. All
    record their round length (H) at every step."""

    def __init__(self, out_dir: Path, scenario: str, fast_rounds: int, seconds: float) -> None:
        self.out_dir, self.scenario = out_dir, scenario
        self.fast_rounds, self.seconds = fast_rounds, seconds
        self.round_lengths = []

    def _signal(self, rank: int) -> Path:
        return self.out_dir / f"{self.scenario}_fast_rounds_done_{rank}"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != trainer.world_size - 1:
            return
        if trainer.global_step == 0:
            deadline = time.monotonic() + 120
            others = range(trainer.world_size - 1)
            while not all(self._signal(r).exists() for r in others) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # a first round clearly slower than the fast workers', whatever the load
        time.sleep(self.seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        strategy = trainer.strategy
        self.round_lengths.append(strategy.current_inner_steps)
        if trainer.global_rank != trainer.world_size - 1 and strategy.rounds >= self.fast_rounds:
            self._signal(trainer.global_rank).touch()


class StepRecorder(L.Callback):
    """On rank 1, per inner step: its parameters and gradients before the step, and after it (with whatever
    the strategy did in the step) its parameters, its round's origin and the server version it holds. It
    sleeps ``seconds`` before every step (so the server's replies arrive within its rounds), and a second
    more before the first."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            # Rank 0 serves from its on_train_start, which a loaded machine may reach a while after rank 1.
            time.sleep(self.seconds + (1.0 if trainer.global_step == 0 else 0.0))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1:
            self.steps.append(
                {
                    "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone(),
                    "grads": torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).clone(),
                    **self._round(trainer, "_before"),
                }
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1:
            self.steps[-1]["after"] = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone()
            self.steps[-1].update(self._round(trainer))

    @staticmethod
    def _round(trainer, suffix=""):
        origin = torch.cat([o.reshape(-1) for o in trainer.strategy.agreed_parameters()]).clone()
        return {f"origin{suffix}": origin, f"version{suffix}": trainer.strategy.outer_steps}


class DieAtStep(L.Callback):
    """Rank ``rank`` exits at once before step ``step``, as a killed process would."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(17)


def strategy(timeout: float = TIMEOUT_SECONDS, **options) -> AsyncDiLoCoStrategy:
    result = AsyncDiLoCoStrategy(backend="reference", timeout=timeout, **options)
    result.arrivals = []
    result.on_arrival = result.arrivals.append
    return result


def fit(strategy, max_steps, callbacks=(), ckpt_path=None, model=None, **trainer_options):
    model = model or Regression("AdamW")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def save(out_dir, name, trainer, model, **extra):
    strategy = trainer.strategy
    server = strategy.server
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "rounds": strategy.rounds,
            "sent": strategy.pseudo_gradients_sent,
            "bytes_sent": strategy.bytes_sent,
            "bytes_received": strategy.bytes_received,
            "reply_waits": strategy.reply_waits,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "arrivals": [(a.worker, a.version, a.staleness, a.applied) for a in strategy.arrivals],
            "pseudo_gradients": PSEUDO_GRADIENTS,
            "server": None
            if server is None
            else {
                "version": server.version,
                "arrivals": server.arrivals,
                "dropped": server.dropped,
                "rounds": {rank: record.rounds for rank, record in server.workers.items()},
                "params": [p.clone() for p in server.params],
            },
            **extra,
        },
        Path(out_dir) / f"{name}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir, name = Path(sys.argv[1]), sys.argv[2]
    rank, world_size = os.environ["LOCAL_RANK"], WORLD_SIZE
    if name == "slow":
        slow = SlowRank(out_dir, name, fast_rounds=3, seconds=SLEEP_SECONDS)
        # The slow worker's stall is a silence: the timeout must outlast it.
        run = fit(strategy(inner_steps=2, dynamic_inner_steps=True, outer_lr=0.5, timeout=120), 8, [slow])
        save(out_dir, name, *run, round_lengths=slow.round_lengths)
    elif name == "four":
        slow = SlowRank(out_dir, name, fast_rounds=3, seconds=SLEEP_SECONDS)
        run = fit(strategy(inner_steps=2, compressor=int8(), timeout=120), 8, [slow])
        save(out_dir, name, *run)
    elif name == "overlap":
        recorder = StepRecorder(seconds=SLEEP_SECONDS)
        every_6_steps = ModelCheckpoint(out_dir / "overlap_checkpoints", save_top_k=-1, every_n_train_steps=6)
        overlapped = strategy(inner_steps=3, compressor=int8(), overlap=True)
        run = fit(overlapped, 9, [recorder, every_6_steps], model=Regression("SGD"))
        save(out_dir, name, *run, steps=recorder.steps)
    elif name == "killed":
        every_4_steps = ModelCheckpoint(out_dir / "checkpoints", save_top_k=-1, every_n_train_steps=4)
        try:
            fit(strategy(inner_steps=2, compressor=sign()), 7, [every_4_steps, DieAtStep(rank=1, step=6)])
        except AsyncDiLoCoError as error:
            (out_dir / f"killed_rank{rank}.err").write_text(str(error))
            raise
    elif name == "resumed":  # with a validation at step 6 (the model gains a validation set)
        seen = SeenInValidation(out_dir / "validation.ckpt")
        run = fit(
            strategy(inner_steps=2, compressor=sign()),
            8,
            [seen],
            ckpt_path=sys.argv[3],
            model=Validated("AdamW"),
            val_check_interval=6,
            check_val_every_n_epoch=None,
        )
        save(out_dir, f"{name}_{world_size}", *run, seen_in_validation=seen.seen)
        run[0].save_checkpoint(out_dir / "after_fit.ckpt")
        PSEUDO_GRADIENTS.clear()
        run = fit(strategy(inner_steps=2, compressor=sign()), 10, ckpt_path=out_dir / "after_fit.ckpt")
        save(out_dir, "after_fit", *run)
