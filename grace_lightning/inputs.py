"""Checks of what a user hands the callback (quality scores, a reference set) and of the Trainer it runs in.

Each fails at construction or at ``setup`` with a message that names the parameter and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from grace_lightning.sampler import CoresetSampler, resolve_budget
from grace_lightning.schedule import RefreshSchedule
from grace_lightning.strategies import Strategy
from grace_lightning.validation import non_negative_int, positive_int_or_none

_OWNER = "CoresetCallback"

__all__ = [
    "check_budget_source",
    "check_embeddings",
    "check_fixed_embedding_inputs",
    "check_one_callback_per_sampler",
    "check_quality",
    "check_reference_format",
    "check_reference_type",
    "check_trainer",
    "refresh_schedule",
    "warn_unused_inputs",
]


def check_quality(quality: Any, pool_size: int) -> Optional[Tensor]:
    """``quality`` as a finite ``(pool_size,)`` float32 CPU tensor, or None."""
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


def check_embeddings(embeddings: Any, rows: int, name: str, what: str) -> Tensor:
    """``embeddings`` as a finite ``(rows, D)`` float32 CPU tensor with no all-zero row (rows are normalised)."""
    try:
        e = torch.as_tensor(embeddings, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"CoresetCallback: `{name}` must be a ({rows}, D) array of numbers: {err}") from err
    if e.ndim != 2 or e.shape[0] != rows or e.shape[1] < 1:
        raise ValueError(
            f"CoresetCallback: `{name}` must have one row per {what}, shape ({rows}, D), got {tuple(e.shape)}."
        )
    if not bool(torch.isfinite(e).all()):
        raise ValueError(f"CoresetCallback: `{name}` contains NaN or infinite values; give finite embeddings.")
    zero = (e == 0).all(dim=1).nonzero().squeeze(1)
    if zero.numel():
        raise ValueError(
            f"CoresetCallback: `{name}` has {zero.numel()} all-zero rows (first: {int(zero[0])}); embeddings are "
            "compared by direction, so every row needs one."
        )
    return e


def check_fixed_embedding_inputs(strategy: Strategy, embeddings: Any, reference_embeddings: Any, has_reference: bool) -> None:
    """At construction: ``reference_embeddings`` only beside ``embeddings`` and a reference set, and required where
    the strategy compares the two (the live model's reference embeddings live in another space than the user's)."""
    if reference_embeddings is not None and embeddings is None:
        raise ValueError(
            "CoresetCallback: `reference_embeddings` needs `embeddings` for the pool from the same encoder; pass both, "
            "or neither to use the live model's embeddings."
        )
    if reference_embeddings is not None and not has_reference:
        raise ValueError(
            "CoresetCallback: `reference_embeddings` are the reference set's embeddings, and there is no `reference`; "
            "pass CoresetCallback(..., reference=dataset, reference_embeddings=...)."
        )
    strategy.check_embedding_source(fixed=embeddings is not None)
    if embeddings is None:
        return
    if "embedding" not in strategy.needs:
        rank_zero_warn(
            f"CoresetCallback: strategy {strategy.name!r} reads no embeddings, so `embeddings` is ignored "
            "(grace, grip, group_mates and gip read them). Drop `embeddings` or pick a strategy that uses them."
        )
    elif has_reference and strategy.reads_reference_embedding and reference_embeddings is None:
        raise ValueError(
            f"CoresetCallback: strategy {strategy.name!r} compares the pool's embeddings with the reference set's, and "
            "the pool's come from your encoder (`embeddings`): pass the reference set's from the same encoder as "
            "`reference_embeddings` (one row per reference example, same width)."
        )


def _item_layout(item: Any) -> str:
    """The shape of one dataset item's structure: a tuple's length, a mapping's keys."""
    if isinstance(item, Mapping):
        return f"a mapping with keys {sorted(map(str, item))}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} items"
    return f"a {type(item).__name__}"


def dataset_of(data: Union[Dataset, DataLoader]) -> Dataset:
    """The dataset behind a DataLoader, or the dataset itself."""
    return data.dataset if isinstance(data, DataLoader) else data


def check_reference_format(reference: Union[Dataset, DataLoader], train_set: Dataset) -> None:
    """The reference set's items must be laid out like the training set's (labels included): fail at setup."""
    reference_set = dataset_of(reference)
    if len(reference_set) == 0:
        raise ValueError("CoresetCallback: `reference` is empty; give it 64-256 held-out examples of the target task.")
    mine, theirs = _item_layout(reference_set[0]), _item_layout(train_set[0])
    if mine != theirs:
        raise ValueError(
            f"CoresetCallback: the reference set's items are {mine}, the training set's are {theirs}. The reference "
            "set is scored and probed like training batches, so its items need the training format, labels included."
        )


def warn_unused_inputs(strategy: Strategy, has_reference: bool, has_quality: bool) -> None:
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


def check_trainer(trainer: Trainer, schedule: RefreshSchedule, every_n_steps: Optional[int]) -> RefreshSchedule:
    """Refuse Trainer settings that fight the budget; return ``schedule`` sized to the Trainer.

    ``every_n_steps`` counts optimizer steps, as Lightning's own ``every_n_train_steps``: k of them span
    ``k * accumulate_grad_batches`` batches.
    """
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
    if schedule.anneal_epochs and max_epochs is None:
        raise ValueError("CoresetCallback: `anneal_epochs` needs Trainer(max_epochs=...) to know when the last epochs are.")
    if max_epochs is not None and schedule.warmup_epochs + schedule.anneal_epochs > max_epochs:
        raise ValueError(
            f"CoresetCallback: warmup_epochs={schedule.warmup_epochs} + anneal_epochs={schedule.anneal_epochs} "
            f"exceed Trainer(max_epochs={max_epochs}); shorten them."
        )
    every_n_batches = None if every_n_steps is None else every_n_steps * trainer.accumulate_grad_batches
    return RefreshSchedule(**{**schedule.__dict__, "max_epochs": max_epochs, "every_n_steps": every_n_batches})


def check_one_callback_per_sampler(callbacks: list, mine: Any) -> None:
    """Two callbacks driving one sampler would both refresh it and the last would win: refuse at setup."""
    others = [c for c in callbacks if c is not mine and getattr(c, "sampler", None) is mine.sampler]
    if others:
        raise ValueError(
            "CoresetCallback: two CoresetCallbacks drive the same CoresetSampler, so both would refresh it and "
            "the last one would win. Keep one CoresetCallback per sampler."
        )


def check_budget_source(sampler: Any, fraction: Any, size: Any) -> None:
    """The budget comes from the sampler, or (one-line adoption) from ``fraction``/``size``: never from both."""
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
        resolve_budget(fraction, size, None, owner=_OWNER)


def check_reference_type(reference: Any) -> Optional[Union[Dataset, DataLoader]]:
    if reference is not None and not isinstance(reference, (Dataset, DataLoader)):
        raise TypeError(
            f"CoresetCallback: `reference` must be a torch Dataset or DataLoader, got {type(reference).__name__}."
        )
    return reference


def refresh_schedule(every_n_epochs: Any, every_n_steps: Any, warmup_epochs: Any, anneal_epochs: Any) -> RefreshSchedule:
    """The callback's refresh calendar from its arguments (``every_n_steps`` still in optimizer steps)."""
    every_n_epochs = positive_int_or_none(_OWNER, "refresh_every_n_epochs", every_n_epochs)
    every_n_steps = positive_int_or_none(_OWNER, "refresh_every_n_steps", every_n_steps)
    if every_n_epochs is not None and every_n_steps is not None:
        raise ValueError(
            "CoresetCallback: set only one of `refresh_every_n_epochs` and `refresh_every_n_steps` "
            "(pass refresh_every_n_epochs=None to refresh by steps)."
        )
    return RefreshSchedule(
        every_n_epochs=every_n_epochs,
        every_n_steps=every_n_steps,
        warmup_epochs=non_negative_int(_OWNER, "warmup_epochs", warmup_epochs),
        anneal_epochs=non_negative_int(_OWNER, "anneal_epochs", anneal_epochs),
    )


def overlap_setting(overlap: Any, strategy: Any, on_accelerator: bool = False) -> bool:
    """The callback's ``overlap`` argument as a bool.

    ``"auto"``: on where the model trains on an accelerator and the strategy's ``overlap_by_default`` says its
    selection is costly. Training on the CPU, the thread would compete with training for the same cores (and the
    GIL): measured on 2 cores, overlapped GRACE took 1.4-1.6x the synchronous run's wall clock.
    """
    if overlap == "auto":
        return bool(strategy.overlap_by_default) and on_accelerator
    if isinstance(overlap, bool):
        return bool(overlap)
    raise ValueError(
        f"CoresetCallback: `overlap` must be True, False or 'auto', got {overlap!r} (True: select in a background "
        "thread while training goes on; False: training waits for each selection)."
    )
