"""The callback that rebuilds the coreset while training runs: the schedule of measure, probe, select, apply.

What it delegates: finding and adopting the training loader (:mod:`grace_lightning.loaders`), measuring signals
and running probes (:mod:`grace_lightning.scoring`), the strategy's math (:mod:`grace_lightning.strategies`),
checks of the user's inputs (:mod:`grace_lightning.inputs`), RNG streams for exact resume
(:mod:`grace_lightning.rng`), handing results back from worker processes (:mod:`grace_lightning.handback`).
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from grace_lightning.budget import OverheadBudget
from grace_lightning.distributed import max_over_ranks
from grace_lightning.handback import Origin
from grace_lightning.inputs import (
    check_budget_source,
    check_embeddings,
    check_fixed_embedding_inputs,
    check_one_callback_per_sampler,
    check_reference_type,
    check_quality,
    check_reference_format,
    check_trainer,
    dataset_of,
    overlap_setting,
    refresh_schedule,
    warn_unused_inputs,
)
from grace_lightning.knn import set_faiss_threads
from grace_lightning.loaders import TrainingLoader, adopt_sampler, explain_resume_warning, wrap_train_source
from grace_lightning.overlap import PendingSelection, SelectionWorker
from grace_lightning.rng import ResumeStreams
from grace_lightning.sampler import CoresetSampler
from grace_lightning.schedule import Action
from grace_lightning.scoring import Measurements
from grace_lightning.seeding import seeded_generator
from grace_lightning.signals import SignalStore
from grace_lightning.strategies import Selection, SelectionInput, Strategy, build_strategy
from grace_lightning.strategies.base import check_selection
from grace_lightning.telemetry import RefreshLog
from grace_lightning.validation import integer, non_negative_int, positive_int_or_none, real
from grace_lightning.weights import TrainingBatchView

__all__ = ["CoresetCallback"]

_OWNER = "CoresetCallback"


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
    propagation, graph update and selection). An overlapped refresh (``overlap``) is logged at its hand-over,
    with ``submitted_batch``, ``exposed_seconds`` (training waited for the thread) and ``hidden_seconds`` (it ran
    beside training, not counted in ``selection_seconds``). With the free capture on, ``capture_seconds`` is what
    turning the trained batches' outputs into signals took on the training thread since the previous refresh (on a
    GPU also ``capture_gpu_seconds``, its kernels' device time); training pays it step by step, so it is not in
    ``selection_seconds`` either. The same records are kept in :attr:`history`.

    Under ``Trainer(fast_dev_run=...)`` the callback stands aside (no refresh; a loader it would adopt is left as
    it is; an explicit sampler streams the whole pool) and says so.

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
        scoring_batch_size: batch size of the scoring pass and of probe evaluations (default: twice the training
            batch size; a forward-only pass holds no activations for a backward pass).
        scoring_num_workers: workers of the scoring pass's own DataLoader.
        capture_training_signals: measure signals on training batches for free (only when the strategy
            reads signals).
        strategy_kwargs: keyword arguments for a strategy given by name.
        max_embedding_dim: the signal store keeps embeddings with at most this many dimensions (a fixed
            random projection above it; ``None`` keeps them as the model gives them).
        signal_memmap_dir: keep the signal store in memory-mapped files in this directory (pools that do
            not fit in RAM); ``None`` keeps it in RAM.
        max_selection_share: overhead budget, a share of the fit's wall clock in ``(0, 1)``, e.g. ``0.05``. A
            scheduled refresh runs only if the selection seconds so far plus the last refresh's cost stay within
            it (else it is skipped, counted in ``skipped_refreshes``, and the subset trains on), and refreshes ask
            the strategy for proportionally less scoring work (``fidelity``). The decisions follow measured time,
            so two runs of one seed can refresh at different steps; ``None`` (the default) keeps a run a pure
            function of its seed.
        overlap: run the strategy's selection (graph, clustering, greedy) in a background thread while training goes
            on, and put it into force at the schedule's next decision point (the next refresh), so a subset trains
            one refresh period after the signals it was chosen from. Measuring and probing stay on the training
            thread (they need the model); only the seconds training waits for the thread count as selection time
            (``exposed_seconds``; the rest is logged as ``hidden_seconds``). Deterministic like the synchronous
            mode: the hand-over step is fixed by the schedule, not by when the thread finishes. A refresh whose next
            decision point is not a refresh (the anneal, or the end of training) runs synchronously; a checkpoint
            written while the thread runs waits for it.
            ``"auto"`` (the default): on where the model trains on an accelerator (a GPU) and the strategy's
            selection is costly (``grace``, ``grip``, ``group_mates``, ``gip``); off for the cheap strategies, whose
            subsets then follow their signals at once, and off when training runs on the CPU, where the thread
            would take cores (and the GIL) from training: measured on 2 cores, an overlapped GRACE run took
            1.4-1.6x the wall clock of a synchronous one.
        reference: a reference set (a ``Dataset`` of items in the training format, or a ``DataLoader`` over
            one), for strategies that measure influence or build queries on it (``group_mates``, ``gip``).
            It is scored with the live model at every refresh (forward only, sharded over ranks); probes
            measure their loss on it. Typically 64-256 held-out examples of the target task.
        quality: ``(N,)`` user quality scores of the pool examples (any real numbers; higher is better), for
            strategies that read them (``grip`` budgets, ``gip`` queries).
        embeddings: ``(N, D)`` embeddings of the pool examples from an encoder of your own (a sentence encoder,
            a pretrained vision model), used instead of the live model's head input by the strategies that read
            embeddings (``grace``, ``grip``, ``group_mates``, ``gip``), as the GRIP, Group-MATES and GIP papers
            embed data with a separate model. They are never re-measured, so a strategy that reads nothing else
            (``gip``) runs no scoring pass. Use them when the model's own embeddings do not separate what matters:
            early in pretraining, a small model's mean-pooled hidden states barely tell domains apart (see the
            README's lm-mixture findings). Rows are compared by direction (stored as projected unit rows, fp16).
        reference_embeddings: ``(m, D)`` embeddings of the ``reference`` set's examples from the same encoder;
            required with ``embeddings`` when the strategy compares the pool with the reference set (``gip``).
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
            malformed ``quality``, ``embeddings`` or ``reference_embeddings`` (shape, NaN, zero rows, one without
            the other); in ``setup``, for Trainer settings that fight the budget
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
        overlap: Union[bool, str] = "auto",
        max_invalid_share: float = 0.5,
        reference: Optional[Union[Dataset, DataLoader]] = None,
        quality: Optional[Any] = None,
        embeddings: Optional[Any] = None,
        reference_embeddings: Optional[Any] = None,
        log_prefix: str = "coreset/",
        restore_rng: bool = True,
    ) -> None:
        check_budget_source(sampler, fraction, size)
        self._budget_args = {"fraction": fraction, "size": size}
        self.schedule = refresh_schedule(refresh_every_n_epochs, refresh_every_n_steps, warmup_epochs, anneal_epochs)
        self._every_n_steps = self.schedule.every_n_steps  # optimizer steps; `setup` turns them into batches
        self.seed = integer(_OWNER, "seed", seed)
        self.strategy = build_strategy(strategy, **(strategy_kwargs or {}))
        self.reference = check_reference_type(reference)
        self._quality_input = quality
        self.quality: Optional[Tensor] = None
        self.strategy.check_inputs(reference is not None, quality is not None)
        warn_unused_inputs(self.strategy, reference is not None, quality is not None)
        check_fixed_embedding_inputs(self.strategy, embeddings, reference_embeddings, reference is not None)
        self._embeddings_input, self._reference_embeddings_input = embeddings, reference_embeddings
        self._reference_embedding: Optional[Tensor] = None  # the reference set's fixed embeddings, in the store's space
        self.scoring_batch_size = positive_int_or_none(_OWNER, "scoring_batch_size", scoring_batch_size)
        self.scoring_num_workers = non_negative_int(_OWNER, "scoring_num_workers", scoring_num_workers)
        self.capture_training_signals = bool(capture_training_signals)
        self.max_selection_share = None if max_selection_share is None else real(
            _OWNER, "max_selection_share", max_selection_share, low=0, high=1, low_open=True, high_open=True,
            hint=" (e.g. 0.05 for 5% of wall clock) or None",
        )
        self._overlap_arg = overlap
        self.overlap = overlap_setting(overlap, self.strategy)  # validated now; "auto" is settled at `setup`
        self.max_invalid_share = real(
            _OWNER, "max_invalid_share", max_invalid_share, low=0, high=1, high_open=True, hint=" (e.g. 0.5)"
        )
        self.log_prefix = log_prefix
        self._rng = ResumeStreams(bool(restore_rng))
        self._store_args = {"max_embedding_dim": max_embedding_dim, "seed": seed, "memmap_dir": signal_memmap_dir}
        self.sampler: Optional[CoresetSampler] = None
        self.store: Optional[SignalStore] = None
        self._measure = Measurements(None, self.scoring_batch_size, self.scoring_num_workers)
        self._loader: Optional[TrainingLoader] = None
        self._strategy_state: Any = None
        self._fidelity = 1.0
        self._budget = None if self.max_selection_share is None else OverheadBudget(self.max_selection_share)
        self._worker = SelectionWorker()
        self._pending: Optional[PendingSelection] = None  # an overlapped selection awaiting its hand-over
        self._log = RefreshLog(log_prefix)
        self._origin = Origin()  # under ddp_spawn/ddp_fork, rank 0 hands `history` back to this process
        self._trainer: Optional[Trainer] = None
        self._restored = self._fit_started = self._standing_aside = False
        self._loaded_state: Optional[dict[str, Any]] = None  # a checkpoint read before the sampler was known
        self._refreshes = 0
        self._batch: Optional[TrainingBatchView] = None  # indices and weights of the batch being trained
        self._state_key = self._generate_state_key(strategy=self.strategy.name)
        if sampler is not None:
            self._attach_sampler(sampler)

    @property
    def restore_rng(self) -> bool:
        return self._rng.enabled

    def _attach_sampler(self, sampler: CoresetSampler) -> None:
        """Take ``sampler`` as the coreset's and size everything that depends on the pool to it."""
        self.sampler = sampler
        self.quality = check_quality(self._quality_input, sampler.pool_size)
        self._loader = TrainingLoader(sampler)
        self._batch = TrainingBatchView(sampler, self.strategy.name)
        if self.strategy.needs:
            # Only what the strategy reads: InfoBatch's losses need no copy of every trained example's embedding.
            self.store = self._measure.store = SignalStore(
                sampler.pool_size, signals=self.strategy.needs, **self._store_args
            )
            if self._embeddings_input is not None and "embedding" in self.strategy.needs:
                self._fix_embeddings(sampler.pool_size)

    def _fix_embeddings(self, pool_size: int) -> None:
        """Put the user's embeddings into the store (and the reference set's beside them), checked against the pool."""
        pool = check_embeddings(self._embeddings_input, pool_size, "embeddings", "pool example")
        self.store.fix_embedding(pool)
        if self._reference_embeddings_input is None:
            return
        reference = check_embeddings(
            self._reference_embeddings_input, len(dataset_of(self.reference)), "reference_embeddings", "reference example"
        )
        if reference.shape[1] != pool.shape[1]:
            raise ValueError(
                f"CoresetCallback: `reference_embeddings` have width {reference.shape[1]} and `embeddings` "
                f"{pool.shape[1]}; embed both with the same encoder."
            )
        self._reference_embedding = self.store.to_store_space(reference)

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it in every hook call: build it once

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._fit_started = False
        self._standing_aside = bool(trainer.fast_dev_run)
        if self._standing_aside:
            rank_zero_info(
                f"CoresetCallback: Trainer(fast_dev_run={trainer.fast_dev_run!r}) runs a few batches to check the "
                "code, so the coreset stands aside: no refresh, no sampler put into the loader (a CoresetSampler "
                "already there streams the whole pool)."
            )
            if self.sampler is not None:
                self.sampler.set_selection(None, start_batch=0)
            return
        self.schedule = check_trainer(trainer, self.schedule, self._every_n_steps)
        self.overlap = overlap_setting(self._overlap_arg, self.strategy, trainer.strategy.root_device.type != "cpu")
        if trainer.world_size > 1:
            # faiss ignores Lightning's per-rank torch threads; without this the ranks oversubscribe the cores.
            set_faiss_threads(trainer.world_size)
        # Every training loader Lightning requests passes through `_adopt_loaders`: it finds the CoresetSampler,
        # or puts one in, before Lightning measures the epoch and creates the first iterator.
        wrap_train_source(trainer, self._adopt_loaders)
        if self.sampler is not None:
            self._bind(trainer)

    def _bind(self, trainer: Trainer) -> None:
        """The set-up that needs the sampler: rank, restored state, the strategy's memory."""
        check_one_callback_per_sampler(trainer.callbacks, self)
        if self.reference is not None:
            check_reference_format(self.reference, self.sampler.dataset)
        self.sampler.bind(trainer.global_rank, trainer.world_size, lambda: self._loader.position(self._trainer))
        # Selection runs on rank 0 only, so only rank 0 keeps the strategy's memory (a graph can be large).
        self._strategy_state = self.strategy.create_state(self.sampler.pool_size) if trainer.is_global_zero else None
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self.load_state_dict(state)

    def _adopt_loaders(self, iterables: Any) -> Any:
        iterables, sampler = adopt_sampler(iterables, self.sampler, self._budget_args, self.seed)
        if self.sampler is None:
            self._attach_sampler(sampler)
            self._bind(self._trainer)
            if self._fit_started:
                self._start(self._trainer, self._trainer.lightning_module)
        elif sampler is not self.sampler:
            raise ValueError(
                "CoresetCallback: the training DataLoader changed its pool after the coreset was built; a "
                "CoresetCallback keeps one pool for the whole fit."
            )
        return iterables

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None or self._standing_aside:
            return {}  # no coreset was built in this fit: nothing to resume
        if self._pending is not None:
            self._worker.finish(self._pending)  # the strategy's memory and the store are the thread's until then
        if self._trainer is not None:
            self._measure.flush(self._trainer)
        return {
            "sampler": self.sampler.state_dict(),
            "rng": self._rng.state_dict(self._trainer),  # a collective: state_dict runs on every rank
            "store": None if self.store is None else self.store.state_dict(),
            "refreshes": self._refreshes,
            "selection_seconds": self._log.selection_seconds,
            "fidelity": self._fidelity,
            "budget": None if self._budget is None else self._budget.state_dict(),
            "signals_seen": list(self._measure.signals_seen),
            "strategy_state": None if self._strategy_state is None else self._strategy_state.state_dict(),
            "pending": None if self._pending is None else self._pending.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.sampler is None:  # one-line adoption: the sampler is built when Lightning requests the loader
            self._loaded_state, self._restored = state_dict, True
            return
        self.sampler.load_state_dict(state_dict["sampler"])
        if self.store is not None and state_dict["store"] is not None:
            self.store.load_state_dict(state_dict["store"])
        self._refreshes = int(state_dict["refreshes"])
        self._log.selection_seconds = float(state_dict["selection_seconds"])
        self._fidelity = float(state_dict["fidelity"])
        if self._budget is not None and state_dict.get("budget") is not None:
            self._budget.load_state_dict(state_dict["budget"])
        self._measure.signals_seen = tuple(int(v) for v in state_dict.get("signals_seen", (0, 0)))
        if self._strategy_state is not None and state_dict["strategy_state"] is not None:
            self._strategy_state.load_state_dict(state_dict["strategy_state"])
        pending = state_dict.get("pending")
        self._pending = None if pending is None else PendingSelection.from_state_dict(pending)
        rank, world = (self._trainer.global_rank, self._trainer.world_size) if self._trainer is not None else (0, 1)
        self._rng.load(state_dict.get("rng"), rank, world)
        self._restored = True

    # ------------------------------------------------------------------ the schedule
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log.start_fit()
        if self._budget is not None:
            self._budget.start()
        self._fit_started = True
        if self.sampler is not None and not self._standing_aside:  # else the first loader request builds it
            self._start(trainer, pl_module)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The first selection, before the first training iterator exists (with workers, later changes miss batches)."""
        if self._restored:
            return  # the checkpoint's selections are already in the sampler
        if self.schedule.initial_action() is Action.FULL_POOL:
            self.sampler.set_selection(None, start_batch=0)
            return
        self._refresh(trainer, pl_module, start_batch=0, now_batch=0, score=False)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._standing_aside:
            return
        explain_resume_warning(trainer)
        position = self._loader.position(trainer)  # raises with the fix when the sampler is not in the loader
        expected = self.sampler.batches_per_epoch(position.batch_size, position.drop_last)
        if trainer.num_training_batches != expected:
            raise ValueError(
                f"CoresetCallback: Lightning plans {trainer.num_training_batches} batches per epoch but the coreset "
                f"budget gives {expected} (len(sampler)={len(self.sampler)}, batch_size={position.batch_size}). "
                "Leave Trainer(limit_train_batches=1.0) and do not wrap the training DataLoader."
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._standing_aside:
            return
        self._rng.restore_pending()  # a mid-epoch checkpoint's streams: after the resumed run's new iterator
        self._batch.enter(self._loader.position(trainer), pl_module.device)
        if batch_idx == 0 or not self._loader.checked_iterator:  # a wiring error shows on the first batch
            self._loader.check_batch(batch, self.batch_indices)
        if self._capturing():
            self._measure.arm(pl_module, batch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._standing_aside:
            return
        position = self._loader.position(trainer)
        if self._capturing():
            self._measure.keep_training_batch(self.batch_indices, position.batches_done, batch, pl_module.device)
        self._batch.warn_if_weights_unread()
        self._batch.leave()
        action = self.schedule.decide(position.batches_done, trainer.current_epoch, bool(trainer.is_last_batch))
        if action is None:
            return
        # At an epoch end the next iterator does not exist yet; mid-epoch, workers have drawn `lag` batches ahead.
        lag = 0 if trainer.is_last_batch else self._loader.prefetch_lag(trainer)
        start = position.batches_done + lag
        if action is Action.SELECT:
            self._hand_over(trainer, start, position.batches_done)
        else:
            self._drop_pending()  # only a schedule changed on resume leaves one here: its subset would not train
        if action is Action.FULL_POOL:
            self.sampler.set_selection(None, start_batch=start, now_batch=position.batches_done)
        elif self._within_budget(trainer):
            self._refresh(trainer, pl_module, start_batch=start, now_batch=position.batches_done, score=True)
        else:
            self._measure.flush(trainer)  # the subset trains on; keep the free signals, not a growing buffer

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_pending()
        if not self._standing_aside:
            self._measure.flush(trainer)  # leave a complete store for whoever inspects it after fit
        summary = self._log.fit_summary() if trainer.is_global_zero else None
        if summary is not None:
            rank_zero_info(summary)  # what selection cost, in the terms a comparison with random needs

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_fit(trainer)
        if not self._origin.is_here() and trainer.world_size > 1:
            # Ranks in worker processes leave together once rank 0 has written the hand-back. A rank that exits
            # first, while its peer is still busy, can reach interpreter shutdown before torch's gloo threads
            # have released their last collective; releasing it then needs the GIL, which shutdown refuses, and
            # the process aborts ("terminate called without an active exception", seen under ddp_spawn).
            trainer.strategy.barrier("grace_lightning.fit_end")
            # The DDP wrapper (unwrapped by the strategy's teardown, before this hook) holds the reducer and its last
            # collectives in reference cycles; left to the collection at interpreter shutdown, their release on a
            # gloo thread meets the same refusal. Collect them now, while the interpreter still serves the GIL.
            gc.collect()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._end_fit(trainer)  # no barrier: a failed rank may never reach it

    def _end_fit(self, trainer: Trainer) -> None:
        self._drop_pending()
        self._worker.close()
        self._hand_back(trainer)
        if not self._standing_aside and trainer.train_dataloader is not None and trainer.num_training_batches == 0:
            # Lightning skips a 0-batch epoch with a mere warning; say why there was nothing to train.
            position = self._loader.position(trainer)
            self.sampler.check_batch_size(position.batch_size, position.drop_last)
        self._measure.detach()

    def _drop_pending(self) -> None:
        """A selection still pending that nobody will train on (the fit ends): wait for its thread, drop it.

        Its seconds were spent all the same, so they count in the fit's selection total.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._worker.finish(pending)
            except Exception:  # noqa: BLE001 - the fit is over (or failing for its own reason); its result is unused
                pass
            self._log.selection_seconds += pending.prepared_seconds + pending.waited_seconds

    def _capturing(self) -> bool:
        # With several training loaders the head also runs on the other loaders' batches, so a hooked forward
        # cannot be attributed to the coreset's examples: signals then come from scoring passes only. A strategy
        # whose every signal was given up front (gip on fixed embeddings) needs nothing from the training batches.
        return (
            self.store is not None
            and self.capture_training_signals
            and not self._loader.path
            and bool(self.strategy.model_needs(self.store))
        )

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per refresh (the logged telemetry, without the prefix), oldest first.

        After a fit that trained in worker processes (``ddp_spawn``, ``ddp_fork``), the records and the sampler's
        selections come back from rank 0 the first time this is read in the launching process.
        """
        handed_back = self._origin.take()
        if handed_back is not None:
            self._log.records = handed_back["history"]
            if self.sampler is not None and handed_back["sampler"] is not None:
                self.sampler.load_state_dict(handed_back["sampler"])
        return self._log.records

    def _hand_back(self, trainer: Trainer) -> None:
        """Rank 0 of a fit running outside the launching process writes what the launching process reads."""
        if trainer.is_global_zero and not self._origin.is_here():
            sampler = None if self.sampler is None else self.sampler.state_dict()
            self._origin.hand_back({"history": self._log.records, "sampler": sampler})

    # ------------------------------------------------------------------ the batch being trained
    @property
    def batch_weights(self) -> Optional[Tensor]:
        """Per-example weights of the batch being trained (float32, on the module's device), or None outside one.

        Also None when no selection in force carries weights (all ones): :func:`~grace_lightning.batch_weights`
        then returns a scalar 1.
        """
        return None if self._batch is None else self._batch.weights

    @property
    def batch_indices(self) -> Optional[Tensor]:
        """Dataset indices of the batch being trained (int64), or None outside a training batch."""
        return None if self._batch is None else self._batch.indices

    # ------------------------------------------------------------------ one refresh: measure, probe, select, apply
    def _refresh(
        self, trainer: Trainer, pl_module: LightningModule, start_batch: int, now_batch: int, score: bool
    ) -> None:
        began = time.perf_counter()
        inputs, cold, numbers, phases = self._measure_and_probe(trainer, pl_module, start_batch, now_batch, score)
        if score and not cold and self._overlaps_from(trainer, now_batch):
            prepared = max_over_ranks(trainer.strategy, time.perf_counter() - began, pl_module.device)
            self._pending = PendingSelection({**numbers, **phases, "submitted_batch": start_batch}, prepared)
            if trainer.is_global_zero:
                self._worker.submit(self._pending, lambda: self._select(inputs, cold=False))
            return
        selection = self._select(inputs, cold) if trainer.is_global_zero else None
        # Faiss and threaded code may differ across ranks: select once, broadcast the answer.
        selection = trainer.strategy.broadcast(selection, src=0)
        seconds = max_over_ranks(trainer.strategy, time.perf_counter() - began, pl_module.device)
        self._apply(trainer, selection, start_batch, now_batch, seconds, numbers, phases)

    def _measure_and_probe(
        self, trainer: Trainer, pl_module: LightningModule, start_batch: int, now_batch: int, score: bool
    ) -> tuple[SelectionInput, bool, dict[str, float], dict[str, float]]:
        """The refresh's work on the training thread (it needs the model): scoring pass, reference, probes."""
        inputs = self._selection_input(trainer, start_batch, now_batch)
        scored, scoring_seconds, probe_seconds = 0, 0.0, 0.0
        capture: dict[str, float] = {}
        if self.store is not None:  # measure
            self._measure.flush(trainer)
            if self._capturing():
                # Not selection seconds (training pays them step by step), but part of what selection costs.
                taken = self._measure.take_capture_seconds()
                capture = {k: max_over_ranks(trainer.strategy, v, pl_module.device) for k, v in taken.items()}
            to_score = self.strategy.to_score(inputs) if score and trainer.is_global_zero else None
            to_score = trainer.strategy.broadcast(to_score, src=0) if score else None
            if to_score is not None:
                scoring_began = time.perf_counter()
                scored = self._measure.score(trainer, pl_module, to_score, now_batch, self._loader.loader(trainer))
                scoring_seconds = time.perf_counter() - scoring_began
            self._measure.check_mostly_valid(self.max_invalid_share, self.strategy.name)
        # A strategy that reads signals starts from a uniform subset even when all of them were given up front
        # (gip on the user's embeddings): before training, the reference set cannot be scored like training data.
        cold = self.strategy.is_cold(inputs) or (not score and bool(self.strategy.needs))
        if score and not cold:  # probe
            reference = None if self.reference is None else self._reference(trainer)
            if reference is not None and self.strategy.reference != "unused":
                signals = self._measure.score_reference(trainer, pl_module, reference)
                if self._reference_embedding is not None:  # the user's encoder, like the pool's fixed embeddings
                    signals.embedding = self._reference_embedding.clone()
                inputs = replace(inputs, reference=signals)
            request = self.strategy.to_probe(inputs) if trainer.is_global_zero else None
            request = trainer.strategy.broadcast(request, src=0)
            if request is not None:
                probe = self._measure.probe(trainer, pl_module, request, self._loader.loader(trainer), reference)
                inputs, probe_seconds = replace(inputs, probe=probe), probe.seconds  # max over ranks
        phases = {"scoring_seconds": scoring_seconds, "probe_seconds": probe_seconds, **capture}
        return inputs, cold, {"scored": scored}, phases

    def _select(self, inputs: SelectionInput, cold: bool) -> Selection:
        """The strategy's math (rank 0 only; on the worker thread when overlapped)."""
        began = time.perf_counter()
        selection = check_selection(self.strategy, self.strategy.cold_start(inputs) if cold else self.strategy.select(inputs))
        selection.diagnostics.setdefault("strategy_seconds", time.perf_counter() - began)
        return selection

    def _apply(
        self,
        trainer: Trainer,
        selection: Selection,
        start_batch: int,
        now_batch: int,
        seconds: float,
        numbers: dict[str, float],
        phases: dict[str, float],
    ) -> None:
        """Put ``selection`` into force from ``start_batch``; record and log the refresh that made it."""
        previous = self.sampler.selection if self._refreshes else None
        self.sampler.set_selection(selection.indices, selection.weights, start_batch=start_batch, now_batch=now_batch)
        self._refreshes += 1
        current = self.sampler.selection
        numbers = {
            "refresh": self._refreshes,
            "start_batch": start_batch,
            "subset_size": current.numel(),
            "overlap": float("nan") if previous is None else _overlap(current, previous, self.sampler.pool_size),
            **numbers,
            "invalid_signals": self.store.invalid_count if self.store is not None else 0,
            "padding": self.sampler.padding,
            "fidelity": self._fidelity,
            "skipped_refreshes": self.skipped_refreshes,
        }
        self._log.add(trainer, seconds, numbers, {**phases, **selection.diagnostics})
        self._adapt_fidelity()

    # ------------------------------------------------------------------ overlapped selection
    def _overlaps_from(self, trainer: Trainer, now_batch: int) -> bool:
        """Whether this refresh's selection can run in the background: overlap is on and the next decision point
        is a refresh, where its subset is handed over (at the anneal or the end of training it would never train)."""
        if not self.overlap or trainer.train_dataloader is None:
            return False
        position = self._loader.position(trainer)
        per_epoch = self.sampler.batches_per_epoch(position.batch_size, position.drop_last)
        return self.schedule.next_action(now_batch, per_epoch) is Action.SELECT

    def _hand_over(self, trainer: Trainer, start_batch: int, now_batch: int) -> None:
        """At a refresh, put the pending overlapped selection into force from ``start_batch``."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._worker.finish(pending)  # rank 0 waits here if the thread is not done (the exposed seconds)
        selection = trainer.strategy.broadcast(pending.selection, src=0)
        waited = max_over_ranks(trainer.strategy, pending.waited_seconds, trainer.lightning_module.device)
        numbers = {k: v for k, v in pending.numbers.items() if k in ("scored", "submitted_batch")}
        phases = {k: v for k, v in pending.numbers.items() if k not in numbers}
        phases.update(exposed_seconds=waited, hidden_seconds=max(pending.worker_seconds - waited, 0.0))
        self._apply(trainer, selection, start_batch, now_batch, pending.prepared_seconds + waited, numbers, phases)

    def _selection_input(self, trainer: Trainer, start_batch: int, now_batch: int) -> SelectionInput:
        per_epoch = None
        if trainer.train_dataloader is not None:
            position = self._loader.position(trainer)
            per_epoch = self.sampler.batches_per_epoch(position.batch_size, position.drop_last)
        epoch, progress = self.schedule.epoch_and_progress(start_batch, per_epoch)
        return SelectionInput(
            pool_size=self.sampler.pool_size,
            budget=self.sampler.budget,
            store=self.store,
            generator=seeded_generator(self.seed, start_batch),
            epoch=epoch,
            step=start_batch,
            progress=progress,
            now_batch=now_batch,
            state=self._strategy_state,
            fidelity=self._fidelity,
            quality=self.quality,
        )

    def _reference(self, trainer: Trainer) -> DataLoader:
        return self._measure.reference_loader(self.reference, self._loader.loader(trainer))

    @property
    def skipped_refreshes(self) -> int:
        """Scheduled refreshes skipped to stay within ``max_selection_share`` (0 without a budget)."""
        return 0 if self._budget is None else self._budget.skipped

    def _within_budget(self, trainer: Trainer) -> bool:
        """Rank 0's budget decision for a scheduled refresh, broadcast so that every rank takes it."""
        if self._budget is None:
            return True
        allowed = None
        if trainer.is_global_zero:
            last = self._log.records[-1]["selection_seconds"] if self._log.records else 0.0
            allowed = self._budget.allows(self._log.selection_seconds, last)
            if not allowed and self._budget.skipped == 1:
                rank_zero_info(
                    f"CoresetCallback: skipping refreshes to keep selection within max_selection_share="
                    f"{self.max_selection_share:g} of the fit's wall clock (counted in `skipped_refreshes`)."
                )
        allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        if not trainer.is_global_zero and not allowed:
            self._budget.skipped += 1  # every rank reports the same count
        return allowed

    def _adapt_fidelity(self) -> None:
        """Scale the next refreshes' scoring work so selection stays within ``max_selection_share``."""
        if self.max_selection_share is None or not self._log.records:
            return
        share = self._log.records[-1]["selection_share"]
        if share > 0:
            self._fidelity = min(1.0, max(0.05, self._fidelity * self.max_selection_share / share))


def _overlap(current: Tensor, previous: Tensor, pool_size: int) -> float:
    """The share of ``current``'s indices that are in ``previous`` (a pool mask: ``torch.isin`` sorts, and took
    1.6 ms a refresh on a 32k pool, most of what a refresh of InfoBatch costs)."""
    if current.numel() == 0:
        return float("nan")
    was = torch.zeros(pool_size, dtype=torch.bool)
    was[previous] = True
    return float(was[current].float().mean())
