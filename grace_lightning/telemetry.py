"""Progress bars for scoring passes and metric logging from any hook, through the user's own loggers."""

from __future__ import annotations

import sys
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
