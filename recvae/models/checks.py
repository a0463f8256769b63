"""The one check of each kind of hyperparameter value: every estimator, ``tune``'s grids and the
command line call these, so a value is judged (and its error worded) the same way everywhere.
Each raises :class:`recvae.errors.ParameterError` naming the parameter."""

from __future__ import annotations

import math

import numpy as np

from recvae.errors import ParameterError, shown


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ParameterError(name, f"expected a positive integer, got {shown(v)}")
    return int(v)


def number(name: str, v, ok=lambda v: True, expected: str = "a finite number") -> float:
    """A finite number for which ``ok(v)`` holds."""
    if not _is_number(v) or not math.isfinite(v) or not ok(v):
        raise ParameterError(name, f"expected {expected}, got {shown(v)}")
    return float(v)


def positive_number(name: str, v) -> float:
    return number(name, v, lambda v: v > 0, "a finite number > 0")


def non_negative_number(name: str, v) -> float:
    return number(name, v, lambda v: v >= 0, "a finite number >= 0")


def probability(name: str, v) -> float:
    """A dropout rate: in [0, 1)."""
    return number(name, v, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")


def one_of(name: str, v, options) -> object:
    if v not in options:
        raise ParameterError(name, f"expected one of {list(options)}, got {shown(v)}")
    return v


def widths(name: str, v) -> tuple[int, ...]:
    """Layer widths: a sequence of positive integers (possibly empty)."""
    try:
        dims = tuple(v)
    except TypeError:
        raise ParameterError(name, f"expected a tuple of positive integers, got {shown(v)}") from None
    if not all(not isinstance(d, bool) and isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
        raise ParameterError(name, f"expected positive integer widths, got {shown(v)}")
    return tuple(int(d) for d in dims)


def seed(name: str, v) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
        raise ParameterError(name, f"expected None or a non-negative integer, got {shown(v)}")
    return v
