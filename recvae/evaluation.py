"""Batched evaluation of any model of the library on held-out users (the paper's fold-in protocol)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from recvae import metrics
from recvae.models.base import as_csr


@dataclass
class MetricSummary:
    mean: float
    stderr: float  # std / sqrt(n_users), as the paper reports
    n_users: int


@dataclass
class EvaluationResult:
    metrics: dict[str, MetricSummary] = field(default_factory=dict)  # e.g. "ndcg@100"
    seconds: float = 0.0

    def __getitem__(self, name: str) -> MetricSummary:
        return self.metrics[name]


def evaluate(model, fold_in, heldout, ks=(20, 50, 100), batch_size: int = 1000) -> EvaluationResult:
    """Score users from their fold-in items and rank the rest against their held-out items.

    Fold-in items are excluded from the ranking (score set to -inf). Users are scored in
    batches of ``batch_size``, so at most one batch of dense scores is held at a time.
    """
    fold_in = as_csr(fold_in, "fold_in")
    heldout = as_csr(heldout, "heldout")
    if fold_in.shape != heldout.shape:
        raise ValueError(f"heldout: expected shape {fold_in.shape} (same as fold_in), got {heldout.shape}")
    start = time.perf_counter()
    values: dict[str, list[np.ndarray]] = {}
    for lo in range(0, fold_in.shape[0], batch_size):
        x = fold_in[lo : lo + batch_size]
        scores = model.score(x)
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        scores[rows, x.indices] = -np.inf
        h = heldout[lo : lo + batch_size]
        for k in ks:
            values.setdefault(f"recall@{k}", []).append(metrics.recall_at_k(scores, h, k))
            values.setdefault(f"ndcg@{k}", []).append(metrics.ndcg_at_k(scores, h, k))
    result = EvaluationResult(seconds=time.perf_counter() - start)
    for name, parts in values.items():
        v = np.concatenate(parts)
        result.metrics[name] = MetricSummary(float(v.mean()), float(v.std() / np.sqrt(len(v))), len(v))
    return result
