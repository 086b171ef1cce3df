"""Argument checks shared by the public constructors: each raises ``ValueError`` naming the parameter and the fix.

Every validator takes ``(owner, name, value)`` and returns the value as a plain Python ``int`` or ``float``.
The message reads ``"<owner>: `<name>` must be <requirement><hint>, got <value!r>."``, where ``hint`` (optional,
e.g. ``" (e.g. 2)"`` or ``", or None for all"``) tells the user what a good value is.

Integers are Python ``int`` or numpy integers; ``bool`` (and ``numpy.bool_``) is never accepted, although
``True`` is an ``int`` to Python. Numbers are ints or floats (numpy's too, ``bool`` again excluded) and must be
finite.

Example::

    >>> positive_int("MyStrategy", "k", 10)
    10
    >>> positive_int("MyStrategy", "k", 0, hint=" (e.g. 10)")
    Traceback (most recent call last):
        ...
    ValueError: MyStrategy: `k` must be a positive int (e.g. 10), got 0.
    >>> unit_interval("MyStrategy", "share", 0.25, high_open=True)
    0.25
    >>> non_negative_float("MyStrategy", "lam", float("nan"))
    Traceback (most recent call last):
        ...
    ValueError: MyStrategy: `lam` must be a finite number >= 0, got nan.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = [
    "boolean",
    "integer",
    "is_int",
    "is_real",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "positive_int_or_none",
    "real",
    "unit_interval",
]


def is_int(value: object) -> bool:
    """``True`` for a Python or numpy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """``True`` for a finite Python or numpy int or float that is not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return isinstance(value, (int, np.integer)) or math.isfinite(value)


def _fail(owner: str, name: str, requirement: str, hint: str, value: object) -> ValueError:
    return ValueError(f"{owner}: `{name}` must be {requirement}{hint}, got {value!r}.")


def integer(owner: str, name: str, value: object, *, minimum: Optional[int] = None, hint: str = "") -> int:
    """``value`` as an ``int``; it must be an integer (not a bool), at least ``minimum`` when given."""
    if not is_int(value) or (minimum is not None and value < minimum):
        if minimum is None:
            requirement = "an int"
        elif minimum == 1:
            requirement = "a positive int"
        else:
            requirement = f"an int >= {minimum}"
        raise _fail(owner, name, requirement, hint, value)
    return int(value)


def positive_int(owner: str, name: str, value: object, *, hint: str = "") -> int:
    """An integer ``>= 1``."""
    return integer(owner, name, value, minimum=1, hint=hint)


def non_negative_int(owner: str, name: str, value: object, *, hint: str = "") -> int:
    """An integer ``>= 0``."""
    return integer(owner, name, value, minimum=0, hint=hint)


def positive_int_or_none(owner: str, name: str, value: object, *, hint: str = "") -> Optional[int]:
    """``None``, or an integer ``>= 1``; the message reads "must be a positive int or None<hint>"."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise _fail(owner, name, "a positive int or None", hint, value)
    return int(value)


def _bound(x: float) -> str:
    return f"{x:g}"


def real(
    owner: str,
    name: str,
    value: object,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a ``float``; a finite number within ``[low, high]`` (either end open or absent).

    The requirement reads "a number in [0, 1)" with both bounds, "a finite number > 0" with one, "a finite
    number" with none.
    """
    ok = is_real(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            requirement = f"a number in {left}{_bound(low)}, {_bound(high)}{right}"
        elif low is not None:
            requirement = f"a finite number {'>' if low_open else '>='} {_bound(low)}"
        elif high is not None:
            requirement = f"a finite number {'<' if high_open else '<='} {_bound(high)}"
        else:
            requirement = "a finite number"
        raise _fail(owner, name, requirement, hint, value)
    return float(value)


def positive_float(owner: str, name: str, value: object, *, hint: str = "") -> float:
    """A finite number ``> 0``."""
    return real(owner, name, value, low=0.0, low_open=True, hint=hint)


def non_negative_float(owner: str, name: str, value: object, *, hint: str = "") -> float:
    """A finite number ``>= 0``."""
    return real(owner, name, value, low=0.0, hint=hint)


def unit_interval(
    owner: str, name: str, value: object, *, low_open: bool = False, high_open: bool = False, hint: str = ""
) -> float:
    """A number in ``[0, 1]``, either end open on request (e.g. ``high_open=True`` for ``[0, 1)``)."""
    return real(owner, name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open, hint=hint)


def boolean(owner: str, name: str, value: object, *, hint: str = "") -> bool:
    """``True`` or ``False`` (not a truthy stand-in such as ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise _fail(owner, name, "True or False", hint, value)
    return value
