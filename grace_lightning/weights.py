"""The one line a user adds to ``training_step`` to train with the strategy's per-example weights."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
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


class TrainingBatchView:
    """The dataset indices and weights of the batch being trained, looked up lazily from the sampler.

    Most steps of an unweighted strategy need neither, so nothing is computed until asked. It also notes
    whether the training step read the weights, to warn once when non-uniform weights went unused.
    """

    def __init__(self, sampler: Any, strategy_name: str) -> None:
        self.sampler, self.strategy_name = sampler, strategy_name
        self.position: Any = None  # the LoaderPosition of the batch being trained, or None outside one
        self._batch: Optional[tuple[Tensor, Optional[Tensor]]] = None
        self._device: Any = None
        self._weights_read = self._warned = False

    def enter(self, position: Any, device: torch.device) -> None:
        self.position, self._batch, self._device = position, None, device

    def leave(self) -> None:
        self.position = self._batch = None

    @property
    def indices(self) -> Optional[Tensor]:
        return None if self.position is None else self._lookup()[0]

    @property
    def weights(self) -> Optional[Tensor]:
        """Weights on the module's device, or None when outside a batch or no selection in force carries any."""
        self._weights_read = True
        if self.position is None or not self.sampler.batch_is_weighted(*self.position):
            return None
        return self._lookup()[1]

    def _lookup(self) -> tuple[Tensor, Optional[Tensor]]:
        if self._batch is None:
            indices, weights = self.sampler.batch_indices(*self.position)
            weighted = self.sampler.batch_is_weighted(*self.position)
            self._batch = (indices, weights.to(self._device, non_blocking=True) if weighted else None)
        return self._batch

    def warn_if_weights_unread(self) -> None:
        """At the batch's end: warn once when it carried non-uniform weights the training step never asked for."""
        read, self._weights_read = self._weights_read, False
        if read or self._warned or self.position is None or not self.sampler.batch_is_weighted(*self.position):
            return
        weights = self._lookup()[1]
        if weights is None or bool((weights == weights[0]).all()):
            return  # uniform weights change nothing when the loss is a mean
        self._warned = True
        rank_zero_warn(
            f"CoresetCallback: strategy {self.strategy_name!r} gives per-example weights (this batch: "
            f"{float(weights.min()):.3g} to {float(weights.max()):.3g}), but training_step never read them, so the "
            "strategy is not trained as designed (InfoBatch without its rescaling is not InfoBatch). Weight the "
            "per-example loss: `(losses * grace_lightning.batch_weights(self)).mean()`."
        )
