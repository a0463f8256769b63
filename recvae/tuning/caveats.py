"""What a tuned choice rests on, said in one warning line each: too few validation users, or a
chosen value on the edge of what was tried (the best may lie beyond it)."""

from __future__ import annotations

import logging
import math
from numbers import Real

from recvae.evaluation import warn_few_users
from recvae.tuning.candidates import Candidate, describe

logger = logging.getLogger("recvae.tuning")

#: a value this close to a bound of its range, as a fraction of the range's width (in logs for a
#: log range), sits at that bound
EDGE_FRACTION = 0.05
#: a grid's lowest or highest value is an edge once at least this many values were tried (with
#: two, every choice is one)
MIN_GRID_VALUES = 3


def warn_choice(chosen: Candidate, tried: list[Candidate], space: dict | None, n_validation: int) -> list[str]:
    """Warn about what ``chosen`` rests on: ``n_validation`` users, and each of its numeric values
    on the edge of ``space[chosen.model]``'s range, or else of the values ``tried`` (the
    finished candidates); returns the edge lines logged."""
    warn_few_users(n_validation, "tune", "validation user" + ("" if n_validation == 1 else "s"),
                   "its choice among the trials may rest on noise")
    lines = edges(chosen, tried, space)
    for line in lines:
        logger.warning("%s", line)
    return lines


def edges(chosen: Candidate, tried: list[Candidate], space: dict | None) -> list[str]:
    """One line per numeric value of ``chosen`` at a bound of its range (within
    :data:`EDGE_FRACTION`) or at the lowest or highest of the values tried (at least
    :data:`MIN_GRID_VALUES` of them)."""
    out = []
    dims = (space or {}).get(chosen.model, {})
    for name, value in chosen.values.items():
        if not _numeric(value):
            continue
        shown = describe({name: value})
        dim = dims.get(name)
        if dim is not None and dim.kind != "cat":
            scale = math.log if dim.kind == "log" else float
            where = (scale(value) - scale(dim.low)) / (scale(dim.high) - scale(dim.low))
            if where <= EDGE_FRACTION:
                out.append(f"tune: the chosen {shown} lies at the low end of its range {dim.describe()}: "
                           "the best may lie below; widen the range")
            elif where >= 1 - EDGE_FRACTION:
                out.append(f"tune: the chosen {shown} lies at the high end of its range {dim.describe()}: "
                           "the best may lie above; widen the range")
            continue
        values = sorted({c.values[name] for c in tried
                         if c.model == chosen.model and _numeric(c.values.get(name))})
        if len(values) < MIN_GRID_VALUES:
            continue
        what, extend = ("values of its list", f"extend its list ({dim.describe()})") if dim is not None else (
            "values of its grid", "extend the grid")
        if value == values[0]:
            out.append(f"tune: the chosen {shown} is the lowest of the {len(values)} {what} tried: "
                       f"the best may lie below; {extend}")
        elif value == values[-1]:
            out.append(f"tune: the chosen {shown} is the highest of the {len(values)} {what} tried: "
                       f"the best may lie above; {extend}")
    return out


def _numeric(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
