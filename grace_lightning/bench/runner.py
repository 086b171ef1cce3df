"""One benchmark run: a fresh model trained on a coreset of one task, timed, with every evaluation recorded.

Timing: ``wall_seconds`` is the whole ``trainer.fit``; ``train_seconds`` is the same minus the time spent in
validation loops (identical work for every strategy, so it is left out of the comparison). Both include
the selection's own cost: scoring passes, strategy state updates and selection, which the callback also
reports on their own (``selection_seconds``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import lightning as L

from grace_lightning.bench.config import BenchConfig
from grace_lightning.bench.tasks import BenchTask, TaskSize

__all__ = ["BenchRun", "EvalClock", "build_run", "plan", "quiet_and_restored", "run_one"]


class EvalClock(L.Callback):
    """Records, after every validation epoch, the clock and the cost so far (the run's evaluation points)."""

    def __init__(self, coreset_callback, marked=None, last_batch: Optional[int] = None) -> None:
        self.coreset_callback = coreset_callback
        self._batches = 0  # training batches so far, for the epochs (a fraction between epochs' ends) of a point
        # The fit's last batch when the validation interval does not land on it: it is made to validate there.
        self.last_batch = last_batch
        self.fit_began = 0.0
        self.validation_seconds = 0.0
        self._validation_began = 0.0
        self.points: list[dict] = []
        # Pool examples the task marks (noisy labels, off-target text): how many of the trained ones were marked.
        self.marked = marked
        self._marked_trained = self._trained = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == self.last_batch:
            # Lightning validates after a batch at which training is asked to stop; this is the fit's last one.
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.marked is not None:
            indices = self.coreset_callback.batch_indices
            self._marked_trained += int(self.marked[indices].sum())
            self._trained += int(indices.numel())

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_began = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_began = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self.validation_seconds += now - self._validation_began
        if trainer.sanity_checking or not pl_module.metric_history:
            return
        history = self.coreset_callback.history
        per_epoch = int(trainer.num_training_batches)
        whole, part = divmod(self._batches, per_epoch)
        self.points.append(
            {
                "epoch": whole if part == 0 else round(self._batches / per_epoch, 4),  # epochs trained so far
                "step": int(trainer.global_step),
                "examples_seen": int(pl_module.examples_seen),
                "wall_seconds": now - self.fit_began,
                "train_seconds": now - self.fit_began - self.validation_seconds,
                "selection_seconds": float(history[-1]["selection_seconds_total"]) if history else 0.0,
                "metric": float(pl_module.metric_history[-1]),
                # share of the examples trained since the previous evaluation that the task marks (None: no mask)
                "marked_share": self._marked_trained / self._trained if self._trained else None,
            }
        )
        self._marked_trained = self._trained = 0


@contextlib.contextmanager
def quiet_and_restored() -> Iterator[None]:
    """Silence Lightning's per-fit chatter, and undo the global flags ``Trainer(deterministic=True)`` sets."""
    import torch

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*log_every_n_steps.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def evaluation_interval(batches_per_epoch: int, evals_per_epoch: int) -> int:
    """Training batches between two validations for about ``evals_per_epoch`` of them an epoch (at least 1).

    Counted over the whole fit, not within each epoch, since a batch count need not divide by it (a prime one
    divides by nothing); :class:`EvalClock` adds a validation at the fit's last batch when the count does not
    land there, so that the final metric is read where training ends.

    Example:
        >>> evaluation_interval(157, 4), evaluation_interval(3, 4)
        (39, 1)
    """
    return max(1, round(batches_per_epoch / evals_per_epoch))


@dataclass
class BenchRun:
    """One run, built and not yet fitted: ``trainer.fit(model, train_loader, val_loader)`` trains it."""

    data: Any
    model: L.LightningModule
    sampler: Any
    callback: Any
    clock: EvalClock
    trainer: L.Trainer
    train_loader: Any
    val_loader: Any
    evaluations: int  # validations the fit makes (one per epoch, or as `evals_per_epoch` asks)


def build_run(task: BenchTask, strategy: str, fraction: float, seed: int, config: BenchConfig) -> BenchRun:
    """A fresh model, its coreset sampler and callback, the loaders and the Trainer of one run (not fitted).

    ``Trainer(deterministic=True)`` sets global flags when it is built: build inside :func:`quiet_and_restored`.
    """
    from torch.utils.data import DataLoader

    from grace_lightning import CoresetCallback, CoresetSampler, build_strategy

    size = TaskSize(config.train_examples, config.val_examples, config.epochs)
    data = task.make_data(size, seed)
    model = task.build_model(data, seed)
    model.lr_schedule = config.lr_schedule
    sampler = CoresetSampler(data.train, fraction=fraction, seed=seed)
    train_loader = DataLoader(data.train, batch_size=task.batch_size, sampler=sampler, collate_fn=data.collate_fn)
    val_loader = DataLoader(data.val, batch_size=task.val_batch_size, shuffle=False, collate_fn=data.collate_fn)
    chosen = build_strategy(strategy, **(config.strategy_kwargs.get(strategy) or {}))
    # Callback settings given only when the comparison sets them, so that the callback's defaults apply otherwise.
    settings = {} if config.max_selection_share == "default" else {"max_selection_share": config.max_selection_share}
    if config.scoring_batch_size is not None:
        settings["scoring_batch_size"] = config.scoring_batch_size
    if not config.capture:
        settings["capture_training_signals"] = False
    reference = None if chosen.reference == "unused" else data.reference  # group_mates and gip read it
    encoder = {}
    if data.embeddings is not None and "embedding" in chosen.needs:  # the task's own encoder, for those that read it
        encoder["embeddings"] = data.embeddings
        if reference is not None and chosen.reads_reference_embedding:
            encoder["reference_embeddings"] = data.reference_embeddings
    callback = CoresetCallback(
        sampler,
        strategy=chosen,
        refresh_every_n_epochs=config.refresh_every,
        warmup_epochs=config.warmup_epochs,
        anneal_epochs=config.anneal_epochs,
        seed=seed,
        overlap={"auto": "auto", "on": True, "off": False}[config.overlap],
        reference=reference,
        **settings,
        **encoder,
    )
    validation: dict[str, Any] = {}
    evaluations, last_batch = config.epochs, None
    if config.evals_per_epoch > 1:
        batches_per_epoch = len(train_loader)
        every = evaluation_interval(batches_per_epoch, config.evals_per_epoch)
        total = batches_per_epoch * config.epochs
        validation = {"val_check_interval": every, "check_val_every_n_epoch": None}
        evaluations = total // every + (total % every > 0)
        last_batch = total if total % every else None
    clock = EvalClock(callback, data.marked, last_batch)
    trainer = L.Trainer(
        accelerator="auto",  # a GPU where there is one (the tasks' `gpu` presets), else the CPU
        devices=1,
        precision=config.precision,
        max_epochs=config.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        benchmark=False,
        num_sanity_val_steps=0,
        callbacks=[callback, clock],
        **validation,
    )
    return BenchRun(data, model, sampler, callback, clock, trainer, train_loader, val_loader, evaluations)


def build_single_run(
    task_name: str,
    strategy: str,
    fraction: float,
    seed: int,
    epochs: int,
    *,
    task_options: Optional[dict[str, Any]] = None,
    strategy_kwargs: Optional[dict[str, Any]] = None,
    warmup_epochs: int = 0,
) -> BenchRun:
    """One run of a bench task for a measurement script: the bench's data, model and schedule at the task's default
    size (``warmup_epochs`` streamed over the whole pool first), the selection synchronous (``overlap="off"``),
    nothing written. Build and fit inside
    :func:`quiet_and_restored`.

    Example::

        with quiet_and_restored():
            built = build_single_run("fashion-mnist-noisy", "grace", 0.3, 0, 4, task_options={"noise": 0.3})
            built.trainer.fit(built.model, built.train_loader, built.val_loader)
        built.callback.history
    """
    from grace_lightning.bench.tasks import get_task

    options = dict(task_options or {})
    config = BenchConfig(
        task=task_name, strategies=[strategy], fractions=[fraction], seeds=[seed], epochs=epochs, out="",
        preset="default", train_examples=None, val_examples=None,
        strategy_kwargs={strategy: dict(strategy_kwargs or {})}, task_options=options, overlap="off",
        warmup_epochs=warmup_epochs,
    )
    return build_run(get_task(task_name, **options), strategy, fraction, seed, config)


def run_one(task: BenchTask, strategy: str, fraction: float, seed: int, config: BenchConfig) -> dict:
    """Train one fresh model on a coreset and return its row: the summary columns plus ``evals``."""
    built = build_run(task, strategy, fraction, seed, config)
    data, model, sampler, callback, clock, trainer = (
        built.data, built.model, built.sampler, built.callback, built.clock, built.trainer
    )
    began = time.perf_counter()
    trainer.fit(model, built.train_loader, built.val_loader)
    wall = time.perf_counter() - began
    if not callback.history:
        raise RuntimeError(f"bench: the CoresetCallback recorded no selection in the {strategy!r} run.")
    if len(clock.points) != built.evaluations:
        raise RuntimeError(
            f"bench: expected {built.evaluations} evaluations in the {strategy!r} run, got {len(clock.points)}."
        )
    selection = float(callback.history[-1]["selection_seconds_total"])
    train = wall - clock.validation_seconds
    metrics = [p["metric"] for p in clock.points]
    best = max(metrics) if task.higher_is_better else min(metrics)
    return {
        "task": task.name,
        "strategy": strategy,
        "fraction": fraction,
        "seed": seed,
        "epochs": config.epochs,
        "train_examples": len(data.train),
        "budget_per_epoch": sampler.budget,
        "steps": int(trainer.global_step),
        "examples_seen": int(model.examples_seen),
        "metric": task.metric,
        "final_metric": metrics[-1],
        "best_metric": best,
        "wall_seconds": wall,
        "train_seconds": train,
        "selection_seconds": selection,
        "selection_share": selection / train if train > 0 else float("nan"),
        "marked_share": _marked_share(clock.points, data.marked),
        "marked_name": data.marked_name if data.marked is not None else None,
        "tokens_per_example": data.info.get("tokens_per_example"),
        "phase_seconds": phase_seconds(callback.history),
        "evals": clock.points,
    }


def phase_seconds(history: list[dict]) -> dict[str, float]:
    """A fit's selection seconds by phase, summed over its refreshes: the scoring pass, probes, the strategy and
    its own phases (GRACE's graph, GRIP's density...), and with overlapped selection the seconds training waited
    for the thread (``exposed_seconds``) and those it did not (``hidden_seconds``). Only ``runs.json`` and
    ``runs.jsonl`` carry it.

    Example:
        >>> phase_seconds([{"selection_seconds": 1.0, "scoring_seconds": 0.5, "refresh": 1.0},
        ...                {"selection_seconds": 2.0, "scoring_seconds": 0.25, "graph_seconds": 1.0}])
        {'scoring_seconds': 0.75, 'graph_seconds': 1.0}
    """
    totals: dict[str, float] = {}
    for record in history:
        for key, value in record.items():
            if key.endswith("_seconds") and key not in ("selection_seconds", "selection_seconds_total"):
                totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _marked_share(points: list[dict], marked) -> Optional[float]:
    """Share of all trained examples that the task marks, over the whole fit (None when it marks none)."""
    if marked is None:
        return None
    shares = [p["marked_share"] for p in points if p["marked_share"] is not None]
    return sum(shares) / len(shares) if shares else None  # every epoch trains the same number of examples


def plan(config: BenchConfig) -> list[tuple[int, str, float]]:
    """Run order: seeds outermost, so slow drifts of the machine spread over every strategy alike; within a seed
    the strategies take turns going first (the list rotated by the seed's position), because this machine's speed
    also drifts within a seed's runs, and a strategy that always ran last would always pay for it."""
    order: list[tuple[int, str, float]] = []
    for position, seed in enumerate(config.seeds):
        shift = position % len(config.strategies)
        for strategy in config.strategies[shift:] + config.strategies[:shift]:
            for fraction in [1.0] if strategy == "full" else config.fractions:
                order.append((seed, strategy, fraction))
    return order
