"""Ranking: the one top-K of the library, and the batched loop that ranks users' items.

Items are ranked by decreasing score; **equal scores are broken by the lower item (column)
index first**, always, so results are deterministic and the top-K list for a smaller K is a
prefix of the one for a larger K (one ranking serves all cut-offs). ``-inf`` scores are allowed
and rank last: this is how a user's fold-in (or seen, or excluded) items leave the ranking
(:func:`mask_rows`). ``NaN`` scores are rejected. The metrics (:mod:`recvae.metrics`), the
evaluation, validation and every model's ``recommend`` rank through :func:`top_k`.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from recvae.errors import ParameterError


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
