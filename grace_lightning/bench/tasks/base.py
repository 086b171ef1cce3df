"""What a benchmark task is: its data, its model, its metric, and its sizes.

A task is a :class:`BenchTask` subclass registered with :func:`register_task`. The harness
(:mod:`grace_lightning.bench.cli`) only talks to this interface, so every task runs under the same loop,
the same timing and the same reporting.

Contract of a task's model (a :class:`BenchModule`):

- its ``training_step`` weights the per-example loss with :func:`grace_lightning.batch_weights`;
- after every validation epoch outside the sanity check it appends the task's metric to
  ``metric_history`` (one float per epoch) and logs it as ``val_metric``;
- it counts the training examples it has stepped on in ``examples_seen``.

Nothing here touches the global RNGs: data come from private generators, and model weights are drawn inside
:func:`torch.random.fork_rng`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from grace_lightning.weights import batch_weights

__all__ = ["REFERENCE_EXAMPLES", "BenchModule", "BenchTask", "ClassifierModule", "TaskData", "TaskSize", "TaskUnavailable", "seeded_init"]

# The reference set of group_mates / gip: this many examples of the training split, held out of every pool and
# disjoint from the validation set (influence measured on validation data would leak into the metric).
REFERENCE_EXAMPLES = 256


class TaskUnavailable(RuntimeError):
    """The task's data are not installed here; the message says how to install them."""


@dataclass(frozen=True)
class TaskSize:
    """How big one run of a task is.

    Attributes:
        train_examples: training pool size (a seeded subset of the task's training data), ``None`` = all.
        val_examples: validation set size, ``None`` = all.
        epochs: epochs per run.
    """

    train_examples: Optional[int]
    val_examples: Optional[int]
    epochs: int


@dataclass
class TaskData:
    """A task's datasets for one seed, as its model's ``training_step`` / ``validation_step`` expect them."""

    train: Dataset
    val: Dataset
    reference: Optional[Dataset] = None  # held-out training-split examples for reference-set strategies
    collate_fn: Optional[Callable[[list], Any]] = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. vocabulary size, number of classes


class BenchModule(L.LightningModule):
    """Base of the tasks' models: weighted training loss, metric history, examples seen, AdamW.

    Subclasses implement :meth:`per_example_loss` (``(B,)`` float losses of a training batch),
    :meth:`update_metric` (accumulate one validation batch) and :meth:`compute_metric` (the epoch's value,
    then reset the accumulator).
    """

    def __init__(self, lr: float = 2e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.metric_history: list[float] = []
        self.examples_seen = 0

    def per_example_loss(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def update_metric(self, batch: Any) -> None:
        raise NotImplementedError

    def compute_metric(self) -> float:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self.per_example_loss(batch)
        self.examples_seen += int(losses.shape[0])
        return (losses * batch_weights(self)).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.update_metric(batch)

    def on_validation_epoch_end(self) -> None:
        value = float(self.compute_metric())
        if not self.trainer.sanity_checking:
            self.metric_history.append(value)
        self.log("val_metric", value)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class ClassifierModule(BenchModule):
    """A :class:`BenchModule` for ``(inputs, labels)`` batches: cross-entropy of ``self(inputs)``, micro accuracy.

    Subclasses build their layers (the output layer named ``head``) and ``forward``; call
    ``super().__init__(num_classes, lr=..., weight_decay=...)`` first.
    """

    def __init__(self, num_classes: int, lr: float = 2e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def per_example_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def update_metric(self, batch: Any) -> None:
        self.val_accuracy.update(self(batch[0]), batch[1])

    def compute_metric(self) -> float:
        value = float(self.val_accuracy.compute())
        self.val_accuracy.reset()
        return value


def seeded_init(seed: int, make: Callable[[], L.LightningModule]) -> L.LightningModule:
    """``make()`` with weights drawn from ``seed``; the caller's global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return make()


class BenchTask:
    """One benchmark task. Subclass, set the class attributes, implement the three methods, register.

    Class attributes:
        name: the ``--task`` value.
        description: one line for ``--help`` and the run's JSON.
        metric: the metric's name as printed (e.g. ``"accuracy"``, ``"perplexity"``).
        higher_is_better: direction of the metric.
        tolerance: "reached the full-data metric" means within this many metric units of it (time-to-target).
        batch_size: training batch size.
        sizes: ``{"quick": TaskSize, "default": TaskSize}``; ``--quick`` picks the first.
        reference_examples: size of the reference set held out of the training split.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    tolerance: ClassVar[float] = 0.005
    batch_size: ClassVar[int] = 128
    val_batch_size: ClassVar[int] = 512
    sizes: ClassVar[dict[str, TaskSize]] = {}
    reference_examples: ClassVar[int] = REFERENCE_EXAMPLES

    def check_available(self) -> None:
        """Raise :class:`TaskUnavailable` (saying how to install the data) if the task cannot run here."""

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The train/validation data for ``seed`` (same seed, same data)."""
        raise NotImplementedError

    def build_model(self, data: TaskData, seed: int) -> BenchModule:
        """A fresh model whose weights depend only on ``seed`` (use :func:`seeded_init`)."""
        raise NotImplementedError
