"""The one container for implicit feedback: a users x items CSR matrix plus id vocabularies.

Also the generic readers (CSV, TSV, GroupLens ``::`` files, Parquet) and the ``.npz`` cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Hashable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recvae.data.ids import index_of, strip_id_columns
from recvae.data.preprocessing import PAPER, Preprocessing
from recvae.data.timestamps import parse_timestamps
from recvae.data.user_items import as_csr  # noqa: F401  (its former home: still importable from here)
from recvae.errors import ColumnError, InputError, ParameterError
from recvae.fileio import atomic_write, read_npz

logger = logging.getLogger(__name__)

#: bumped when the layout of the ``.npz`` cache changes
NPZ_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Interactions:
    """Implicit feedback as a binary users x items CSR matrix.

    ``user_ids[u]`` / ``item_ids[i]`` are the original ids (ints or strings) of row ``u`` /
    column ``i``; indices are contiguous ``0..n-1``. :meth:`from_dataframe` sorts both id
    arrays (sorted unique original ids), so the same data always gives the same indices.
    Use :meth:`user_index` / :meth:`item_index` to go from original ids to indices.
    """

    matrix: sp.csr_matrix  # (n_users, n_items), float32 ones, sorted indices, no duplicates
    user_ids: np.ndarray  # (n_users,) original user ids
    item_ids: np.ndarray  # (n_items,) original item ids
    # when read with a timestamp column (for a time split), aligned with the stored entries
    # (``matrix.indices``): each interaction's time in Unix seconds (float64), and ``sequence``,
    # the position in the source table of the row it came from (int64), which orders equal times
    timestamps: np.ndarray | None = None
    sequence: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.timestamps is None) != (self.sequence is None):
            raise ParameterError("sequence", "give it with timestamps, or neither")
        for name in ("timestamps", "sequence"):
            values = getattr(self, name)
            if values is not None and len(values) != self.matrix.nnz:
                raise ParameterError(name, f"{len(values)} values for {self.matrix.nnz} stored interactions")
        if not sp.isspmatrix_csr(self.matrix):
            raise TypeError(f"matrix: expected a scipy.sparse.csr_matrix, got {type(self.matrix).__name__}")
        if self.matrix.shape != (len(self.user_ids), len(self.item_ids)):
            raise ParameterError(
                "matrix", f"shape {self.matrix.shape} does not match "
                f"{len(self.user_ids)} user ids x {len(self.item_ids)} item ids"
            )

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]

    @property
    def nnz(self) -> int:
        return self.matrix.nnz

    def __repr__(self) -> str:
        return f"Interactions(n_users={self.n_users}, n_items={self.n_items}, nnz={self.nnz})"

    # ------------------------------------------------------------------ id <-> index
    @cached_property
    def _user_lookup(self) -> pd.Index:
        return pd.Index(self.user_ids)

    @cached_property
    def _item_lookup(self) -> pd.Index:
        return pd.Index(self.item_ids)

    def user_index(self, ids) -> np.ndarray:
        """Row indices (int64) of the original user ``ids``; ``-1`` where an id is unknown.

        ``ids`` is a scalar or a sequence; a scalar gives a 0-d result converted to ``int``.
        Lookups are exact: ``"1"`` and ``1`` are different ids.
        """
        return index_of(self._user_lookup, ids)

    def item_index(self, ids) -> np.ndarray:
        """Column indices (int64) of the original item ``ids``; ``-1`` where an id is unknown."""
        return index_of(self._item_lookup, ids)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        user_col: Hashable = "user",
        item_col: Hashable = "item",
        rating_col: Hashable | None = None,
        rating_threshold: float | None = PAPER.rating_threshold,
        min_user_interactions: int = PAPER.min_user_interactions,
        min_item_interactions: int = PAPER.min_item_interactions,
        *,
        timestamp_col: Hashable | None = None,
        source: str | None = None,
        locate: Callable[[int], str] | None = None,
        report: dict | None = None,
    ) -> "Interactions":
        """Build binary implicit feedback from a table of (user, item[, rating]) rows.

        Steps, in this order (each a single pass, as in the Mult-VAE paper's preprocessing; the
        defaults are the paper's, :class:`~recvae.data.Preprocessing`'s):

        1. keep rows with ``rating > rating_threshold`` (strictly greater; the paper keeps
           ratings > 3.5, i.e. 4 and above on MovieLens). Only with ``rating_col``: without a
           rating column every row is a positive; ``rating_threshold=None`` keeps every rating.
        2. merge duplicate (user, item) pairs into one binary interaction.
        3. keep users with ``>= min_user_interactions`` interactions (the paper: 5), counted
           after step 1-2.
        4. keep items with ``>= min_item_interactions`` interactions, counted after step 3
           (the paper: 0, i.e. no item filter). Not iterated: a user may fall below the user
           minimum after step 4. (The paper's notebook ``filter_triplets`` filters items
           before users; with the paper's item minimum of 0 both orders give the same data.)

        ``user_ids`` / ``item_ids`` are the sorted unique original ids (ints or strings);
        mixing ints and strings in one column is an error.

        ``timestamp_col`` (for a time split, :mod:`recvae.data.splits`): the column of each
        row's time, Unix seconds (numbers) or ISO dates/datetimes (``2016-01-31``,
        ``2016-01-31 12:00:00``; without a zone they are UTC), kept as ``timestamps`` (seconds)
        with ``sequence`` (the row's position in ``df``). A pair merged in step 2 keeps its
        earliest time (the first such row on a tie): an item enters a user's history once, when
        it was first seen. An empty or unparseable time is an error naming its row.

        Raises ``KeyError`` for a missing column (listing the available ones) and
        ``ValueError`` for missing ids, non-numeric ratings (naming the first bad row) or when
        a filter leaves nothing (naming the filter). ``source`` (e.g. a file name) prefixes
        error messages; ``locate(j)`` names row ``j`` as the user finds it (``line 7``, see
        :func:`~recvae.data.read_table`), else it is ``row j (index ...)``. ``report`` (a dict) receives what each step kept and dropped
        (:func:`describe_kept` words it).
        """
        where = f"{source}: " if source else ""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"{where}df: expected a pandas DataFrame, got {type(df).__name__}")
        for arg, col in (("user_col", user_col), ("item_col", item_col), ("rating_col", rating_col),
                         ("timestamp_col", timestamp_col)):
            if col is not None and col not in df.columns:
                hint = "; if the data has no ratings, give {rating_col} none" if arg == "rating_col" else ""
                raise ColumnError(arg, f"column {col!r} not found; available columns: {list(df.columns)}{hint}",
                                  source, names=("rating_col",))
        try:
            Preprocessing(rating_threshold, min_user_interactions, min_item_interactions)
        except ParameterError as e:
            raise ParameterError(e.param, e.message, source) from None
        if rating_col is None:
            rating_threshold = None  # no ratings: every row is a positive
        if len(df) == 0:
            raise InputError(source, "no rows: the table is empty")

        if locate is None:
            locate = lambda j: f"row {j} (index {df.index[j]!r})"  # noqa: E731
        df = strip_id_columns(df, (user_col, item_col), source, locate)  # " u1" is the user "u1"
        users = df[user_col]
        items = df[item_col]
        for arg, col, values in (("user_col", user_col, users), ("item_col", item_col, items)):
            missing = (values.isna() | (values == "")).to_numpy(dtype=bool)  # "" (or spaces only): no id
            if missing.any():
                first = int(np.argmax(missing))
                raise ParameterError(
                    arg,
                    f"column {col!r} has {int(missing.sum())} missing id(s); first at {locate(first)}",
                    where=source,
                )
        times = None if timestamp_col is None else parse_timestamps(df[timestamp_col], timestamp_col, source, locate)
        keep = np.ones(len(df), dtype=bool)
        if rating_col is not None:
            raw = df[rating_col]
            ratings = pd.to_numeric(raw, errors="coerce")
            bad = ratings.isna().to_numpy()
            if bad.any():
                first = int(np.argmax(bad))
                raise ParameterError(
                    "rating_col",
                    f"column {rating_col!r} must be numeric; {locate(first)} holds {raw.iloc[first]!r}",
                    where=source,
                )
            if rating_threshold is not None:
                keep = ratings.to_numpy(dtype=np.float64) > float(rating_threshold)
                if not keep.any():  # the data's fault as much as the rule's, which may be a default
                    raise InputError(source, f"no rating is above {rating_threshold:g}, the threshold of "
                                             f"{{rating_threshold}} (the highest is {ratings.max():g}): nothing left",
                                     names=("rating_threshold",))

        counts_report = {"rows": len(df), "below_threshold": int(len(df) - keep.sum()), "threshold": rating_threshold}
        u_codes, u_uniques = _factorize(users[keep], "user_col", user_col, where)
        i_codes, i_uniques = _factorize(items[keep], "item_col", item_col, where)
        n_u, n_i = len(u_uniques), len(i_uniques)
        # one key per (user, item) pair: sorting merges duplicates and orders by (user, item)
        keys = u_codes * n_i + i_codes
        if times is None:
            pairs = sorted_unique(keys)
        else:  # sorted by pair, then time, then row: each pair's first entry is its earliest row
            positions = np.flatnonzero(keep)
            order = np.lexsort((positions, times[keep], keys))
            first = np.ones(len(order), dtype=bool)
            first[1:] = keys[order][1:] != keys[order][:-1]
            pairs = keys[order][first]
            pair_times, pair_rows = times[keep][order][first], positions[order][first]
        rows, cols = np.divmod(pairs, n_i)
        counts_report["duplicates"] = int(keep.sum() - len(pairs))

        # the user minimum, then the item minimum on what the user minimum left
        rules = (("min_user_interactions", min_user_interactions, "user", "", "the most active user"),
                 ("min_item_interactions", min_item_interactions, "item", " after the user filter",
                  "the most popular item"))
        for param, minimum, kind, after, top in rules:
            if minimum <= 0:
                continue
            index, n = (rows, n_u) if kind == "user" else (cols, n_i)
            counts = np.bincount(index, minlength=n)
            ok = counts[index] >= minimum
            if not ok.any():  # about the data: the minimum may be a default the user never gave
                raise InputError(source, f"no {kind} has {minimum} or more interactions{after}, the minimum of "
                                         f"{{{param}}} ({top} has {counts.max()}): nothing left", names=(param,))
            counts_report[f"{kind}s_below_min"] = int(((counts > 0) & (counts < minimum)).sum())
            counts_report[f"interactions_of_those_{kind}s"] = int((~ok).sum())
            rows, cols = rows[ok], cols[ok]
            if times is not None:
                pair_times, pair_rows = pair_times[ok], pair_rows[ok]

        # re-index the survivors densely; rows/cols are sorted by (row, col) already
        used_u = np.flatnonzero(np.bincount(rows, minlength=n_u))
        used_i = np.flatnonzero(np.bincount(cols, minlength=n_i))
        rows = np.searchsorted(used_u, rows)
        cols = np.searchsorted(used_i, cols)
        indptr = np.zeros(len(used_u) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(used_u)), out=indptr[1:])
        matrix = sp.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), cols.astype(np.int32), indptr),
            shape=(len(used_u), len(used_i)),
        )
        matrix.has_sorted_indices = True
        ids = []
        for arg, col, uniques, used in (("user_col", user_col, u_uniques, used_u), ("item_col", item_col, i_uniques, used_i)):
            try:
                ids.append(_as_id_array(uniques[used], arg))
            except TypeError as e:
                raise ParameterError(arg, f"column {col!r} mixes id types; {e}", source) from e
        if report is not None:
            report.update(counts_report, min_user_interactions=min_user_interactions,
                          min_item_interactions=min_item_interactions, users=matrix.shape[0], items=matrix.shape[1],
                          interactions=int(matrix.nnz))
        if times is None:
            return cls(matrix, *ids)
        return cls(matrix, *ids, timestamps=pair_times.astype(np.float64), sequence=pair_rows.astype(np.int64))

    # ------------------------------------------------------------------ .npz cache
    def save(self, path: str | os.PathLike) -> Path:
        """Write a compact ``.npz`` cache (CSR arrays + id arrays), atomically.

        Strings ids are stored as fixed-width unicode arrays so that :meth:`load` works with
        ``allow_pickle=False``. Written to a temporary file beside ``path``, then renamed.
        """
        path = Path(path)
        arrays = {
            "format_version": np.array(NPZ_FORMAT_VERSION),
            "indptr": self.matrix.indptr,
            "indices": self.matrix.indices,
            "data": self.matrix.data,
            "shape": np.array(self.matrix.shape, dtype=np.int64),
            "user_ids": _as_id_array(self.user_ids, "user_ids"),
            "item_ids": _as_id_array(self.item_ids, "item_ids"),
        }
        if self.timestamps is not None:  # optional: caches without them read as before
            arrays.update(timestamps=self.timestamps, sequence=self.sequence)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        logger.debug("saved %r to %s", self, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Interactions":
        """Read a cache written by :meth:`save` (no pickle involved)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"interactions cache not found: {path}")
        z = read_npz(path, "interactions cache")
        missing = sorted({"format_version", "indptr", "indices", "data", "shape", "user_ids", "item_ids"} - set(z))
        if missing:
            raise InputError(path, f"not a valid interactions cache (missing {', '.join(missing)})")
        version = int(z["format_version"])
        if version != NPZ_FORMAT_VERSION:
            raise InputError(path, f"cache format version {version}, expected {NPZ_FORMAT_VERSION}; delete it to "
                                   "rebuild")
        shape = tuple(int(s) for s in z["shape"])
        try:
            matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
            times = {k: z[k] for k in ("timestamps", "sequence") if k in z}
            return cls(matrix, z["user_ids"], z["item_ids"], **times)
        except (ValueError, TypeError) as e:
            raise InputError(path, f"not a valid interactions cache ({e})") from e


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` (sorted distinct values) by one sort: numpy 2's ``np.unique`` hashes
    first, which on tens of millions of int64 codes is 15-20x slower and grows faster than n."""
    values = np.sort(values)
    keep = np.ones(values.size, dtype=bool)
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def describe_kept(report: dict) -> str:
    """One line: what preprocessing kept and what each rule dropped (a report of
    :meth:`Interactions.from_dataframe`)."""
    dropped = []
    if report.get("below_threshold"):
        dropped.append(f"{report['below_threshold']:,} rows rated <= {report['threshold']:g}")
    if report.get("duplicates"):
        dropped.append(f"{report['duplicates']:,} repeated (user, item) pairs")
    if report.get("users_below_min"):
        dropped.append(f"{report['users_below_min']:,} users with fewer than {report['min_user_interactions']} "
                       f"interactions ({report['interactions_of_those_users']:,} interactions)")
    if report.get("items_below_min"):
        dropped.append(f"{report['items_below_min']:,} items with fewer than {report['min_item_interactions']} "
                       f"interactions ({report['interactions_of_those_items']:,} interactions)")
    kept = (f"kept {report['users']:,} users, {report['items']:,} items, {report['interactions']:,} interactions "
            f"of {report['rows']:,} rows")
    return kept + ("; dropped " + ", ".join(dropped) if dropped else "")


def _factorize(values: pd.Series, arg: str, col, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes into the sorted unique values of ``values``."""
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError as e:
        raise ParameterError(
            arg,
            f"column {col!r} mixes id types that cannot be sorted (e.g. ints and strings): {e}",
            where=where[:-2] if where else None,
        ) from e
    return codes.astype(np.int64), np.asarray(uniques)


def _as_id_array(ids, name: str = "ids") -> np.ndarray:
    """Ids as a numpy array storable without pickle: integers as int64, text as unicode."""
    arr = np.asarray(ids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind in "Uf":
        return arr
    if arr.dtype.kind == "b":
        return arr
    # object / pandas string arrays: all strings -> unicode, all ints -> int64
    values = list(arr)
    if all(isinstance(v, str) for v in values):
        return np.array(values, dtype=str)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    kinds = sorted({type(v).__name__ for v in values})
    raise TypeError(f"{name}: ids must be all integers or all strings, got {kinds}")

