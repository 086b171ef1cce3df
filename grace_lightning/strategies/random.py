"""``random``: a fresh uniform subset of the budget's size at every refresh (adaptive random)."""

from grace_lightning.strategies.base import Selection, SelectionInput, Strategy, register_strategy, uniform_sample


@register_strategy("random")
class RandomSubset(Strategy):
    """A uniform random subset of ``budget`` distinct examples, re-drawn at every refresh.

    Cheap and hard to beat once selection cost is counted (CORDS issue #81), so every benchmark reports it.

    Example::

        CoresetCallback(sampler, strategy="random", refresh_every_n_epochs=1)
    """

    def select(self, inputs: SelectionInput) -> Selection:
        return Selection(indices=uniform_sample(inputs.pool_size, inputs.budget, inputs.generator))
