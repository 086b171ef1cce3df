"""The overhead budget: refresh less often when selection would take more than its share of the fit's wall clock.

At every refresh the schedule asks for, :class:`OverheadBudget` (rank 0's clock, broadcast so that every rank
agrees) lets it run only if the selection seconds so far plus what the last refresh cost would stay within
``share`` of the fit's wall clock; otherwise the refresh is skipped and the current subset trains on. The
refresh period so stretches itself to what the model's training time can pay for: a cheap strategy on a big model
refreshes every time, an expensive one on a tiny model seldom. The first informed refresh always runs (nothing
is known of its cost before).

A skipped refresh depends on measured time, so with a budget the refresh times, and so the subsets, can differ
between two runs of the same seed. Without one (``max_selection_share=None``) a run is a pure function of its seed.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["OverheadBudget"]


class OverheadBudget:
    """Decides whether a scheduled refresh fits in ``share`` of the fit's wall clock.

    Example:
        >>> budget = OverheadBudget(0.05)
        >>> budget.start(now=0.0)
        >>> budget.allows(selection_seconds=0.0, last_cost=0.0, now=1.0)  # nothing spent yet
        True
        >>> budget.allows(selection_seconds=2.0, last_cost=2.0, now=10.0)  # (2 + 2) / (10 + 2) > 5%
        False
        >>> budget.allows(selection_seconds=2.0, last_cost=2.0, now=90.0)  # (2 + 2) / (90 + 2) < 5%
        True
        >>> budget.skipped
        1
    """

    def __init__(self, share: float) -> None:
        self.share = float(share)
        self.skipped = 0  # refreshes skipped in this fit, resumed runs included
        self._began = 0.0
        self._elapsed_before = 0.0  # wall clock of the fit before the checkpoint this run resumed from

    def start(self, now: float | None = None) -> None:
        self._began = time.perf_counter() if now is None else now

    def elapsed(self, now: float | None = None) -> float:
        return self._elapsed_before + (time.perf_counter() if now is None else now) - self._began

    def allows(self, selection_seconds: float, last_cost: float, now: float | None = None) -> bool:
        """True when ``selection_seconds`` spent so far plus another ``last_cost`` stay within the share."""
        ok = selection_seconds + last_cost <= self.share * (self.elapsed(now) + last_cost)
        self.skipped += not ok
        return ok

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed_before = float(state["elapsed"])
        self.skipped = int(state["skipped"])
