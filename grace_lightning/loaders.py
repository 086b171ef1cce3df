"""Finding the coreset's training DataLoader, and putting a CoresetSampler into one (one-line adoption).

``CoresetCallback(fraction=0.3)`` with no sampler needs the training DataLoader the user gave Lightning. Lightning
re-creates a user's loader to inject its own ``DistributedSampler`` (``_update_dataloader``); this module does the
same with a :class:`~grace_lightning.CoresetSampler`, at the moment Lightning requests the training loader (so the
epoch length, ``estimated_stepping_batches`` and the first iterator all see the coreset). The request is wrapped by
replacing the fit loop's data source with a subclass that forwards to it: Lightning 2.6 has no public hook between
"the user's ``train_dataloader()`` returned" and "the loader is measured and iterated". The pin ``lightning<2.7``
in ``pyproject.toml`` covers this; ``tests/test_adoption.py`` checks it end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.data import _update_dataloader, extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from grace_lightning.sampler import CoresetSampler, LoaderPosition

__all__ = [
    "TrainingLoader",
    "adopt_sampler",
    "batch_part",
    "explain_resume_warning",
    "flatten_loaders",
    "loader_path",
    "loader_sampler",
    "replace_loader",
    "with_sampler",
    "wrap_train_source",
]


def flatten_loaders(iterables: Any) -> list:
    """The loaders in what a training source returns: a loader, a CombinedLoader, or lists/dicts of them."""
    if isinstance(iterables, CombinedLoader):
        return list(iterables.flattened)
    if isinstance(iterables, dict):
        return [dl for value in iterables.values() for dl in flatten_loaders(value)]
    if isinstance(iterables, (list, tuple)):
        return [dl for value in iterables for dl in flatten_loaders(value)]
    return [iterables]


def loader_sampler(dl: Any) -> Any:
    """The sampler a DataLoader draws indices from (its own, or its batch sampler's)."""
    sampler = getattr(dl, "sampler", None)
    batch_sampler = getattr(dl, "batch_sampler", None)
    if batch_sampler is not None and getattr(dl, "batch_size", None) is None:
        return getattr(batch_sampler, "sampler", sampler)
    return sampler


def replace_loader(iterables: Any, old: DataLoader, new: DataLoader) -> Any:
    """``iterables`` with the loader ``old`` replaced by ``new``, keeping its structure."""
    if iterables is old:
        return new
    if isinstance(iterables, CombinedLoader):
        iterables.flattened = [new if dl is old else dl for dl in iterables.flattened]
        return iterables
    if isinstance(iterables, dict):
        return type(iterables)((k, replace_loader(v, old, new)) for k, v in iterables.items())
    if isinstance(iterables, (list, tuple)):
        return type(iterables)(replace_loader(v, old, new) for v in iterables)
    return iterables


def with_sampler(dl: DataLoader, sampler: Any) -> DataLoader:
    """A copy of ``dl`` that draws from ``sampler``, made the way Lightning injects its DistributedSampler."""
    return _update_dataloader(dl, sampler, mode=RunningStage.TRAINING)


@dataclass
class _AdoptingSource(_DataLoaderSource):
    """The fit loop's training source, passing every loader it returns through ``adopt`` first."""

    adopt: Optional[Callable[[Any], Any]] = None

    def dataloader(self) -> Any:
        loaders = super().dataloader()
        return loaders if self.adopt is None else self.adopt(loaders)


def wrap_train_source(trainer: Trainer, adopt: Callable[[Any], Any]) -> None:
    """Route the training loaders Lightning requests from now on through ``adopt`` (idempotent per trainer)."""
    fit_loop = trainer.fit_loop
    source = getattr(fit_loop, "_data_source", None)
    if not isinstance(source, _DataLoaderSource):
        raise RuntimeError(
            "CoresetCallback: this Lightning version keeps the training data source elsewhere, so the callback "
            "cannot put a CoresetSampler into the training DataLoader. Use the explicit form: "
            "DataLoader(train_set, batch_size=..., sampler=CoresetSampler(train_set, fraction=...)) and "
            "CoresetCallback(sampler)."
        )
    if isinstance(source, _AdoptingSource):
        source.adopt = adopt
        return
    fit_loop._data_source = _AdoptingSource(source.instance, source.name, adopt=adopt)


def loader_path(iterables: Any, dl: Any) -> Optional[tuple]:
    """Keys/indices leading from ``iterables`` (``trainer.train_dataloader``) to the loader ``dl``; () if it is all."""
    if iterables is dl:
        return ()
    if isinstance(iterables, dict):
        items = iterables.items()
    elif isinstance(iterables, (list, tuple)):
        items = enumerate(iterables)
    else:
        return None
    for key, value in items:
        rest = loader_path(value, dl)
        if rest is not None:
            return (key, *rest)
    return None


def batch_part(batch: Any, path: tuple) -> Any:
    """The part of a combined batch that came from the loader at ``path`` (Lightning mirrors the loaders' structure)."""
    for key in path:
        batch = batch[key]
    return batch


def adopt_sampler(
    iterables: Any, current: Optional[CoresetSampler], budget: dict[str, Any], seed: int
) -> tuple[Any, CoresetSampler]:
    """Find the CoresetSampler in the training loaders Lightning got, or put one into the training DataLoader.

    Args:
        iterables: what the fit loop's training source returned.
        current: the callback's CoresetSampler so far (given by the user, or adopted from an earlier request), or None.
        budget: ``{"fraction": ..., "size": ...}`` given to the callback (all None: find a sampler, build none).
        seed: the seed of a sampler built here.

    Returns:
        ``(iterables, sampler)``: the loaders to train on (with the new sampler in, if one was built) and the
        coreset's sampler. Raises ``ValueError`` naming the fix when neither finding nor building one is right.
    """
    budget_given = any(v is not None for v in budget.values())
    loaders = flatten_loaders(iterables)
    if current is not None and (not budget_given or any(loader_sampler(dl) is current for dl in loaders)):
        return iterables, current  # the explicit form (checked when the loader is looked up), or a kept reload
    found = [dl for dl in loaders if isinstance(loader_sampler(dl), CoresetSampler)]
    if found:
        if budget_given:
            raise ValueError(
                "CoresetCallback: the training DataLoader already has a CoresetSampler, and the callback was given "
                "`fraction`/`size` too. Give the budget once: CoresetCallback() finds the loader's sampler."
            )
        if len(found) > 1:
            raise ValueError(
                "CoresetCallback: several training DataLoaders have a CoresetSampler; pass the one this callback "
                "drives: CoresetCallback(sampler)."
            )
        return iterables, loader_sampler(found[0])
    if not budget_given:
        raise ValueError(
            "CoresetCallback: no CoresetSampler in the training DataLoader and no budget to build one. Give "
            "the budget, CoresetCallback(fraction=0.3), or the sampler: CoresetCallback(sampler)."
        )
    candidates = [dl for dl in loaders if isinstance(dl, DataLoader)]
    if len(loaders) != 1 or len(candidates) != 1:
        raise ValueError(
            f"CoresetCallback: the training data is {len(loaders)} loaders; the callback puts a CoresetSampler "
            "into a single DataLoader only. Give the loader to subset its own sampler: "
            "DataLoader(train_set, batch_size=..., sampler=CoresetSampler(train_set, fraction=...)) and "
            "CoresetCallback(sampler)."
        )
    dl = candidates[0]
    if current is not None and len(dl.dataset) == current.pool_size:
        sampler = current  # a reloaded loader over the same pool keeps the coreset
    else:
        if dl.batch_size is None:
            raise ValueError(
                "CoresetCallback: the training DataLoader uses a custom batch_sampler; the coreset fixes the "
                "batches per epoch, so give it DataLoader(train_set, batch_size=..., shuffle=True) instead."
            )
        sampler = CoresetSampler(dl.dataset, **budget, seed=seed)
    return replace_loader(iterables, dl, with_sampler(dl, sampler)), sampler


class TrainingLoader:
    """The training DataLoader that draws from ``sampler``, found among the trainer's loaders, and where it stands.

    Example::

        view = TrainingLoader(sampler)
        position = view.position(trainer)  # batches trained so far, batch size, drop_last
    """

    def __init__(self, sampler: CoresetSampler) -> None:
        self.sampler = sampler
        self.path: tuple = ()  # where its part sits in a combined training batch
        self.checked_iterator = False  # whether a batch of the current loader was cross-checked with the sampler
        self._cache: Optional[tuple[Any, DataLoader]] = None

    def loader(self, trainer: Trainer) -> DataLoader:
        iterables = trainer.train_dataloader
        if self._cache is not None and self._cache[0] is iterables:
            return self._cache[1]
        self.checked_iterator = False  # a new loader: cross-check its first batch again
        for dl in flatten_loaders(iterables):
            if loader_sampler(dl) is self.sampler:
                if len(dl.dataset) != self.sampler.pool_size:
                    raise ValueError(
                        f"CoresetCallback: the CoresetSampler was built on a pool of {self.sampler.pool_size} examples "
                        f"but its DataLoader's dataset has {len(dl.dataset)}. Build the sampler on the loader's own "
                        "dataset: DataLoader(train_set, sampler=CoresetSampler(train_set, ...))."
                    )
                self._cache = (iterables, dl)
                self.path = loader_path(iterables, dl) or ()
                return dl
        raise ValueError(
            "CoresetCallback: the CoresetSampler given to the callback is not the sampler of the training "
            "DataLoader. Build the loader with it: DataLoader(train_set, batch_size=..., sampler=sampler)."
        )

    def position(self, trainer: Trainer) -> LoaderPosition:
        """The :class:`~grace_lightning.sampler.LoaderPosition` of the batch being trained (or next to be)."""
        stage = trainer.state.stage
        if stage is not None and stage not in (RunningStage.TRAINING,):
            raise ValueError(
                f"CoresetCallback: the CoresetSampler is iterated by a {stage.value} DataLoader. It yields the training "
                "coreset only; evaluation must see every example: give that loader a plain order, e.g. "
                "DataLoader(val_set, batch_size=..., shuffle=False)."
            )
        dl = self.loader(trainer)
        batch_size = dl.batch_size if dl.batch_size is not None else getattr(dl.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "CoresetCallback: the training DataLoader has no batch size; use "
                "DataLoader(train_set, batch_size=..., sampler=sampler) rather than a custom batch_sampler."
            )
        drop_last = bool(dl.drop_last if dl.batch_size is not None else getattr(dl.batch_sampler, "drop_last", False))
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return LoaderPosition(int(done), int(batch_size), drop_last)

    def check_batch(self, batch: Any, indices: Any) -> None:
        """The (combined) training batch must hold as many examples as the sampler yielded for it."""
        self.checked_iterator = True
        try:
            seen = extract_batch_size(batch_part(batch, self.path))
        except Exception:  # an exotic batch whose size Lightning cannot infer: nothing to cross-check
            return
        if seen != indices.numel():
            raise RuntimeError(
                f"CoresetCallback: the batch has {seen} examples but the sampler yielded {indices.numel()} for it; "
                "the training DataLoader must draw indices from the CoresetSampler unchanged."
            )

    def prefetch_lag(self, trainer: Trainer) -> int:
        """Batches the DataLoader has already drawn from the sampler beyond the one being trained."""
        dl = self.loader(trainer)
        return 0 if dl.num_workers == 0 else dl.num_workers * (dl.prefetch_factor or 2)


def explain_resume_warning(trainer: Trainer) -> None:
    """Say once why Lightning's 'dataloader is not resumable' warning of a mid-epoch resume does not apply."""
    batches = trainer.num_training_batches
    if not trainer.fit_loop.restarting or batches in (0, float("inf")):
        return
    if trainer.global_step % math.ceil(batches / trainer.accumulate_grad_batches) == 0:
        return  # the same test as Lightning's (training_epoch_loop.py): no warning comes
    rank_zero_info(
        "CoresetCallback: Lightning's warning below, \"You're resuming from a checkpoint that ended before the "
        "epoch ended and your dataloader is not resumable\", does not apply to the CoresetSampler's loader: the "
        "sampler resumes from Lightning's restored batch counter, so the resumed epoch trains the remaining "
        "batches of the uninterrupted run. Other training loaders are not covered."
    )
