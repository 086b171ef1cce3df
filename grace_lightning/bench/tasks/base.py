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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from grace_lightning.weights import batch_weights

__all__ = [
    "REFERENCE_EXAMPLES", "BenchModule", "BenchTask", "ClassifierModule", "TaskData", "TaskOption", "TaskSize",
    "flip_labels", "fraction_option", "held_out_split", "with_flipped_labels",
    "TaskUnavailable", "seeded_init",
]

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
    # Pool examples a good selection should avoid (flipped labels, off-target text): a bool (N,) mask, and what
    # it marks, e.g. "noisy" or "off-target". The bench reports the share of trained examples that were marked.
    marked: Optional[Tensor] = None
    marked_name: str = ""
    # Embeddings from an encoder other than the model (``CoresetCallback(embeddings=...)``): (N, D) for the pool and
    # (m, D) for the reference set, or None for the live model's own.
    embeddings: Optional[Tensor] = None
    reference_embeddings: Optional[Tensor] = None


@dataclass(frozen=True)
class TaskOption:
    """One option of a task (``--task-option name=value``): its default, a line of help, and its check.

    ``check(value)`` returns the converted value or raises ``ValueError`` saying what is allowed; the bench
    turns that into exit code 2 naming the option before any training.
    """

    default: Any
    help: str
    check: Callable[[Any], Any]


def embedding_option(own: str, other: str = "minilm", other_help: str = "a pretrained encoder's") -> TaskOption:
    """The option ``embedding`` of a task: which embeddings the strategies read, the trained model's own
    (``model``, described by ``own``) or fixed ones computed before training (``other``, described by
    ``other_help``; the text tasks' ``minilm`` is all-MiniLM-L6-v2's sentence embeddings), handed over as
    ``TaskData.embeddings``, i.e. ``CoresetCallback(embeddings=...)``."""
    sources = ("model", other)

    def check(value: Any) -> str:
        if value not in sources:
            raise ValueError(f"embedding must be one of {', '.join(sources)}, got {value!r}")
        return str(value)

    return TaskOption("model", f"embeddings the strategies read: model ({own}) or {other} ({other_help})", check)


def fraction_option(name: str, *, low_open: bool = False) -> Callable[[Any], float]:
    """A check for an option that is a share in ``[0, 1)`` (``(0, 1)`` with ``low_open``)."""

    def check(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number in {'(' if low_open else '['}0, 1), got {value!r}") from None
        if not (0.0 < number < 1.0 if low_open else 0.0 <= number < 1.0):
            raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1), got {value!r}")
        return number

    return check


class BenchModule(L.LightningModule):
    """Base of the tasks' models: weighted training loss, metric history, examples seen, AdamW (cosine optional).

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
        #: "constant" or "cosine" (decay to zero over the fit's steps); the bench sets it from ``--lr-schedule``.
        self.lr_schedule = "constant"

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

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The task's optimizer (AdamW); override this, not ``configure_optimizers``, so the schedule applies."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        if self.lr_schedule == "constant":
            return optimizer
        # Cosine decay to zero over the fit's own optimizer steps, stepped per step. A coreset fit has a constant
        # number of batches per epoch, so `estimated_stepping_batches` is exact and every strategy gets the same
        # schedule shape over its own budget.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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


def flip_labels(labels: Tensor, share: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(noisy_labels, flipped)``: exactly ``round(share * N)`` labels, chosen by ``seed``, each moved to one of the
    other ``num_classes - 1`` classes uniformly; ``flipped`` is the bool mask of the changed examples."""
    gen = torch.Generator().manual_seed(int(seed))
    n = labels.shape[0]
    chosen = torch.randperm(n, generator=gen)[: int(round(share * n))]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=gen)  # never 0: always another class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def with_flipped_labels(data: TaskData, share: float, num_classes: int, seed: int) -> TaskData:
    """``data`` whose pool (a ``TensorDataset`` of inputs and labels) has ``share`` of its labels flipped
    (:func:`flip_labels`); the flipped examples become ``marked`` ("noisy"), the clean labels stay in
    ``info["clean_labels"]``. Validation and reference sets are left clean."""
    from torch.utils.data import TensorDataset

    x, y = data.train.tensors
    noisy, flipped = flip_labels(y, share, num_classes, seed)
    data.train = TensorDataset(x, noisy)
    data.marked, data.marked_name = flipped, "noisy"
    data.info["clean_labels"] = y
    return data


def held_out_split(
    train_order: Tensor, val_order: Tensor, reference_examples: int, size: TaskSize
) -> tuple[Tensor, Tensor, Tensor]:
    """``(reference, pool, validation)`` indices from fixed orders of a training and a validation split: the
    first ``reference_examples`` of the training order are the reference set, held out of every pool; the pool
    and the validation set are prefixes of the rest (so a smaller size's are inside a larger one's), each sorted."""
    reference = train_order[:reference_examples].sort().values
    pool = train_order[reference_examples:][: size.train_examples].sort().values  # [:None] = all
    return reference, pool, val_order[: size.val_examples].sort().values


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
        options: ``{name: TaskOption}``, set with ``--task-option name=value``; read them from ``self.settings``.

    A size named ``"long"`` in ``sizes`` is the task's long-training preset (``--preset long``).
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
    options: ClassVar[dict[str, TaskOption]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"task {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")
        #: the task's options, defaults filled in and every value checked.
        self.settings: dict[str, Any] = {
            key: option.check(options[key]) if key in options else option.default for key, option in self.options.items()
        }

    def check_available(self) -> None:
        """Raise :class:`TaskUnavailable` (saying how to install the data) if the task cannot run here."""

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The train/validation data for ``seed`` (same seed, same data)."""
        raise NotImplementedError

    def build_model(self, data: TaskData, seed: int) -> BenchModule:
        """A fresh model whose weights depend only on ``seed`` (use :func:`seeded_init`)."""
        raise NotImplementedError
