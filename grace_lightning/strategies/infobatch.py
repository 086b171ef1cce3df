"""``infobatch``: InfoBatch-style soft pruning of well-learned examples, rescaled to keep the gradient unbiased.

After Qin et al., *InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning*, ICLR 2024
(arXiv:2303.04947; reference code NUS-HPC-AI-Lab/InfoBatch). When to use it and how to set it: the ``infobatch``
section of ``grace_lightning/strategies/README.md``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from grace_lightning.strategies.base import Selection, SelectionInput, Strategy, register_strategy
from grace_lightning.validation import unit_interval


@register_strategy("infobatch")
class InfoBatch(Strategy):
    r"""Drop a random share ``r`` of the well-learned examples; up-weight the rest by ``1/(1 − r)``.

    Each refresh, the examples whose last measured loss is below the mean are *well learned* (losses of the
    trained batches, measured for free: no scoring pass); a random share ``r`` of them is dropped and the
    kept ones get weight ``1/(1 − r)``, so the weighted gradient over the kept set is an unbiased estimate
    of the full pool's. For the last ``anneal_share`` of training (needs ``Trainer(max_epochs=...)``) it
    returns the whole pool, unweighted. How ``r`` follows the budget, when to use it and suggested
    settings: the ``infobatch`` section of ``grace_lightning/strategies/README.md``.

    Args:
        prune_ratio: share of the well-learned examples dropped per refresh, in ``[0, 1)`` (the paper's 0.5),
            or ``None`` to derive it from the budget: the ``r`` at which the kept set has ``budget`` examples.
        anneal_share: share of training, at the end, on the whole pool, in ``[0, 1)`` (the paper's
            ``δ = 0.875`` is ``anneal_share = 0.125``).
        max_prune_ratio: cap on a derived ``r``, in ``[0, 1)``; bounds the weights at ``1/(1 − max_prune_ratio)``.

    Example::

        CoresetCallback(sampler, strategy="infobatch", strategy_kwargs={"prune_ratio": 0.5})
    """

    needs = frozenset({"loss"})

    def __init__(
        self, prune_ratio: Optional[float] = None, anneal_share: float = 0.125, max_prune_ratio: float = 0.9
    ) -> None:
        self.prune_ratio = None
        if prune_ratio is not None:
            self.prune_ratio = unit_interval(
                "infobatch", "prune_ratio", prune_ratio, high_open=True, hint=" or None (derive it from the budget)"
            )
        self.anneal_share = unit_interval("infobatch", "anneal_share", anneal_share, high_open=True)
        self.max_prune_ratio = unit_interval("infobatch", "max_prune_ratio", max_prune_ratio, high_open=True)

    def __repr__(self) -> str:
        return f"InfoBatch(prune_ratio={self.prune_ratio}, anneal_share={self.anneal_share})"

    def to_score(self, inputs: SelectionInput) -> Optional[Tensor]:
        return None  # losses of trained batches are measured for free; InfoBatch never rescans the pool

    def select(self, inputs: SelectionInput) -> Selection:
        if self.anneal_share > 0 and inputs.progress is not None and inputs.progress >= 1.0 - self.anneal_share:
            return Selection(indices=None, diagnostics={"annealed": 1.0, "prune_ratio": 0.0})
        store = inputs.store
        measured = store.measured
        loss = store.loss
        well = torch.zeros_like(measured)
        if bool(measured.any()):
            well = measured & (loss < loss[measured].double().mean().float())
        well_idx = well.nonzero().squeeze(1)
        others = (~well).nonzero().squeeze(1)
        total = well_idx.numel()
        keep = self._kept_count(inputs.budget, others.numel(), total)
        kept = well_idx[torch.randperm(total, generator=inputs.generator)[:keep]]
        indices, order = torch.sort(torch.cat([others, kept]))
        weights = torch.cat([torch.ones(others.numel()), torch.full((keep,), total / keep if keep else 1.0)])
        diagnostics = {
            "annealed": 0.0,
            "prune_ratio": 1.0 - keep / total if total else 0.0,
            "well_learned": float(total),
            "kept": float(indices.numel()),
        }
        return Selection(indices=indices, weights=weights[order].float(), diagnostics=diagnostics)

    def _kept_count(self, budget: int, always_kept: int, well_learned: int) -> int:
        """How many of the ``well_learned`` examples to keep (at least one of them when there are any)."""
        if well_learned == 0:
            return 0
        if self.prune_ratio is not None:
            return math.ceil((1.0 - self.prune_ratio) * well_learned - 1e-9)
        floor = math.ceil((1.0 - self.max_prune_ratio) * well_learned - 1e-9)  # r <= max_prune_ratio
        return min(well_learned, max(budget - always_kept, floor))
