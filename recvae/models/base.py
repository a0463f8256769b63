"""The interface every model of the library shares: fit, score, recommend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

#: every saved model folder holds this JSON (class name, hyperparameters, item ids)
MODEL_FILE = "model.json"
#: bumped when the layout of a saved model changes
FORMAT_VERSION = 1


def read_model_meta(path) -> tuple[Path, dict]:
    """``(path/model.json, its content)`` of a folder written by a model's ``save()``;
    errors name the file when it is missing or of another format version."""
    meta_file = Path(path) / MODEL_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"path: no {MODEL_FILE} in {path}; expected a folder written by a model's save()")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta_file, meta


def as_csr(X, name: str = "X", n_items: int | None = None) -> sp.csr_matrix:
    """Accept an :class:`~recvae.data.Interactions` or a sparse matrix; return float32 CSR.

    Raises a ``TypeError``/``ValueError`` naming ``name`` when the input is not usable.
    """
    matrix = getattr(X, "matrix", X)
    if not sp.issparse(matrix):
        raise TypeError(
            f"{name}: expected a scipy.sparse matrix or recvae.data.Interactions, got {type(X).__name__}"
        )
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if n_items is not None and matrix.shape[1] != n_items:
        raise ValueError(f"{name}: expected {n_items} item columns (as in training), got {matrix.shape[1]}")
    if matrix.nnz and not np.isfinite(matrix.data).all():
        raise ValueError(f"{name}: contains non-finite values")
    return matrix


class Recommender:
    """Base class: subclasses implement ``fit`` and ``_score_batch``.

    ``fit`` must set ``n_items_``. Scores are for items in the training item index space.
    """

    #: rows scored at once by ``score``/``recommend``; bounds dense memory to batch x items
    batch_size_predict: int = 1000

    def fit(self, train, validation=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:  # pragma: no cover - abstract
        """Dense float32 scores (batch, n_items) for a CSR batch of user histories."""
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_items_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit() first")

    def score(self, user_items) -> np.ndarray:
        """Dense float32 scores (users, n_items) for the given histories (a CSR batch).

        Only call on batches: the result is dense. ``recommend`` and
        :func:`recvae.evaluation.evaluate` batch for you.
        """
        self._check_fitted()
        user_items = as_csr(user_items, "user_items", self.n_items_)
        return np.asarray(self._score_batch(user_items), dtype=np.float32)

    def recommend(
        self,
        user_items,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items=None,
        batch_size: int | None = None,
        exclude=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-N items for each row of ``user_items`` (users x items CSR of histories).

        Returns ``(ids, scores)``, each of shape (users, min(N, n_items)), best first: an N
        beyond the catalogue returns the whole catalogue, and memory never grows with N past
        it. Items in a user's history are excluded when ``filter_already_liked_items``; item
        indices in ``filter_items`` are excluded for everyone; the stored entries of row ``u``
        of ``exclude`` (a CSR of the same shape, e.g. items rated below a threshold) are
        excluded for user ``u``. Where fewer items are left, the remaining slots hold id -1
        and score -inf.
        """
        self._check_fitted()
        user_items = as_csr(user_items, "user_items", self.n_items_)
        if not isinstance(N, (int, np.integer)) or isinstance(N, bool) or N < 1:
            raise ValueError(f"N: expected a positive integer, got {N!r}")
        n_users, n_items = user_items.shape
        if exclude is not None:
            exclude = as_csr(exclude, "exclude", n_items)
            if exclude.shape[0] != n_users:
                raise ValueError(f"exclude: expected {n_users} rows (one per user), got {exclude.shape[0]}")
        k = min(int(N), n_items)
        ids = np.full((n_users, k), -1, dtype=np.int64)
        out = np.full((n_users, k), -np.inf, dtype=np.float32)
        blocked = None
        if filter_items is not None:
            blocked = np.unique(np.asarray(filter_items, dtype=np.int64))
            if blocked.size and (blocked.min() < 0 or blocked.max() >= n_items):
                raise ValueError(f"filter_items: item indices must lie in [0, {n_items}), got {blocked.min()}..{blocked.max()}")
        bs = batch_size or self.batch_size_predict
        for start in range(0, n_users, bs):
            batch = user_items[start : start + bs]
            scores = self.score(batch)
            if filter_already_liked_items:
                mask_rows(scores, batch)
            if exclude is not None:
                mask_rows(scores, exclude[start : start + bs])
            if blocked is not None and blocked.size:
                scores[:, blocked] = -np.inf
            ids[start : start + bs], out[start : start + bs] = top_k(scores, k)
        return ids, out


def mask_rows(scores: np.ndarray, rows: sp.csr_matrix) -> None:
    """Set ``scores[u, i] = -inf`` for every stored entry (u, i) of the CSR ``rows``, in place."""
    r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    scores[r, rows.indices] = -np.inf


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores`` (B, I): ``(ids, values)``, each (B, k).

    Best first; equal scores by lower column index (also across the k-th place); a -inf score
    (an excluded item) comes back as id -1. ``torch.topk`` does the selection (faster than
    ``np.argpartition`` on wide rows); rows where a tie straddles the k-th place are redone
    with a stable sort.
    """
    k = min(int(k), scores.shape[1])
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    values, idx = torch.topk(torch.from_numpy(scores), k, dim=1)
    values, idx = values.numpy(), idx.numpy().astype(np.int64)
    order = np.lexsort((idx, -values), axis=1)  # by score descending, then index ascending
    idx = np.take_along_axis(idx, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    if k < scores.shape[1]:
        last = values[:, -1:]
        straddle = (scores == last).sum(axis=1) > (values == last).sum(axis=1)
        for r in np.flatnonzero(straddle & np.isfinite(last[:, 0])):
            idx[r] = np.argsort(-scores[r], kind="stable")[:k]
            values[r] = scores[r, idx[r]]
    idx[~np.isfinite(values)] = -1
    return idx, values
