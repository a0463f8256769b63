"""Top-K ranking metrics with the conventions of Liang et al. (WWW 2018).

Every per-user metric is a pure, vectorised function of a dense ``scores`` array
(users x items; higher is better) and a ``heldout`` matrix of the same shape
whose stored positive entries are the relevant items (binary relevance: the
value itself is ignored). Each returns a float64 array with one value per user.

Notation, for one user u and cut-off K: ``n_u`` = number of held-out items,
``rel_r`` = 1 if the item at rank r (1-based) of the ranking is held out, else 0,
``hits@K = sum_{r<=K} rel_r``.

Ranking and ties
----------------
The ranking is :mod:`recvae.ranking`'s: by decreasing score, **equal scores broken by the
lower item (column) index first**, ``-inf`` last (a user's fold-in items), ``NaN`` rejected.
:func:`user_values` is the one loop that scores users in batches, ranks their items and
computes their metrics: evaluation and the models' validation both run it.

Users with no held-out item have undefined Recall/NDCG (0/0): the functions
reject them with an error; :func:`recvae.evaluation.evaluate` filters them out
first and logs how many.

Reported summaries are the mean over users with the standard error
``std / sqrt(n)`` using numpy's default ``ddof=0``, exactly as the paper's
notebook prints them (``np.std(n100_list) / np.sqrt(len(n100_list))``); see
:func:`summarize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from recvae.errors import ParameterError
from recvae.ranking import (  # noqa: F401  (re-exported: the ranking the metrics are defined on)
    _check_scores, _top_k, _top_k_exact, check_k, mask_rows, rank_users, top_k, top_k_with_scores,
)

#: per-user metrics accepted by :func:`per_user_metrics` and ``evaluate(metrics=...)``
USER_METRICS = ("recall", "ndcg", "precision", "hit_rate", "mrr")
#: catalogue-level metrics (one number for the whole set of users)
CATALOGUE_METRICS = ("coverage",)


# --------------------------------------------------------------------------- validation


def _relevance(heldout, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR (sorted indices) of the stored positive entries of ``heldout``; rejects empty rows."""
    if heldout is None:
        raise TypeError("heldout: expected a users x items matrix of held-out items, got None")
    rel = sp.csr_matrix(heldout, copy=True)
    if rel.shape != shape:
        raise ParameterError("heldout", f"expected shape {shape} (same as scores), got {rel.shape}")
    rel.data = (rel.data > 0).astype(np.float32)
    rel.eliminate_zeros()
    rel.sum_duplicates()  # also sorts indices, which the hit look-up relies on
    n = np.diff(rel.indptr)
    if (n == 0).any():
        bad = np.flatnonzero(n == 0)
        raise ParameterError(
            "heldout", f"{bad.size} user(s) have no held-out items (rows {bad[:5].tolist()}"
            f"{'...' if bad.size > 5 else ''}); their metrics are undefined (0/0): filter them out "
            "first (recvae.evaluation.evaluate does this and logs the count)"
        )
    return rel


# --------------------------------------------------------------------------- ranking


def binary_relevance(heldout: sp.csr_matrix) -> sp.csr_matrix:
    """Held-out items as relevance: a copy with every positive entry 1, zeros dropped,
    duplicates merged (the form :func:`ranked_hits` reads)."""
    heldout = heldout.copy()
    heldout.data = (heldout.data > 0).astype(np.float32)
    heldout.eliminate_zeros()
    heldout.sum_duplicates()
    return heldout


def ranked_hits(idx: np.ndarray, rel: sp.csr_matrix) -> np.ndarray:
    """Boolean (users x K): whether the item at each rank of ``idx`` is in ``rel``.

    ``rel`` must be CSR with sorted indices (as built by the metric functions).
    Looks the (user, item) pairs up by binary search, without densifying ``rel``.
    """
    n_users, k = idx.shape
    n_items = rel.shape[1]
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(rel.indptr))
    keys = rows * n_items + rel.indices  # globally sorted: rows ascend, indices sorted per row
    query = (np.arange(n_users, dtype=np.int64)[:, None] * n_items + idx).ravel()
    if keys.size == 0:
        return np.zeros((n_users, k), dtype=bool)
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return (keys[pos] == query).reshape(n_users, k)


def _discount(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


# hit-matrix formulas; ``hits`` is (users x >=k) by rank, ``n`` the held-out count per user
def _recall(hits, n, k):
    return np.count_nonzero(hits[:, :k], axis=1) / np.minimum(k, n)


def _ndcg(hits, n, k):
    disc = _discount(k)
    dcg = hits[:, :k] @ disc
    idcg = np.cumsum(disc)[np.minimum(n, k) - 1]
    return dcg / idcg


def _precision(hits, n, k):
    return np.count_nonzero(hits[:, :k], axis=1) / float(k)


def _hit_rate(hits, n, k):
    return hits[:, :k].any(axis=1).astype(np.float64)


def _mrr(hits, n, k):
    h = hits[:, :k]
    first = np.argmax(h, axis=1)  # first True; 0 when none, masked below
    return np.where(h.any(axis=1), 1.0 / (first + 1.0), 0.0)


_FORMULAS = {"recall": _recall, "ndcg": _ndcg, "precision": _precision, "hit_rate": _hit_rate, "mrr": _mrr}


def user_values(score, fold_in: sp.csr_matrix, heldout: sp.csr_matrix, ks, metrics, batch_size: int,
                batches=iter, on_batch=None) -> tuple[dict[str, np.ndarray], float]:
    """Per-user values of ``metrics`` at each cut-off of ``ks`` for every user (row) of
    ``fold_in``, ``batch_size`` users scored at a time by ``score`` (:func:`rank_users`: one
    ranking of ``max(ks)`` items per user serves every metric and cut-off). ``heldout``: binary
    relevance (:func:`binary_relevance`), every row with an item. ``on_batch(scores, idx)`` sees
    each batch's masked scores and ranking (catalogue metrics). Returns ``({"ndcg@100": values,
    ...}, seconds spent in score)``."""
    ks = tuple(ks)
    parts: dict[str, list[np.ndarray]] = {}
    seconds = 0.0
    for lo, scores, idx, took in rank_users(score, fold_in, max(ks), batch_size, batches):
        seconds += took
        h = heldout[lo:lo + batch_size]
        if metrics:
            for name, v in metrics_from_hits(ranked_hits(idx, h), np.diff(h.indptr), ks, metrics).items():
                parts.setdefault(name, []).append(v)
        if on_batch is not None:
            on_batch(scores, idx)
        del scores
    names = [f"{m}@{k}" for m in metrics for k in ks]
    return {n: np.concatenate(parts[n]) if n in parts else np.zeros(0) for n in names}, seconds


def metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray, ks, metrics=("recall", "ndcg")) -> dict[str, np.ndarray]:
    """Per-user metrics ``"{name}@{k}"`` for every name in ``metrics`` and k in ``ks``,
    from one hit matrix (users x max(ks)) of a ranking and the held-out counts."""
    out = {}
    for name in metrics:
        for k in ks:
            out[f"{name}@{k}"] = _FORMULAS[name](hits, n_relevant, k)
    return out


def _check_metric_names(metrics, allowed, name: str = "metrics") -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise ParameterError(name, f"expected at least one metric name out of {allowed}")
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ParameterError(name, f"unknown metric(s) {unknown}; expected names out of {allowed}")
    return tuple(dict.fromkeys(metrics))


def per_user_metrics(scores, heldout, ks=(20, 50, 100), metrics=("recall", "ndcg")) -> dict[str, np.ndarray]:
    """Several per-user metrics at several cut-offs from a single ranking.

    One ``top_k`` for ``max(ks)`` and one hit matrix serve every metric and
    cut-off (the top-K list for a smaller K is a prefix, see the module notes),
    so the values equal those of the individual functions exactly.
    """
    scores = _check_scores(scores)
    metrics = _check_metric_names(metrics, USER_METRICS)
    ks = tuple(check_k(k, scores.shape[1], "ks") for k in np.atleast_1d(np.asarray(ks, dtype=object)))
    rel = _relevance(heldout, scores.shape)
    hits = ranked_hits(top_k(scores, max(ks)), rel)
    return metrics_from_hits(hits, np.diff(rel.indptr), ks, metrics)


def _single(name: str, scores, heldout, k) -> np.ndarray:
    scores = _check_scores(scores)
    k = check_k(k, scores.shape[1])
    rel = _relevance(heldout, scores.shape)
    hits = ranked_hits(top_k(scores, k), rel)
    return _FORMULAS[name](hits, np.diff(rel.indptr), k)


# --------------------------------------------------------------------------- public metrics


def recall_at_k(scores, heldout, k: int) -> np.ndarray:
    """Recall@K as in Liang et al. (2018) and their notebook::

        Recall@K(u) = hits@K / min(K, n_u)

    The denominator ``min(K, n_u)`` makes a perfect ranking score 1 even when the
    user has more than K held-out items (the paper's stated reason: it normalises
    Recall@K to a maximum of 1, reached by ranking all relevant items first).
    RecBole and Cornac divide by ``n_u`` instead, which gives lower values whenever
    ``n_u > K``; the two agree when ``n_u <= K``. Values lie in [0, 1].

    Examples
    --------
    Two users, four items; user 0 holds out items 0 and 3 (ranked 1st and 3rd), user 1 item 2
    (ranked 2nd):

    >>> from recvae.metrics import recall_at_k
    >>> scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.9, 0.5, 0.1]])
    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]]))
    >>> recall_at_k(scores, heldout, k=2)     # 1 hit of min(2, 2); 1 of min(2, 1)
    array([0.5, 1. ])
    """
    return _single("recall", scores, heldout, k)


def ndcg_at_k(scores, heldout, k: int) -> np.ndarray:
    """NDCG@K with binary relevance, as in Liang et al. (2018)::

        DCG@K(u)  = sum_{r=1..K} rel_r / log2(r + 1)
        IDCG@K(u) = sum_{r=1..min(K, n_u)} 1 / log2(r + 1)   (all hits ranked first)
        NDCG@K(u) = DCG@K / IDCG@K

    The ideal DCG counts ``min(K, n_u)`` hits, so a perfect ranking scores 1 for any
    ``n_u``. (The notebook multiplies the stored held-out values, all 1 there, by the
    discounts; here any stored positive value counts as 1.) This is also what RecBole and Cornac
    compute for binary relevance. Values lie in [0, 1].

    Examples
    --------
    Two users, four items; user 0 holds out items 0 and 3 (ranked 1st and 3rd), user 1 item 2
    (ranked 2nd):

    >>> from recvae.metrics import ndcg_at_k
    >>> scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.9, 0.5, 0.1]])
    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]]))
    >>> ndcg_at_k(scores, heldout, k=3).round(4)   # (1 + 1/log2 4) / (1 + 1/log2 3); (1/log2 3) / 1
    array([0.9197, 0.6309])
    """
    return _single("ndcg", scores, heldout, k)


def precision_at_k(scores, heldout, k: int) -> np.ndarray:
    """Precision@K = hits@K / K (values in [0, 1]; at most n_u / K when n_u < K).

    Examples
    --------
    Two users, four items; user 0 holds out items 0 and 3 (ranked 1st and 3rd), user 1 item 2
    (ranked 2nd):

    >>> from recvae.metrics import precision_at_k
    >>> scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.9, 0.5, 0.1]])
    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]]))
    >>> precision_at_k(scores, heldout, k=2)
    array([0.5, 0.5])
    """
    return _single("precision", scores, heldout, k)


def hit_rate_at_k(scores, heldout, k: int) -> np.ndarray:
    """HitRate@K = 1 if hits@K >= 1 else 0 (any held-out item in the top K).

    Examples
    --------
    Two users, four items; user 0 holds out items 0 and 3 (ranked 1st and 3rd), user 1 item 2
    (ranked 2nd):

    >>> from recvae.metrics import hit_rate_at_k
    >>> scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.9, 0.5, 0.1]])
    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]]))
    >>> hit_rate_at_k(scores, heldout, k=1)
    array([1., 0.])
    """
    return _single("hit_rate", scores, heldout, k)


def mrr_at_k(scores, heldout, k: int) -> np.ndarray:
    """MRR@K (reciprocal rank) = 1 / r_first if the first held-out item is at rank
    r_first <= K, else 0. Its mean over users is the mean reciprocal rank.

    Examples
    --------
    Two users, four items; user 0 holds out items 0 and 3 (ranked 1st and 3rd), user 1 item 2
    (ranked 2nd):

    >>> from recvae.metrics import mrr_at_k
    >>> scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.9, 0.5, 0.1]])
    >>> heldout = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]]))
    >>> mrr_at_k(scores, heldout, k=3)        # first hits at ranks 1 and 2
    array([1. , 0.5])
    """
    return _single("mrr", scores, heldout, k)


def coverage_at_k(scores, k: int) -> float:
    """Catalogue coverage@K: the fraction of the catalogue that appears in at least
    one user's top K::

        Coverage@K = |union_u TopK(u)| / n_items

    A **catalogue-level** metric: a single float over the given set of users (not a
    per-user value, so it has no standard error and depends on how many users are
    ranked). Positions whose score is ``-inf`` (excluded items that only fill a
    ranking with fewer than K candidates) are not counted.
    """
    scores = _check_scores(scores)
    k = check_k(k, scores.shape[1])
    idx = top_k(scores, k)
    ranked = np.take_along_axis(scores, idx, axis=1) > -np.inf
    seen = np.zeros(scores.shape[1], dtype=bool)
    seen[idx[ranked]] = True
    return float(seen.mean())


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class MetricSummary:
    """Mean over users and its standard error, as the paper reports them."""

    mean: float
    stderr: float  # std(ddof=0) / sqrt(n_users); NaN for catalogue-level metrics
    n_users: int


def mean_stderr(values) -> tuple[float, float]:
    """``(mean, std / sqrt(n))`` with numpy's default ``ddof=0``, as in the paper's notebook."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ParameterError("values", "expected at least one per-user value, got an empty array")
    return float(v.mean()), float(v.std() / np.sqrt(v.size))


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, MetricSummary]:
    """Mean, standard error (``std / sqrt(n)``, ddof=0) and count for each metric array."""
    out = {}
    for name, values in per_user.items():
        mean, se = mean_stderr(values)
        out[name] = MetricSummary(mean, se, int(np.size(values)))
    return out
