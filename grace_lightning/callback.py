"""The callback that rebuilds the coreset while training runs."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from grace_lightning import rng
from grace_lightning.distributed import gather_rows
from grace_lightning.graph import set_faiss_threads
from grace_lightning.handback import Origin
from grace_lightning.probes import ProbeRequest, ProbeResults, ProbeRunner
from grace_lightning.loaders import (
    batch_part,
    flatten_loaders,
    loader_path,
    loader_sampler,
    replace_loader,
    with_sampler,
    wrap_train_source,
)
from grace_lightning.sampler import CoresetSampler, LoaderPosition, _mix_seed, resolve_budget
from grace_lightning.schedule import Action, RefreshSchedule
from grace_lightning.signals import ExampleSignals, SignalExtractor, SignalStore
from grace_lightning.signals.capture import ModuleModes
from grace_lightning.strategies import Selection, SelectionInput, Strategy, build_strategy
from grace_lightning.strategies.base import uniform_sample
from grace_lightning.telemetry import ScoringProgressBar, log_metrics

__all__ = ["CoresetCallback"]

_SIGNAL_KEYS = ("loss", "grad_norm", "embedding", "length", "error_norm")


def _positive_int_or_none(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CoresetCallback: `{name}` must be a positive int or None, got {value!r}.")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"CoresetCallback: `{name}` must be an int >= 0, got {value!r}.")
    return value


def _check_quality(quality: Any, pool_size: int) -> Optional[Tensor]:
    if quality is None:
        return None
    try:
        q = torch.as_tensor(quality, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"CoresetCallback: `quality` must be a sequence of {pool_size} numbers: {err}") from err
    if q.shape != (pool_size,):
        raise ValueError(
            f"CoresetCallback: `quality` must have one score per pool example, shape ({pool_size},), got {tuple(q.shape)}."
        )
    if not bool(torch.isfinite(q).all()):
        raise ValueError("CoresetCallback: `quality` contains NaN or infinite scores; give finite numbers.")
    return q


def _item_layout(item: Any) -> str:
    """The shape of one dataset item's structure: a tuple's length, a mapping's keys."""
    if isinstance(item, Mapping):
        return f"a mapping with keys {sorted(map(str, item))}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} items"
    return f"a {type(item).__name__}"


def _check_reference_format(reference: Union[Dataset, DataLoader], train_set: Dataset) -> None:
    """The reference set's items must be laid out like the training set's (labels included): fail at setup."""
    reference_set = reference.dataset if isinstance(reference, DataLoader) else reference
    if len(reference_set) == 0:
        raise ValueError("CoresetCallback: `reference` is empty; give it 64-256 held-out examples of the target task.")
    mine, theirs = _item_layout(reference_set[0]), _item_layout(train_set[0])
    if mine != theirs:
        raise ValueError(
            f"CoresetCallback: the reference set's items are {mine}, the training set's are {theirs}. The reference "
            "set is scored and probed like training batches, so its items need the training format, labels included."
        )


def _warn_unused_inputs(strategy: Strategy, has_reference: bool, has_quality: bool) -> None:
    """Say once, at construction, that an input the user gave is ignored by this strategy."""
    if has_reference and strategy.reference == "unused":
        rank_zero_warn(
            f"CoresetCallback: strategy {strategy.name!r} does not read a reference set, so `reference` is ignored "
            "(group_mates and gip use one; grace reads none). Drop `reference` or pick a strategy that uses it."
        )
    if has_quality and not strategy.uses_quality:
        rank_zero_warn(
            f"CoresetCallback: strategy {strategy.name!r} does not read quality scores, so `quality` is ignored "
            "(grip and gip use them). Drop `quality` or pick a strategy that uses it."
        )


class CoresetCallback(Callback):
    r"""Rebuilds the training subset held by a :class:`~grace_lightning.CoresetSampler` while training runs.

    The callback owns the schedule (warm-up on the whole pool, refresh every n epochs or k steps, anneal
    to the whole pool at the end), the scoring pass (forward-only, over the pool slice the strategy asks
    for, sharded over ranks, gathered), the selection (computed once on rank 0, broadcast to every rank),
    checkpoint state and telemetry. Strategy math lives in :mod:`grace_lightning.strategies`.

    Every epoch has the same number of batches, fixed by the sampler's budget, so the progress bar,
    ``trainer.estimated_stepping_batches`` and step LR schedulers are exact in every phase.

    Signals (per-example loss, closed-form last-layer gradient norm, embedding) are measured for free on
    the batches the model trains on, and by the scoring pass; see :class:`~grace_lightning.signals.SignalExtractor`
    for what works with no change to the module, and ``coreset_signals`` for everything else.

    Telemetry is logged through the Trainer's loggers at every refresh under ``{log_prefix}``:
    ``selection_seconds`` (this refresh: scoring + selection, max over ranks), ``selection_share``
    (all selection seconds so far over the fit's wall clock), ``subset_size``, ``overlap`` (share of the
    new subset that was in the previous one), ``scored`` (examples measured by the scoring pass),
    ``invalid_signals`` (non-finite measurements excluded so far), ``padding``, ``fidelity``, and the
    phases: ``scoring_seconds``, ``strategy_seconds`` and whatever the strategy reports (GRACE splits
    propagation, graph update and selection). The same records are kept in :attr:`history`.

    Args:
        sampler: the :class:`CoresetSampler` given to the training DataLoader. ``None`` (one-line adoption):
            the callback finds the CoresetSampler in the training DataLoader, or, given ``fraction`` or ``size``,
            re-creates the training DataLoader with one (the way Lightning injects its ``DistributedSampler``;
            its ``shuffle`` is then the sampler's own order). The sampler's seed is ``seed``.
        strategy: a registered name (``"grace"``, the default; ``"random"``, ``"full"``, ...) or a
            :class:`Strategy` instance.
        fraction: share of the pool trained per epoch, for one-line adoption (no ``sampler``).
        size: examples trained per epoch, for one-line adoption (instead of ``fraction``).
        refresh_every_n_epochs: re-select at the end of every n-th epoch (None: never by epochs).
        refresh_every_n_steps: re-select every k optimizer steps, i.e. every ``k * accumulate_grad_batches``
            training batches (None: never by steps). Mutually
            exclusive with ``refresh_every_n_epochs``; with neither, the first selection is kept.
        warmup_epochs: train this many epochs on the whole pool (streamed at the budget's epoch length)
            before the first selection.
        anneal_epochs: train the last this many epochs on the whole pool (needs ``Trainer(max_epochs)``).
        seed: seed of the selection generator. Same seed, same data, same model: same selections.
        scoring_batch_size: batch size of the scoring pass (default: the training batch size).
        scoring_num_workers: workers of the scoring pass's own DataLoader.
        capture_training_signals: measure signals on training batches for free (only when the strategy
            reads signals).
        strategy_kwargs: keyword arguments for a strategy given by name.
        max_embedding_dim: the signal store keeps embeddings with at most this many dimensions (a fixed
            random projection above it; ``None`` keeps them as the model gives them).
        signal_memmap_dir: keep the signal store in memory-mapped files in this directory (pools that do
            not fit in RAM); ``None`` keeps it in RAM.
        max_selection_share: overhead budget, a share of the fit's wall clock in ``(0, 1)``. When selection
            exceeds it, later refreshes ask the strategy for proportionally less scoring work (``fidelity``).
            Selections then depend on measured time, so runs are no longer reproducible bit for bit.
        reference: a reference set (a ``Dataset`` of items in the training format, or a ``DataLoader`` over
            one), for strategies that measure influence or build queries on it (``group_mates``, ``gip``).
            It is scored with the live model at every refresh (forward only, sharded over ranks); probes
            measure their loss on it. Typically 64-256 held-out examples of the target task.
        quality: ``(N,)`` user quality scores of the pool examples (any real numbers; higher is better), for
            strategies that read them (``grip`` budgets, ``gip`` queries).
        max_invalid_share: a refresh fails (``RuntimeError``, with the likely cause) when more than this share
            of the signals measured since the last refresh were NaN or infinite, typically a diverged loss:
            selecting from such a store would silently use stale or missing data.
        log_prefix: prefix of the logged metric names.
        restore_rng: save every rank's random streams of the training process (torch CPU, CUDA when
            initialised, numpy's global generator, python's ``random``) in the checkpoint, and restore each
            rank's own on resume, at the point where the uninterrupted run's streams stood (so dropout and other
            draws in the training process match it bit for bit). Augmentation randomness inside DataLoader
            worker processes is not covered: workers reseed themselves from a base seed drawn when each iterator
            is created, and a resumed run creates its iterator at a different time. Resuming needs the saving
            run's number of ranks. ``restore_rng=False`` neither saves nor restores them.

    Raises:
        TypeError: if ``sampler`` is not a :class:`CoresetSampler`.
        ValueError: for an unknown strategy, non-positive intervals, both intervals at once, or negative
            warm-up/anneal lengths, a strategy that needs a reference set or quality scores and got none,
            malformed ``quality``; in ``setup``, for Trainer settings that fight the budget
            (``limit_train_batches``, ``overfit_batches``) or an anneal without ``max_epochs``; at the start
            of training, if the sampler is not in the training DataLoader.

    Example::

        import lightning as L
        from torch.utils.data import DataLoader
        from grace_lightning import CoresetCallback, CoresetSampler

        # one line: the callback puts a CoresetSampler into the training DataLoader itself
        trainer = L.Trainer(max_epochs=20, callbacks=[CoresetCallback(fraction=0.3)])
        trainer.fit(model, DataLoader(train_set, batch_size=128, shuffle=True))

        # explicit: the sampler is yours to build and inspect
        sampler = CoresetSampler(train_set, fraction=0.3, seed=0)
        loader = DataLoader(train_set, batch_size=128, sampler=sampler)
        trainer = L.Trainer(max_epochs=20, callbacks=[CoresetCallback(sampler, strategy="random")])
        trainer.fit(model, loader)
    """

    def __init__(
        self,
        sampler: Optional[CoresetSampler] = None,
        strategy: Union[str, Strategy] = "grace",
        *,
        fraction: Optional[float] = None,
        size: Optional[int] = None,
        refresh_every_n_epochs: Optional[int] = 1,
        refresh_every_n_steps: Optional[int] = None,
        warmup_epochs: int = 0,
        anneal_epochs: int = 0,
        seed: int = 0,
        scoring_batch_size: Optional[int] = None,
        scoring_num_workers: int = 0,
        capture_training_signals: bool = True,
        strategy_kwargs: Optional[dict] = None,
        max_embedding_dim: Optional[int] = 256,
        signal_memmap_dir: Optional[str] = None,
        max_selection_share: Optional[float] = None,
        max_invalid_share: float = 0.5,
        reference: Optional[Union[Dataset, DataLoader]] = None,
        quality: Optional[Any] = None,
        log_prefix: str = "coreset/",
        restore_rng: bool = True,
    ) -> None:
        if sampler is not None and not isinstance(sampler, CoresetSampler):
            raise TypeError(
                f"CoresetCallback: `sampler` must be the CoresetSampler given to the training DataLoader (or None, "
                f"to find or put one in the training DataLoader), got {type(sampler).__name__}."
            )
        if sampler is not None and (fraction is not None or size is not None):
            raise ValueError(
                "CoresetCallback: the budget is the sampler's; give `fraction`/`size` only without a `sampler` "
                "(CoresetCallback(fraction=0.3) puts a CoresetSampler into the training DataLoader itself)."
            )
        if fraction is not None or size is not None:
            resolve_budget(fraction, size, None, owner="CoresetCallback")
        self._budget_args = {"fraction": fraction, "size": size}
        every_n_epochs = _positive_int_or_none("refresh_every_n_epochs", refresh_every_n_epochs)
        every_n_steps = _positive_int_or_none("refresh_every_n_steps", refresh_every_n_steps)
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError(
                "CoresetCallback: set only one of `refresh_every_n_epochs` and `refresh_every_n_steps` "
                "(pass refresh_every_n_epochs=None to refresh by steps)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"CoresetCallback: `seed` must be an int, got {seed!r}.")
        self.sampler: Optional[CoresetSampler] = None
        self.strategy = build_strategy(strategy, **(strategy_kwargs or {}))
        if reference is not None and not isinstance(reference, (Dataset, DataLoader)):
            raise TypeError(
                f"CoresetCallback: `reference` must be a torch Dataset or DataLoader, got {type(reference).__name__}."
            )
        self.reference = reference
        self._quality_input = quality
        self.quality: Optional[Tensor] = None
        self.strategy.check_inputs(reference is not None, quality is not None)
        _warn_unused_inputs(self.strategy, reference is not None, quality is not None)
        self.schedule = RefreshSchedule(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            warmup_epochs=_non_negative_int("warmup_epochs", warmup_epochs),
            anneal_epochs=_non_negative_int("anneal_epochs", anneal_epochs),
        )
        self.seed = seed
        self._every_n_steps = every_n_steps
        self.scoring_batch_size = _positive_int_or_none("scoring_batch_size", scoring_batch_size)
        self.scoring_num_workers = _non_negative_int("scoring_num_workers", scoring_num_workers)
        self.capture_training_signals = bool(capture_training_signals)
        if max_selection_share is not None and not 0.0 < max_selection_share < 1.0:
            raise ValueError(
                f"CoresetCallback: `max_selection_share` must be in (0, 1) (e.g. 0.05 for 5% of wall clock) or None, "
                f"got {max_selection_share!r}."
            )
        self.max_selection_share = max_selection_share
        if isinstance(max_invalid_share, bool) or not isinstance(max_invalid_share, (int, float)) or not 0.0 <= max_invalid_share < 1.0:
            raise ValueError(
                f"CoresetCallback: `max_invalid_share` must be in [0, 1) (e.g. 0.5), got {max_invalid_share!r}."
            )
        self.max_invalid_share = float(max_invalid_share)
        self.log_prefix = log_prefix
        self.restore_rng, self._rng_pending = bool(restore_rng), None  # _rng_pending: restored at the next batch
        self._store_args = {"max_embedding_dim": max_embedding_dim, "seed": seed, "memmap_dir": signal_memmap_dir}
        self.store: Optional[SignalStore] = None
        self._strategy_state: Any = None
        self._fidelity = 1.0
        self._history: list[dict[str, float]] = []
        self._origin = Origin()  # under ddp_spawn/ddp_fork, rank 0 hands `history` back to this process
        self._extractor: Optional[SignalExtractor] = None
        self._pending: list[tuple[Tensor, int, ExampleSignals]] = []
        self._restored = False
        self._refreshes = 0
        self._selection_seconds = 0.0
        self._fit_started_at = 0.0
        self._position: Optional[LoaderPosition] = None  # of the batch being trained
        self._batch: Optional[tuple[Tensor, Optional[Tensor]]] = None  # its indices and weights, once asked for
        self._trainer: Optional[Trainer] = None
        self._loader_cache: Optional[tuple[Any, DataLoader]] = None
        self._checked_iterator = False
        self._state_key = self._generate_state_key(strategy=self.strategy.name)
        self._loaded_state: Optional[dict[str, Any]] = None  # a checkpoint read before the sampler was known
        self._weights_read = False  # whether this batch's training step asked for its weights
        self._signals_seen = (0, 0)  # the store's (invalid, offered) counts at the last refresh
        self._batch_path: tuple = ()  # where the coreset loader's part sits in a combined training batch
        self._warned_unread_weights = False
        self._fit_started = False
        if sampler is not None:
            self._attach_sampler(sampler)

    def _attach_sampler(self, sampler: CoresetSampler) -> None:
        """Take ``sampler`` as the coreset's and size everything that depends on the pool to it."""
        self.sampler = sampler
        self.quality = _check_quality(self._quality_input, sampler.pool_size)
        if self.strategy.needs:
            self.store = SignalStore(sampler.pool_size, **self._store_args)

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it in every hook call: build it once

    # ------------------------------------------------------------------ setup and validation
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # overfit_batches first: Lightning copies it into limit_train_batches, whose message would mislead.
        if trainer.overfit_batches:
            raise ValueError(
                f"CoresetCallback: Trainer(overfit_batches={trainer.overfit_batches!r}) replaces the training "
                "sampler; remove the CoresetCallback when overfitting a few batches."
            )
        if trainer.limit_train_batches not in (1.0, None) or isinstance(trainer.limit_train_batches, int):
            raise ValueError(
                f"CoresetCallback: Trainer(limit_train_batches={trainer.limit_train_batches!r}) fights the coreset "
                "budget, which fixes the batches per epoch. Leave limit_train_batches=1.0 and set the budget with "
                "CoresetSampler(fraction=...) or CoresetSampler(size=...)."
            )
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        if self.schedule.anneal_epochs and max_epochs is None:
            raise ValueError(
                "CoresetCallback: `anneal_epochs` needs Trainer(max_epochs=...) to know when the last epochs are."
            )
        if max_epochs is not None and self.schedule.warmup_epochs + self.schedule.anneal_epochs > max_epochs:
            raise ValueError(
                f"CoresetCallback: warmup_epochs={self.schedule.warmup_epochs} + anneal_epochs="
                f"{self.schedule.anneal_epochs} exceed Trainer(max_epochs={max_epochs}); shorten them."
            )
        # Steps are optimizer steps, as in Lightning's own `every_n_train_steps`: k of them span k * accumulation batches.
        every_n_batches = None if self._every_n_steps is None else self._every_n_steps * trainer.accumulate_grad_batches
        self.schedule = RefreshSchedule(
            **{**self.schedule.__dict__, "max_epochs": max_epochs, "every_n_steps": every_n_batches}
        )
        if trainer.world_size > 1:
            # faiss ignores Lightning's per-rank torch threads; without this the ranks oversubscribe the cores.
            set_faiss_threads(trainer.world_size)
        self._trainer = trainer
        self._fit_started = False
        # Every training loader Lightning requests passes through `_adopt_loaders`: it finds the CoresetSampler,
        # or puts one in, before Lightning measures the epoch and creates the first iterator.
        wrap_train_source(trainer, self._adopt_loaders)
        if self.sampler is not None:
            self._bind(trainer)

    def _bind(self, trainer: Trainer) -> None:
        """The set-up that needs the sampler: rank, restored state, the strategy's memory."""
        others = [c for c in trainer.callbacks if isinstance(c, CoresetCallback) and c is not self and c.sampler is self.sampler]
        if others:
            raise ValueError(
                "CoresetCallback: two CoresetCallbacks drive the same CoresetSampler, so both would refresh it and "
                "the last one would win. Keep one CoresetCallback per sampler."
            )
        if self.reference is not None:
            _check_reference_format(self.reference, self.sampler.dataset)
        self.sampler.bind(trainer.global_rank, trainer.world_size, self._loader_position)
        # Selection runs on rank 0 only, so only rank 0 keeps the strategy's memory (a graph can be large).
        self._strategy_state = self.strategy.create_state(self.sampler.pool_size) if trainer.is_global_zero else None
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self.load_state_dict(state)

    def _adopt_loaders(self, iterables: Any) -> Any:
        """Find the CoresetSampler in the training loaders Lightning got, or put one into the training DataLoader."""
        trainer = self._trainer
        loaders = flatten_loaders(iterables)
        if self.sampler is not None and (
            not self._budget_args_given() or any(loader_sampler(dl) is self.sampler for dl in loaders)
        ):
            return iterables  # the explicit form (`_train_loader` checks the sampler is there), or a kept reload
        found = [dl for dl in loaders if isinstance(loader_sampler(dl), CoresetSampler)]
        if found:
            if self._budget_args_given():
                raise ValueError(
                    "CoresetCallback: the training DataLoader already has a CoresetSampler, and the callback was given "
                    "`fraction`/`size` too. Give the budget once: CoresetCallback() finds the loader's sampler."
                )
            if len(found) > 1:
                raise ValueError(
                    "CoresetCallback: several training DataLoaders have a CoresetSampler; pass the one this callback "
                    "drives: CoresetCallback(sampler)."
                )
            sampler = loader_sampler(found[0])
        else:
            if not self._budget_args_given():
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
            if self.sampler is not None and len(dl.dataset) == self.sampler.pool_size:
                sampler = self.sampler  # a reloaded loader over the same pool keeps the coreset
            else:
                if dl.batch_size is None:
                    raise ValueError(
                        "CoresetCallback: the training DataLoader uses a custom batch_sampler; the coreset fixes the "
                        "batches per epoch, so give it DataLoader(train_set, batch_size=..., shuffle=True) instead."
                    )
                sampler = CoresetSampler(dl.dataset, **self._budget_args, seed=self.seed)
            iterables = replace_loader(iterables, dl, with_sampler(dl, sampler))
        if self.sampler is None:
            self._attach_sampler(sampler)
            self._bind(trainer)
            if self._fit_started:
                self._start(trainer, trainer.lightning_module)
        elif sampler is not self.sampler:
            raise ValueError(
                "CoresetCallback: the training DataLoader changed its pool after the coreset was built; a "
                "CoresetCallback keeps one pool for the whole fit."
            )
        return iterables

    def _budget_args_given(self) -> bool:
        return any(v is not None for v in self._budget_args.values())

    def _train_loader(self, trainer: Trainer) -> DataLoader:
        iterables = trainer.train_dataloader
        if self._loader_cache is not None and self._loader_cache[0] is iterables:
            return self._loader_cache[1]
        self._checked_iterator = False  # a new loader: cross-check its first batch again
        for dl in flatten_loaders(iterables):
            if loader_sampler(dl) is self.sampler:
                if len(dl.dataset) != self.sampler.pool_size:
                    raise ValueError(
                        f"CoresetCallback: the CoresetSampler was built on a pool of {self.sampler.pool_size} examples "
                        f"but its DataLoader's dataset has {len(dl.dataset)}. Build the sampler on the loader's own "
                        "dataset: DataLoader(train_set, sampler=CoresetSampler(train_set, ...))."
                    )
                self._loader_cache = (iterables, dl)
                self._batch_path = loader_path(iterables, dl) or ()
                return dl
        raise ValueError(
            "CoresetCallback: the CoresetSampler given to the callback is not the sampler of the training "
            "DataLoader. Build the loader with it: DataLoader(train_set, batch_size=..., sampler=sampler)."
        )

    def _loader_position(self) -> LoaderPosition:
        trainer = self._trainer
        stage = trainer.state.stage
        if stage is not None and stage not in (RunningStage.TRAINING,):
            raise ValueError(
                f"CoresetCallback: the CoresetSampler is iterated by a {stage.value} DataLoader. It yields the training "
                "coreset only; evaluation must see every example: give that loader a plain order, e.g. "
                "DataLoader(val_set, batch_size=..., shuffle=False)."
            )
        dl = self._train_loader(trainer)
        batch_size = dl.batch_size if dl.batch_size is not None else getattr(dl.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "CoresetCallback: the training DataLoader has no batch size; use "
                "DataLoader(train_set, batch_size=..., sampler=sampler) rather than a custom batch_sampler."
            )
        drop_last = bool(dl.drop_last if dl.batch_size is not None else getattr(dl.batch_sampler, "drop_last", False))
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return LoaderPosition(int(done), int(batch_size), drop_last)

    def _prefetch_lag(self, trainer: Trainer) -> int:
        """Batches a DataLoader has already drawn from the sampler beyond the one being trained."""
        dl = self._train_loader(trainer)
        if dl.num_workers == 0:
            return 0
        return dl.num_workers * (dl.prefetch_factor or 2)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}  # no training loader was ever requested: nothing to resume
        self._flush_pending_signals()
        return {
            "sampler": self.sampler.state_dict(),
            "rng": self._rng_state_dict(),  # a collective: state_dict runs on every rank
            "store": None if self.store is None else self.store.state_dict(),
            "refreshes": self._refreshes,
            "selection_seconds": self._selection_seconds,
            "fidelity": self._fidelity,
            "signals_seen": list(self._signals_seen),
            "strategy_state": None if self._strategy_state is None else self._strategy_state.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.sampler is None:  # one-line adoption: the sampler is built when Lightning requests the loader
            self._loaded_state = state_dict
            self._restored = True
            return
        self.sampler.load_state_dict(state_dict["sampler"])
        if self.store is not None and state_dict["store"] is not None:
            self.store.load_state_dict(state_dict["store"])
        self._refreshes = int(state_dict["refreshes"])
        self._selection_seconds = float(state_dict["selection_seconds"])
        self._fidelity = float(state_dict["fidelity"])
        self._signals_seen = tuple(int(v) for v in state_dict.get("signals_seen", (0, 0)))
        if self._strategy_state is not None and state_dict["strategy_state"] is not None:
            self._strategy_state.load_state_dict(state_dict["strategy_state"])
        self._load_rng_state(state_dict.get("rng"))
        self._restored = True

    def _rng_state_dict(self) -> Optional[dict[str, Any]]:
        """Every rank's RNG streams (rank 0 writes the checkpoint) and what tells when to put them back."""
        if not self.restore_rng or self._trainer is None:
            return None
        trainer = self._trainer
        loaders = flatten_loaders(trainer.train_dataloader) if trainer.train_dataloader is not None else []
        next_epoch_draws, resume_draws = rng.fresh_iterator_draws(loaders)
        return {
            "ranks": rng.gather(trainer.strategy, trainer.world_size, trainer.lightning_module.device),
            # Saved on an epoch's last batch (or at its end): the running fit made the next epoch's iterator after.
            "epoch_boundary": bool(trainer.is_last_batch),
            "next_epoch_draws": next_epoch_draws,
            "resume_draws": resume_draws,
        }

    def _load_rng_state(self, saved: Optional[dict[str, Any]]) -> None:
        """Restore this rank's streams now, or arm them for the first training batch (see the timing below)."""
        self._rng_pending = None
        if not self.restore_rng:
            return
        if saved is None:
            rank_zero_warn(
                "CoresetCallback: the checkpoint holds no RNG state (saved with restore_rng=False or by an older "
                "version), so dropout and other random draws will differ from the uninterrupted run."
            )
            return
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        state = rng.for_rank(saved, rank, world)
        # A resumed fit creates its training iterator (a global draw per DataLoader, its base seed) in
        # FitLoop.setup_data, before on_train_start. Mid-epoch, the running fit had already made it: restore
        # after it, at the first batch. At an epoch boundary the running fit made the next epoch's iterator
        # after saving: when it drew exactly as the resumed one will, restore now (before it; the base seed,
        # hence non-persistent workers' seeds, then match too); else restore at the first batch and replay.
        boundary = bool(saved["epoch_boundary"])
        if boundary and int(saved["next_epoch_draws"]) == int(saved["resume_draws"]):
            rng.restore(state)
            return
        self._rng_pending = (state, int(saved["next_epoch_draws"]) if boundary else 0)

    def _restore_pending_rng(self) -> None:
        if self._rng_pending is None:
            return
        (state, replay), self._rng_pending = self._rng_pending, None
        rng.restore(state)
        rng.replay_iterator_draws(replay)

    # ------------------------------------------------------------------ the schedule
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started_at = time.perf_counter()
        self._fit_started = True
        if self.sampler is not None:  # else the first training loader request builds it, then starts
            self._start(trainer, pl_module)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The first selection, before the first training iterator exists."""
        if self._restored:
            return  # the checkpoint's selections are already in the sampler
        # Before the first iterator exists (pitfall: with workers, later changes miss the first batches).
        if self.schedule.initial_action() is Action.FULL_POOL:
            self.sampler.set_selection(None, start_batch=0)
            return
        self._refresh(trainer, pl_module, start_batch=0, now_batch=0, score=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._explain_resume_warning(trainer)
        position = self._loader_position()  # raises with the fix when the sampler is not in the loader
        expected = self.sampler.batches_per_epoch(position.batch_size, position.drop_last)
        if trainer.num_training_batches != expected:
            raise ValueError(
                f"CoresetCallback: Lightning plans {trainer.num_training_batches} batches per epoch but the coreset "
                f"budget gives {expected} (len(sampler)={len(self.sampler)}, batch_size={position.batch_size}). "
                "Leave Trainer(limit_train_batches=1.0) and do not wrap the training DataLoader."
            )

    @staticmethod
    def _explain_resume_warning(trainer: Trainer) -> None:
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

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore_pending_rng()  # a mid-epoch checkpoint's streams: after the resumed run's new iterator
        # Indices and weights are looked up lazily: most steps of an unweighted strategy need neither.
        self._position = self._loader_position()
        self._batch = None
        if batch_idx == 0 or not self._checked_iterator:  # a wiring error shows on the first batch; keep steps cheap
            self._check_batch_matches(batch_part(batch, self._batch_path), self.batch_indices)
        if self._capturing():
            self._signal_extractor(pl_module, batch).arm()

    def _check_batch_matches(self, batch: Any, indices: Tensor) -> None:
        self._checked_iterator = True
        try:
            seen = extract_batch_size(batch)
        except Exception:  # an exotic batch whose size Lightning cannot infer: nothing to cross-check
            return
        if seen != indices.numel():
            raise RuntimeError(
                f"CoresetCallback: the batch has {seen} examples but the sampler yielded {indices.numel()} for it; "
                "the training DataLoader must draw indices from the CoresetSampler unchanged."
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        position = self._loader_position()
        if self._capturing() and self._extractor is not None:
            self._extractor.disarm()
            signals = self._extractor.training_batch_signals(batch)
            if signals is not None and len(signals) == self.batch_indices.numel():
                self._pending.append((self.batch_indices, position.batches_done, signals.detach_cpu()))
        self._check_weights_were_read(position)
        self._position = self._batch = None
        action = self.schedule.decide(position.batches_done, trainer.current_epoch, bool(trainer.is_last_batch))
        if action is None:
            return
        # At an epoch end the next iterator does not exist yet; mid-epoch, workers have drawn `lag` batches ahead.
        start = position.batches_done if trainer.is_last_batch else position.batches_done + self._prefetch_lag(trainer)
        if action is Action.FULL_POOL:
            self.sampler.set_selection(None, start_batch=start, now_batch=position.batches_done)
        else:
            self._refresh(trainer, pl_module, start_batch=start, now_batch=position.batches_done, score=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_pending_signals()  # leave a complete store for whoever inspects it after fit

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hand_back(trainer)
        if trainer.train_dataloader is not None and trainer.num_training_batches == 0:
            # Lightning skips a 0-batch epoch with a mere warning; say why there was nothing to train.
            position = self._loader_position()
            self.sampler.check_batch_size(position.batch_size, position.drop_last)
        if self._extractor is not None:
            self._extractor.detach()
            self._extractor = None

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per refresh (the logged telemetry, without the prefix), oldest first.

        After a fit that trained in worker processes (``ddp_spawn``, ``ddp_fork``), the records and the sampler's
        selections come back from rank 0 the first time this is read in the launching process.
        """
        handed_back = self._origin.take()
        if handed_back is not None:
            self._history = handed_back["history"]
            if self.sampler is not None and handed_back["sampler"] is not None:
                self.sampler.load_state_dict(handed_back["sampler"])
        return self._history

    def _hand_back(self, trainer: Trainer) -> None:
        """Rank 0 of a fit running outside the launching process writes what the launching process reads."""
        if trainer.is_global_zero and not self._origin.is_here():
            sampler = None if self.sampler is None else self.sampler.state_dict()
            self._origin.hand_back({"history": self._history, "sampler": sampler})

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    def _signal_extractor(self, pl_module: LightningModule, batch: Any) -> SignalExtractor:
        """The extractor for this module, built from the first batch seen (training or scoring)."""
        if self._extractor is None:
            self._extractor = SignalExtractor.for_module(pl_module, batch)
            if self._capturing():
                self._extractor.attach()  # the persistent hook for free signals on training batches
        return self._extractor

    def _capturing(self) -> bool:
        # With several training loaders the head also runs on the other loaders' batches, so a hooked forward
        # cannot be attributed to the coreset's examples: signals then come from scoring passes only.
        return self.store is not None and self.capture_training_signals and not self._batch_path

    # ------------------------------------------------------------------ weights for the user's loss
    @property
    def batch_weights(self) -> Optional[Tensor]:
        """Per-example weights of the batch being trained (float32, on the module's device), or None outside one.

        Also None when no selection in force carries weights (all ones): :func:`~grace_lightning.batch_weights`
        then returns a scalar 1.
        """
        self._weights_read = True
        if self._position is None or not self.sampler.batch_is_weighted(*self._position):
            return None
        return self._current_batch()[1]

    def _check_weights_were_read(self, position: LoaderPosition) -> None:
        """Warn once when a batch carried non-uniform weights that the training step never asked for."""
        read, self._weights_read = self._weights_read, False
        if read or self._warned_unread_weights or not self.sampler.batch_is_weighted(*position):
            return
        weights = self._current_batch()[1]
        if weights is None or bool((weights == weights[0]).all()):
            return  # uniform weights change nothing when the loss is a mean
        self._warned_unread_weights = True
        rank_zero_warn(
            f"CoresetCallback: strategy {self.strategy.name!r} gives per-example weights (this batch: "
            f"{float(weights.min()):.3g} to {float(weights.max()):.3g}), but training_step never read them, so the "
            "strategy is not trained as designed (InfoBatch without its rescaling is not InfoBatch). Weight the "
            "per-example loss: `(losses * grace_lightning.batch_weights(self)).mean()`."
        )

    @property
    def batch_indices(self) -> Optional[Tensor]:
        """Dataset indices of the batch being trained (int64), or None outside a training batch."""
        return None if self._position is None else self._current_batch()[0]

    def _current_batch(self) -> tuple[Tensor, Optional[Tensor]]:
        if self._batch is None:
            done, batch_size, drop_last = self._position
            indices, weights = self.sampler.batch_indices(done, batch_size, drop_last)
            weighted = self.sampler.batch_is_weighted(done, batch_size, drop_last)
            device = self._trainer.lightning_module.device
            self._batch = (indices, weights.to(device, non_blocking=True) if weighted else None)
        return self._batch

    # ------------------------------------------------------------------ one refresh
    def _refresh(
        self, trainer: Trainer, pl_module: LightningModule, start_batch: int, now_batch: int, score: bool
    ) -> None:
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, start_batch))
        epoch, progress = self._epoch_and_progress(trainer, start_batch)
        inputs = SelectionInput(
            pool_size=self.sampler.pool_size,
            budget=self.sampler.budget,
            store=self.store,
            generator=generator,
            epoch=epoch,
            step=start_batch,
            progress=progress,
            now_batch=now_batch,
            state=self._strategy_state,
            fidelity=self._fidelity,
            quality=self.quality,
        )
        scored, scoring_seconds = 0, 0.0
        if self.store is not None:
            self._flush_pending_signals()
            if score:
                to_score = self.strategy.to_score(inputs) if trainer.is_global_zero else None
                to_score = trainer.strategy.broadcast(to_score, src=0)
                if to_score is not None:
                    scoring_began = time.perf_counter()
                    scored = self._score(trainer, pl_module, to_score, now_batch)
                    scoring_seconds = time.perf_counter() - scoring_began
            self._check_signals_are_mostly_valid()
        probe_seconds = 0.0
        if score and (self.store is None or bool(self.store.measured.any())):
            if self.reference is not None and self.strategy.reference != "unused":
                inputs = replace(inputs, reference=self._score_reference(trainer, pl_module))
            request = self.strategy.to_probe(inputs) if trainer.is_global_zero else None
            request = trainer.strategy.broadcast(request, src=0)
            if request is not None:
                inputs = replace(inputs, probe=self._run_probes(trainer, pl_module, request))
                probe_seconds = inputs.probe.seconds  # max over ranks, like the refresh's own seconds
        selection: Optional[Selection] = None
        if trainer.is_global_zero:
            select_began = time.perf_counter()
            if self.store is not None and not bool(self.store.measured.any()):
                # An untrained model's signals carry no information: start from a uniform subset.
                selection = Selection(uniform_sample(inputs.pool_size, inputs.budget, generator))
            else:
                selection = self.strategy.select(inputs)
            self._check_selection(selection)
            selection.diagnostics.setdefault("strategy_seconds", time.perf_counter() - select_began)
        # Faiss and threaded code may differ across ranks: select once, broadcast the answer.
        selection = trainer.strategy.broadcast(selection, src=0)
        previous = self.sampler.selection if self._refreshes else None
        self.sampler.set_selection(selection.indices, selection.weights, start_batch=start_batch, now_batch=now_batch)
        self._refreshes += 1
        seconds = self._max_over_ranks(trainer, pl_module, time.perf_counter() - began)
        self._selection_seconds += seconds
        phases = {"scoring_seconds": scoring_seconds, "probe_seconds": probe_seconds, **selection.diagnostics}
        self._record(trainer, seconds, scored, previous, start_batch, phases)
        self._adapt_fidelity()

    def _check_signals_are_mostly_valid(self) -> None:
        """Refuse to select from a store whose measurements since the last refresh were mostly NaN/Inf."""
        invalid, offered = self.store.invalid_count, self.store.offered_count
        new_invalid, new_offered = invalid - self._signals_seen[0], offered - self._signals_seen[1]
        self._signals_seen = (invalid, offered)
        if new_offered and new_invalid > self.max_invalid_share * new_offered:
            raise RuntimeError(
                f"CoresetCallback: {new_invalid} of the {new_offered} per-example signals measured since the last "
                f"refresh were NaN or infinite (more than max_invalid_share={self.max_invalid_share}), so strategy "
                f"{self.strategy.name!r} would select from stale or missing data. The usual cause is a diverged "
                "model (a NaN loss: lower the learning rate, clip gradients) or a `coreset_signals` that returns "
                "NaN rows; check `training_step`'s loss."
            )

    def _adapt_fidelity(self) -> None:
        """Scale the next refreshes' scoring work so selection stays within ``max_selection_share``."""
        if self.max_selection_share is None or not self._history:
            return
        share = self._history[-1]["selection_share"]
        if share > 0:
            self._fidelity = min(1.0, max(0.05, self._fidelity * self.max_selection_share / share))

    def _epoch_and_progress(self, trainer: Trainer, start_batch: int) -> tuple[int, Optional[float]]:
        if trainer.train_dataloader is None:
            return 0, 0.0 if self.schedule.max_epochs else None
        position = self._loader_position()
        per_epoch = self.sampler.batches_per_epoch(position.batch_size, position.drop_last)
        epoch = start_batch // per_epoch
        if self.schedule.max_epochs is None:
            return epoch, None
        return epoch, min(1.0, start_batch / (per_epoch * self.schedule.max_epochs))

    def _check_selection(self, selection: Selection) -> None:
        if not isinstance(selection, Selection):
            raise TypeError(
                f"Strategy {self.strategy!r} returned {type(selection).__name__}; `select` must return a Selection."
            )
        if selection.indices is not None:
            if selection.indices.dtype != torch.int64:
                raise TypeError(f"Strategy {self.strategy!r} returned {selection.indices.dtype} indices; use int64.")
            if selection.indices.numel() == 0:
                raise ValueError(f"Strategy {self.strategy!r} selected no example.")

    @staticmethod
    def _max_over_ranks(trainer: Trainer, pl_module: LightningModule, seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64, device=pl_module.device)
        return float(trainer.strategy.all_gather(t).max())

    def _record(
        self,
        trainer: Trainer,
        seconds: float,
        scored: int,
        previous: Optional[Tensor],
        start_batch: int,
        phases: dict[str, float],
    ) -> None:
        current = self.sampler.selection
        overlap = float("nan")
        if previous is not None:
            overlap = float(torch.isin(current, previous).float().mean())
        wall = max(time.perf_counter() - self._fit_started_at, 1e-9)
        record = {
            "refresh": float(self._refreshes),
            "start_batch": float(start_batch),
            "selection_seconds": seconds,
            "selection_seconds_total": self._selection_seconds,
            "selection_share": self._selection_seconds / wall,
            "subset_size": float(current.numel()),
            "overlap": overlap,
            "scored": float(scored),
            "invalid_signals": float(self.store.invalid_count if self.store is not None else 0),
            "padding": float(self.sampler.padding),
            "fidelity": self._fidelity,
            **{key: float(value) for key, value in phases.items()},
        }
        self._history.append(record)
        metrics = {f"{self.log_prefix}{k}": v for k, v in record.items() if not math.isnan(v)}
        log_metrics(trainer, metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ signals
    def _score(self, trainer: Trainer, pl_module: LightningModule, to_score: Tensor, now_batch: int) -> int:
        """Forward-only pass over this rank's shard of ``to_score``; gather; write every rank's store."""
        shard = to_score[trainer.global_rank :: trainer.world_size]
        loader = self._scoring_loader(trainer, Subset(self.sampler.dataset, shard.tolist()))
        gathered = self._forward_signals(trainer, pl_module, loader, shard)
        self.store.update(gathered["index"], self._signals_from_rows(gathered), step=now_batch)
        return int(gathered["index"].numel())

    def _scoring_loader(self, trainer: Trainer, dataset: Dataset, like: Optional[DataLoader] = None) -> DataLoader:
        """A forward-only loader over ``dataset`` that batches like ``like`` (default: the training loader)."""
        like = like or self._train_loader(trainer)
        return DataLoader(
            dataset,
            batch_size=self.scoring_batch_size or like.batch_size or 1,
            shuffle=False,
            num_workers=self.scoring_num_workers,
            collate_fn=like.collate_fn,
        )

    def _reference_loader(self, trainer: Trainer) -> DataLoader:
        """The user's reference DataLoader, or one over the reference Dataset batched like the training loader."""
        if isinstance(self.reference, DataLoader):
            return self.reference
        return self._scoring_loader(trainer, self.reference)

    def _score_reference(self, trainer: Trainer, pl_module: LightningModule) -> ExampleSignals:
        """The reference set's signals under the live model, embeddings mapped into the store's space (unit rows)."""
        full = self._reference_loader(trainer)
        shard = torch.arange(len(full.dataset))[trainer.global_rank :: trainer.world_size]
        loader = self._scoring_loader(trainer, Subset(full.dataset, shard.tolist()), like=full)
        gathered = self._forward_signals(trainer, pl_module, loader, shard)
        order = torch.argsort(gathered["index"])
        signals = self._signals_from_rows({k: None if v is None else v[order] for k, v in gathered.items()})
        if signals.embedding is not None and self.store is not None:
            signals.embedding = F.normalize(self.store._project(signals.embedding.float()), dim=1)
        return signals

    def _run_probes(self, trainer: Trainer, pl_module: LightningModule, request: ProbeRequest) -> ProbeResults:
        """Run this rank's share of the probe tasks (task i on rank i % world), gather, return all results."""
        extractor = self._extractor
        if extractor is None:
            raise RuntimeError("CoresetCallback: probes need the signal capture, which has not seen a batch yet.")
        train_dl = self._train_loader(trainer)
        reference = None
        if self.reference is not None:
            reference = list(self._reference_loader(trainer))
        runner = ProbeRunner(
            pl_module,
            trainer.optimizers,
            extractor.example_losses,
            extractor.head,
            self.sampler.dataset,
            train_dl.collate_fn,
            lambda batch: trainer.strategy.batch_to_device(batch, pl_module.device),
            reference=reference,
            eval_batch_size=self.scoring_batch_size or train_dl.batch_size or 256,
            forward_context=trainer.precision_plugin.forward_context,
        )
        began = time.perf_counter()
        mine = list(range(trainer.global_rank, len(request.tasks), trainer.world_size))
        losses = runner.run(request, mine)
        width = max((t.num_losses for t in request.tasks), default=1)
        table = torch.full((len(mine), width), float("nan"), dtype=torch.float64)
        for row, values in enumerate(losses):
            table[row, : values.numel()] = values
        gathered = gather_rows(
            trainer.strategy,
            {"task": torch.tensor(mine, dtype=torch.int64), "losses": table, "steps": torch.tensor([runner.steps_taken])},
            pl_module.device,
        )
        by_task = dict(zip(gathered["task"].tolist(), gathered["losses"]))
        results = tuple(by_task[i][: request.tasks[i].num_losses].clone() for i in range(len(request.tasks)))
        seconds = self._max_over_ranks(trainer, pl_module, time.perf_counter() - began)
        return ProbeResults(results, seconds=seconds, optimizer_steps=int(gathered["steps"].sum()))

    def _forward_signals(
        self, trainer: Trainer, pl_module: LightningModule, loader: DataLoader, shard: Tensor
    ) -> dict[str, Optional[Tensor]]:
        """Forward-only signals of this rank's ``loader`` (whose items are ``shard``), gathered over ranks."""
        collected: list[ExampleSignals] = []
        modes = ModuleModes(pl_module)
        bar = ScoringProgressBar(trainer, total=len(loader))
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    collected.append(self._signal_extractor(pl_module, batch).score_batch(batch).detach_cpu())
                    bar.update(1)
        finally:
            bar.close()
            modes.restore()
        rows = self._signal_rows(shard, collected)
        return gather_rows(trainer.strategy, rows, pl_module.device)

    @staticmethod
    def _signal_rows(indices: Tensor, signals: list[ExampleSignals]) -> dict[str, Optional[Tensor]]:
        rows: dict[str, Optional[Tensor]] = {"index": indices.long()}
        for key in _SIGNAL_KEYS:
            parts = [getattr(s, key) for s in signals]
            rows[key] = torch.cat(parts) if parts and parts[0] is not None else None
        if rows["loss"] is None:  # an empty shard: zero rows, shapes agreed in the gather
            rows.update(loss=torch.zeros(0), grad_norm=torch.zeros(0), length=torch.zeros(0, dtype=torch.int64))
        return rows

    @staticmethod
    def _signals_from_rows(rows: dict[str, Optional[Tensor]]) -> ExampleSignals:
        return ExampleSignals(
            loss=rows["loss"],
            grad_norm=rows["grad_norm"],
            embedding=rows["embedding"],
            length=rows["length"].long(),
            error_norm=rows["error_norm"],
        )

    def _flush_pending_signals(self) -> None:
        """Gather the signals every rank captured on its training batches into every rank's store.

        Rows are applied in (step, rank) order, so the store does not depend on when the flush happens:
        at a refresh or when a checkpoint is written (``state_dict`` runs on every rank).
        """
        if self.store is None or self._trainer is None:
            return
        trainer = self._trainer
        device = trainer.lightning_module.device
        pending, self._pending = self._pending, []
        rows = self._signal_rows(
            torch.cat([p[0] for p in pending]) if pending else torch.zeros(0, dtype=torch.int64),
            [p[2] for p in pending],
        )
        rows["step"] = (
            torch.cat([torch.full((p[0].numel(),), p[1], dtype=torch.int64) for p in pending])
            if pending
            else torch.zeros(0, dtype=torch.int64)
        )
        if trainer.world_size > 1:
            rows = gather_rows(trainer.strategy, rows, device)
        if rows["index"].numel() == 0:
            return
        order = torch.sort(rows["step"], stable=True).indices
        signals = self._signals_from_rows({k: None if v is None else v[order] for k, v in rows.items()})
        self.store.update(rows["index"][order], signals, step=rows["step"][order])
