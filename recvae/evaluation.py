"""Batched evaluation of any model of the library on held-out users (the paper's fold-in protocol).

For each evaluated user the model sees the *fold-in* part of the history, scores every
item, the fold-in items are excluded from the ranking (score set to ``-inf``), and the
ranking is compared with the *held-out* items. Metric conventions (Recall@K denominator
``min(K, n_u)``, ties broken by lower item index, standard error ``std / sqrt(n)``) are
documented in :mod:`recvae.metrics`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from recvae import metrics as M
from recvae.errors import ParameterError
from recvae.progress import bar
from recvae.data.user_items import as_csr
from recvae.metrics import MetricSummary  # re-exported: callers import it from here

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_METRICS", "MIN_RELIABLE_USERS", "EvaluationResult", "MetricSummary", "evaluate",
           "paired_difference", "warn_few_users"]

#: the paper's metrics; add "precision", "hit_rate", "mrr" (per user) or "coverage" (catalogue)
DEFAULT_METRICS = ("recall", "ndcg")

#: held-out users below which a result is flagged (one logged warning): a mean over fewer users
#: moves with a handful of them, and its standard error, estimated from the same few, is itself
#: unreliable (2 users can read ``± 0.0000``); 50 is a common floor
MIN_RELIABLE_USERS = 50


def warn_few_users(n_users: int, who: str, what: str, meaning: str) -> bool:
    """One warning line when ``n_users`` (``what``: "held-out users", "validation users") is
    below :data:`MIN_RELIABLE_USERS`, saying what it means for ``who``'s result; True if warned."""
    if n_users >= MIN_RELIABLE_USERS:
        return False
    logger.warning("%s: %d %s (fewer than %d): %s; hold out more users (n_heldout_users) or use more data",
                   who, n_users, what, MIN_RELIABLE_USERS, meaning)
    return True


@dataclass
class EvaluationResult:
    """Per-metric summaries keyed ``"{metric}@{k}"`` (e.g. ``"ndcg@100"``) and timings.

    ``seconds`` is the wall time of the whole evaluation; ``score_seconds`` the part
    spent inside ``model.score``, so ``seconds - score_seconds`` is the ranking/metric
    time. ``n_skipped`` users had no held-out item and were left out. ``per_user`` holds each
    user metric's values, one per evaluated user in the order of the input rows (skipped users
    left out): two models evaluated on the same users can be compared user by user
    (:func:`paired_difference`).
    """

    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    seconds: float = 0.0
    score_seconds: float = 0.0
    n_users: int = 0
    n_skipped: int = 0
    per_user: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> MetricSummary:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"{name!r}: not evaluated; available: {sorted(self.metrics)}") from None

    def __str__(self) -> str:
        parts = []
        for name, s in self.metrics.items():
            if math.isnan(s.stderr):
                parts.append(f"{name}={s.mean:.5f}")
            else:
                parts.append(f"{name}={s.mean:.5f} ({s.stderr:.5f})")
        return f"{', '.join(parts)} [{self.n_users} users, {self.seconds:.2f}s]"

    def to_dict(self) -> dict:
        """JSON-ready dict (a NaN stderr, as for coverage, becomes ``None``)."""
        return {
            "metrics": {
                name: {
                    "mean": s.mean,
                    "stderr": None if math.isnan(s.stderr) else s.stderr,
                    "n_users": s.n_users,
                }
                for name, s in self.metrics.items()
            },
            "seconds": self.seconds,
            "score_seconds": self.score_seconds,
            "n_users": self.n_users,
            "n_skipped": self.n_skipped,
        }

    @staticmethod
    def markdown_header(names, label: str = "model") -> str:
        """Header and separator lines of a markdown table for :meth:`markdown_row`."""
        names = list(names)
        return f"| {label} | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)

    def markdown_row(self, label: str, names=None, digits: int = 4) -> str:
        """``| label | mean ± stderr | ... |`` for ``names`` (default: every metric)."""
        names = list(self.metrics) if names is None else list(names)
        cells = []
        for name in names:
            s = self[name]
            cell = f"{s.mean:.{digits}f}"
            if not math.isnan(s.stderr):
                cell += f" ± {s.stderr:.{digits}f}"
            cells.append(cell)
        return f"| {label} | " + " | ".join(cells) + " |"


def _unpack(fold_in, heldout):
    if heldout is not None:
        return fold_in, heldout
    if hasattr(fold_in, "fold_in") and hasattr(fold_in, "heldout"):
        return fold_in.fold_in, fold_in.heldout
    if isinstance(fold_in, tuple) and len(fold_in) == 2:
        return fold_in
    raise TypeError(
        "heldout: missing; pass evaluate(model, fold_in, heldout), or an object with "
        f".fold_in and .heldout (HeldOutUsers) or a (fold_in, heldout) tuple, got {type(fold_in).__name__}"
    )


def evaluated_users(fold_in, heldout=None) -> int:
    """How many users :func:`evaluate` scores on these arguments (the same forms): those with a
    held-out item (a positive entry of ``heldout``)."""
    _, heldout = _unpack(fold_in, heldout)
    return int(_with_heldout(M.binary_relevance(as_csr(heldout, "heldout"))).size)


def _with_heldout(relevance: sp.csr_matrix) -> np.ndarray:
    """The rows of a :func:`~recvae.metrics.binary_relevance` matrix that hold an item."""
    return np.flatnonzero(np.diff(relevance.indptr) > 0)


def evaluate(
    model,
    fold_in,
    heldout=None,
    ks=(20, 50, 100),
    batch_size: int = 1000,
    metrics=DEFAULT_METRICS,
    show_progress: bool = False,
    warn_few: bool = True,
) -> EvaluationResult:
    """Score users from their fold-in items and rank the rest against their held-out items.

    Parameters
    ----------
    model : any object with ``score(csr_batch) -> dense (batch, n_items)`` (e.g. a fitted
        :class:`~recvae.models.base.Recommender`). The returned array is modified in place
        (fold-in items set to ``-inf``), so ``score`` must return a fresh array.
    fold_in, heldout : users x items sparse matrices (or Interactions) of the same shape,
        with disjoint entries per user. Alternatively pass one object with ``.fold_in`` and
        ``.heldout`` (a ``HeldOutUsers``) or a ``(fold_in, heldout)`` tuple as ``fold_in``.
    ks : cut-offs K.
    batch_size : users scored at once; at most one ``batch_size x n_items`` block of dense
        scores exists at a time.
    metrics : names out of :data:`recvae.metrics.USER_METRICS` and ``"coverage"``.
        Coverage is catalogue-level: its summary has ``stderr = nan``.

    Notes
    -----
    Users without held-out items are skipped (their Recall/NDCG is 0/0), with a logged count.
    Fewer than :data:`MIN_RELIABLE_USERS` evaluated users log one warning (``warn_few=False``:
    none, for a caller that evaluates the same users many times and says it once, as tune does).
    One ranking of ``max(ks)`` items per user serves every metric and cut-off.
    """
    start = time.perf_counter()
    fold_in, heldout = _unpack(fold_in, heldout)
    fold_in = as_csr(fold_in, "fold_in")
    heldout = as_csr(heldout, "heldout")
    if fold_in.shape != heldout.shape:
        raise ParameterError("heldout", f"expected shape {fold_in.shape} (same as fold_in), got {heldout.shape}")
    n_total, n_items = fold_in.shape
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(sorted({M.check_k(k, n_items, "ks") for k in ks}))
    if not ks:
        raise ParameterError("ks", "expected at least one cut-off K")
    names = M._check_metric_names(metrics, M.USER_METRICS + M.CATALOGUE_METRICS)
    user_names = tuple(m for m in names if m in M.USER_METRICS)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ParameterError("batch_size", f"expected a positive integer, got {batch_size!r}")

    heldout = M.binary_relevance(heldout)
    overlap = fold_in.multiply(heldout).count_nonzero()
    if overlap:
        raise ParameterError(
            "heldout", f"{overlap} (user, item) pair(s) also appear in fold_in; held-out items must be "
            "disjoint from the fold-in items, which are excluded from the ranking"
        )
    users = _with_heldout(heldout)
    n_skipped = n_total - users.size
    if n_skipped:
        logger.warning("evaluate: skipping %d of %d user(s) with no held-out items", n_skipped, n_total)
    if users.size == 0:
        raise ParameterError("heldout", f"none of the {n_total} user(s) has a held-out item; nothing to evaluate")
    if n_skipped:
        fold_in, heldout = fold_in[users], heldout[users]
    if warn_few:
        warn_few_users(int(users.size), "evaluate", "held-out user" + ("" if users.size == 1 else "s"),
                       "the metrics and their standard errors say little")

    seen = {k: np.zeros(n_items, dtype=bool) for k in ks} if "coverage" in names else None

    def cover(scores, idx) -> None:  # the items that reach some user's top K
        ranked = np.take_along_axis(scores, idx, axis=1) > -np.inf
        for k in ks:
            seen[k][idx[:, :k][ranked[:, :k]]] = True

    progress = lambda starts: bar(starts, show=show_progress, desc="evaluate", unit="batch")  # noqa: E731
    per_user, score_seconds = M.user_values(model.score, fold_in, heldout, ks, user_names, batch_size, progress,
                                            on_batch=cover if seen is not None else None)

    result = EvaluationResult(n_users=int(users.size), n_skipped=int(n_skipped), score_seconds=score_seconds)
    result.per_user = per_user
    summaries = M.summarize(result.per_user)
    for name in names:  # keep the requested order: metric, then K
        for k in ks:
            key = f"{name}@{k}"
            if name == "coverage":
                result.metrics[key] = MetricSummary(float(seen[k].mean()), float("nan"), int(users.size))
            else:
                result.metrics[key] = summaries[key]
    result.seconds = time.perf_counter() - start
    return result


def paired_difference(model: list, baseline: list, n_resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Paired comparison of two models' per-user values over several splits (seeds).

    ``model[s]`` and ``baseline[s]`` are the per-user values (e.g. NDCG@100) of the same test
    users of split ``s``, in the same order. With ``d_su = model_su - baseline_su`` over all N
    users of all splits:

    * ``mean``: ``1/N sum_s sum_u d_su`` (the difference of the pooled means);
    * ``ci_low``, ``ci_high``: percentile interval (``level``, default 95%) of the same mean over
      ``n_resamples`` paired bootstrap resamples, users drawn with replacement within each split
      (the split sizes kept), from a generator seeded with ``seed``;
    * ``wins``: splits where the model's mean is above the baseline's; ``n_splits``, ``n_users``.
    """
    if len(model) != len(baseline) or not model:
        raise ParameterError("baseline", f"expected per-user arrays for the same (non-empty) splits as model, got "
                                         f"{len(baseline)} and {len(model)}")
    diffs = []
    for s, (a, b) in enumerate(zip(model, baseline)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 1 or a.size == 0:
            raise ParameterError("baseline", f"split {s}: expected a non-empty per-user array of model's length, got "
                                             f"shapes {b.shape} (baseline) and {a.shape} (model)")
        diffs.append(a - b)
    if not 0 < level < 1:
        raise ParameterError("level", f"expected a probability in (0, 1), got {level!r}")
    n = sum(d.size for d in diffs)
    rng = np.random.default_rng(seed)
    totals = np.zeros(int(n_resamples))
    for d in diffs:  # resample within each split: the sum over its users, per resample
        for lo in range(0, int(n_resamples), 256):  # bounded memory: 256 x n_users indices at a time
            hi = min(lo + 256, int(n_resamples))
            totals[lo:hi] += d[rng.integers(0, d.size, size=(hi - lo, d.size))].sum(axis=1)
    means = totals / n
    alpha = (1.0 - level) / 2.0
    return {
        "mean": float(sum(d.sum() for d in diffs) / n),
        "ci_low": float(np.quantile(means, alpha)),
        "ci_high": float(np.quantile(means, 1.0 - alpha)),
        "level": float(level),
        "method": f"paired bootstrap over users within splits, {int(n_resamples)} resamples, seed {seed}",
        "wins": int(sum(d.mean() > 0 for d in diffs)),
        "n_splits": len(diffs),
        "n_users": int(n),
    }


@dataclass(frozen=True)
class RankingScorer:
    """A scikit-learn scorer ``scorer(estimator, X) -> float``: mean NDCG@k over the users (rows)
    of ``X``. Each user's items are split as :func:`recvae.data.weak_generalization_split` splits
    them (``floor(heldout_fraction * n_u)`` random items held out, users with at least 5 items;
    seeded, so every candidate is scored on the same split); the model scores the rest, which
    :func:`evaluate` excludes from the ranking. Make it with :func:`ranking_scorer`."""

    k: int = 100
    heldout_fraction: float = 0.2
    seed: int = 0

    def __call__(self, estimator, X, y=None) -> float:
        from recvae.data.interactions import Interactions
        from recvae.data.splits import weak_generalization_split

        X = as_csr(X, "X")
        data = Interactions(X.astype(np.float32), np.arange(X.shape[0]), np.arange(X.shape[1]))
        test = weak_generalization_split(data, self.heldout_fraction, self.seed).test
        if test.fold_in.shape[0] == 0:
            raise ParameterError("X", f"none of its {X.shape[0]} user(s) has an item to hold out (each needs "
                                      f"at least 5 items and floor({self.heldout_fraction:g} * items) >= 1)")
        k = min(self.k, X.shape[1])  # a k beyond the catalogue ranks the whole catalogue
        return float(evaluate(estimator, test, ks=k, metrics=("ndcg",))[f"ndcg@{k}"].mean)


def ranking_scorer(k: int = 100, heldout_fraction: float = 0.2, seed: int = 0) -> RankingScorer:
    """A ranking scorer for scikit-learn's model selection (a model's ``score`` returns a matrix
    of scores, not a number, so ``GridSearchCV`` needs ``scoring=``)::

        from sklearn.model_selection import GridSearchCV, KFold
        search = GridSearchCV(EASE(), {"l2": [50, 500]}, scoring=ranking_scorer(k=100),
                              cv=KFold(5, shuffle=True, random_state=0)).fit(X)
        search.best_params_, search.best_estimator_  # refitted on every row of X

    Each fold fits on some users (rows) and scores the others from part of their items (strong
    generalization, as the paper's protocol): see :class:`RankingScorer`. The library's own
    search, :func:`recvae.tuning.search` (and ``recvae tune``), does the same with the paper's
    validation users, early stopping and run folders."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ParameterError("k", f"expected a positive integer, got {k!r}")
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0 < heldout_fraction < 1:
        raise ParameterError("heldout_fraction", f"expected a number in (0, 1), got {heldout_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ParameterError("seed", f"expected an integer, got {seed!r}")
    return RankingScorer(int(k), float(heldout_fraction), int(seed))
