"""``el2n``: keep the examples with the largest EL2N score, measured once early in training (static pruning).

After Paul, Ganguli, Dziugaite, *Deep Learning on a Data Diet: Finding Important Examples Early in
Training*, NeurIPS 2021 (arXiv:2107.07075): ``EL2N(x, y) = ‖softmax(z(x)) − onehot(y)‖₂``, computed a few
epochs into training. The paper averages over several initialisations; here it is one run's score.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    register_strategy,
    top_k_random_ties,
    uniform_sample,
)
from grace_lightning.validation import non_negative_int, positive_int


class EL2NState:
    """EL2N's memory between refreshes (rank 0 only): the frozen selection and how long it has been kept.

    Attributes:
        selection: ``(budget,)`` int64 sorted pool indices chosen at the last scoring pass, ``None`` before.
        waited: refreshes since that scoring pass that reused the selection.
    """

    def __init__(self) -> None:
        self.selection: Optional[Tensor] = None
        self.waited = 0

    def state_dict(self) -> dict[str, Any]:
        return {"selection": self.selection, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selection = None if state["selection"] is None else state["selection"].clone()
        self.waited = int(state["waited"])


@register_strategy("el2n")
class EL2N(Strategy):
    r"""The top-``budget`` examples by EL2N, scored over the whole pool at ``score_epoch`` and then frozen.

    Before ``score_epoch``: a fresh uniform subset at every refresh. At the first refresh whose selection
    starts at epoch ``score_epoch`` or later: a forward-only pass over the pool, then the ``budget`` examples
    with the largest ``error_norm`` (ties broken by the seeded generator; examples without a supervised
    target last). After: the same subset, unweighted (re-ranking from the store would compare the selected
    examples' fresh scores with the others' stale ones). The automatic captures provide ``error_norm``; a
    custom ``coreset_signals`` must return ``ExampleSignals(..., error_norm=...)``. When to use it and
    suggested settings: the ``el2n`` section of ``grace_lightning/strategies/README.md``.

    Args:
        score_epoch: epoch (0-based) of the first selection made from EL2N scores (``>= 0``). With 0, the
            scoring pass is the first refresh after training starts: before any training the callback draws
            a uniform subset itself, as an untrained model's scores say nothing.
        rescore_every_n_refreshes: rescore and re-select every this many refreshes after a scoring pass
            (``None``: never; the selection is static).

    Example::

        CoresetCallback(sampler, strategy="el2n", strategy_kwargs={"score_epoch": 2})
    """

    needs = frozenset({"error_norm"})

    def __init__(self, score_epoch: int = 2, rescore_every_n_refreshes: Optional[int] = None) -> None:
        self.score_epoch = non_negative_int("el2n", "score_epoch", score_epoch, hint=" (e.g. 2)")
        every = rescore_every_n_refreshes
        if every is not None:
            every = positive_int("el2n", "rescore_every_n_refreshes", every, hint=", or None to never rescore")
        self.rescore_every_n_refreshes = every

    def __repr__(self) -> str:
        return f"EL2N(score_epoch={self.score_epoch}, rescore_every_n_refreshes={self.rescore_every_n_refreshes})"

    def create_state(self, pool_size: int) -> EL2NState:
        return EL2NState()

    def _scoring_due(self, inputs: SelectionInput) -> bool:
        """Whether this refresh scores the pool: a pure function of the inputs and the state before ``select``."""
        if inputs.epoch < self.score_epoch:
            return False
        state = _state(inputs)
        if state.selection is None:
            return True
        every = self.rescore_every_n_refreshes
        return every is not None and state.waited + 1 >= every

    def to_score(self, inputs: SelectionInput) -> Optional[Tensor]:
        return torch.arange(inputs.pool_size) if self._scoring_due(inputs) else None

    def select(self, inputs: SelectionInput) -> Selection:
        if inputs.epoch < self.score_epoch:
            return Selection(uniform_sample(inputs.pool_size, inputs.budget, inputs.generator), diagnostics={"rescored": 0.0})
        state = _state(inputs)
        if not self._scoring_due(inputs):
            state.waited += 1
            return Selection(state.selection.clone(), diagnostics={"rescored": 0.0})
        store = inputs.store
        if store is None or store.error_norm is None:
            raise ValueError(
                "el2n: no EL2N score (`error_norm`) was measured. The automatic signal captures provide it; a "
                "custom `coreset_signals` must return it too: ExampleSignals(loss=..., grad_norm=..., "
                "error_norm=(softmax(logits) - one_hot(targets)).norm(dim=-1)), or use "
                "grace_lightning.signals.classification_signals / causal_lm_signals, which compute it."
            )
        score = torch.where(store.measured, store.error_norm, torch.full_like(store.error_norm, -torch.inf))
        top = top_k_random_ties(score.numpy(), inputs.budget, inputs.generator)
        state.selection = torch.from_numpy(np.sort(top))
        state.waited = 0
        return Selection(state.selection.clone(), diagnostics={"rescored": 1.0})


def _state(inputs: SelectionInput) -> EL2NState:
    if not isinstance(inputs.state, EL2NState):
        raise TypeError(
            "el2n: `inputs.state` must be the EL2NState from EL2N.create_state(pool_size); the CoresetCallback "
            "passes it. When calling the strategy yourself, pass SelectionInput(..., state=strategy.create_state(n))."
        )
    return inputs.state
