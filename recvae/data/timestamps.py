"""Reading a timestamp column (for a split in time): Unix seconds or ISO dates/datetimes, one
format per column, as float64 Unix seconds; errors name the column, its file and line."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import pandas as pd

from recvae.errors import ParameterError, shown

#: what a timestamp column may hold, as the error messages say it
TIMESTAMP_FORMS = "Unix seconds or an ISO date or datetime (2016-01-31, 2016-01-31 12:00:00)"

_ISO_DATE = re.compile(r"\s*[+-]?\d{4,}-\d{2}-\d{2}\s*")


def parse_timestamps(values: pd.Series, col, source: str | None = None,
                     locate: Callable[[int], str] | None = None) -> np.ndarray:
    """A timestamp column as float64 Unix seconds: numbers are seconds already; datetimes (a
    Parquet timestamp column) are converted; text is either all numbers (seconds) or all ISO
    dates/datetimes (UTC without a zone). The first empty or unparseable value, or a column
    mixing numbers and dates (naming the first of each), is a
    :class:`~recvae.errors.ParameterError` of ``timestamp_col`` naming its row (``locate(j)``)."""
    locate = locate or (lambda j: f"row {j}")

    def bad(j: int, problem: str) -> ParameterError:
        return ParameterError("timestamp_col", f"column {col!r}: {locate(j)} {problem}; expected {TIMESTAMP_FORMS}",
                              where=source)

    kind = values.dtype.kind
    text = kind not in "iufbM"
    empty = values.isna().to_numpy()
    if text:
        empty = empty | values.astype(str).str.strip().eq("").to_numpy()
    if empty.any():
        j = int(np.argmax(empty))
        raise bad(j, f"has no time ({int(empty.sum())} empty value(s) in the column)")
    if kind == "b":
        raise bad(0, f"holds {shown(values.iloc[0])}")
    if kind == "M":
        seconds = _seconds(pd.to_datetime(values, utc=True))
    elif not text:
        seconds = values.to_numpy(dtype=np.float64)
    else:
        seconds = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        dated = np.isnan(seconds)  # not a number: an ISO date, or not a time at all
        if dated.any():
            dates = pd.to_datetime(values[dated], errors="coerce", utc=True, format="ISO8601")
            seconds[dated] = _seconds(dates)
            is_date = np.zeros(len(values), dtype=bool)
            is_date[np.flatnonzero(dated)[dates.notna().to_numpy()]] = True
            if is_date.any() and (~dated).any():
                raise _mixed(values, col, source, locate, int(np.argmin(dated)), int(np.argmax(is_date)))
            failed = dated & ~is_date
            if failed.any():
                j = int(np.argmax(failed))
                raise bad(j, f"holds {shown(values.iloc[j])}")
    finite = np.isfinite(seconds)
    if not finite.all():
        j = int(np.argmin(finite))
        raise bad(j, f"holds {shown(values.iloc[j])}")
    return seconds


def _seconds(dates: pd.Series) -> np.ndarray:
    return ((dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def _mixed(values: pd.Series, col, source, locate, number: int, date: int) -> ParameterError:
    """The error of a column holding both Unix seconds and ISO dates: the first of each kind."""
    iso = "ISO date" if _ISO_DATE.fullmatch(str(values.iloc[date])) else "ISO datetime"
    first = sorted([(number, "Unix seconds"), (date, iso)])
    kinds = " and ".join(f"{locate(j)}: {str(values.iloc[j]).strip()} ({what})" for j, what in first)
    return ParameterError("timestamp_col", f"column {col!r} mixes time formats, {kinds}; give one format per "
                                           "column: all Unix seconds, or all ISO dates/datetimes", where=source)
