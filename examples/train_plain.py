"""A small Lightning classifier on generated data, trained in a few seconds on a CPU.

train_plain.py and train_coreset.py are the same script but for three lines; see them with
`diff examples/train_plain.py examples/train_coreset.py`.
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(L.LightningModule):
    def __init__(self, in_features: int = 16, num_classes: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def make_data(n: int, seed: int) -> TensorDataset:
    """n points from 8 overlapping Gaussian blobs in 16 dimensions (the blob centres are fixed)."""
    centers = torch.randn(8, 16, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 8, (n,), generator=gen)
    return TensorDataset(centers[y] + 1.5 * torch.randn(n, 16, generator=gen), y)


if __name__ == "__main__":
    L.seed_everything(0)
    train_set, val_set = make_data(6000, seed=1), make_data(2000, seed=2)
    train_loader = DataLoader(train_set, batch_size=128, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=512)
    trainer = L.Trainer(
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), train_loader, val_loader)
    print(f"validation accuracy: {trainer.callback_metrics['val_acc']:.3f}")
