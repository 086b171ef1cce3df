"""``full``: train on the whole pool. At a budget below 1 the sampler streams it, a budget's worth per epoch."""

from grace_lightning.strategies.base import Selection, SelectionInput, Strategy, register_strategy


@register_strategy("full")
class FullData(Strategy):
    """The whole pool, unweighted: the reference every other strategy is compared against.

    With ``CoresetSampler(fraction=1.0)`` this is plain full-data training. With a smaller budget, each
    epoch trains on the next ``budget`` examples of a shuffled pass over the whole pool (sampling without
    replacement across epochs), which is the fair "same number of steps" comparison.

    Example::

        CoresetCallback(sampler, strategy="full")
    """

    def select(self, inputs: SelectionInput) -> Selection:
        return Selection(indices=None)
