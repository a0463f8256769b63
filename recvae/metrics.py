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
Items are ranked by decreasing score; **equal scores are broken by the lower
item (column) index first**, always, so results are deterministic and the top-K
list for a smaller K is a prefix of the one for a larger K (one ranking serves
all cut-offs). ``-inf`` scores are allowed and rank last: this is how
:func:`recvae.evaluation.evaluate` excludes a user's fold-in items. ``NaN``
scores are rejected.

Users with no held-out item have undefined Recall/NDCG (0/0): the functions
reject them with an error; :func:`recvae.evaluation.evaluate` filters them out
first and logs how many.

Reported summaries are the mean over users with the standard error
``std / sqrt(n)`` using numpy's default ``ddof=0``, exactly as the paper's
notebook prints them (``np.std(n100_list) / np.sqrt(len(n100_list))``); see
:func:`summarize`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from recvae.errors import ParameterError

#: per-user metrics accepted by :func:`per_user_metrics` and ``evaluate(metrics=...)``
USER_METRICS = ("recall", "ndcg", "precision", "hit_rate", "mrr")
#: catalogue-level metrics (one number for the whole set of users)
CATALOGUE_METRICS = ("coverage",)


# --------------------------------------------------------------------------- validation


def _check_scores(scores) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ParameterError("scores", f"expected a 2-d (users x items) array, got shape {scores.shape}")
    if scores.shape[1] == 0:
        raise ParameterError("scores", "expected at least one item column, got 0")
    if not np.issubdtype(scores.dtype, np.floating):
        if not (np.issubdtype(scores.dtype, np.integer) or scores.dtype == bool):
            raise TypeError(f"scores: expected a numeric array, got dtype {scores.dtype}")
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        n_bad = int(np.isnan(scores).any(axis=1).sum())
        raise ParameterError(
            "scores", f"contains NaN in {n_bad} row(s); expected finite values, or -inf for excluded items"
        )
    return scores


def check_k(k, n_items: int, name: str = "k") -> int:
    """Return ``k`` as an int after checking ``1 <= k <= n_items`` (error names ``name``)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer cut-off, got {k!r}")
    if not 1 <= k <= n_items:
        raise ParameterError(name, f"expected 1 <= {name} <= number of items ({n_items}), got {k}")
    return int(k)


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


def top_k(scores, k: int) -> np.ndarray:
    """Indices (users x k, int64) of the ``k`` highest scores per row, best first.

    Equal scores are ordered by the lower item index first, also across the K-th place, and
    ``-inf`` ranks last (see the module notes). This is the one ranking of the library: the
    metrics, :func:`recvae.evaluation.evaluate` and the models' ``recommend`` (through
    :func:`top_k_with_scores`) all use it.
    """
    scores = _check_scores(scores)
    return _top_k(scores, check_k(k, scores.shape[1]))


def top_k_with_scores(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, values)`` of :func:`top_k`, each (users x k): the ranked item indices and their
    scores. A ``-inf`` score (an excluded item that only fills a row with fewer than k other
    items) comes back as id -1; its value stays ``-inf``."""
    scores = _check_scores(scores)
    ids = _top_k(scores, check_k(k, scores.shape[1]))
    values = np.take_along_axis(scores, ids, axis=1)
    ids[np.isneginf(values)] = -1
    return ids, values


def mask_rows(scores: np.ndarray, rows: sp.csr_matrix) -> None:
    """Set ``scores[u, i] = -inf`` for every stored entry (u, i) of the CSR ``rows``, in place:
    how a user's fold-in (or already seen, or excluded) items leave the ranking."""
    r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    scores[r, rows.indices] = -np.inf


def binary_relevance(heldout: sp.csr_matrix) -> sp.csr_matrix:
    """Held-out items as relevance: a copy with every positive entry 1, zeros dropped,
    duplicates merged (the form :func:`ranked_hits` reads)."""
    heldout = heldout.copy()
    heldout.data = (heldout.data > 0).astype(np.float32)
    heldout.eliminate_zeros()
    heldout.sum_duplicates()
    return heldout


def rank_users(score, fold_in: sp.csr_matrix, k: int, batch_size: int, batches=iter):
    """Rank ``k`` items for every user (row) of ``fold_in``, ``batch_size`` users at a time: the
    one loop behind evaluation and validation. ``score(csr_batch)`` gives dense (batch, items)
    scores; each user's fold-in items leave the ranking (:func:`mask_rows`). Yields ``(start,
    scores, idx, seconds)`` per batch: its first row, the masked scores, :func:`top_k`'s ids and
    the seconds ``score`` took. ``batches`` wraps the batch starts (e.g. a progress bar)."""
    for lo in batches(range(0, fold_in.shape[0], batch_size)):
        x = fold_in[lo : lo + batch_size]
        t0 = time.perf_counter()
        scores = np.asarray(score(x))
        seconds = time.perf_counter() - t0
        if scores.shape != x.shape:
            raise ParameterError("model", f"score() returned shape {scores.shape} for a batch of shape {x.shape}; "
                                          "expected dense (batch, n_items)")
        if not scores.flags.writeable or not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float32)
        mask_rows(scores, x)
        yield lo, scores, top_k(scores, k), seconds
        del scores  # one dense block at a time: freed before the next batch is scored


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` of checked scores and cut-off.

    Speed: instead of an ``argpartition`` over all items, a cheap lower bound of each
    row's K-th largest score comes first: the first ``4k * g`` items form 4k strided
    groups, and the K-th largest of the 4k group maxima is reached by k distinct items,
    so it cannot exceed the row's K-th largest score. Only items at or above it (about
    1.2 k for continuous scores) are then ranked exactly. Where the bound lets more than a
    quarter of a row's items through (one value shared by most items: e.g. mostly ``-inf``),
    that row keeps the items above the bound and only the lowest-index items equal to it
    that can still be needed (a full ``argpartition`` is very slow on such rows).
    """
    n_users, n_items = scores.shape
    m = 4 * k  # number of groups
    if n_users == 0 or 2 * m > n_items:
        return _top_k_exact(scores, k)
    g = n_items // m
    row, col = scores.strides
    groups = np.lib.stride_tricks.as_strided(scores, (n_users, g, m), (row, m * col, col), writeable=False)
    bound = np.partition(groups.max(axis=1), m - k, axis=1)[:, m - k, None]
    candidate = scores >= bound
    if np.count_nonzero(candidate) > candidate.size // 8:  # some rows are loose: trim before listing
        _trim_loose(candidate, scores, bound, k, _row_counts(candidate))
    r, c, counts = _listed(candidate)
    if _trim_loose(candidate, scores, bound, k, counts):  # a few loose rows, listed for nothing
        r, c, counts = _listed(candidate)
    width = int(counts.max())
    # candidates packed left in increasing item order, padded with -inf after them: every
    # row has >= k real candidates, and an exact tie with the padding goes to the lower
    # (real) position
    pos = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    packed = np.full((n_users, width), -np.inf, dtype=scores.dtype)
    packed[r, pos] = scores[r, c]
    items = np.zeros((n_users, width), dtype=np.int64)
    items[r, pos] = c
    return np.take_along_axis(items, _top_k_exact(packed, k), axis=1)


def _listed(candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column of each True of a 2-d mask (row-major order), and the count per row."""
    flat = np.flatnonzero(candidate)  # much faster than a 2-d np.nonzero
    r, c = np.divmod(flat, candidate.shape[1])
    return r, c, np.bincount(r, minlength=candidate.shape[0])


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """Number of True per row of a 2-d boolean mask; summing its bytes is several times
    faster than ``np.count_nonzero(mask, axis=1)``."""
    return mask.view(np.uint8).sum(axis=1, dtype=np.int32)


def _trim_loose(candidate: np.ndarray, scores: np.ndarray, bound: np.ndarray, k: int, counts) -> bool:
    """In the rows of ``candidate`` (scores >= bound) holding more than a quarter of the items,
    keep only the items the top k can need (:func:`_above_or_first_at`); whether any row was."""
    loose = np.flatnonzero(counts > candidate.shape[1] // 4)
    if loose.size:
        candidate[loose] = _above_or_first_at(scores[loose], bound[loose], k)
    return bool(loose.size)


def _above_or_first_at(scores: np.ndarray, bound: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask per row: every item above ``bound`` (a lower bound of the row's K-th
    largest score), then the lowest-index items equal to it until k are chosen. The row's top
    k lie in it, and it holds max(k, #above) items."""
    above = scores > bound
    at = scores == bound
    need = k - _row_counts(above)
    return above | (at & (np.cumsum(at, axis=1, dtype=np.int32) <= need[:, None]))


def _top_k_exact(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` by one ``argpartition`` over each row, then a sort of k candidates;
    rows where a tie straddles the K-th place are re-selected, lowest indices first."""
    n_users, n_items = scores.shape
    if k == n_items:
        cand = np.broadcast_to(np.arange(n_items), scores.shape)
    else:
        # argpartition on scores (not -scores) avoids a negated copy of the whole batch
        part = np.argpartition(scores, n_items - k, axis=1)
        cand = part[:, n_items - k :]
        thr = np.take_along_axis(scores, cand[:, :1], axis=1)  # the K-th largest score
        n_ge = np.count_nonzero(scores >= thr, axis=1)
        tied = np.flatnonzero(n_ge > k)  # more items reach the threshold than places left
        cand = np.sort(cand, axis=1)
        if tied.size:
            cand[tied] = _select_ties_low_index(scores[tied], thr[tied], k)
    vals = np.take_along_axis(scores, cand, axis=1)
    # candidates are in increasing index order, so a stable sort keeps lower indices first among ties
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1).astype(np.int64, copy=False)


def _select_ties_low_index(scores: np.ndarray, thr: np.ndarray, k: int) -> np.ndarray:
    """For each row: every index with score > thr, then the lowest-index items equal to thr
    until k are chosen. Returned sorted by index, shape (rows, k)."""
    sel = scores > thr
    need = k - np.count_nonzero(sel, axis=1)
    r, c = np.nonzero(scores == thr)  # row-major: columns ascend within each row
    first = np.searchsorted(r, np.arange(scores.shape[0]))
    rank_in_row = np.arange(r.size) - first[r]
    keep = rank_in_row < need[r]
    sel[r[keep], c[keep]] = True
    return np.nonzero(sel)[1].reshape(scores.shape[0], k)


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
    """Recall@K as in Liang et al. (2018) and their notebook:

        Recall@K(u) = hits@K / min(K, n_u)

    The denominator ``min(K, n_u)`` makes a perfect ranking score 1 even when the
    user has more than K held-out items (the paper's stated reason: it normalises
    Recall@K to a maximum of 1, reached by ranking all relevant items first).
    RecBole and Cornac divide by ``n_u`` instead, which gives lower values whenever
    ``n_u > K``; the two agree when ``n_u <= K``. Values lie in [0, 1].
    """
    return _single("recall", scores, heldout, k)


def ndcg_at_k(scores, heldout, k: int) -> np.ndarray:
    """NDCG@K with binary relevance, as in Liang et al. (2018):

        DCG@K(u)  = sum_{r=1..K} rel_r / log2(r + 1)
        IDCG@K(u) = sum_{r=1..min(K, n_u)} 1 / log2(r + 1)   (all hits ranked first)
        NDCG@K(u) = DCG@K / IDCG@K

    The ideal DCG counts ``min(K, n_u)`` hits, so a perfect ranking scores 1 for any
    ``n_u``. (The notebook multiplies the stored held-out values, all 1 there, by the
    discounts; here any stored positive value counts as 1.) This is also what RecBole and Cornac compute for binary relevance.
    Values lie in [0, 1].
    """
    return _single("ndcg", scores, heldout, k)


def precision_at_k(scores, heldout, k: int) -> np.ndarray:
    """Precision@K = hits@K / K (values in [0, 1]; at most n_u / K when n_u < K)."""
    return _single("precision", scores, heldout, k)


def hit_rate_at_k(scores, heldout, k: int) -> np.ndarray:
    """HitRate@K = 1 if hits@K >= 1 else 0 (any held-out item in the top K)."""
    return _single("hit_rate", scores, heldout, k)


def mrr_at_k(scores, heldout, k: int) -> np.ndarray:
    """MRR@K (reciprocal rank) = 1 / r_first if the first held-out item is at rank
    r_first <= K, else 0. Its mean over users is the mean reciprocal rank."""
    return _single("mrr", scores, heldout, k)


def coverage_at_k(scores, k: int) -> float:
    """Catalogue coverage@K: the fraction of the catalogue that appears in at least
    one user's top K,

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
