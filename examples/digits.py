"""scikit-learn's 8x8 handwritten digits: a DataModule, a classifier and a class-conditional flow-matching model.

Data: the 1,797 images of ``sklearn.datasets.load_digits`` (shipped inside
scikit-learn, nothing is downloaded), 10 classes, pixels 0..16 scaled to
[-1, 1] and flattened to 64 values. One fixed random split (``seed``) gives
train / validation / test sets (70 / 15 / 15 % by default).

Models:

- :class:`DigitsClassifier`: an MLP classifier.
- :class:`DigitsFlowMatching`: class-conditional *flow matching* (rectified flow)
  on the 64 pixels, not a noise-prediction diffusion model. Training draws
  ``t ~ U(0, 1)`` and ``x_t = (1 - t) * x_0 + t * noise`` and regresses the
  velocity ``noise - x_0``. A fraction ``label_dropout`` of the labels is
  replaced by a null class (index 10), so the same network also predicts
  unconditionally, as classifier-free guidance needs. :meth:`DigitsFlowMatching.sample`
  integrates the flow from noise (``t = 1``) to data (``t = 0``) with Euler
  steps and guides each step with a :class:`~lightning_converge.guidance.Guidance`.

Both take ``optimizer``, any callable from parameters to an optimizer (in YAML a
``class_path`` such as ``torch.optim.AdamW`` with its ``init_args``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_converge.guidance import Guidance

NUM_CLASSES = 10
NUM_PIXELS = 64  # 8 x 8
NULL_CLASS = NUM_CLASSES  # the label that means "no class" (classifier-free guidance)

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


def load_digits_scaled() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (images of shape (N, 64) in [-1, 1], labels of shape (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0  # pixels are 0..16
    return images, torch.tensor(digits.target, dtype=torch.long)


class Digits(L.LightningDataModule):
    """The digits, split once with ``seed`` into train / validation / test ``TensorDataset``\\ s of (image, label)."""

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__()
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be > 0 with a sum < 1, got {val_fraction} and {test_fraction}"
            )
        self.save_hyperparameters()
        images, labels = load_digits_scaled()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val, n_test = round(val_fraction * len(labels)), round(test_fraction * len(labels))
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=len(self.test_set))


def default_classifier_optimizer(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class DigitsClassifier(L.LightningModule):
    """An MLP on the 64 pixels: ``depth`` hidden layers of ``width`` with ReLU.

    Logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc``.
    """

    def __init__(self, width: int = 128, depth: int = 2, optimizer: OptimizerFactory = default_classifier_optimizer):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(NUM_PIXELS if i == 0 else width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width if depth else NUM_PIXELS, NUM_CLASSES))
        # The fraction of correct answers ("micro"; torchmetrics' default "macro" averages per class).
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    @torch.no_grad()
    def predict_labels(self, images: Tensor) -> Tensor:
        """The predicted class of each image in ``images`` (shape (N, 64), in [-1, 1])."""
        return self(images).argmax(-1)

    def _logits_and_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self(images)
        return logits, F.cross_entropy(logits, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        _, loss = self._logits_and_loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.val_acc.update(logits, batch[1])
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.test_acc.update(logits, batch[1])
        self.log("test_loss", loss)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class TimeEmbedding(nn.Module):
    """``t`` in [0, 1] -> a ``dim`` vector: sines and cosines of geometric frequencies, then an MLP."""

    def __init__(self, dim: int, num_frequencies: int = 32) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(0, 3, num_frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.frequencies
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class ConditionedBlock(nn.Module):
    """A residual MLP block whose LayerNorm is scaled and shifted by the conditioning vector (adaLN)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, h: Tensor, condition: Tensor) -> Tensor:
        scale, shift = self.modulation(condition).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class VelocityNet(nn.Module):
    """Predicts the flow's velocity from ``x_t`` (N, 64), ``t`` (N,) and a label (N,) in 0..10 (10: none)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.input = nn.Linear(NUM_PIXELS, width)
        self.time = TimeEmbedding(width)
        self.label = nn.Embedding(NUM_CLASSES + 1, width)
        self.blocks = nn.ModuleList(ConditionedBlock(width) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, NUM_PIXELS))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        condition = F.silu(self.time(t) + self.label(labels))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, condition)
        return self.output(h)


def default_flow_optimizer(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class DigitsFlowMatching(L.LightningModule):
    """Class-conditional rectified flow on the 8x8 digits, with label dropout for classifier-free guidance.

    Args:
        width, depth: the velocity network's MLP width and number of conditioned residual blocks.
        label_dropout: fraction of training labels replaced by the null class.
        sample_steps: Euler steps :meth:`sample` takes by default.
        optimizer: a callable from parameters to an optimizer.

    Logs ``train_loss`` and ``val_loss``, the conditional velocity MSE. Validation
    draws its noise and times from a generator seeded by the batch index, so
    ``val_loss`` of different epochs (and of the live and averaged weights) is
    measured on the same noisy inputs.
    """

    def __init__(
        self,
        width: int = 128,
        depth: int = 3,
        label_dropout: float = 0.1,
        sample_steps: int = 32,
        optimizer: OptimizerFactory = default_flow_optimizer,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.net = VelocityNet(width, depth)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return self.net(x, t, labels)

    def _flow_loss(self, images: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        t = torch.rand(images.shape[0], generator=generator, device=images.device)
        x_t = (1 - t[:, None]) * images + t[:, None] * noise
        return F.mse_loss(self(x_t, t, labels), noise - images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        dropped = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
        loss = self._flow_loss(images, labels.masked_fill(dropped, NULL_CLASS))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        generator = torch.Generator(images.device).manual_seed(batch_idx)
        self.log("val_loss", self._flow_loss(images, labels, generator), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        guidance: Optional[Guidance] = None,
        guide_by: Literal["step", "sigma"] = "step",
        num_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Images of shape (N, 64) for the classes ``labels`` (N,), integrated from Gaussian noise.

        Each of the ``num_steps`` Euler steps (default ``sample_steps``) goes from
        ``t`` to ``t - 1/num_steps``. The network's velocity ``v`` is turned into
        the denoised prediction ``x_0 = x_t - t * v``; with ``guidance``, the
        conditional and unconditional ``x_0`` predictions are combined by
        ``guidance(cond, uncond, key)`` (APG is defined on ``x_0``, where plain
        CFG gives the same result as on ``v``), and the step follows the guided
        prediction. The unconditional pass runs only where ``guidance.needs_uncond(key)``.

        ``key`` is what the guidance's scale schedule reads: with ``guide_by="step"``
        the step index 0..num_steps-1; with ``"sigma"`` the noise level
        ``sigma = t / (1 - t)`` (infinite at ``t = 1``): the flow's ``x_t / (1 - t)``
        is ``x_0 + sigma * noise``, so this is the sigma of
        :func:`~lightning_converge.guidance.guidance_interval`.
        """
        if guide_by not in ("step", "sigma"):
            raise ValueError(f"guide_by must be 'step' or 'sigma', got {guide_by!r}")
        num_steps = num_steps or self.hparams.sample_steps
        labels = labels.to(self.device)
        x = torch.randn((labels.shape[0], NUM_PIXELS), generator=generator, device=self.device)
        null_labels = torch.full_like(labels, NULL_CLASS)
        times = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
        if guidance is not None:
            guidance.reset()
        for step, (t, t_next) in enumerate(zip(times, times[1:])):
            key = step if guide_by == "step" else (t / (1.0 - t) if t < 1.0 else math.inf)
            t_batch = torch.full((labels.shape[0],), t, device=self.device)
            if guidance is not None and guidance.needs_uncond(key):
                x_twice = torch.cat([x, x])
                velocities = self(x_twice, torch.cat([t_batch, t_batch]), torch.cat([labels, null_labels]))
                cond, uncond = (x_twice - t * velocities).chunk(2)
                denoised = guidance(cond, uncond, key)
            else:
                denoised = x - t * self(x, t_batch, labels)
            # Euler step along the velocity implied by the (guided) prediction: v = (x_t - x_0) / t.
            x = x + (t_next - t) * (x - denoised) / t
        return x
