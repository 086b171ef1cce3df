"""The benchmark's task: a seeded Gaussian-mixture classification problem and a small MLP classifier.

Everything is deterministic from the seed, and nothing here touches the global RNGs: the data come from
a private :class:`torch.Generator`, and :func:`build_model` initialises the weights inside
:func:`torch.random.fork_rng`, so the caller's random state is the same before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from grace_lightning.weights import batch_weights

__all__ = ["MixtureConfig", "MixtureData", "MLPClassifier", "build_model", "make_mixture"]


@dataclass(frozen=True)
class MixtureConfig:
    """Shape of the generated problem.

    Each class is a mixture of ``components_per_class`` isotropic Gaussians (unit variance) in ``dim``
    dimensions, whose centres are drawn from ``N(0, center_scale**2)``; the classes overlap, so accuracy
    stays well below 100% and a smaller training subset shows.
    """

    num_examples: int = 20_000
    num_classes: int = 10
    dim: int = 20
    components_per_class: int = 3
    center_scale: float = 0.8
    val_fraction: float = 0.2


@dataclass
class MixtureData:
    train: TensorDataset
    val: TensorDataset
    num_classes: int
    dim: int


def make_mixture(config: MixtureConfig, seed: int) -> MixtureData:
    """Generate the train/validation split of the problem for ``seed`` (same seed, same tensors)."""
    gen = torch.Generator().manual_seed(int(seed))
    n_comp = config.num_classes * config.components_per_class
    centers = torch.randn(n_comp, config.dim, generator=gen) * config.center_scale
    component = torch.randint(0, n_comp, (config.num_examples,), generator=gen)
    x = centers[component] + torch.randn(config.num_examples, config.dim, generator=gen)
    y = component % config.num_classes  # component c belongs to class c mod num_classes
    order = torch.randperm(config.num_examples, generator=gen)
    n_val = max(1, int(round(config.val_fraction * config.num_examples)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return MixtureData(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        num_classes=config.num_classes,
        dim=config.dim,
    )


class MLPClassifier(L.LightningModule):
    """Two hidden ReLU layers; the loss is weighted by :func:`~grace_lightning.batch_weights`.

    Records validation accuracy (``MulticlassAccuracy``, micro average = plain accuracy) after each
    validation epoch in :attr:`accuracy_history`, and counts the training examples it has seen.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.accuracy_history: list[float] = []
        self.examples_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.examples_seen += int(y.numel())
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (losses * batch_weights(self)).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_accuracy.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        accuracy = float(self.val_accuracy.compute())
        self.val_accuracy.reset()
        if not self.trainer.sanity_checking:
            self.accuracy_history.append(accuracy)
        self.log("val_acc", accuracy)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_model(data: MixtureData, seed: int, **kwargs) -> MLPClassifier:
    """A fresh model initialised from ``seed``; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return MLPClassifier(data.dim, data.num_classes, **kwargs)
