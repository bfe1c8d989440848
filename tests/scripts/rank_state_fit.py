"""Per-rank checkpoint files on two gloo processes: 1-bit Adam with Grokfast, where each rank's
error-feedback state and Grokfast filter are its own (after ``freeze_step`` each rank filters its own
gradients).

Run by tests/test_rank_state.py as ``python rank_state_fit.py OUT_DIR`` (Lightning's launcher starts
rank 1). Runs, each rank saving ``OUT_DIR/rank{r}.pt``:

* ``straight``: four epochs, with a ``ModelCheckpoint`` keeping the two latest epochs' checkpoints
  (``save_top_k=2``: the first two are rotated out) in ``OUT_DIR/rotation``;
* ``first``: two epochs, then ``trainer.save_checkpoint(OUT_DIR/after_fit.ckpt)``; it records the
  rank's strategy and Grokfast states that checkpoint saves;
* ``after_fit``: four epochs resumed from ``after_fit.ckpt`` (with ``weights_only=True``);
* ``during_fit``: four epochs resumed from the straight run's checkpoint after its third epoch.

Every ``strategy.save_checkpoint`` runs with the collectives that carry data replaced by ones that raise.
The data give each rank 4 batches an epoch, always the same, so resumes land at epoch boundaries.
"""

import contextlib
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_converge.callbacks import Grokfast
from lightning_converge.strategies import OneBitAdamStrategy

sys.path.insert(0, str(Path(__file__).parent))
from ddp_fit import Regression  # noqa: E402

#: The torch.distributed collectives that move data between ranks (a barrier moves none).
DATA_COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "recv", "reduce", "reduce_scatter", "scatter",
    "scatter_object_list", "send",
)  # fmt: skip


@contextlib.contextmanager
def no_data_collectives():
    def forbidden(name):
        def collective(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} while saving a checkpoint")

        return collective

    with contextlib.ExitStack() as stack:
        for name in DATA_COLLECTIVES:
            stack.enter_context(mock.patch.object(dist, name, forbidden(name)))
        yield


class SavesWithoutCollectives(OneBitAdamStrategy):
    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        with no_data_collectives():
            super().save_checkpoint(checkpoint, filepath, storage_options)


def fit(out_dir: Path, max_epochs: int, ckpt_path=None, weights_only=None, rotate=False):
    model = Regression("AdamW")
    grokfast = Grokfast(backend="reference")
    callbacks = [grokfast]
    if rotate:
        callbacks.append(ModelCheckpoint(out_dir / "rotation", monitor="step", mode="max", save_top_k=2))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=SavesWithoutCollectives(freeze_step=1, block_size=8),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=rotate,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=weights_only)
    return trainer, grokfast, {"params": [p.detach().clone() for p in model.parameters()]}


def main(out_dir: Path) -> None:
    runs = {}
    trainer, _, runs["straight"] = fit(out_dir, 4, rotate=True)
    trainer, grokfast, runs["first"] = fit(out_dir, 2)
    trainer.save_checkpoint(out_dir / "after_fit.ckpt")
    runs["first"]["saved"] = {"grokfast": grokfast.state_dict(), "strategy": trainer.strategy.comm_state_dict()}
    _, _, runs["after_fit"] = fit(out_dir, 4, ckpt_path=out_dir / "after_fit.ckpt", weights_only=True)
    _, _, runs["during_fit"] = fit(out_dir, 4, ckpt_path=out_dir / "rotation" / "epoch=2-step=12.ckpt")
    torch.save(runs, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
