"""Per-example signals over the whole pool, with when each was last measured."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from grace_lightning.signals.types import ExampleSignals

__all__ = ["SignalStore"]


class SignalStore:
    """Dense per-example arrays over the pool: loss, gradient norm, unit embedding (fp16), length, last step.

    Memory is about ``N * (2*d + 16)`` bytes. Non-finite measurements (NaN/Inf loss, gradient norm or
    embedding) are never written: the example keeps its previous value and the rejection is counted in
    :attr:`invalid_count`, so strategies only ever see finite numbers.

    Args:
        pool_size: number of examples in the pool.

    Example::

        store = SignalStore(len(train_set))
        store.update(batch_indices, signals, step=trainer.global_step)
        fresh = store.measured  # bool mask of examples measured at least once
    """

    def __init__(self, pool_size: int) -> None:
        if pool_size < 1:
            raise ValueError(f"SignalStore: `pool_size` must be >= 1, got {pool_size}.")
        self.pool_size = int(pool_size)
        self.loss = torch.zeros(pool_size, dtype=torch.float32)
        self.grad_norm = torch.zeros(pool_size, dtype=torch.float32)
        self.length = torch.ones(pool_size, dtype=torch.int32)
        self.last_step = torch.full((pool_size,), -1, dtype=torch.int32)
        self.embedding: Optional[Tensor] = None  # (N, d) float16, unit rows; allocated on first use
        self.invalid_count = 0

    @property
    def measured(self) -> Tensor:
        """Bool mask of examples with at least one finite measurement."""
        return self.last_step >= 0

    def update(self, indices: Tensor, signals: ExampleSignals, step: Union[int, Tensor]) -> int:
        """Write ``signals`` for dataset ``indices`` measured at ``step``; return how many were rejected.

        ``step`` is one int or a per-row int tensor. When an index appears more than once, the last finite
        occurrence wins (indexed writes with duplicates would leave the winner unspecified).
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        if indices.numel() != len(signals):
            raise ValueError(f"SignalStore.update: {indices.numel()} indices for {len(signals)} signals.")
        steps = torch.as_tensor(step, dtype=torch.int32).reshape(-1).expand(indices.numel())
        s = signals.detach_cpu()
        finite = torch.isfinite(s.loss) & torch.isfinite(s.grad_norm)
        if s.embedding is not None:
            finite &= torch.isfinite(s.embedding).all(dim=1)
        rejected = int((~finite).sum())
        self.invalid_count += rejected
        keep = finite.nonzero().squeeze(1)
        if keep.numel() == 0:
            return rejected
        unique, inverse = torch.unique(indices[keep], return_inverse=True)
        last = torch.zeros(unique.numel(), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(keep.numel()), reduce="amax", include_self=False
        )
        keep, idx = keep[last], unique
        self.loss[idx] = s.loss[keep]
        self.grad_norm[idx] = s.grad_norm[keep]
        self.length[idx] = s.length[keep].to(torch.int32)
        self.last_step[idx] = steps[keep]
        if s.embedding is not None:
            emb = F.normalize(s.embedding[keep], dim=1).to(torch.float16)
            if self.embedding is None:
                self.embedding = torch.zeros(self.pool_size, emb.shape[1], dtype=torch.float16)
            elif self.embedding.shape[1] != emb.shape[1]:
                raise ValueError(
                    f"SignalStore.update: embedding dimension changed from {self.embedding.shape[1]} to {emb.shape[1]}."
                )
            self.embedding[idx] = emb
        return rejected

    def state_dict(self) -> dict:
        """Tensors and ints only, so the checkpoint loads under ``weights_only=True``."""
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "length": self.length,
            "last_step": self.last_step,
            "embedding": self.embedding,
            "invalid_count": self.invalid_count,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["loss"].shape[0] != self.pool_size:
            raise ValueError(
                f"SignalStore: the checkpoint covers {state['loss'].shape[0]} examples, the pool has {self.pool_size}."
            )
        self.loss, self.grad_norm = state["loss"].clone(), state["grad_norm"].clone()
        self.length, self.last_step = state["length"].clone(), state["last_step"].clone()
        self.embedding = None if state["embedding"] is None else state["embedding"].clone()
        self.invalid_count = int(state["invalid_count"])
