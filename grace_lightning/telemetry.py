"""Progress bars for scoring passes and metric logging from any hook, through the user's own loggers."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class ScoringProgressBar:
    """A nested bar on the Trainer's active progress bar (TQDM or Rich), silent when bars are off.

    Mirrors how Lightning's own validation bar is created, so it is disabled on non-zero ranks.
    """

    def __init__(self, trainer: Any, total: int, description: str = "Coreset scoring") -> None:
        self._bar_callback, self._kind = trainer.progress_bar_callback, None
        pb = self._bar_callback
        if isinstance(pb, RichProgressBar) and pb.is_enabled and pb.progress is not None:
            self._kind, self._task = "rich", pb.progress.add_task(description, total=total)
        elif isinstance(pb, TQDMProgressBar) and pb.is_enabled:
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._kind = "tqdm"
            self._bar = Tqdm(
                total=total,
                desc=description,
                position=2 * pb.process_position + 1,
                leave=False,
                disable=pb.is_disabled,
                dynamic_ncols=True,
                file=sys.stdout,
            )

    def update(self, n: int = 1) -> None:
        if self._kind == "rich":
            self._bar_callback.progress.update(self._task, advance=n)
            self._bar_callback.refresh()
        elif self._kind == "tqdm":
            self._bar.update(n)

    def close(self) -> None:
        if self._kind == "rich":
            self._bar_callback.progress.remove_task(self._task)
            self._bar_callback.refresh()
        elif self._kind == "tqdm":
            self._bar.close()


def log_metrics(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Log scalars through every logger the Trainer has (loggers are rank-zero-only themselves).

    Works in hooks where ``LightningModule.log`` is not allowed (``on_fit_start``, for instance).
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class RefreshLog:
    """Every refresh's record (seconds, share of the fit's wall clock, subset, phases), kept and logged.

    Args:
        prefix: prefix of the logged metric names (``"coreset/"``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.records: list[dict[str, float]] = []
        self.selection_seconds = 0.0  # all refreshes so far (restored from checkpoints)
        self.fit_started_at = 0.0
        self._first_of_fit = 0  # records before this index came from an earlier fit of the same callback

    def start_fit(self) -> None:
        """Mark the start of a fit: its wall clock and its first record."""
        self.fit_started_at = time.perf_counter()
        self._first_of_fit = len(self.records)

    def fit_summary(self, owner: str = "CoresetCallback") -> str | None:
        """One line on what this fit's refreshes cost against its wall clock so far, or ``None`` if it ran none.

        Example:
            >>> log = RefreshLog("coreset/")
            >>> log.start_fit()
            >>> log.records.append({"selection_seconds": 0.5, "scoring_seconds": 0.25, "strategy_seconds": 0.2})
            >>> log.fit_summary().split(",")[0]
            'CoresetCallback: 1 refresh took 0.50 s of selection'
        """
        records = self.records[self._first_of_fit :]
        if not records:
            return None
        wall = max(time.perf_counter() - self.fit_started_at, 1e-9)
        seconds = sum(r["selection_seconds"] for r in records)

        def total(key: str) -> float:
            return sum(r.get(key, 0.0) for r in records)

        parts = [f"scoring {total('scoring_seconds'):.2f} s", f"strategy {total('strategy_seconds'):.2f} s"]
        if total("probe_seconds"):
            parts.insert(1, f"probes {total('probe_seconds'):.2f} s")
        line = (
            f"{owner}: {len(records)} refresh{'es' if len(records) > 1 else ''} took {seconds:.2f} s of selection, "
            f"{seconds / wall:.1%} of this fit's {wall:.2f} s wall clock ({', '.join(parts)})"
        )
        if total("capture_seconds"):
            line += f"; capturing the trained batches' signals took {total('capture_seconds'):.2f} s more, inside the steps"
        return line + "."

    def add(self, trainer: Any, seconds: float, numbers: dict[str, float], phases: dict[str, float]) -> dict[str, float]:
        """Record one refresh that took ``seconds`` (max over ranks); log it through the Trainer's loggers.

        ``numbers`` are the refresh's own (its number, subset size, ...); ``phases`` are seconds and diagnostics
        (the strategy's among them), which may not overwrite the refresh's own numbers.
        """
        self.selection_seconds += seconds
        wall = max(time.perf_counter() - self.fit_started_at, 1e-9)
        record = {
            "selection_seconds": seconds,
            "selection_seconds_total": self.selection_seconds,
            "selection_share": self.selection_seconds / wall,
            **{key: float(value) for key, value in numbers.items()},
        }
        # A strategy's diagnostics never overwrite the refresh's own numbers (GRACE once reported its greedy's
        # time as `selection_seconds`): a clashing name is kept as `strategy/<name>`.
        for key, value in phases.items():
            record[f"strategy/{key}" if key in record else key] = float(value)
        self.records.append(record)
        log_metrics(trainer, {f"{self.prefix}{k}": v for k, v in record.items() if not math.isnan(v)}, trainer.global_step)
        return record
