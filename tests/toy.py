"""Small models and data shared by the tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from grace_lightning import batch_weights


def quiet_trainer(**kwargs) -> L.Trainer:
    """A single-CPU Trainer with no logger, checkpoints, bars or sanity check; ``kwargs`` override any of it."""
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class IndexedBlobs(Dataset):
    """A seeded classification problem whose items are ``(x, y, index)``: the index lets tests see what was trained."""

    def __init__(self, n: int = 256, dim: int = 8, classes: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=g) * 2
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], torch.tensor(i, dtype=torch.int64)


class TinyClassifier(L.LightningModule):
    """An MLP with a linear head, trained with the coreset weights.

    ``dropout > 0`` adds an ``nn.Dropout`` to the body: training then draws from the global torch generator,
    which the resume tests need (a resumed run matches the uninterrupted one only if the RNG is restored).
    """

    def __init__(self, dim: int = 8, classes: int = 4, lr: float = 0.1, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            extra = [nn.Dropout(dropout)] if dropout > 0 else []
            self.body = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), *extra)
            self.head = nn.Linear(16, classes)
        self.lr = lr
        self.seen: list[list[int]] = []

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append(idx.tolist())
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (losses * batch_weights(self)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
