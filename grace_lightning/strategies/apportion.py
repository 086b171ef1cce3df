"""Largest-remainder apportionment: whole units within per-entry bounds, summing exactly to a total.

Shared by the strategies that split a budget over clusters (``grip``'s probe and selection budgets,
``group_mates``'s per-cluster quotas). Numpy in, numpy out.
"""

from __future__ import annotations

import numpy as np

__all__ = ["largest_remainder", "round_to_total"]

_TIES = ("lowest_id", "highest_id")


def largest_remainder(
    base: np.ndarray,
    remainders: np.ndarray,
    total: int,
    lower: np.ndarray,
    upper: np.ndarray,
    ties: str = "lowest_id",
) -> np.ndarray:
    """Integers within ``[lower, upper]`` summing exactly to ``total``: ``base``, then units by remainder.

    Starting from ``base`` (which must lie within the bounds), the missing units go one at a time to the
    entries with the largest ``remainders`` first (skipping entries at their upper bound, and cycling again
    if a pass does not place them all); surplus units are taken from the smallest remainders first
    (skipping entries at their lower bound). ``remainders`` are only compared, so exact integer
    numerators (e.g. ``(B · size) mod N``) work as well as float fractions and cannot tie by rounding.

    Args:
        base: ``(K,)`` integer starting point (usually the floors of the exact shares).
        remainders: ``(K,)`` the priority of each entry (usually the fractional parts of the shares).
        total: the sum the result must have.
        lower, upper: ``(K,)`` integer bounds.
        ties: which entry comes first among equal remainders, for adding and taking alike:
            ``"lowest_id"`` or ``"highest_id"``.

    Returns:
        ``(K,)`` int64.

    Raises:
        ValueError: if ``total`` cannot be reached within the bounds.

    Example::

        >>> floors, fractions = np.array([3, 1, 0]), np.array([0.0, 0.5, 0.5])  # shares 3, 1.5, 0.5 of 5
        >>> lower, upper = np.zeros(3, dtype=np.int64), np.array([6, 3, 1])
        >>> largest_remainder(floors, fractions, 5, lower, upper).tolist()
        [3, 2, 0]
        >>> largest_remainder(floors, fractions, 5, lower, upper, ties="highest_id").tolist()
        [3, 1, 1]
    """
    if ties not in _TIES:
        raise ValueError(f"largest_remainder: `ties` must be 'lowest_id' or 'highest_id', got {ties!r}.")
    out = np.array(base, dtype=np.int64, copy=True)
    lo = np.asarray(lower, dtype=np.int64)
    hi = np.asarray(upper, dtype=np.int64)
    rem = np.asarray(remainders)
    ids = np.arange(out.size)
    tie_key = ids if ties == "lowest_id" else -ids
    need = int(total - out.sum())
    # lexsort: the last key is the primary one; stable, so with a unique secondary key the order is exact.
    order = np.lexsort((tie_key, -rem)) if need > 0 else np.lexsort((tie_key, rem))
    while need != 0:
        moved = False
        for i in order:
            if need > 0 and out[i] < hi[i]:
                out[i] += 1
                need -= 1
                moved = True
            elif need < 0 and out[i] > lo[i]:
                out[i] -= 1
                need += 1
                moved = True
            if need == 0:
                break
        if not moved:
            raise ValueError(f"cannot place {total} units within the bounds (sum of upper bounds {int(hi.sum())}).")
    return out


def round_to_total(
    x: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int, ties: str = "lowest_id"
) -> np.ndarray:
    """Round real shares ``x`` to integers within ``[lower, upper]`` summing exactly to ``total``.

    Floors (with a ``1e-9`` tolerance, so ``2.9999999999`` counts as 3) clipped to the bounds, then
    :func:`largest_remainder` on the fractional parts.

    Example::

        >>> round_to_total(np.array([1.5, 1.5, 1.0]), np.zeros(3, int), np.full(3, 5), 4).tolist()
        [2, 1, 1]
    """
    lo = np.asarray(lower, dtype=np.int64)
    hi = np.asarray(upper, dtype=np.int64)
    base = np.clip(np.floor(x + 1e-9).astype(np.int64), lo, hi)
    return largest_remainder(base, x - base, total, lo, hi, ties)
