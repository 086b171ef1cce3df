"""When to refresh the coreset: warm-up, periodic refresh (epochs or steps) and anneal, as pure decisions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class Phase(str, Enum):
    WARMUP = "warmup"  # whole pool (streamed at the budget's epoch length)
    SELECT = "select"  # the strategy's subsets
    ANNEAL = "anneal"  # whole pool again, for the last epochs


class Action(str, Enum):
    SELECT = "select"
    FULL_POOL = "full_pool"


@dataclass(frozen=True)
class RefreshSchedule:
    """The refresh calendar. Epochs have a constant number of batches in every phase.

    Args:
        every_n_epochs: refresh at the end of every n-th epoch of the selection phase (None: never).
        every_n_steps: refresh every k training batches of the selection phase (None: never).
        warmup_epochs: epochs trained on the whole pool before the first selection.
        anneal_epochs: final epochs trained on the whole pool (needs ``max_epochs``).
        max_epochs: the Trainer's ``max_epochs`` (None or -1: unbounded).
    """

    every_n_epochs: Optional[int] = 1
    every_n_steps: Optional[int] = None
    warmup_epochs: int = 0
    anneal_epochs: int = 0
    max_epochs: Optional[int] = None

    def phase(self, epoch: int) -> Phase:
        if epoch < self.warmup_epochs:
            return Phase.WARMUP
        if self.anneal_epochs and self.max_epochs is not None and epoch >= self.max_epochs - self.anneal_epochs:
            return Phase.ANNEAL
        return Phase.SELECT

    def initial_action(self) -> Action:
        return Action.SELECT if self.phase(0) is Phase.SELECT else Action.FULL_POOL

    def at_epoch_end(self, finished_epoch: int) -> Optional[Action]:
        """What to do before epoch ``finished_epoch + 1`` starts, or None."""
        nxt = finished_epoch + 1
        if self.max_epochs is not None and nxt >= self.max_epochs:
            return None  # training ends; a selection nobody trains on is wasted work
        now, then = self.phase(finished_epoch), self.phase(nxt)
        if then is Phase.ANNEAL:
            return Action.FULL_POOL if now is not Phase.ANNEAL else None
        if then is Phase.SELECT:
            if now is Phase.WARMUP:
                return Action.SELECT
            if self.every_n_epochs and (nxt - self.warmup_epochs) % self.every_n_epochs == 0:
                return Action.SELECT
        return None

    def at_step(self, batches_done: int, epoch: int) -> bool:
        """Whether a step-interval refresh is due after ``batches_done`` batches (within ``epoch``)."""
        return bool(
            self.every_n_steps and self.phase(epoch) is Phase.SELECT and batches_done % self.every_n_steps == 0
        )

    def decide(self, batches_done: int, epoch: int, is_last_batch: bool) -> Optional[Action]:
        """The action due after a training batch: epoch-end transitions first, then the step interval."""
        if not is_last_batch:
            return Action.SELECT if self.at_step(batches_done, epoch) else None
        action = self.at_epoch_end(epoch)
        training_goes_on = self.max_epochs is None or epoch + 1 < self.max_epochs
        if action is None and training_goes_on and self.at_step(batches_done, epoch):
            if self.phase(epoch + 1) is Phase.SELECT:
                action = Action.SELECT
        return action

    def next_action(self, batches_done: int, batches_per_epoch: int) -> Optional[Action]:
        """The action of the first decision point after batch position ``batches_done`` (None: none before the end).

        An overlapped selection submitted at ``batches_done`` is handed over there, so it is started only when that
        action is :attr:`Action.SELECT` (a subset handed over at the anneal, or never, would not train).
        """
        last = None if self.max_epochs is None else self.max_epochs * batches_per_epoch
        epoch_end = (batches_done // batches_per_epoch + 1) * batches_per_epoch
        step = (batches_done // self.every_n_steps + 1) * self.every_n_steps if self.every_n_steps else None
        while last is None or min(epoch_end, step or epoch_end) <= last:
            position = epoch_end if step is None else min(epoch_end, step)
            action = self.decide(position, (position - 1) // batches_per_epoch, position % batches_per_epoch == 0)
            if action is not None:
                return action
            if position == epoch_end:
                epoch_end += batches_per_epoch
            if step is not None and position == step:
                step += self.every_n_steps
        return None

    def epoch_and_progress(self, start_batch: int, batches_per_epoch: Optional[int]) -> tuple[int, Optional[float]]:
        """The epoch a selection starting at ``start_batch`` falls in, and the share of training done then.

        ``batches_per_epoch=None`` (no training loader yet): epoch 0, progress 0 (None for an unbounded run).
        """
        if batches_per_epoch is None:
            return 0, 0.0 if self.max_epochs else None
        epoch = start_batch // batches_per_epoch
        if self.max_epochs is None:
            return epoch, None
        return epoch, min(1.0, start_batch / (batches_per_epoch * self.max_epochs))
