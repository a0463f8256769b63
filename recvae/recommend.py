"""Recommendations in original ids: histories in, a (user, rank, item, score) table out."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)


class UnknownItemsWarning(UserWarning):
    """Some item ids of the histories are not in the model's catalogue and were dropped."""


def histories_to_csr(
    histories: pd.DataFrame,
    item_ids: np.ndarray,
    user_col: str = "user",
    item_col: str = "item",
    strict: bool = False,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Turn (user, item) rows in original ids into a users x items CSR over ``item_ids``.

    Returns ``(matrix, users)`` with rows in order of first appearance of each user. Rows whose
    item is unknown are dropped with an :class:`UnknownItemsWarning` giving the count, or raise a
    ``ValueError`` with ``strict=True``. A user whose rows are all unknown keeps an empty row.
    """
    for col in (user_col, item_col):
        if col not in histories.columns:
            raise ValueError(
                f"histories: expected a column {col!r}, found {list(map(str, histories.columns))}"
            )
    users, user_codes = _codes_in_order(histories[user_col])
    catalogue = pd.Index(item_ids)
    item_codes = catalogue.get_indexer(_align_dtype(histories[item_col], catalogue))
    unknown = item_codes < 0
    if unknown.any():
        examples = histories[item_col][unknown].unique()[:5].tolist()
        msg = f"{int(unknown.sum())} history row(s) name item ids unknown to the model (e.g. {examples})"
        if strict:
            raise ValueError(f"histories: {msg}")
        warnings.warn(f"{msg}; dropped", UnknownItemsWarning, stacklevel=2)
    keep = ~unknown
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (user_codes[keep], item_codes[keep])),
        shape=(len(users), len(catalogue)),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix, users


def recommend_frame(
    model,
    user_items: sp.csr_matrix,
    users: np.ndarray,
    item_ids: np.ndarray,
    N: int = 10,
    fallback_scores: np.ndarray | None = None,
    filter_already_liked_items: bool = True,
) -> pd.DataFrame:
    """Top-N for each row as a long table ``(user, rank, item, score)`` in original ids.

    Rows with an empty history get ``fallback_scores`` (e.g. training popularity) when given,
    else a ``ValueError``: an amortised model would otherwise recommend from an all-zero input,
    which is the same list for everyone and says nothing about the user.
    """
    empty = np.diff(user_items.indptr) == 0
    if empty.any() and fallback_scores is None:
        raise ValueError(
            f"histories: {int(empty.sum())} user(s) have no known item (e.g. {users[empty][:5].tolist()}); "
            "give them at least one item from the catalogue"
        )
    ids, scores = model.recommend(user_items, N=N, filter_already_liked_items=filter_already_liked_items)
    if empty.any():
        ranked = np.argsort(-fallback_scores, kind="stable")[:N]
        ids[empty, : len(ranked)] = ranked
        scores[empty, : len(ranked)] = fallback_scores[ranked]
    rank = np.tile(np.arange(1, N + 1), len(users))
    flat_ids = ids.ravel()
    valid = flat_ids >= 0  # fewer than N items left after filtering
    out = pd.DataFrame(
        {
            "user": np.repeat(users, N)[valid],
            "rank": rank[valid],
            "item": np.asarray(item_ids)[flat_ids[valid]],
            "score": scores.ravel()[valid],
        }
    )
    return out.reset_index(drop=True)


def _codes_in_order(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    if values.isna().any():
        line = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ValueError(f"histories: user id missing (NaN) in row {line}")
    codes, uniques = pd.factorize(values, sort=False)
    return np.asarray(uniques), codes


def _align_dtype(values: pd.Series, catalogue: pd.Index) -> pd.Series:
    """Compare ids as the catalogue stores them: '42' in a CSV matches item 42."""
    if catalogue.dtype.kind in "iu" and values.dtype.kind not in "iu":
        return pd.to_numeric(values, errors="coerce").astype("Int64")
    if catalogue.dtype.kind in "OU" and values.dtype.kind != "O":
        return values.astype(str)
    return values


def recommend_ids(
    model,
    histories,
    N: int = 10,
    user_col: str = "user",
    item_col: str = "item",
    strict: bool = False,
    fallback_scores: np.ndarray | None = None,
    filter_already_liked_items: bool = True,
) -> pd.DataFrame:
    """Top-N in original ids for histories in original ids, known users or new ones alike.

    ``histories`` is a DataFrame of (user, item) rows, or a plain list of item ids for one user
    (reported as user 0). The model must have been fitted on :class:`~recvae.data.Interactions`
    (so it knows ``item_ids_``). Returns a DataFrame ``(user, rank, item, score)``, best first.
    Unknown item ids are dropped with a warning that counts them (``strict=True`` raises); a
    user left with no known item gets ``fallback_scores`` (e.g. training popularity) when
    given, else a ``ValueError``. Fewer than N rows come back for a user when fewer than N items
    remain after filtering.
    """
    item_ids = getattr(model, "item_ids_", None)
    if item_ids is None:
        raise ValueError("model: has no item_ids_; fit it on recvae.data.Interactions to use original ids")
    if not isinstance(histories, pd.DataFrame):
        histories = pd.DataFrame({user_col: 0, item_col: list(histories)})
    matrix, users = histories_to_csr(histories, item_ids, user_col, item_col, strict=strict)
    return recommend_frame(model, matrix, users, item_ids, N, fallback_scores, filter_already_liked_items)
