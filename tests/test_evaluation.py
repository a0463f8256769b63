"""evaluate(): fold-in exclusion, batching, filtering, result formatting, errors."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from recvae import metrics as M
from recvae.evaluation import EvaluationResult, MetricSummary, evaluate


class FixedScores:
    """Returns the rows of a fixed score matrix for each batch (a fresh copy, as models do)."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float32)
        self.batches = []
        self._next = 0

    def score(self, x):
        lo = self._next
        self._next += x.shape[0]
        self.batches.append(x.shape[0])
        return self.scores[lo : lo + x.shape[0]].copy()


def random_split(seed=0, n_users=57, n_items=40):
    rng = np.random.default_rng(seed)
    a = rng.random((n_users, n_items))
    fold_in = (a < 0.2).astype(np.float32)
    heldout = ((a >= 0.2) & (a < 0.3)).astype(np.float32)
    first_free = np.argmax(fold_in == 0, axis=1)
    heldout[np.arange(n_users), first_free] = 1  # every user has >= 1 held-out item, disjoint from fold-in
    scores = rng.standard_normal((n_users, n_items)).astype(np.float32)
    return sp.csr_matrix(fold_in), sp.csr_matrix(heldout), scores


def test_fold_in_items_are_excluded_from_the_ranking():
    # the model scores the fold-in item highest; after exclusion the held-out item is first
    fold_in = sp.csr_matrix(np.array([[1.0, 0, 0, 0]]))
    heldout = sp.csr_matrix(np.array([[0, 0, 1.0, 0]]))
    model = FixedScores([[9.0, 1.0, 5.0, 0.0]])
    res = evaluate(model, fold_in, heldout, ks=(1,), metrics=("recall", "ndcg", "mrr"))
    assert res["recall@1"].mean == 1.0
    assert res["ndcg@1"].mean == 1.0
    assert res["mrr@1"].mean == 1.0


def test_matches_metric_functions_on_masked_scores_and_batches():
    fold_in, heldout, scores = random_split()
    masked = scores.copy()
    masked[fold_in.toarray() > 0] = -np.inf
    for bs in (1, 10, 1000):
        model = FixedScores(scores)
        res = evaluate(model, fold_in, heldout, ks=(5, 10), batch_size=bs, metrics=M.USER_METRICS)
        assert model.batches == [min(bs, 57 - lo) for lo in range(0, 57, bs)]  # never more than one batch
        for name, fn in [("recall", M.recall_at_k), ("ndcg", M.ndcg_at_k), ("mrr", M.mrr_at_k)]:
            v = fn(masked, heldout, 5)
            assert res[f"{name}@5"].mean == pytest.approx(v.mean(), rel=1e-12)
            assert res[f"{name}@5"].stderr == pytest.approx(v.std() / math.sqrt(57), rel=1e-12)
            assert res[f"{name}@5"].n_users == 57
    assert list(res.metrics)[:3] == ["recall@5", "recall@10", "ndcg@5"]  # metric, then K


def test_users_without_heldout_are_skipped_and_logged(caplog):
    fold_in, heldout, scores = random_split()
    h = heldout.tolil()
    h[[3, 10], :] = 0
    h = h.tocsr()
    with caplog.at_level(logging.WARNING, logger="recvae.evaluation"):
        res = evaluate(FixedScores(scores[[u for u in range(57) if u not in (3, 10)]]),
                       fold_in, h, ks=(5,))
    assert "skipping 2 of 57 user(s) with no held-out items" in caplog.text
    assert res.n_users == 55 and res.n_skipped == 2 and res["ndcg@5"].n_users == 55
    keep = np.setdiff1d(np.arange(57), [3, 10])
    masked = scores[keep].copy()
    masked[fold_in[keep].toarray() > 0] = -np.inf
    assert res["ndcg@5"].mean == pytest.approx(M.ndcg_at_k(masked, heldout[keep], 5).mean())


def test_accepts_heldout_users_like_object_and_tuple():
    fold_in, heldout, scores = random_split()
    a = evaluate(FixedScores(scores), fold_in, heldout, ks=(10,))
    b = evaluate(FixedScores(scores), SimpleNamespace(fold_in=fold_in, heldout=heldout), ks=(10,))
    c = evaluate(FixedScores(scores), (fold_in, heldout), ks=(10,))
    assert a["ndcg@10"] == b["ndcg@10"] == c["ndcg@10"]


def test_coverage_in_evaluate_is_catalogue_level():
    fold_in = sp.csr_matrix(np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    heldout = sp.csr_matrix(np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    scores = [[9.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]]
    res = evaluate(FixedScores(scores), fold_in, heldout, ks=(1, 2), metrics=("coverage",), batch_size=1)
    # top 1: user 0 -> item 2 (item 0 excluded), user 1 -> item 3 ; top 2 adds items 1 and 2
    assert res["coverage@1"].mean == pytest.approx(2 / 4)
    assert res["coverage@2"].mean == pytest.approx(3 / 4)
    assert math.isnan(res["coverage@1"].stderr)
    assert res.to_dict()["metrics"]["coverage@1"]["stderr"] is None


def test_result_formatting():
    res = EvaluationResult(
        metrics={"ndcg@100": MetricSummary(0.42587, 0.00212, 10), "coverage@20": MetricSummary(0.5, math.nan, 10)},
        seconds=1.5, n_users=10,
    )
    assert str(res) == "ndcg@100=0.42587 (0.00212), coverage@20=0.50000 [10 users, 1.50s]"
    d = res.to_dict()
    json.dumps(d)  # JSON-ready
    assert d["metrics"]["ndcg@100"] == {"mean": 0.42587, "stderr": 0.00212, "n_users": 10}
    assert EvaluationResult.markdown_header(["ndcg@100"]) == "| model | ndcg@100 |\n|---|---:|"
    assert res.markdown_row("EASE", ["ndcg@100", "coverage@20"]) == "| EASE | 0.4259 ± 0.0021 | 0.5000 |"
    with pytest.raises(KeyError, match="'recall@20': not evaluated; available"):
        res["recall@20"]


def test_timings_split_model_time():
    fold_in, heldout, scores = random_split()
    res = evaluate(FixedScores(scores), fold_in, heldout, ks=(5,))
    assert 0 < res.score_seconds <= res.seconds


# ----------------------------------------------------------------- errors


def test_errors():
    fold_in, heldout, scores = random_split()
    model = FixedScores(scores)
    with pytest.raises(ValueError, match=r"heldout: expected shape \(57, 40\) \(same as fold_in\)"):
        evaluate(model, fold_in, heldout[:, :30])
    with pytest.raises(ValueError, match=r"ks: expected 1 <= ks <= number of items \(40\), got 50"):
        evaluate(model, fold_in, heldout)  # default ks include 50 and 100 > 40 items
    with pytest.raises(ValueError, match="metrics: unknown metric"):
        evaluate(model, fold_in, heldout, ks=(5,), metrics=("auc",))
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        evaluate(model, fold_in, heldout, ks=(5,), batch_size=0)
    with pytest.raises(TypeError, match="heldout: missing"):
        evaluate(model, fold_in)
    with pytest.raises(TypeError, match="fold_in: expected a scipy.sparse matrix"):
        evaluate(model, [[0, 1]], heldout)
    overlapping = (heldout + fold_in[:, :]).tocsr()
    with pytest.raises(ValueError, match=r"heldout: \d+ \(user, item\) pair\(s\) also appear in fold_in"):
        evaluate(model, fold_in, overlapping, ks=(5,))
    with pytest.raises(ValueError, match="heldout: none of the 57 user"):
        evaluate(model, fold_in, sp.csr_matrix(heldout.shape), ks=(5,))


def test_error_model_returns_wrong_shape():
    fold_in, heldout, _ = random_split()
    bad = SimpleNamespace(score=lambda x: np.zeros((x.shape[0], 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"^model: score\(\) returned shape \(57, 3\) for a batch of shape \(57, 40\)"):
        evaluate(bad, fold_in, heldout, ks=(5,))


def test_read_only_scores_are_copied_not_written():
    fold_in, heldout, scores = random_split()
    ro = scores.copy()
    ro.flags.writeable = False
    res = evaluate(SimpleNamespace(score=lambda x: ro[: x.shape[0]]), fold_in, heldout, ks=(5,), batch_size=100)
    assert np.isfinite(ro).all() and res.n_users == 57
