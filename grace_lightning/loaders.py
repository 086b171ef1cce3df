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

from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader

__all__ = [
    "batch_part",
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
