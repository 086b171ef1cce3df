"""``infobatch``: InfoBatch-style soft pruning of well-learned examples, rescaled to keep the gradient unbiased.

After Qin et al., *InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning*, ICLR 2024
(arXiv:2303.04947; reference code NUS-HPC-AI-Lab/InfoBatch). See ``research/peers.md`` §3 of the project notes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from grace_lightning.strategies.base import Selection, SelectionInput, Strategy, register_strategy


def _ratio(name: str, value: object, *, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        hint = " or None (derive it from the budget)" if allow_none else ""
        raise ValueError(f"infobatch: `{name}` must be a number in [0, 1){hint}, got {value!r}.")
    return float(value)


@register_strategy("infobatch")
class InfoBatch(Strategy):
    r"""Drop a random share ``r`` of the well-learned examples; up-weight the rest by ``1/(1 − r)``.

    Each refresh, an example is *well learned* when its last measured loss is below the mean of the
    measured losses. Losses come for free from the batches the model trained on, so there is no scoring
    pass. Examples never measured count as not well learned and are always kept, as InfoBatch's initial
    score of 3.0 does. A random share of the well-learned examples, drawn without replacement, is dropped.
    The ``k`` of ``L`` well-learned examples that are kept get weight ``L / k = 1/(1 − r)``, all others
    weight 1, so the weighted sum of per-example gradients over the kept set is an unbiased estimate of
    the full-pool sum. ``r`` here is the share actually dropped, rounded to whole examples.

    **How ``r`` relates to the budget.** The epoch length is fixed by the sampler's budget, while
    InfoBatch's kept set is whatever survives pruning:

    * ``prune_ratio=None`` (default) derives ``r`` from the budget: the ``r`` at which the kept set has
      exactly ``budget`` examples when the not-well-learned examples fit in it, capped at
      ``max_prune_ratio`` so that weights stay at most ``1/(1 − max_prune_ratio)``.
    * ``prune_ratio=0.5`` (a float) fixes ``r`` as in the paper, whatever the budget.

    A kept set larger than the budget is streamed by the sampler (each epoch trains the next ``budget``
    examples of a shuffled pass over it, every example at the same rate, so the estimate stays unbiased
    up to a constant factor); a smaller one wraps around.

    **Annealing.** For the last ``anneal_share`` of training (``progress >= 1 − anneal_share``; the paper's
    ``δ = 0.875`` is ``anneal_share = 0.125``) it returns the whole pool, unweighted. This needs the
    run's length (``Trainer(max_epochs=...)``); without it, it never anneals. The refresh that crosses
    the threshold starts the anneal, so refresh at least as often as the anneal is long.

    Args:
        prune_ratio: share of the well-learned examples dropped per refresh, in ``[0, 1)``, or ``None``
            to derive it from the budget.
        anneal_share: share of training, at the end, on the whole pool, in ``[0, 1)``.
        max_prune_ratio: cap on a derived ``r``, in ``[0, 1)``; bounds the weights.

    Example::

        CoresetCallback(sampler, strategy="infobatch", strategy_kwargs={"prune_ratio": 0.5})
    """

    needs = frozenset({"loss"})

    def __init__(
        self, prune_ratio: Optional[float] = None, anneal_share: float = 0.125, max_prune_ratio: float = 0.9
    ) -> None:
        self.prune_ratio = _ratio("prune_ratio", prune_ratio, allow_none=True)
        self.anneal_share = _ratio("anneal_share", anneal_share)
        self.max_prune_ratio = _ratio("max_prune_ratio", max_prune_ratio)

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
