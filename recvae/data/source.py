"""Where a run's interactions come from and how they are read: :class:`DataSpec` (a MovieLens
name, an interaction file or a prepared directory, with its preprocessing), and what a run
records of that read (the users it dropped and why, every item each user has seen)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recvae.data.ids import strip_id_columns
from recvae.data.interactions import Interactions, describe_kept
from recvae.data.movielens import load_movielens
from recvae.data.prepared import load_prepared, read_prepared_description
from recvae.data.preprocessing import PAPER, Preprocessing
from recvae.data.readers import read_table
from recvae.errors import InputError, ParameterError
from recvae.optional import require

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class DataSpec:
    """Where interactions come from and how they are preprocessed (defaults: the paper's,
    :class:`~recvae.data.Preprocessing`'s; ``run.json`` records the three rules as flat fields)."""

    dataset: str | None = None  # a MovieLens name, or None when `path` is given
    path: str | None = None  # an interaction file (CSV, TSV, ::, Parquet)
    # a prepared directory (recvae.data.prepared), read instead of the source; the other fields
    # then record where it came from and how it was preprocessed
    prepared: str | None = None
    data_dir: str | None = None
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str | None = "rating"
    sep: str | None = None
    rating_threshold: float | None = PAPER.rating_threshold
    min_user_interactions: int = PAPER.min_user_interactions
    min_item_interactions: int = PAPER.min_item_interactions
    # the time column of `path`, read for a split in time (RunConfig.cutoff / leave_last) and only
    # then; a MovieLens dataset has GroupLens's ("timestamp"); a prepared directory keeps none
    timestamp_col: str | None = None

    def __post_init__(self) -> None:
        if self.prepared is None and (self.dataset is None) == (self.path is None):
            raise ParameterError("data", "give exactly one of a MovieLens dataset name or an interaction file path")

    @classmethod
    def of_prepared(cls, prepared: str | os.PathLike) -> "DataSpec":
        """The spec of a prepared directory: its source and preprocessing, as ``recvae prepare`` recorded them."""
        recorded = read_prepared_description(prepared)["preprocessing"]
        known = {f.name for f in fields(cls)} - {"prepared"}
        return cls(**{k: v for k, v in recorded.items() if k in known}, prepared=str(prepared))

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing rules of this spec."""
        return Preprocessing(self.rating_threshold, self.min_user_interactions, self.min_item_interactions)

    @property
    def name(self) -> str:
        if self.dataset or self.path:
            return self.dataset if self.dataset else Path(self.path).stem
        return Path(self.prepared).name

    @property
    def where(self) -> str:
        """What messages about the data name: the prepared directory, the file or the dataset."""
        return str(self.prepared or self.path or self.dataset)

    def check_optional(self) -> None:
        """Fail now, not after hours, when reading the data needs a package that is missing."""
        if self.path is not None and Path(self.path).suffix.lower() in PARQUET_SUFFIXES:
            require("pyarrow", f"{self.path}: reading Parquet")

    def load(self, show_progress: bool = False, timestamps: bool = False) -> Interactions:
        return self.load_with_seen(show_progress, seen=False, timestamps=timestamps)[0]

    def load_with_seen(self, show_progress: bool = False, seen: bool = True, timestamps: bool = False,
                       positives: dict | None = None) -> tuple[Interactions, Interactions | None, dict | None]:
        """The preprocessed interactions (with ``timestamps``, each interaction's time, for a
        split in time: from ``timestamp_col``); with ``seen`` and a rating threshold, every interaction
        of the source at any rating (what ``recommend`` must not offer again), from one read of
        the source (None without a threshold: the positives are all the source holds; or for a
        prepared directory); and what preprocessing kept and dropped (a file's report, see
        :func:`~recvae.data.interactions.describe_kept`; None for prepared data).
        ``positives`` (a dict) receives, under ``"positives"``, the source's positive interactions
        of every user, the preprocessing without its minimums (what :func:`dropped_users` counts),
        from the same read (not for prepared data)."""
        if timestamps:
            self.check_timestamps()
        if self.prepared is not None:
            return load_prepared(self.prepared), None, None
        threshold = self.rating_threshold if (self.dataset is not None or self.rating_col) else None
        filters = dict(rating_threshold=threshold, min_user_interactions=self.min_user_interactions,
                       min_item_interactions=self.min_item_interactions)
        everything = dict(rating_threshold=None, min_user_interactions=0, min_item_interactions=0)
        want_raw = seen and threshold is not None
        if self.dataset is not None:
            options = dict(data_dir=self.data_dir, show_progress=show_progress)
            try:
                kept: dict = {}
                data = load_movielens(self.dataset, **filters, timestamps=timestamps, report=kept, **options)
                logger.info("%s: %s", self.dataset, describe_kept(kept))
                if positives is not None:
                    positives["positives"] = (load_movielens(self.dataset, rating_threshold=threshold,
                                                             min_user_interactions=0, **options)
                                              if self.min_user_interactions or self.min_item_interactions else data)
                # the unfiltered release comes from the cache MovieLens keeps (parsed once, ever)
                return data, load_movielens(self.dataset, **everything, **options) if want_raw else None, kept
            except ParameterError as e:  # load_movielens's ``name`` is this spec's ``dataset``
                raise (e.renamed("dataset") if e.param == "name" else e) from None
        frame, locate = read_table(self.path, sep=self.sep, locate=True)  # parsed once for both
        # once, not in each read below: one warning when ids had spaces around them
        frame = strip_id_columns(frame, (self.user_col, self.item_col), str(self.path), locate)
        columns = dict(user_col=self.user_col, item_col=self.item_col, rating_col=self.rating_col,
                       source=str(self.path))
        if timestamps and self.timestamp_col is None:  # none was given: a fault of the data's settings, no flag's
            raise InputError(self.path, "a split in time needs the time of each interaction, and no time column was "
                                        f"given: name it with {{timestamp_col}} (columns: {list(frame.columns)})",
                             names=("timestamp_col",))
        kept: dict = {}
        data = Interactions.from_dataframe(frame, **columns, **filters, report=kept, locate=locate,
                                           timestamp_col=self.timestamp_col if timestamps else None)
        logger.info("%s: %s", self.path, describe_kept(kept))
        if positives is not None:
            positives["positives"] = (Interactions.from_dataframe(frame, **columns, rating_threshold=threshold,
                                                                  min_user_interactions=0, min_item_interactions=0)
                                      if self.min_user_interactions or self.min_item_interactions else data)
        return data, Interactions.from_dataframe(frame, **columns, **everything) if want_raw else None, kept

    def check_timestamps(self) -> None:
        """Whether this source can give timestamps (before it is read)."""
        if self.prepared is not None:
            raise ParameterError("prepared", f"{self.prepared} holds no timestamps (recvae prepare keeps none): "
                                             "split in time from the interaction file ({path}) or the dataset "
                                             "({dataset})", names=("path", "dataset"))
        if self.dataset is not None and self.timestamp_col not in (None, "timestamp"):
            raise ParameterError("timestamp_col", f"{self.dataset}'s time column is GroupLens's 'timestamp', "
                                                  f"not {self.timestamp_col!r}")


def read_source(data: DataSpec, show_progress: bool = False, timestamps: bool = False):
    """One read of ``data``'s source: ``(interactions, raw, kept, positives)`` (see
    :meth:`DataSpec.load_with_seen`)."""
    positives: dict = {}
    interactions, raw, kept = data.load_with_seen(show_progress, seen=True, timestamps=timestamps, positives=positives)
    return interactions, raw, kept, positives.get("positives")


#: why a user of the source is not a user of the run (``dropped_users.csv``'s ``reason``)
DROP_REASONS = ("rating_threshold", "min_user_interactions", "min_item_interactions", "split")


def dropped_users(data: DataSpec, positives: Interactions | None, interactions: Interactions, split,
                  raw: Interactions | None) -> pd.DataFrame | None:
    """The users of ``data``'s source that the run does not know, as ``(user, interactions,
    reason)`` rows: no rating above the threshold (``rating_threshold``, 0 interactions), fewer
    positive interactions than the user minimum (``min_user_interactions``, their count), every
    item dropped by the item minimum (``min_item_interactions``), or a held-out user with too few
    items on the training catalogue to hold any out (``split``, their count there).
    ``positives``: the source's positives of every user (see :meth:`DataSpec.load_with_seen`);
    ``interactions``: the preprocessed data ``split`` was made of; ``raw``: the source at any
    rating (None without a threshold). None for prepared data (its source is not at hand)."""
    if data.prepared is not None or positives is None:
        return None
    parts = []
    if raw is not None:
        none = ~pd.Index(raw.user_ids).isin(positives.user_ids)
        parts.append((raw.user_ids[none], np.zeros(int(none.sum()), dtype=np.int64), "rating_threshold"))
    out = ~pd.Index(positives.user_ids).isin(interactions.user_ids)
    counts = np.diff(positives.matrix.indptr)[out]
    for reason, pick in (("min_user_interactions", counts < data.min_user_interactions),
                         ("min_item_interactions", counts >= data.min_user_interactions)):
        parts.append((positives.user_ids[out][pick], counts[pick], reason))
    known = np.concatenate([np.asarray(h.user_ids) for h in (split.train, split.validation, split.test)])
    rows = np.flatnonzero(~pd.Index(interactions.user_ids).isin(known))
    if rows.size:
        cols = interactions.item_index(np.asarray(split.item_ids))
        on_catalogue = np.diff(interactions.matrix[rows][:, cols].tocsr().indptr)
        parts.append((interactions.user_ids[rows], on_catalogue, "split"))
    users = np.concatenate([np.asarray(u, dtype=object) for u, _, _ in parts])
    return pd.DataFrame({"user": users, "interactions": np.concatenate([c for _, c, _ in parts]).astype(np.int64),
                         "reason": np.concatenate([[r] * len(u) for u, _, r in parts]).astype(object)})


def seen_interactions(split, raw: Interactions | None) -> Interactions:
    """Every interaction of the run's users (training, validation, test; in that order) over the
    run's catalogue at any rating, from ``raw`` (the source without threshold or minimums), as
    an :class:`Interactions`. The training data keeps only ratings above the threshold;
    ``recommend`` must also exclude what a user rated lower. Without ``raw`` (no threshold)
    this is the known history."""
    users = np.concatenate([np.asarray(split.train.user_ids), np.asarray(split.validation.user_ids),
                            np.asarray(split.test.user_ids)])
    items = np.asarray(split.train.item_ids)
    if raw is not None:
        return _on_catalogue(raw, users, items)
    known = [split.train.matrix] + [h.fold_in + h.heldout for h in (split.validation, split.test)]
    matrix = sp.vstack(known, format="csr")
    matrix.data[:] = 1.0
    matrix.eliminate_zeros()
    return Interactions(matrix.astype(np.float32).tocsr(), users, items)


def dropped_seen(dropped: pd.DataFrame | None, split, raw: Interactions | None,
                 positives: Interactions | None) -> Interactions | None:
    """Every interaction of the users the run left out (``dropped``, :func:`dropped_users`'s
    table) over the run's catalogue at any rating, from ``raw`` (else, without a threshold,
    ``positives``: then all the source holds): what a popularity list offered to one of them must
    leave out. A user with nothing on the catalogue has an empty row. None when ``dropped`` is."""
    source = raw if raw is not None else positives
    if dropped is None or source is None:
        return None
    rows = source.user_index(dropped["user"].to_numpy(dtype=object))
    return _on_catalogue(source, np.asarray(source.user_ids)[rows[rows >= 0]], np.asarray(split.train.item_ids))


def take_rows(matrix: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """The rows ``rows`` of ``matrix`` in that order, an empty row where a row is -1 (a user it lacks)."""
    rows = np.asarray(rows, dtype=np.int64)
    return (sp.diags((rows >= 0).astype(np.float32)) @ matrix[np.maximum(rows, 0)]).tocsr()


def _on_catalogue(source: Interactions, users: np.ndarray, items: np.ndarray) -> Interactions:
    """The rows of ``users`` in ``source`` (an empty row for a user it lacks) over the columns of
    ``items`` (all of them items of ``source``), binary."""
    matrix = take_rows(source.matrix[:, source.item_index(items)].tocsr(), source.user_index(users))
    matrix.eliminate_zeros()
    matrix.data[:] = 1.0
    return Interactions(matrix.astype(np.float32).tocsr(), users, items)


@dataclass
class Recorded:
    """What a run directory records of the read of its source, besides the split: the run's
    users' seen items (:func:`seen_interactions`), what preprocessing kept (None: not known), the
    users it left out (:func:`dropped_users`) and their seen items (:func:`dropped_seen`); None
    where the source does not tell (prepared data)."""

    seen: Interactions
    kept: dict | None = None
    dropped: pd.DataFrame | None = None
    dropped_seen: Interactions | None = None


def record(data: DataSpec, split, interactions: Interactions, raw: Interactions | None, kept: dict | None,
           positives: Interactions | None) -> Recorded:
    """What a run records of one read of ``data``'s source (:func:`read_source`'s four values)."""
    dropped = dropped_users(data, positives, interactions, split, raw)
    return Recorded(seen_interactions(split, raw), kept, dropped, dropped_seen(dropped, split, raw, positives))
