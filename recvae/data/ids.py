"""Ids as users write them, matched to a run's vocabularies: the one conversion and lookup of
user and item ids (``recommend``, the service and history files all call it).

``"42"`` matches the integer id 42 and ``42`` the string id ``"42"``; an id that cannot be of
the vocabulary's type (``1.5`` where ids are integers) is marked bad, and callers name its line.
Text ids are read without the spaces around them (:func:`strip_ids`), in training data and in
lookups alike: ``" u1"`` is the user ``"u1"``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from recvae.errors import RecvaeError

logger = logging.getLogger(__name__)

_INT_TEXT = r"[+-]?\d+"


def index_of(index: pd.Index, ids):
    """Positions of ``ids`` in ``index`` (int64, ``-1`` where absent; a scalar gives an ``int``).
    Exact: ``"1"`` and ``1`` are different ids. The one id lookup of the library: callers that
    accept ids of another type (``recvae.data.ids.match_ids``) convert them first."""
    scalar = np.ndim(ids) == 0
    if scalar:
        target = pd.Index([ids], dtype=object)
    elif isinstance(ids, (np.ndarray, pd.Index, pd.Series)):
        target = pd.Index(ids)
    else:  # a list may mix types: keep each value as is ("1" must not match 1)
        target = pd.Index(list(ids), dtype=object)
    out = np.asarray(index.get_indexer(target), dtype=np.int64)
    return int(out[0]) if scalar else out


def strip_ids(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Text ids without the spaces around them (``" u1 "`` is ``"u1"``): ``(stripped, changed)``,
    ``changed[j]`` marking the values that had some. Numbers, and columns of them, as they are."""
    none = np.zeros(len(values), dtype=bool)
    if values.dtype.kind != "O" and not isinstance(values.dtype, pd.StringDtype):
        return values, none
    stripped = values.str.strip()  # missing for a value that is not text
    changed = (stripped.notna() & (stripped != values)).to_numpy(dtype=bool)
    if not changed.any():
        return values, none
    if isinstance(values.dtype, pd.CategoricalDtype):  # "b" need not be a category where " b" is
        values = values.astype(object)
    return values.where(~changed, stripped), changed


def strip_id_columns(df: pd.DataFrame, columns, source: str | None = None, locate=None) -> pd.DataFrame:
    """``df`` with the text ids of ``columns`` stripped (:func:`strip_ids`), and one warning line
    when any had spaces around them: how many values, and where the first is (``locate(j)``
    names row ``j``: ``line 7``); a column ``df`` lacks is skipped. ``df`` itself is left as it
    is (a copy holds the change)."""
    locate = locate or (lambda j: f"row {j}")
    found = {}
    for col in dict.fromkeys(c for c in columns if c in df.columns):  # a missing one: the caller says
        stripped, changed = strip_ids(df[col])
        if changed.any():
            found[col] = (stripped, changed)
    if not found:
        return df
    first, col = min(((int(np.argmax(changed)), col) for col, (_, changed) in found.items()), key=lambda f: f[0])
    n = sum(int(changed.sum()) for _, changed in found.values())
    logger.warning("%sremoved the spaces around %d id(s) (%r is read as %r); the first at %s, column %r",
                   f"{source}: " if source else "", n, df[col].iloc[first], found[col][0].iloc[first],
                   locate(first), col)
    df = df.copy(deep=False)
    for col, (stripped, _) in found.items():
        df[col] = stripped
    return df


class IdError(RecvaeError, ValueError):
    """An id that cannot be an id of the run (e.g. ``1.5`` where ids are integers).

    ``position`` is the 0-based position of the value in its column, so callers can name a
    file line or a JSON field; ``names``: parameters the message speaks of (:class:`RecvaeError`).
    """

    def __init__(self, message: str, position: int, value, names: tuple[str, ...] = ()):
        super().__init__(message, names=names)
        self.position = position
        self.value = value


def convert_ids(values, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` converted to the id type of the vocabulary ``like``: ``(converted, bad)``.

    Integer vocabularies take ints, integral floats (``3.0``, e.g. a Parquet float column) and
    text spelling an integer (``"42"``, ``" 42 "``, ``"42.0"``); string vocabularies take the text
    of any value (an integral float as its integer text). ``bad[j]`` marks values that cannot be
    an id of that type (``1.5``, ``"abc"``, a missing value for integer ids); their converted
    entry is meaningless.
    """
    to_int = np.asarray(like).dtype.kind in "iu"
    if isinstance(values, list):  # a request's ids: mostly of the vocabulary's own type already
        same = _of_type(values, to_int)
        if same is not None:
            return same, np.zeros(len(same), dtype=bool)
    if not isinstance(values, pd.Series) and len(values) <= 256:  # a few ids: per value, no pandas
        return _convert_few(values, to_int)
    series = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
    n = len(series)
    missing = series.isna().to_numpy()
    if to_int:
        if series.dtype.kind in "iu":
            return series.to_numpy(np.int64), np.zeros(n, dtype=bool)
        out = np.zeros(n, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        text = series.astype(str).str.strip()
        is_int = text.str.fullmatch(_INT_TEXT).fillna(False).to_numpy() & ~missing
        if is_int.any():
            parsed = pd.to_numeric(text[is_int], errors="coerce")  # beyond int64 -> float: refused below
            exact = parsed.to_numpy().dtype.kind == "i"  # uint64 (a value beyond int64) or float: one by one
            if exact:
                out[is_int] = parsed.to_numpy(np.int64)
                ok[is_int] = True
            else:  # some value exceeds int64: check one by one
                for j in np.flatnonzero(is_int):
                    v = int(text.iloc[j])
                    if -(2**63) <= v < 2**63:
                        out[j], ok[j] = v, True
        rest = ~is_int & ~missing
        if rest.any():
            num = pd.to_numeric(text[rest], errors="coerce").to_numpy(np.float64)
            integral = np.isfinite(num) & (np.floor(num) == num) & (np.abs(num) < 2**53)
            idx = np.flatnonzero(rest)[integral]
            out[idx] = num[integral].astype(np.int64)
            ok[idx] = True
        return out, ~ok
    # string vocabulary
    if series.dtype.kind == "f":  # e.g. a Parquet float column: 3.0 is the id "3"
        text = [str(int(v)) if np.isfinite(v) and v == int(v) else str(v) for v in series.to_numpy()]
        return np.asarray(text, dtype=object), missing
    return series.astype(str).str.strip().to_numpy(dtype=object), missing


def _of_type(values: list, to_int: bool) -> np.ndarray | None:
    """``values`` as an id array when every one is already an id of the vocabulary's type (a
    Python int within int64, or a str), with nothing to convert; else None."""
    kind = int if to_int else str
    if not all(type(v) is kind for v in values):
        return None
    if not to_int:
        return np.array([v.strip() for v in values], dtype=object)
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:  # beyond int64: convert_ids refuses it value by value
        return None


def _convert_few(values, to_int: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`convert_ids` value by value (the same rules), for a few ids such as one request's."""
    out, bad = [], []
    for v in values:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            out.append(0 if to_int else "")
            bad.append(True)
            continue
        if not to_int:
            text = str(int(v)) if isinstance(v, float) and v == int(v) else str(v).strip()
            out.append(text)
            bad.append(False)
            continue
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            ok, num = -(2**63) <= v < 2**63, int(v)
        else:
            try:
                num = int(str(v).strip())
                ok = -(2**63) <= num < 2**63
            except ValueError:
                try:
                    f = float(str(v).strip())
                except ValueError:
                    f = np.nan
                ok = bool(np.isfinite(f) and f == np.floor(f) and abs(f) < 2**53)
                num = int(f) if ok else 0
        out.append(num if ok else 0)
        bad.append(not ok)
    dtype = np.int64 if to_int else object
    return np.array(out, dtype=dtype), np.array(bad, dtype=bool)


def match_ids(values, vocabulary: pd.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of ``values`` in ``vocabulary`` (-1 where unknown), after :func:`convert_ids`.

    Returns ``(codes, converted, bad)``; ``bad`` values (not of the vocabulary's type) get code -1.
    """
    converted, bad = convert_ids(values, vocabulary.to_numpy())
    codes = np.full(len(converted), -1, dtype=np.int64)
    good = ~bad
    if good.any():
        codes[good] = index_of(vocabulary, converted[good])
    return codes, converted, bad


def log_unknown(what: str, values: np.ndarray, total: int) -> None:
    """One warning line with the count of unknown ids and a few examples."""
    values = pd.unique(pd.Series(values, dtype=object))
    if len(values):
        examples = ", ".join(repr(v) for v in values[:5])
        logger.warning("%d of %d %s unknown to the run (e.g. %s)", len(values), total, what, examples)
