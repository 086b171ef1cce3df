"""Task ``mixture``: a seeded Gaussian-mixture classification problem and a small MLP (no data to install).

Everything is deterministic from the seed: the data come from a private :class:`torch.Generator`, and
:func:`build_model` initialises the weights inside :func:`torch.random.fork_rng`. Seconds per run, so the
tests and the overhead benchmark use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from grace_lightning.bench.tasks.base import BenchTask, ClassifierModule, TaskData, TaskSize, seeded_init

__all__ = ["MixtureConfig", "MixtureTask", "MLPClassifier", "build_model", "make_mixture"]


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
    reference_examples: int = 256


def make_mixture(config: MixtureConfig, seed: int) -> TaskData:
    """Generate the train/validation split and the reference set of the problem for ``seed`` (same seed, same tensors)."""
    gen = torch.Generator().manual_seed(int(seed))
    n_comp = config.num_classes * config.components_per_class
    centers = torch.randn(n_comp, config.dim, generator=gen) * config.center_scale
    component = torch.randint(0, n_comp, (config.num_examples,), generator=gen)
    x = centers[component] + torch.randn(config.num_examples, config.dim, generator=gen)
    y = component % config.num_classes  # component c belongs to class c mod num_classes
    order = torch.randperm(config.num_examples, generator=gen)
    n_val = max(1, int(round(config.val_fraction * config.num_examples)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    # Drawn after everything else, so the pool and validation set do not depend on the reference size.
    ref_component = torch.randint(0, n_comp, (config.reference_examples,), generator=gen)
    ref_x = centers[ref_component] + torch.randn(config.reference_examples, config.dim, generator=gen)
    return TaskData(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        reference=TensorDataset(ref_x, ref_component % config.num_classes),
        info={"num_classes": config.num_classes, "dim": config.dim},
    )


class MLPClassifier(ClassifierModule):
    """Two hidden ReLU layers and a linear ``head``; metric: validation accuracy."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, lr: float = 2e-3) -> None:
        super().__init__(num_classes, lr=lr)
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def build_model(data: TaskData, seed: int, **kwargs) -> MLPClassifier:
    """A fresh model initialised from ``seed``; the global RNG state is restored afterwards."""
    return seeded_init(seed, lambda: MLPClassifier(data.info["dim"], data.info["num_classes"], **kwargs))


class MixtureTask(BenchTask):
    """Generated 10-class Gaussian mixture in 20 dimensions, 2-hidden-layer MLP, accuracy."""

    name = "mixture"
    description = "generated 10-class Gaussian mixture (20 dims), 2-layer MLP; accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.005
    batch_size = 128
    sizes = {
        "quick": TaskSize(train_examples=6_400, val_examples=1_600, epochs=5),
        "default": TaskSize(train_examples=16_000, val_examples=4_000, epochs=10),
    }

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        train, val = size.train_examples or 16_000, size.val_examples or 4_000
        return make_mixture(MixtureConfig(num_examples=train + val, val_fraction=val / (train + val)), seed)

    def build_model(self, data: TaskData, seed: int) -> MLPClassifier:
        return build_model(data, seed)
