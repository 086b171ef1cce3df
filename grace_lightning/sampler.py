"""The sampler that holds the current coreset and turns it into a rank-sharded, resumable index stream."""

from __future__ import annotations

import math
import bisect
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sized

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, IterableDataset

from grace_lightning.seeding import seeded_generator
from grace_lightning.validation import integer, is_real

__all__ = ["CoresetSampler", "LoaderPosition"]


class LoaderPosition(NamedTuple):
    """Where the training loop stands, as the sampler needs it to resume.

    ``batches_done`` counts training batches whose step has run (over all epochs); ``batch_size`` and
    ``drop_last`` are the training DataLoader's.
    """

    batches_done: int
    batch_size: int
    drop_last: bool


_SERIALS = itertools.count()


@dataclass
class _Version:
    """One selection, in force from global batch position ``start`` on. ``start`` is also its id."""

    start: int
    indices: Optional[Tensor]  # int64; None means the whole pool
    weights: Optional[Tensor]  # float32 aligned with ``indices``; None means all ones
    # Identity for the permutation cache only: a replaced version may reuse `start`.
    serial: int = field(default_factory=lambda: next(_SERIALS))


def resolve_budget(
    fraction: Optional[float], size: Optional[int], pool_size: Optional[int], owner: str = "CoresetSampler"
) -> int:
    """The examples per epoch that ``fraction`` or ``size`` gives on a pool of ``pool_size``; ValueError naming the fix.

    With ``pool_size=None`` (the pool is not known yet) only the checks that need no pool run, and 0 is returned.
    """
    if (fraction is None) == (size is None):
        raise ValueError(
            f"{owner}: give exactly one of `fraction` (share of the pool per epoch, e.g. 0.3) "
            f"or `size` (examples per epoch); got fraction={fraction!r}, size={size!r}."
        )
    if fraction is not None:
        if not is_real(fraction):
            raise ValueError(f"{owner}: `fraction` must be a number in (0, 1], got {fraction!r}.")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{owner}: `fraction` must be in (0, 1], got {fraction}. Use fraction=1.0 for full data.")
        return 0 if pool_size is None else max(1, int(math.floor(fraction * pool_size + 0.5)))
    integer(owner, "size", size)
    if size < 1 or (pool_size is not None and size > pool_size):
        raise ValueError(
            f"{owner}: `size` must be in [1, len(data_source)={pool_size}], got {size}. "
            "Lower `size`, or use fraction=1.0 for the whole pool."
        )
    return int(size)


class CoresetSampler(DistributedSampler):
    r"""Yields the current coreset, sharded over ranks, with a constant number of batches per epoch.

    The sampler owns the subset (int64 dataset indices) and per-example weights, and nothing else:
    which examples form the subset is decided by :class:`~grace_lightning.CoresetCallback`.

    * **Constant epoch length.** Every epoch yields ``len(sampler)`` = ``ceil(budget / world_size)``
      indices per rank, whatever the subset's size, so Lightning's progress bar,
      ``trainer.estimated_stepping_batches`` and step-based LR schedulers see the true number of batches.
      A subset smaller than the budget wraps around (the padding is reported); a larger one, such as the
      whole pool during warm-up, is streamed: each epoch takes the next ``budget`` examples of a shuffled
      pass over it, so every example is visited once per pass.
    * **Rank shards.** Stream position ``s`` goes to rank ``s % world_size``: shards are disjoint, equal in
      length, and their union is the subset.
    * **Order** is a pure function of ``(seed, selection version, pass)``, drawn from a private generator.
      The global torch/numpy/python RNGs are never touched.
    * **Resume.** Once bound by the callback, the sampler reads how many batches Lightning has trained
      when an iterator is created and starts right after them, so a run resumed mid-epoch yields exactly
      the batches not yet trained. It does not rely on ``set_epoch`` (Lightning calls it too late when
      ``num_workers > 0``, Lightning issue #21938).

    It subclasses :class:`torch.utils.data.DistributedSampler` so that Lightning leaves it alone under DDP
    with the default ``Trainer(use_distributed_sampler=True)``: no Trainer flag is needed.

    Args:
        data_source: the training dataset (map-style, sized). The pool is ``range(len(data_source))``.
        fraction: share of the pool trained per epoch, in ``(0, 1]``. Exactly one of ``fraction`` and
            ``size`` must be given.
        size: number of examples trained per epoch, in ``[1, len(data_source)]``.
        seed: seed of the sampler's private generator (order only; selection has its own seed).

    Raises:
        ValueError: if the budget is missing, given twice or out of range, or ``seed`` is not an int.
        TypeError: if ``data_source`` is an ``IterableDataset`` or has no length.

    Example::

        from torch.utils.data import DataLoader
        from grace_lightning import CoresetCallback, CoresetSampler

        sampler = CoresetSampler(train_set, fraction=0.3, seed=0)
        loader = DataLoader(train_set, batch_size=128, sampler=sampler)
        trainer = L.Trainer(max_epochs=10, callbacks=[CoresetCallback(sampler, strategy="random")])
        trainer.fit(model, loader)
    """

    def __init__(
        self,
        data_source: Sized,
        fraction: Optional[float] = None,
        size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if isinstance(data_source, IterableDataset):
            raise TypeError(
                "CoresetSampler: `data_source` is an IterableDataset; a coreset needs a map-style dataset with "
                "`__len__` and `__getitem__`. Wrap the data in a map-style `torch.utils.data.Dataset`."
            )
        if not hasattr(data_source, "__len__"):
            raise TypeError(
                f"CoresetSampler: `data_source` ({type(data_source).__name__}) has no `__len__`; "
                "pass a map-style dataset."
            )
        pool_size = len(data_source)
        if pool_size < 1:
            raise ValueError("CoresetSampler: `data_source` is empty; the pool needs at least one example.")
        budget = resolve_budget(fraction, size, pool_size)
        integer("CoresetSampler", "seed", seed)

        # A single-replica DistributedSampler: the callback re-binds rank and world size in `setup`.
        super().__init__(data_source, num_replicas=1, rank=0, shuffle=False, seed=int(seed), drop_last=False)
        self.pool_size = pool_size
        self.budget = budget
        self.fraction = fraction
        self._versions: list[_Version] = [_Version(0, None, None)]
        self._position_fn: Optional[Callable[[], LoaderPosition]] = None
        self._perm_cache: dict[tuple[int, int], Tensor] = {}
        self._stream_cache: Optional[tuple[tuple, Tensor, Tensor, int, bool]] = None
        self._generation = 0  # bumped whenever the selections change; invalidates the stream cache
        self._resize()

    # ------------------------------------------------------------------ binding
    def bind(self, rank: int, world_size: int, position_fn: Optional[Callable[[], LoaderPosition]] = None) -> None:
        """Set this process's rank and the world size, and how to read the training loop's position.

        Called by :class:`~grace_lightning.CoresetCallback` in ``setup``; call it yourself only when using
        the sampler without the callback.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"CoresetSampler.bind: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        self.rank, self.num_replicas = int(rank), int(world_size)
        self._position_fn = position_fn
        self._resize()

    def _resize(self) -> None:
        self.num_samples = math.ceil(self.budget / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __getstate__(self) -> dict:
        # The position function closes over the trainer; it is re-bound in each process's `setup`.
        state = self.__dict__.copy()
        state["_position_fn"] = None
        state["_perm_cache"] = {}
        state["_stream_cache"] = None
        return state

    # ------------------------------------------------------------------ the subset
    def __len__(self) -> int:
        return self.num_samples

    @property
    def padding(self) -> int:
        """Indices per epoch (all ranks) beyond the budget, repeated so that every rank has equal length."""
        return self.total_size - self.budget

    @property
    def selection(self) -> Tensor:
        """The newest selection's dataset indices (int64)."""
        indices = self._versions[-1].indices
        return torch.arange(self.pool_size) if indices is None else indices

    @property
    def weights(self) -> Tensor:
        """Per-example weights aligned with :attr:`selection` (all ones when the strategy gave none)."""
        version = self._versions[-1]
        if version.weights is None:
            return torch.ones(len(self.selection), dtype=torch.float32)
        return version.weights

    @property
    def version_starts(self) -> list[int]:
        """Global batch positions from which each retained selection is in force."""
        return [v.start for v in self._versions]

    def set_selection(
        self,
        indices: Optional[Tensor],
        weights: Optional[Tensor] = None,
        start_batch: int = 0,
        now_batch: Optional[int] = None,
    ) -> None:
        """Make ``indices`` (``None`` = the whole pool) the subset from global batch position ``start_batch`` on.

        Selections in force at or after ``start_batch`` are replaced. Versions that can no longer be reached
        from ``now_batch`` (the batches already trained) are dropped to bound memory.
        """
        if indices is not None:
            indices = torch.as_tensor(indices)
            if indices.dtype != torch.int64:
                if indices.is_floating_point():
                    raise TypeError("CoresetSampler.set_selection: `indices` must be integers (int64), got floats.")
                indices = indices.long()
            indices = indices.reshape(-1).cpu()
            if indices.numel() == 0:
                raise ValueError("CoresetSampler.set_selection: the selection is empty; a strategy must pick at least one example.")
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.pool_size:
                raise ValueError(
                    f"CoresetSampler.set_selection: indices must lie in [0, {self.pool_size}), got [{lo}, {hi}]."
                )
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1).cpu()
            expected = self.pool_size if indices is None else indices.numel()
            if weights.numel() != expected:
                raise ValueError(
                    f"CoresetSampler.set_selection: {weights.numel()} weights for {expected} selected examples."
                )
            if not torch.isfinite(weights).all() or bool((weights < 0).any()):
                raise ValueError("CoresetSampler.set_selection: weights must be finite and non-negative.")
        if start_batch < 0:
            raise ValueError(f"CoresetSampler.set_selection: `start_batch` must be >= 0, got {start_batch}.")
        versions = [v for v in self._versions if v.start < start_batch]
        if not (versions and self._same_selection(versions[-1], indices, weights)):
            # An unchanged selection keeps its version, so its shuffled pass goes on instead of restarting
            # (the whole pool is then streamed across epochs rather than re-sampled each refresh).
            versions.append(_Version(int(start_batch), indices, weights))
        if now_batch is not None:
            starts = [v.start for v in versions]
            first_live = max(bisect.bisect_right(starts, now_batch) - 1, 0)
            versions = versions[first_live:]
        self._versions = versions
        self._generation += 1
        live = {v.serial for v in versions}
        self._perm_cache = {k: p for k, p in self._perm_cache.items() if k[0] in live}

    @staticmethod
    def _same_selection(version: _Version, indices: Optional[Tensor], weights: Optional[Tensor]) -> bool:
        def same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

        return same(version.indices, indices) and same(version.weights, weights)

    # ------------------------------------------------------------------ index arithmetic
    def batches_per_epoch(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per epoch on every rank for a DataLoader with this ``batch_size`` and ``drop_last``."""
        return self.num_samples // batch_size if drop_last else math.ceil(self.num_samples / batch_size)

    def check_batch_size(self, batch_size: int, drop_last: bool) -> None:
        """Raise when the budget cannot fill a single batch (``drop_last=True`` would train nothing)."""
        if self.batches_per_epoch(batch_size, drop_last) == 0:
            raise ValueError(
                f"CoresetSampler: {self.num_samples} examples per rank make no full batch of {batch_size} with "
                "drop_last=True; raise the budget (`fraction`/`size`) or lower the batch size."
            )

    def _version_index(self, batch_positions: Tensor) -> Tensor:
        """Index of the selection in force at each batch position; -1 before every retained one."""
        starts = torch.tensor([v.start for v in self._versions], dtype=torch.int64)
        return torch.searchsorted(starts, batch_positions, right=True) - 1

    def _sample_position(self, batch_position: int, batch_size: int, drop_last: bool) -> int:
        """Per-rank sample position (over all epochs) where a global batch position begins."""
        nb = self.batches_per_epoch(batch_size, drop_last)
        epoch, offset = divmod(batch_position, nb)
        return epoch * self.num_samples + offset * batch_size

    def _permutation(self, version: _Version, pass_index: int) -> Tensor:
        key = (version.serial, pass_index)
        perm = self._perm_cache.get(key)
        if perm is None:
            n = self.pool_size if version.indices is None else version.indices.numel()
            gen = seeded_generator(self.seed, version.start, pass_index)
            perm = torch.randperm(n, generator=gen)
            if len(self._perm_cache) >= 8:  # an epoch touches at most a few passes
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[key] = perm
        return perm

    def _positions_to_indices(self, version: _Version, stream: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        n = self.pool_size if version.indices is None else version.indices.numel()
        passes, within = stream // n, stream % n
        picked = torch.empty_like(stream)
        for p in torch.unique(passes).tolist():
            mask = passes == p
            picked[mask] = self._permutation(version, p)[within[mask]]
        indices = picked if version.indices is None else version.indices[picked]
        weights = None if version.weights is None else version.weights[picked]
        return indices, weights

    def _epoch_stream(self, epoch: int, batch_size: int, drop_last: bool) -> tuple[Tensor, Tensor, int, bool]:
        """This rank's whole epoch of indices and weights under the selections known now (cached), how
        many leading positions precede every retained selection (already trained; marked -1), and whether
        any selection in the epoch carries weights.

        Computed in one vectorised pass per selection version: per-index work in Python would cost more
        than the training step of a small model.
        """
        key = (epoch, batch_size, drop_last, self._generation, self.rank, self.num_replicas)
        if self._stream_cache is not None and self._stream_cache[0] == key:
            return self._stream_cache[1:]
        nb = self.batches_per_epoch(batch_size, drop_last)
        within_epoch = torch.arange(self.num_samples, dtype=torch.int64)
        # A trailing chunk that drop_last discards borrows the last kept batch's position.
        batch_positions = epoch * nb + torch.clamp(within_epoch // batch_size, max=nb - 1)
        which = self._version_index(batch_positions)
        # Positions before every retained selection were trained already (their versions were pruned).
        indices = torch.full((self.num_samples,), -1, dtype=torch.int64)
        weights = torch.ones(self.num_samples, dtype=torch.float32)
        weighted = False
        for v in torch.unique(which[which >= 0]).tolist():
            version = self._versions[v]
            rows = (which == v).nonzero().squeeze(1)
            version_start = self._sample_position(version.start, batch_size, drop_last)
            stream = (epoch * self.num_samples + within_epoch[rows] - version_start) * self.num_replicas + self.rank
            picked, picked_weights = self._positions_to_indices(version, stream)
            indices[rows] = picked
            if picked_weights is not None:
                weights[rows] = picked_weights
                weighted = True
        pruned = int((which < 0).sum())  # a prefix: starts are sorted
        self._stream_cache = (key, indices, weights, pruned, weighted)
        return indices, weights, pruned, weighted

    def batch_indices(
        self, batch_position: int, batch_size: int, drop_last: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Dataset indices and weights this rank yields for a global batch position (a pure function).

        Used to attach weights and signals to the batch being trained without changing the batch format.
        """
        epoch, offset = divmod(batch_position, self.batches_per_epoch(batch_size, drop_last))
        indices, weights, pruned, _ = self._epoch_stream(epoch, batch_size, drop_last)
        window = slice(offset * batch_size, min((offset + 1) * batch_size, self.num_samples))
        if window.start < pruned:
            raise RuntimeError(
                f"CoresetSampler: batch position {batch_position} precedes every retained selection (starts "
                f"{self.version_starts}); the sampler state does not match the training loop's progress."
            )
        return indices[window], weights[window]

    def batch_is_weighted(self, batch_position: int, batch_size: int, drop_last: bool = False) -> bool:
        """Whether any selection in force during that batch's epoch carries weights (cheap: cached)."""
        epoch = batch_position // self.batches_per_epoch(batch_size, drop_last)
        return self._epoch_stream(epoch, batch_size, drop_last)[3]

    # ------------------------------------------------------------------ iteration
    def _start_position(self) -> LoaderPosition:
        if self._position_fn is None:
            # Unbound (plain PyTorch use): whole epochs, advanced by `set_epoch`, as one batch each.
            return LoaderPosition(self.epoch, self.num_samples, False)
        return self._position_fn()

    def __iter__(self) -> Iterator[int]:
        batches_done, batch_size, drop_last = self._start_position()
        self.check_batch_size(batch_size, drop_last)
        epoch, offset = divmod(batches_done, self.batches_per_epoch(batch_size, drop_last))
        generation, stream = None, []
        # Yield batch by batch and re-read the stream when a selection was set meanwhile, so that one set
        # mid-epoch is picked up exactly from its start position.
        for begin in range(offset * batch_size, self.num_samples, batch_size):
            if generation != self._generation:
                generation = self._generation
                stream = self._epoch_stream(epoch, batch_size, drop_last)[0].tolist()
            yield from stream[begin : begin + batch_size]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The retained selections, as tensors and plain values only (loads under ``weights_only=True``)."""
        return {
            "pool_size": self.pool_size,
            "budget": self.budget,
            "seed": self.seed,
            "versions": [
                {"start": v.start, "indices": v.indices, "weights": v.weights} for v in self._versions
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore selections saved by :meth:`state_dict`; refuses state from a different pool or budget."""
        for key, mine in (("pool_size", self.pool_size), ("budget", self.budget), ("seed", self.seed)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"CoresetSampler: the checkpoint was made with {key}={int(state[key])}, this sampler has "
                    f"{key}={mine}. Resume with the same dataset, budget (`fraction`/`size`) and `seed`."
                )
        self._versions = [
            _Version(int(v["start"]), None if v["indices"] is None else v["indices"].long(), v["weights"])
            for v in state["versions"]
        ]
        self._perm_cache = {}
        self._generation += 1
