"""The one line a user adds to ``training_step`` to train with the strategy's per-example weights."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor


def batch_weights(module: LightningModule) -> Tensor:
    """Per-example weights of the batch being trained, on the module's device.

    Multiply the per-example loss by them and take the mean. Outside a coreset training batch (no
    :class:`~grace_lightning.CoresetCallback`, validation, a plain Trainer), and when the selection carries
    no weights, this returns a scalar ``1``, so the same ``training_step`` works everywhere. Ignoring the weights altogether is safe too: strategies
    that return none give all ones.

    Example::

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")
            return (losses * batch_weights(self)).mean()
    """
    from grace_lightning.callback import CoresetCallback

    trainer = module._trainer  # `module.trainer` raises when the module is used outside a Trainer
    if trainer is not None:
        for callback in trainer.callbacks:
            if isinstance(callback, CoresetCallback):
                weights = callback.batch_weights
                if weights is not None:
                    return weights
    return torch.ones((), device=module.device)
