"""Top-K ranking metrics with the conventions of Liang et al. (2018).

Every metric is a pure, vectorised function of a dense ``scores`` array
(users x items) and a CSR ``heldout`` matrix of the same shape holding the
relevant items (binary relevance). Each returns one value per user.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _check(scores: np.ndarray, heldout: sp.spmatrix, k: int) -> sp.csr_matrix:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores: expected a 2-d (users x items) array, got shape {scores.shape}")
    if heldout.shape != scores.shape:
        raise ValueError(f"heldout: expected shape {scores.shape} (same as scores), got {heldout.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= number of items ({scores.shape[1]}), got {k}")
    if np.isnan(scores).any():
        raise ValueError("scores: contains NaN; expected finite values or -inf for excluded items")
    heldout = sp.csr_matrix(heldout)
    n = np.diff(heldout.indptr)
    if (n == 0).any():
        bad = np.flatnonzero(n == 0)[:5].tolist()
        raise ValueError(
            f"heldout: {int((n == 0).sum())} user(s) have no held-out items (rows {bad}...); "
            "filter them out before computing metrics"
        )
    return heldout


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first (argpartition, then sort only k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _hits(scores: np.ndarray, heldout: sp.csr_matrix, k: int) -> np.ndarray:
    """Boolean (users x k): whether the item at each rank is relevant."""
    idx = top_k(scores, k)
    rows = np.repeat(np.arange(scores.shape[0]), k)
    return np.asarray(heldout[rows, idx.ravel()]).reshape(idx.shape) > 0


def recall_at_k(scores: np.ndarray, heldout: sp.spmatrix, k: int) -> np.ndarray:
    """Recall@K as in Liang et al. (2018): hits in the top K / min(K, n_u).

    ``n_u`` is the number of held-out items of user u. The paper (and its
    notebook) divides by ``min(K, n_u)`` so a perfect ranking scores 1 even when
    a user has more than K held-out items. RecBole and Cornac divide by ``n_u``
    instead, which gives lower values whenever ``n_u > K``.
    """
    heldout = _check(scores, heldout, k)
    hits = _hits(scores, heldout, k).sum(axis=1)
    n = np.diff(heldout.indptr)
    return hits / np.minimum(k, n)


def ndcg_at_k(scores: np.ndarray, heldout: sp.spmatrix, k: int) -> np.ndarray:
    """NDCG@K with binary relevance, as in Liang et al. (2018).

    DCG@K = sum_{r=1..K} rel_r / log2(r + 1); the ideal DCG puts min(K, n_u)
    hits at the top: IDCG@K = sum_{r=1..min(K, n_u)} 1 / log2(r + 1).
    """
    heldout = _check(scores, heldout, k)
    hits = _hits(scores, heldout, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits @ discount
    n = np.minimum(np.diff(heldout.indptr), k)
    idcg = np.cumsum(discount)[n - 1]
    return dcg / idcg
