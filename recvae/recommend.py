"""Recommendations in original ids: histories in, a ``(user, rank, item, score, source)`` table out.

Two levels:

* :func:`recommend_ids` for a fitted model alone (its ``item_ids_``), histories as a DataFrame;
* :class:`RunRecommender` for a run directory: the model plus every user the run knows (training
  users, and held-out users with their fold-in and held-out items) and the items each of them has
  *seen* at any rating (``seen.npz``), used by ``recvae recommend`` and ``recvae serve``.

Ids are matched to the vocabularies whatever their type in the input
(:func:`recvae.data.ids.match_ids`): ``"42"`` matches the integer id 42 and ``42`` the string id ``"42"``. A user with no known item gets the
popularity fallback: items ranked by the number of training users who have them, with score the
*fraction of training users* having the item (in [0, 1]) and ``source="popularity"``, less the
items the user has: those the request gives, and for a user of the source that the run left out
(too few interactions, ...), the items the run recorded for it (``dropped_seen.npz``); model rows
carry ``source="model"`` and the model's own scores (logits for Mult-VAE/DAE), so the ``source``
column says which unit a row's score is in.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recvae.data.ids import IdError, convert_ids, log_unknown, match_ids  # noqa: F401  (IdError, convert_ids: re-exported)
from recvae.data.source import take_rows
from recvae.errors import InputError, ParameterError
from recvae.fileio import read_json
from recvae.metrics import mask_rows, top_k_with_scores
from recvae.rundir import DROPPED_FILE, DROPPED_SEEN_FILE, METRICS_FILE, SEEN_FILE, RunDir

logger = logging.getLogger(__name__)

COLUMNS = ["user", "rank", "item", "score", "source"]


def user_items_csr(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR (n_rows, n_items) with ones at (rows[j], cols[j]); duplicates merged."""
    m = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (np.asarray(rows), np.asarray(cols))), shape=(n_rows, n_items)
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def recommend_rows(
    model,
    positives: sp.csr_matrix,
    exclude: sp.csr_matrix | None,
    k: int,
    popularity: np.ndarray,
    filter_seen: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of each row: the model's for rows with a positive item, the popularity fallback
    (``popularity`` = fraction of training users per item) for empty rows. The one place that
    decides what a user is not offered again.

    With ``filter_seen`` the items of a row of ``positives`` are excluded, and so are those of
    ``exclude`` (the same shape, None for none); without it nothing is. Returns ``(ids, scores,
    fallback)``: (n, min(k, n_items)) arrays (id -1 / score -inf where nothing is left) and a
    boolean (n,) marking the fallback rows.
    """
    n, n_items = positives.shape
    width = min(int(k), n_items)
    ids = np.full((n, width), -1, dtype=np.int64)
    scores = np.full((n, width), -np.inf, dtype=np.float32)
    exclude = exclude if filter_seen else None
    fallback = np.diff(positives.indptr) == 0
    has = np.flatnonzero(~fallback)
    if has.size:
        sub = positives if has.size == n else positives[has]
        sub_exclude = None if exclude is None else (exclude if has.size == n else exclude[has])
        ids[has], scores[has] = model.recommend(sub, N=width, exclude=sub_exclude,
                                                filter_already_liked_items=filter_seen)
    empty = np.flatnonzero(fallback)
    if empty.size:
        pop = np.tile(np.asarray(popularity, dtype=np.float32), (empty.size, 1))
        if exclude is not None:
            mask_rows(pop, exclude[empty])
        ids[empty], scores[empty] = top_k_with_scores(pop, width)
    return ids, scores, fallback


def to_frame(users, ids: np.ndarray, scores: np.ndarray, fallback: np.ndarray, item_ids: np.ndarray) -> pd.DataFrame:
    """Long table ``(user, rank, item, score, source)`` from top-k arrays; id -1 slots dropped."""
    n, width = ids.shape
    flat = ids.ravel()
    valid = flat >= 0
    return pd.DataFrame(
        {
            "user": np.repeat(np.asarray(users), width)[valid],
            "rank": np.tile(np.arange(1, width + 1, dtype=np.int64), n)[valid],
            "item": np.asarray(item_ids)[flat[valid]],
            "score": scores.ravel()[valid],
            "source": np.repeat(np.where(fallback, "popularity", "model"), width)[valid],
        },
        columns=COLUMNS,
    )


def note_large_k(k: int, n_items: int) -> None:
    if k > n_items:
        logger.info("k = %d exceeds the catalogue: returning all %d items (fewer where seen items are excluded)", k, n_items)


def recommend_ids(
    model,
    histories,
    N: int = 10,
    user_col: str = "user",
    item_col: str = "item",
    strict: bool = False,
    popularity: np.ndarray | None = None,
    filter_already_liked_items: bool = True,
) -> pd.DataFrame:
    """Top-N in original ids for histories in original ids, for a model fitted on
    :class:`~recvae.data.Interactions` (so it knows ``item_ids_``).

    ``histories`` is a DataFrame of (user, item) rows, or a plain list of item ids for one user
    (reported as user 0). Item ids are matched whatever their type (:func:`convert_ids`); a value
    that cannot be an item id raises :class:`IdError`; unknown ids are dropped with one log
    warning (``strict=True`` raises). A user left with no known item gets ``popularity`` (the
    fraction of training users per item) with ``source="popularity"`` when given, else a
    ``ValueError``. Returns ``(user, rank, item, score, source)``, best first; fewer than N rows
    for a user when fewer items remain.
    """
    item_ids = getattr(model, "item_ids_", None)
    if item_ids is None:
        raise ParameterError("model", "has no item_ids_; fit it on recvae.data.Interactions to use original ids")
    if not isinstance(histories, pd.DataFrame):
        histories = pd.DataFrame({user_col: 0, item_col: list(histories)})
    for col in (user_col, item_col):
        if col not in histories.columns:
            raise ParameterError("histories", f"expected a column {col!r}, found {list(map(str, histories.columns))}")
    catalogue = pd.Index(np.asarray(item_ids))
    codes, _, bad = match_ids(histories[item_col], catalogue)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise IdError(f"histories: row {j} of column {item_col!r} holds {histories[item_col].iloc[j]!r}, "
                      f"which cannot be an item id of the model ({_kind(catalogue)})", j, histories[item_col].iloc[j])
    unknown = codes < 0
    if unknown.any() and strict:
        examples = histories[item_col][unknown].unique()[:5].tolist()
        raise ParameterError("histories", f"{int(unknown.sum())} row(s) name item ids unknown to the model "
                                          f"(e.g. {examples})")
    log_unknown("item ids", histories[item_col].to_numpy()[unknown], histories[item_col].nunique())
    user_codes, users = pd.factorize(histories[user_col], sort=False)
    keep = ~unknown
    matrix = user_items_csr(user_codes[keep], codes[keep], len(users), len(catalogue))
    empty = np.diff(matrix.indptr) == 0
    if empty.any() and popularity is None:
        raise ParameterError(
            "histories", f"{int(empty.sum())} user(s) have no known item (e.g. {list(users[empty][:5])}); "
            "give them at least one item from the catalogue"
        )
    note_large_k(N, len(catalogue))
    ids, scores, fallback = recommend_rows(model, matrix, None, N, popularity if popularity is not None else 0,
                                           filter_seen=filter_already_liked_items)
    return to_frame(np.asarray(users), ids, scores, fallback, catalogue.to_numpy())


def _kind(vocabulary: pd.Index) -> str:
    return "integers" if vocabulary.dtype.kind in "iu" else "strings"


# ---------------------------------------------------------------------------- run directories
@dataclass
class Histories:
    """A batch of users to recommend for: their ids, positive histories and extra exclusions."""

    users: np.ndarray  # (n,) user ids as reported in the output
    positives: sp.csr_matrix  # (n, n_items) fold-in input of the model
    seen: sp.csr_matrix  # (n, n_items) items excluded besides the positives (any rating)

    def __len__(self) -> int:
        return len(self.users)

    def slice(self, start: int, stop: int) -> "Histories":
        return Histories(self.users[start:stop], self.positives[start:stop], self.seen[start:stop])


class RunRecommender:
    """A run directory loaded to answer recommendation requests in original ids.

    Holds the model, the item vocabulary, every user of the run with their full known history
    (training users: their training positives; held-out users: fold-in + held-out items) and the
    items each has seen at any rating (``seen.npz``, written at train time; runs from before it
    fall back to the positives, with an info line), and of the users of the source it left out,
    the items each has (``dropped_seen``, :meth:`dropped_rows`). ``popularity`` is the fraction of
    training users having each item (the fallback's score). ``precision``: the model's scoring precision
    (:meth:`~recvae.models.base.Recommender.set_scoring_precision`).
    """

    def __init__(self, run_dir: str | os.PathLike, device=None, precision: str = "fp32"):
        run = RunDir(run_dir)
        self.run_dir = run.path
        self.model, self.description = run.load_finished(device=device)
        self.model.set_scoring_precision(precision)  # refused by name for a model without it
        train = run.load_train(self.model)  # item ids checked against the model's
        held = [run.load_users(name, self.model) for name in ("validation", "test")]
        self.item_ids = np.asarray(train.item_ids)
        self.items = pd.Index(self.item_ids)
        self.user_ids = np.concatenate([np.asarray(train.user_ids)] + [np.asarray(h.user_ids) for h in held])
        self.users = pd.Index(self.user_ids)
        known = sp.vstack([train.matrix] + [(h.fold_in + h.heldout) for h in held], format="csr")
        known.data[:] = 1.0
        self.known = known.astype(np.float32)
        self.seen = self._load_seen(run)
        self.popularity = np.asarray(train.matrix.sum(axis=0), dtype=np.float32).ravel() / max(train.n_users, 1)
        metrics = run.file(METRICS_FILE)
        self.metrics = read_json(metrics) if metrics.is_file() else None
        self.dropped = run.load_dropped()  # users of the source the run left out, and why (None: not known)
        self.dropped_seen = self._load_dropped_seen(run)  # and their items (None: a run from before it)
        self._warned_dropped = False

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def data(self) -> dict:
        """The run's data description (``run.json`` "data"): columns, separator, threshold."""
        return self.description.get("data", {})

    def _load_seen(self, run) -> sp.csr_matrix:
        seen = run.load_seen()
        path = run.file(SEEN_FILE)
        if seen is None:
            if self.data.get("rating_threshold") is not None:
                logger.info("%s has no %s (a run from an older recvae): items the run's users rated at or below "
                            "the threshold are not known and may be recommended", run.path, SEEN_FILE)
            return self.known
        rows = seen.user_index(self.users)
        if (rows < 0).any() or not np.array_equal(np.asarray(seen.item_ids), self.item_ids):
            raise InputError(path, "its users or items do not match the run's")
        return ((seen.matrix[rows] + self.known) > 0).astype(np.float32).tocsr()

    def _load_dropped_seen(self, run):
        seen = run.load_seen(dropped=True)
        if seen is not None and not np.array_equal(np.asarray(seen.item_ids), self.item_ids):
            raise InputError(run.file(DROPPED_SEEN_FILE), "its items are not the run's")
        return seen

    def dropped_rows(self, users) -> np.ndarray:
        """Each of ``users``' row in ``dropped_seen`` (the items of a user of the source that the
        run left out), -1 for any other user. A run without that file (written before it) says
        once, when one of ``users`` is such a user, that its fallback may offer their own items."""
        if self.dropped_seen is None:
            if not self._warned_dropped and any(r is not None for r in self.why_dropped(users)):
                self._warned_dropped = True
                logger.warning("%s has no %s (a run from an older recvae): the popular items offered to the users "
                               "it left out (%s) may include items they already have", self.run_dir,
                               DROPPED_SEEN_FILE, DROPPED_FILE)
            return np.full(len(users), -1, dtype=np.int64)
        return match_ids(list(users), self._dropped_seen_users)[0]

    @functools.cached_property
    def _dropped_seen_users(self) -> pd.Index:
        return pd.Index(self.dropped_seen.user_ids)

    def why_dropped(self, users) -> list[str | None]:
        """For each of ``users`` (ids not of the run), why the run does not know it when it is a
        user of the source that preprocessing or the split left out (``dropped_users.csv``), e.g.
        ``dropped by preprocessing (3 interactions, fewer than --min-user-interactions 5)``; None
        for a user the source never had (or a run that does not know its dropped users)."""
        if self.dropped is None or not len(users):
            return [None] * len(users)
        known, table = self._dropped_lookup
        rows, _, _ = match_ids(list(users), known)
        return [None if r < 0 else self._drop_reason(table["reason"][r], int(table["interactions"][r]))
                for r in rows]

    @functools.cached_property
    def _dropped_lookup(self) -> tuple[pd.Index, pd.DataFrame]:
        """The dropped users' ids as the run's id type, and their rows: built once, on first use
        (the service asks on every unknown user)."""
        converted, bad = convert_ids(self.dropped["user"], self.user_ids)
        return pd.Index(converted[~bad]), self.dropped[~bad].reset_index(drop=True)

    def _drop_reason(self, reason: str, n: int) -> str:
        data = self.data
        if reason == "rating_threshold":
            return f"dropped by preprocessing (no rating above --rating-threshold {data.get('rating_threshold'):g})"
        if reason == "min_user_interactions":
            return (f"dropped by preprocessing ({n} interactions, fewer than --min-user-interactions "
                    f"{data.get('min_user_interactions')})")
        if reason == "min_item_interactions":
            return (f"dropped by preprocessing (its {n} interactions were all on items with fewer than "
                    f"--min-item-interactions {data.get('min_item_interactions')})")
        if reason == "split":
            return (f"dropped by the split (a held-out user with {n} interactions on the training users' items, "
                    "too few to hold any out)")
        return f"dropped ({reason})"

    # -- id lookups ---------------------------------------------------------------------------
    def user_rows(self, values) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, ids)``: each value's row among the run's users (-1 for a new user) and its id
        as reported: the run's typed id, or the text of every value when some value cannot be an
        id of the run's type (a new user such as ``"alice"`` where ids are integers)."""
        rows, converted, bad = match_ids(values, self.users)
        if bad.any():  # some ids are not of the run's type: report all as text, one type per column
            given = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
            return rows, given.astype(str).to_numpy(dtype=object)
        return rows, converted

    def item_codes(self, values, locate: Callable[[int], str], names: tuple[str, ...] = ()) -> np.ndarray:
        """Catalogue positions of item ``values`` (-1 unknown); :class:`IdError` naming
        ``locate(position)`` (which may speak of the parameters ``names``) for a value that cannot
        be an item id of the run."""
        codes, _, bad = match_ids(values, self.items)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            value = list(values)[j] if not isinstance(values, pd.Series) else values.iloc[j]
            raise IdError(f"{locate(j)} holds {value!r}, which cannot be an item id of the run "
                          f"(its item ids are {_kind(self.items)})", j, value, names)
        return codes

    def similar(self, values, k: int = 10, locate: Callable[[int], str] = lambda j: f"item {j + 1}") -> pd.DataFrame:
        """``(item, rank, similar_item, score)`` for item ids of the run (the model's
        :meth:`~recvae.models.base.Recommender.similar_items`); an id unknown to the run is a
        ``ParameterError`` naming it, as is a model without item vectors."""
        codes = self.item_codes(list(values), locate)
        if (codes < 0).any():
            j = int(np.flatnonzero(codes < 0)[0])
            raise ParameterError("items", f"{list(values)[j]!r} is not an item of the run ({locate(j)})")
        ids, scores = self.model.similar_items(codes, N=min(int(k), self.n_items - 1))
        n, width = ids.shape
        keep = ids.ravel() >= 0
        return pd.DataFrame({
            "item": np.repeat(self.item_ids[codes], width)[keep],
            "rank": np.tile(np.arange(1, width + 1), n)[keep],
            "similar_item": self.item_ids[ids.ravel()[keep]],
            "score": scores.ravel()[keep],
        })

    # -- batches ------------------------------------------------------------------------------
    def known_histories(self, rows: np.ndarray, ids=None) -> Histories:
        """The run's users at ``rows`` (>= 0) with their full known history."""
        rows = np.asarray(rows, dtype=np.int64)
        return Histories(self.user_ids[rows] if ids is None else np.asarray(ids), self.known[rows], self.seen[rows])

    def histories(self, users, rows: np.ndarray, positive_items: np.ndarray, seen_items: np.ndarray,
                  with_known: bool = True) -> Histories:
        """Histories of ``users`` (rows of the run, -1 for new) from (user position, item code)
        pairs: ``positive_items`` (n_pairs, 2) fold-in rows, ``seen_items`` (n_pairs, 2) rows only
        excluded; known users' run histories join them when ``with_known``."""
        n = len(users)
        positives = user_items_csr(positive_items[:, 0], positive_items[:, 1], n, self.n_items)
        seen = user_items_csr(seen_items[:, 0], seen_items[:, 1], n, self.n_items)
        known = rows >= 0
        parts = [seen]
        if with_known and known.any():
            positives = ((positives + take_rows(self.known, rows)) > 0).astype(np.float32).tocsr()
            parts.append(take_rows(self.seen, rows))
        new = np.flatnonzero(~known)
        dropped = np.full(n, -1, dtype=np.int64)
        dropped[new] = self.dropped_rows(np.asarray(users)[new]) if new.size else new
        if (dropped >= 0).any():  # users the run left out: the items it recorded for them are seen too
            parts.append(take_rows(self.dropped_seen.matrix, dropped))
        seen = (sum(parts[1:], parts[0]) > 0).astype(np.float32).tocsr() if len(parts) > 1 else seen
        return Histories(np.asarray(users), positives, seen)

    def recommend(self, batch: Histories, k: int, include_seen: bool = False) -> pd.DataFrame:
        """Top-k table for a batch (see :func:`recommend_rows`); ``include_seen`` keeps seen items."""
        ids, scores, fallback = self.recommend_arrays(batch.positives, batch.seen, k, filter_seen=not include_seen)
        return to_frame(batch.users, ids, scores, fallback, self.item_ids)

    def recommend_arrays(self, positives, exclude, k: int, filter_seen: bool = True):
        """``(ids, scores, fallback)`` in catalogue positions; see :func:`recommend_rows`."""
        return recommend_rows(self.model, positives, exclude, k, self.popularity, filter_seen=filter_seen)
