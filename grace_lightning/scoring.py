"""Measuring the live model for the callback: free capture on training batches, scoring passes, probes.

Every measurement runs on every rank over its shard and is gathered, so every rank's
:class:`~grace_lightning.signals.SignalStore` holds the same numbers:

- **free capture**: the head's input and output on the batches the model trains on (a forward hook), kept per
  rank until :meth:`Measurements.flush` gathers them and writes them in (step, rank) order, so the store does
  not depend on when the flush happens (at a refresh, or when a checkpoint is written);
- **scoring pass**: a forward-only pass (eval mode, no graph, the precision plugin's context) over the pool
  slice a strategy asks for, sharded over ranks;
- **reference scoring**: the same over the user's reference set, its embeddings mapped into the store's space;
- **probes**: probe tasks sharded over ranks (task ``i`` on rank ``i % world``), results gathered.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from grace_lightning.distributed import gather_rows, max_over_ranks
from grace_lightning.probes import ProbeRequest, ProbeResults, ProbeRunner
from grace_lightning.signals import ExampleSignals, SignalExtractor, SignalStore
from grace_lightning.signals.capture import inference_forward
from grace_lightning.telemetry import ScoringProgressBar

__all__ = ["Measurements", "TensorRows", "rows_of"]


class TensorRows(Dataset):
    """Rows ``indices`` of a :class:`~torch.utils.data.TensorDataset`, fetched a batch at a time.

    A ``Subset`` fetches and collates example by example (one Python call per example); this indexes each tensor
    once per batch. ``__getitems__`` returns what ``default_collate`` makes of the same examples (a list of the
    stacked tensors), bit for bit, so the DataLoader takes it with :func:`already_batched` as its collate.
    """

    def __init__(self, dataset: TensorDataset, indices: Tensor) -> None:
        self.tensors = dataset.tensors
        self.indices = torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, position: int) -> tuple[Tensor, ...]:
        return tuple(t[self.indices[position]] for t in self.tensors)

    def __getitems__(self, positions: list[int]) -> list[Tensor]:
        rows = self.indices[positions]
        return [t[rows] for t in self.tensors]


def already_batched(batch: Any) -> Any:
    """The collate of a :class:`TensorRows` loader: its ``__getitems__`` already made the batch."""
    return batch


def rows_of(dataset: Dataset, indices: Tensor, collate_fn: Any) -> Dataset:
    """The examples ``indices`` of ``dataset`` for a scoring pass: batched fetches where the result is the same."""
    if isinstance(dataset, TensorDataset) and collate_fn is default_collate:
        return TensorRows(dataset, indices)
    return Subset(dataset, indices.tolist())


class Measurements:
    """The signal capture of one fit and the measurements made with it, written into ``store``.

    Args:
        store: the store every measurement goes into (the same on every rank).
        batch_size: scoring-pass batch size (``None``: the training loader's).
        num_workers: workers of the scoring pass's own DataLoader.
    """

    def __init__(self, store: Optional[SignalStore], batch_size: Optional[int], num_workers: int) -> None:
        self.store = store
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.extractor: Optional[SignalExtractor] = None
        self._pending: list[tuple[Tensor, int, ExampleSignals]] = []  # (indices, batch position, signals)
        self._copying_from: Optional[torch.device] = None  # a GPU whose copies into _pending may be in flight
        self.signals_seen = (0, 0)  # the store's (invalid, offered) counts at the last validity check
        self.batch_hint_given = False
        # What the free capture cost since the last refresh took it: training-thread seconds, and on a GPU the
        # device time of its kernels (timed by events, read once the device has run them).
        self._capture_seconds = 0.0
        self._capture_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    # ------------------------------------------------------------------ free capture
    def extractor_for(self, pl_module: LightningModule, batch: Any, capture: bool = False) -> SignalExtractor:
        """The extractor for this module, built (and its head verified) from the first batch seen."""
        if self.extractor is None:
            self.extractor = SignalExtractor.for_module(pl_module, batch)
            if capture:
                self.extractor.attach()  # the persistent hook for free signals on training batches
        return self.extractor

    def arm(self, pl_module: LightningModule, batch: Any) -> None:
        """Record the head's forwards of the training batch about to run."""
        self.extractor_for(pl_module, batch, capture=True).arm()

    def keep_training_batch(self, indices: Tensor, batches_done: int, batch: Any, device: torch.device) -> None:
        """Turn what the hook recorded on the batch just trained into signals, held until the next flush."""
        if self.extractor is None:
            return
        self.extractor.disarm()
        began = time.perf_counter()
        events = None
        if device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        signals = self.extractor.training_batch_signals(batch)
        if signals is not None and len(signals) == indices.numel():
            if self.store is not None:  # no copy of what the strategy never reads (an embedding, for InfoBatch)
                signals = self.store.keeping(signals)
            # Without waiting for the GPU: a blocking copy here would stall every training step until the device
            # drains its queue. `flush` synchronises before it reads the copies.
            on_gpu = signals.loss.device.type == "cuda"  # other devices (MPS, XLA) copy as before: blocking
            if on_gpu:
                self._copying_from = signals.loss.device
            self._pending.append((indices, batches_done, signals.to(torch.device("cpu"), non_blocking=on_gpu)))
        if events is not None:
            events[1].record()
            self._capture_events.append(events)
        self._capture_seconds += time.perf_counter() - began

    def take_capture_seconds(self) -> dict[str, float]:
        """What the free capture cost since the last call: ``capture_seconds`` on the training thread, and on a GPU
        ``capture_gpu_seconds``, its kernels' device time (waits for the last of them)."""
        taken = {"capture_seconds": self._capture_seconds}
        if self._capture_events:
            self._capture_events[-1][1].synchronize()
            taken["capture_gpu_seconds"] = sum(start.elapsed_time(end) for start, end in self._capture_events) / 1000.0
        self._capture_seconds, self._capture_events = 0.0, []
        return taken

    def flush(self, trainer: Trainer) -> None:
        """Gather the signals every rank captured on its training batches into every rank's store."""
        if self.store is None:
            return
        pending, self._pending = self._pending, []
        if self._copying_from is not None:
            torch.cuda.synchronize(self._copying_from)
            self._copying_from = None
        signals = ExampleSignals.cat([p[2] for p in pending])
        rows: dict[str, Optional[Tensor]] = {
            **signals.as_rows(),
            "index": torch.cat([p[0] for p in pending]) if pending else torch.zeros(0, dtype=torch.int64),
            "step": torch.cat([torch.full((p[0].numel(),), p[1], dtype=torch.int64) for p in pending])
            if pending
            else torch.zeros(0, dtype=torch.int64),
        }
        if trainer.world_size > 1:
            rows = gather_rows(trainer.strategy, rows, trainer.lightning_module.device)
        if rows["index"].numel() == 0:
            return
        order = torch.sort(rows["step"], stable=True).indices
        self.store.update(rows["index"][order], ExampleSignals.from_rows(rows).select(order), step=rows["step"][order])

    def check_mostly_valid(self, max_invalid_share: float, strategy_name: str) -> None:
        """Refuse to select from a store whose measurements since the last check were mostly NaN/Inf."""
        invalid, offered = self.store.invalid_count, self.store.offered_count
        new_invalid, new_offered = invalid - self.signals_seen[0], offered - self.signals_seen[1]
        self.signals_seen = (invalid, offered)
        if new_offered and new_invalid > max_invalid_share * new_offered:
            raise RuntimeError(
                f"CoresetCallback: {new_invalid} of the {new_offered} per-example signals measured since the last "
                f"refresh were NaN or infinite (more than max_invalid_share={max_invalid_share}), so strategy "
                f"{strategy_name!r} would select from stale or missing data. The usual cause is a diverged "
                "model (a NaN loss: lower the learning rate, clip gradients) or a `coreset_signals` that returns "
                "NaN rows; check `training_step`'s loss."
            )

    def detach(self) -> None:
        """Remove the capture hook (end of fit)."""
        if self.extractor is not None:
            self.extractor.detach()
            self.extractor = None

    # ------------------------------------------------------------------ scoring passes
    def score(self, trainer: Trainer, pl_module: LightningModule, indices: Tensor, now_batch: int, like: DataLoader) -> int:
        """Forward-only pass over this rank's shard of pool ``indices``; gather; write every rank's store."""
        shard = indices[trainer.global_rank :: trainer.world_size]
        loader = self.loader(rows_of(like.dataset, shard, like.collate_fn), like)
        rows = self._forward(trainer, pl_module, loader, shard, keep=self.store.keeping)
        self.store.update(rows["index"], ExampleSignals.from_rows(rows), step=now_batch)
        return int(rows["index"].numel())

    def score_reference(self, trainer: Trainer, pl_module: LightningModule, reference: DataLoader) -> ExampleSignals:
        """The reference set's signals under the live model, embeddings mapped into the store's space (unit rows)."""
        shard = torch.arange(len(reference.dataset))[trainer.global_rank :: trainer.world_size]
        loader = self.loader(rows_of(reference.dataset, shard, reference.collate_fn), reference)
        rows = self._forward(trainer, pl_module, loader, shard)
        signals = ExampleSignals.from_rows(rows).select(torch.argsort(rows["index"]))
        if signals.embedding is not None and self.store is not None:
            signals.embedding = self.store.to_store_space(signals.embedding)
        return signals

    def loader(self, dataset: Dataset, like: DataLoader) -> DataLoader:
        """A forward-only loader over ``dataset`` that collates like ``like``, at the scoring batch size."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size_for(like),
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=already_batched if isinstance(dataset, TensorRows) else like.collate_fn,
        )

    def batch_size_for(self, like: DataLoader, fallback: int = 1) -> int:
        """The scoring batch size: the one given, else twice ``like``'s (the training loader's) batch size, else
        ``fallback`` (a loader built on a batch sampler has no batch size).

        A forward-only pass holds no activations for a backward pass, so twice the training batch fits where
        training fits, and larger batches score faster: 1.33x (Fashion-MNIST, 128 -> 256) and 1.05x (lm-mixture,
        32 -> 64) the examples a second on 2 CPU cores; on a GPU a small model's small batches are bound by kernel
        launches (``benchmarks/scoring_throughput.py``).
        """
        return self.batch_size or (2 * like.batch_size if like.batch_size else fallback)

    def scoring_batch_hint(self, device: torch.device, batch_size: Optional[int]) -> Optional[str]:
        """A line for the user when an accelerator scores at the default batch size, which suits any model's memory
        but leaves a small model's passes bound by kernel launches; ``None`` where there is nothing to say."""
        if self.batch_size is not None or device.type == "cpu" or batch_size is None:
            return None
        return (
            f"CoresetCallback: scoring passes run on {device.type} at batch {batch_size} (the default: twice the "
            "training batch, which fits any model). Forward-only passes hold no activations for a backward pass: if "
            "memory allows, a larger `CoresetCallback(scoring_batch_size=...)` scores faster (on one H200 a small "
            "LM's passes ran 5-7x faster at 1024 than at 64; README, 'On a GPU, the second session')."
        )

    def reference_loader(self, reference: Union[Dataset, DataLoader], like: DataLoader) -> DataLoader:
        """The user's reference DataLoader, or one over the reference Dataset batched like the training loader."""
        return reference if isinstance(reference, DataLoader) else self.loader(reference, like)

    def _forward(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        loader: DataLoader,
        shard: Tensor,
        keep: Callable[[ExampleSignals], ExampleSignals] = lambda signals: signals,
    ) -> dict[str, Optional[Tensor]]:
        """Forward-only signals of this rank's ``loader`` (whose items are ``shard``), gathered over ranks; ``keep``
        drops, batch by batch before the copy to the CPU, what is not wanted."""
        collected: list[ExampleSignals] = []
        bar = ScoringProgressBar(trainer, total=len(loader))
        on_gpu = pl_module.device.type == "cuda"
        hint = None if self.batch_hint_given else self.scoring_batch_hint(pl_module.device, loader.batch_size)
        if hint is not None:
            self.batch_hint_given = True
            rank_zero_info(hint)
        try:
            with inference_forward(pl_module, trainer.precision_plugin.forward_context):
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                    signals = keep(self.extractor_for(pl_module, batch).score_batch(batch))
                    collected.append(signals.to(torch.device("cpu"), non_blocking=on_gpu))  # waited for below
                    bar.update(1)
            if on_gpu:
                torch.cuda.synchronize(pl_module.device)
        finally:
            bar.close()
        rows = {**ExampleSignals.cat(collected).as_rows(), "index": shard.long()}
        return gather_rows(trainer.strategy, rows, pl_module.device)

    # ------------------------------------------------------------------ probes
    def probe(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        request: ProbeRequest,
        train_loader: DataLoader,
        reference: Optional[DataLoader],
    ) -> ProbeResults:
        """Run this rank's share of the probe tasks (task i on rank i % world), gather, return all results."""
        if self.extractor is None:
            raise RuntimeError("CoresetCallback: probes need the signal capture, which has not seen a batch yet.")
        runner = ProbeRunner(
            pl_module,
            trainer.optimizers,
            self.extractor.example_losses,
            self.extractor.head,
            train_loader.dataset,
            train_loader.collate_fn,
            lambda batch: trainer.strategy.batch_to_device(batch, pl_module.device),
            reference=None if reference is None else list(reference),
            eval_batch_size=self.batch_size_for(train_loader, fallback=256),
            forward_context=trainer.precision_plugin.forward_context,
            head_inputs=self.extractor.head_inputs,
            head_losses=self.extractor.head_losses,
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
        seconds = max_over_ranks(trainer.strategy, time.perf_counter() - began, pl_module.device)
        return ProbeResults(results, request=request, seconds=seconds, optimizer_steps=int(gathered["steps"].sum()))
