"""Per-example signals over the whole pool, with when each was last measured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from grace_lightning.signals.types import SIGNALS, ExampleSignals, SignalSpec

__all__ = ["SignalStore"]


class SignalStore:
    """Dense per-example arrays over the pool: loss, gradient norm, EL2N, class label, unit embedding (fp16), length,
    last step.

    Memory is about ``N * (2*d + 24)`` bytes (``d`` = stored embedding dimension; 4 bytes less per example for
    each of ``error_norm`` and ``label`` never measured, as the embedding, error-norm and label arrays are
    allocated on first use). Non-finite measurements (NaN/Inf loss, gradient norm, error norm or embedding) are never written:
    the example keeps its previous value and the rejection is counted in :attr:`invalid_count`, so
    strategies only ever see finite numbers.

    Embeddings wider than ``max_embedding_dim`` are projected by a fixed Gaussian random projection
    (Johnson-Lindenstrauss: cosines are preserved up to a small distortion), drawn once from ``seed``.
    A random projection rather than PCA because it needs no data: the first measurement can already be
    stored, and a resumed run rebuilds the identical matrix from the seed.

    With ``memmap_dir`` the arrays live in files there (``numpy.memmap``), for pools that do not fit in RAM;
    the operating system pages them in and out.

    Fixed embeddings: :meth:`fix_embedding` writes embeddings the user computed with an encoder of their own
    (``CoresetCallback(embeddings=...)``) for the whole pool at once, mapped into the store's space like measured
    ones; measurements never overwrite them, and :meth:`has` reports the signal present for every example. The
    other signals are still measured by the live model.

    Checkpoints: :meth:`state_dict` holds every array as a tensor, so a resumed run continues from exactly
    the signals the interrupted run had (not a re-measurement, which would see different weights).

    Args:
        pool_size: number of examples in the pool.
        max_embedding_dim: store embeddings with at most this many dimensions (``None``: as given).
        seed: seed of the projection matrix.
        memmap_dir: directory for memory-mapped arrays (created if missing); ``None`` keeps them in RAM.
        signals: the optional signals (``embedding``, ``error_norm``, ``label``) to keep, e.g. a strategy's
            ``needs``; the others are dropped on arrival (:meth:`keeping`), so a measurement that carries them costs
            no copy, check or write for them. ``None`` (the default) keeps every signal. ``loss``, ``grad_norm`` and
            ``length`` come with every measurement and are always kept.

    Example::

        store = SignalStore(len(train_set), max_embedding_dim=128)
        store.update(batch_indices, signals, step=trainer.global_step)
        fresh = store.measured  # bool mask of examples measured at least once
    """

    # One array per signal of ExampleSignals (the table in signals/types.py), plus when each was measured.
    loss: Tensor
    grad_norm: Tensor
    embedding: Optional[Tensor]
    length: Tensor
    error_norm: Optional[Tensor]
    label: Optional[Tensor]
    last_step: Tensor

    def __init__(
        self,
        pool_size: int,
        max_embedding_dim: Optional[int] = 256,
        seed: int = 0,
        memmap_dir: Optional[Union[str, os.PathLike]] = None,
        signals: Optional[Iterable[str]] = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"SignalStore: `pool_size` must be >= 1, got {pool_size}.")
        if max_embedding_dim is not None and max_embedding_dim < 1:
            raise ValueError(f"SignalStore: `max_embedding_dim` must be >= 1 or None, got {max_embedding_dim}.")
        self.pool_size = int(pool_size)
        self.signals: Optional[frozenset[str]] = None if signals is None else frozenset(signals)
        unknown = sorted((self.signals or frozenset()) - {spec.name for spec in SIGNALS})
        if unknown:
            raise ValueError(
                f"SignalStore: `signals` lists {unknown}, which are not signals; pick from "
                f"{sorted(spec.name for spec in SIGNALS)}, or pass None to keep every one."
            )
        self.max_embedding_dim = max_embedding_dim
        self.seed = int(seed)
        self.memmap_dir = None if memmap_dir is None else Path(memmap_dir)
        if self.memmap_dir is not None:
            self.memmap_dir.mkdir(parents=True, exist_ok=True)
        # One array per declared signal (signals/types.py): the ones every batch carries now, the others
        # (embedding: (N, d) float16 unit rows; error_norm; label) when the first measurement arrives.
        for spec in SIGNALS:
            eager = spec.always_present
            setattr(self, spec.name, self._array(spec.name, (pool_size,), spec.store_dtype, spec.fill) if eager else None)
        self.last_step = self._array("last_step", (pool_size,), np.int32, -1)
        self.projection: Optional[Tensor] = None  # (D, d) float32, when embeddings arrive wider than d
        self.invalid_count = 0
        self.offered_count = 0  # rows offered to `update`, valid or not
        self.fixed: frozenset[str] = frozenset()  # signals given for the whole pool up front, never re-measured

    def _array(self, name: str, shape: tuple, dtype, fill) -> Tensor:
        if self.memmap_dir is None:
            return torch.from_numpy(np.full(shape, fill, dtype=dtype))
        array = np.lib.format.open_memmap(self.memmap_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        array[...] = fill
        return torch.from_numpy(array)

    def project(self, embedding: Tensor) -> Tensor:
        """``(B, D)`` embeddings mapped into the store's space (the fixed projection when ``D`` exceeds the cap)."""
        width = embedding.shape[1]
        if self.max_embedding_dim is None or width <= self.max_embedding_dim:
            return embedding
        if self.projection is None or self.projection.shape[0] != width:
            generator = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(width, self.max_embedding_dim, generator=generator) / self.max_embedding_dim**0.5
        return embedding @ self.projection

    def keeping(self, signals: ExampleSignals) -> ExampleSignals:
        """``signals`` without the optional signals this store does not keep (all of them with ``signals=None``)."""
        return signals if self.signals is None else signals.keeping(self.signals)

    @property
    def measured(self) -> Tensor:
        """Bool mask of examples with at least one finite measurement."""
        return self.last_step >= 0

    def has(self, name: str) -> Tensor:
        """Bool mask of the examples whose ``name`` signal is known: all of them when it is fixed, else :attr:`measured`."""
        if name in self.fixed:
            return torch.ones(self.pool_size, dtype=torch.bool)
        return self.measured

    def fix_embedding(self, embedding: Tensor) -> None:
        """Store ``embedding`` (``(N, D)``, finite, no zero row) for the whole pool, in place of measured embeddings.

        Rows are projected (when ``D`` exceeds ``max_embedding_dim``) and normalised like measured ones.
        """
        if embedding.ndim != 2 or embedding.shape[0] != self.pool_size:
            raise ValueError(
                f"SignalStore.fix_embedding: expected ({self.pool_size}, D) embeddings, got {tuple(embedding.shape)}."
            )
        rows = self.to_store_space(embedding.float())
        if self.embedding is not None and tuple(self.embedding.shape[1:]) != tuple(rows.shape[1:]):
            self.embedding = None  # measured embeddings of another width give way to the fixed ones
        self._column(next(spec for spec in SIGNALS if spec.name == "embedding"), tuple(rows.shape[1:]))[:] = rows
        self.fixed = self.fixed | {"embedding"}

    def to_store_space(self, embedding: Tensor) -> Tensor:
        """``(B, D)`` embeddings as the store keeps them: projected (see :meth:`project`) unit rows."""
        return F.normalize(self.project(embedding), dim=1)

    def update(self, indices: Tensor, signals: ExampleSignals, step: Union[int, Tensor]) -> int:
        """Write ``signals`` for dataset ``indices`` measured at ``step``; return how many were rejected.

        ``step`` is one int or a per-row int tensor. When an index appears more than once, the last finite
        occurrence wins (indexed writes with duplicates would leave the winner unspecified).
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        if indices.numel() != len(signals):
            raise ValueError(f"SignalStore.update: {indices.numel()} indices for {len(signals)} signals.")
        steps = torch.as_tensor(step, dtype=torch.int32).reshape(-1).expand(indices.numel())
        s = self.keeping(signals).detach_cpu()  # a dropped signal's non-finite value rejects nothing
        finite = torch.ones(indices.numel(), dtype=torch.bool)
        for spec in SIGNALS:
            value = getattr(s, spec.name)
            if spec.checked and value is not None:
                finite &= torch.isfinite(value).reshape(indices.numel(), -1).all(dim=1)
        rejected = int((~finite).sum())
        self.invalid_count += rejected
        self.offered_count += int(indices.numel())
        keep = finite.nonzero().squeeze(1)
        if keep.numel() == 0:
            return rejected
        unique, inverse = torch.unique(indices[keep], return_inverse=True)
        last = torch.zeros(unique.numel(), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(keep.numel()), reduce="amax", include_self=False
        )
        keep, idx = keep[last], unique
        self.last_step[idx] = steps[keep]
        for spec in SIGNALS:
            value = getattr(s, spec.name)
            if value is None:
                continue
            if spec.name in self.fixed:
                continue
            value = value[keep]
            if spec.name == "embedding":  # stored as unit rows, projected to at most max_embedding_dim
                value = self.to_store_space(value)
            column = self._column(spec, tuple(value.shape[1:]))
            column[idx] = value.to(column.dtype)
        return rejected

    def _column(self, spec: SignalSpec, width: tuple) -> Tensor:
        """The store's array of ``spec``, allocated on first use; a row signal keeps its first width."""
        column = getattr(self, spec.name)
        if column is None:
            column = self._array(spec.name, (self.pool_size, *width), spec.store_dtype, spec.fill)
            setattr(self, spec.name, column)
        elif tuple(column.shape[1:]) != width:
            raise ValueError(
                f"SignalStore.update: {spec.name} dimension changed from {tuple(column.shape[1:])} to {width}."
            )
        return column

    def state_dict(self) -> dict:
        """Tensors and ints only, so the checkpoint loads under ``weights_only=True``."""
        return {
            **{spec.name: getattr(self, spec.name) for spec in SIGNALS},
            "last_step": self.last_step,
            "invalid_count": self.invalid_count,
            "offered_count": self.offered_count,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["loss"].shape[0] != self.pool_size:
            raise ValueError(
                f"SignalStore: the checkpoint covers {state['loss'].shape[0]} examples, the pool has {self.pool_size}."
            )
        self.last_step.copy_(state["last_step"])
        for spec in SIGNALS:
            saved = state.get(spec.name)  # a signal added after the checkpoint was written is absent
            if saved is None:
                if not spec.always_present:
                    setattr(self, spec.name, None)
                continue
            # Copy into the existing arrays: in memmap mode they are the files.
            current = getattr(self, spec.name)
            if current is None or current.shape != saved.shape:
                setattr(self, spec.name, self._array(spec.name, tuple(saved.shape), spec.store_dtype, spec.fill))
            getattr(self, spec.name).copy_(saved)
        self.invalid_count = int(state["invalid_count"])
        self.offered_count = int(state.get("offered_count", 0))
