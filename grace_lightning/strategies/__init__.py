"""Selection strategies: one file each, registered by name. A new strategy is one file plus an import here."""

from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    available_strategies,
    build_strategy,
    register_strategy,
)
from grace_lightning.strategies import el2n, full, gip, grace, grip, group_mates, infobatch, random  # noqa: F401  (registers the built-in strategies)

__all__ = ["Selection", "SelectionInput", "Strategy", "available_strategies", "build_strategy", "register_strategy"]
