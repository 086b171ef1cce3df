"""Seed derivation, written once: every seeded stream of the plugin comes from its parts through here."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["derive_seed", "seeded_generator"]


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixed from integer ``parts`` (a seed, an epoch, a batch position, a task id...).

    ``numpy.random.SeedSequence`` mixes them without the collisions a linear mix has (``(1, 0)`` and ``(0, K)``).

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0])


def seeded_generator(*parts: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts`` (no global stream is touched)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
