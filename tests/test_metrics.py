"""Ranking metrics: hand-computed cases, a per-user loop reference, properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recvae import metrics as M

PER_USER = {
    "recall": M.recall_at_k,
    "ndcg": M.ndcg_at_k,
    "precision": M.precision_at_k,
    "hit_rate": M.hit_rate_at_k,
    "mrr": M.mrr_at_k,
}


def L(r):  # discount of rank r (1-based)
    return 1.0 / math.log2(r + 1)


def one_user(ranking, relevant, n_items):
    """Scores whose ranking is ``ranking`` (best first) and a 1-row held-out matrix."""
    scores = np.full((1, n_items), -1.0)
    scores[0, list(ranking)] = np.arange(len(ranking), 0, -1, dtype=float)
    h = np.zeros((1, n_items))
    h[0, list(relevant)] = 1
    return scores, sp.csr_matrix(h)


# ----------------------------------------------------------------- hand-computed cases

N_ITEMS = 10
RANK = list(range(N_ITEMS))  # item i at rank i + 1
CASES = [
    # (name, relevant items, k, recall, ndcg, precision, hit_rate, mrr)
    ("perfect, n < K", [0, 1], 5, 1.0, 1.0, 2 / 5, 1.0, 1.0),
    ("perfect, n = K", [0, 1, 2], 3, 1.0, 1.0, 1.0, 1.0, 1.0),
    ("perfect, n > K", [0, 1, 2, 3, 4], 3, 1.0, 1.0, 1.0, 1.0, 1.0),
    ("no hit", [7, 8], 5, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("one hit at rank 3, n=1", [2], 5, 1.0, L(3), 1 / 5, 1.0, 1 / 3),
    ("one hit at rank 4, n=2", [3, 9], 5, 1 / 2, L(4) / (L(1) + L(2)), 1 / 5, 1.0, 1 / 4),
    ("hit just past K", [5], 5, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("hits at 2 and 5, n=6 > K=5", [1, 4, 6, 7, 8, 9], 5, 2 / 5,
     (L(2) + L(5)) / sum(L(r) for r in range(1, 6)), 2 / 5, 1.0, 1 / 2),
    ("K = n_items", [9], 10, 1.0, L(10), 1 / 10, 1.0, 1 / 10),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hand_computed(case):
    _, relevant, k, *expected = case
    scores, h = one_user(RANK, relevant, N_ITEMS)
    for (name, fn), want in zip(PER_USER.items(), expected):
        got = fn(scores, h, k)
        assert got.shape == (1,)
        assert got[0] == pytest.approx(want, abs=1e-12), name


def test_recall_denominator_is_min_k_n_not_n():
    # 4 held-out items, all in the top 2 slots available: the paper's recall is 1, RecBole/Cornac's 0.5
    scores, h = one_user(RANK, [0, 1, 2, 3], N_ITEMS)
    assert M.recall_at_k(scores, h, 2)[0] == 1.0


def test_several_users_at_once_and_heldout_values_ignored():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    h = sp.csr_matrix(np.array([[0, 0, 7.0, 1.0], [3.0, 0, 0, 0]]))  # values other than 1: binary relevance
    # user 0 ranking 0,2,3,1 -> hits at ranks 2,3 ; user 1 ranking 1,3,2,0 -> hit at rank 4
    np.testing.assert_allclose(M.recall_at_k(scores, h, 2), [1 / 2, 0.0])
    np.testing.assert_allclose(M.ndcg_at_k(scores, h, 3), [(L(2) + L(3)) / (L(1) + L(2)), 0.0])
    np.testing.assert_allclose(M.ndcg_at_k(scores, h, 4), [(L(2) + L(3)) / (L(1) + L(2)), L(4)])
    np.testing.assert_allclose(M.mrr_at_k(scores, h, 4), [1 / 2, 1 / 4])


def test_explicit_zeros_in_heldout_are_not_relevant():
    h = sp.csr_matrix((np.array([1.0, 0.0]), np.array([1, 0]), np.array([0, 2])), shape=(1, 3))
    scores = np.array([[3.0, 2.0, 1.0]])
    assert M.recall_at_k(scores, h, 1)[0] == 0.0  # item 0 is stored but 0: not relevant; n_u = 1
    assert M.recall_at_k(scores, h, 2)[0] == 1.0


def test_coverage_is_catalogue_level():
    scores = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0.0]])
    assert M.coverage_at_k(scores, 2) == pytest.approx(4 / 6)  # items {0,1} and {5,4}
    assert M.coverage_at_k(scores, 6) == 1.0
    assert M.coverage_at_k(scores, 1) == pytest.approx(2 / 6)  # items {0} and {5}


def test_coverage_ignores_minus_inf_fillers():
    scores = np.array([[1.0, -np.inf, -np.inf, 2.0]])
    assert M.coverage_at_k(scores, 3) == pytest.approx(2 / 4)


# ----------------------------------------------------------------- ties and -inf


def test_ties_broken_by_lower_item_index():
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    np.testing.assert_array_equal(M.top_k(scores, 2), [[1, 2]])
    np.testing.assert_array_equal(M.top_k(scores, 5), [[1, 2, 3, 5, 0]])
    # the same rule in every row, whatever the row's position in the batch
    batch = np.vstack([np.zeros((1, 6)), scores, np.ones((1, 6))])
    np.testing.assert_array_equal(M.top_k(batch, 3), [[0, 1, 2], [1, 2, 3], [0, 1, 2]])


def test_ties_many_rows_match_lexsort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # heavy ties everywhere
    for k in (1, 7, 40):
        want = np.array([np.lexsort((np.arange(40), -row))[:k] for row in scores])
        np.testing.assert_array_equal(M.top_k(scores, k), want)


def lexsort_top_k(scores, k):
    return np.array([np.lexsort((np.arange(scores.shape[1]), -row))[:k] for row in scores])


@pytest.mark.parametrize("kind", ["continuous", "ties", "sorted", "reversed", "some_minus_inf", "few_finite"])
@pytest.mark.parametrize("k", [1, 7, 25, 60])
def test_top_k_bounded_path_matches_lexsort(kind, k):
    # 500 items >= 8k: top_k first bounds the K-th score, then ranks only the candidates
    rng = np.random.default_rng(k)
    n_users, n_items = 30, 500
    if kind == "ties":
        scores = rng.integers(0, 8, (n_users, n_items)).astype(np.float32)
    elif kind in ("sorted", "reversed"):
        scores = np.tile(np.arange(n_items, dtype=np.float32), (n_users, 1))
        scores = scores[:, ::-1].copy() if kind == "reversed" else scores
    else:
        scores = rng.standard_normal((n_users, n_items)).astype(np.float32)
        if kind == "some_minus_inf":
            scores[rng.random(scores.shape) < 0.3] = -np.inf
        if kind == "few_finite":  # a row with fewer than k finite scores forces the fallback
            scores[3, : n_items - max(k - 1, 0)] = -np.inf
    np.testing.assert_array_equal(M.top_k(scores, k), lexsort_top_k(scores, k))


def test_top_k_ranks_only_packed_candidates_even_for_loose_rows(monkeypatch):
    calls = []
    from recvae import ranking

    exact = ranking._top_k_exact
    monkeypatch.setattr(ranking, "_top_k_exact", lambda s, k: calls.append(s.shape) or exact(s, k))
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 400))
    M.top_k(scores, 10)
    assert len(calls) == 1 and calls[0][0] == 4 and 10 <= calls[0][1] < 100  # only packed candidates
    calls.clear()
    scores[2, :] = -np.inf  # bound is -inf: every item reaches it; only the first 10 can be needed
    scores[3, 50:] = 0.5  # one value shared by most items, above the rest
    np.testing.assert_array_equal(M.top_k(scores, 10), lexsort_top_k(scores, 10))
    assert len(calls) == 1 and calls[0][0] == 4 and 10 <= calls[0][1] < 100  # no full argpartition


@st.composite
def score_matrices(draw):
    """Small float32 score matrices with ties and -inf (often most of a row), and a cut-off."""
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 90))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    levels = draw(st.integers(1, 8))
    scores = rng.integers(0, levels, (n_users, n_items)).astype(np.float32)
    if draw(st.booleans()):
        scores += rng.standard_normal((n_users, n_items)).astype(np.float32) * (rng.random((n_users, n_items)) < 0.5)
    scores[rng.random((n_users, n_items)) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))] = -np.inf
    k = draw(st.integers(1, max(1, min(n_items, draw(st.sampled_from([3, 11, n_items]))))))
    return scores, k


@settings(max_examples=300, deadline=None)
@given(score_matrices())
def test_top_k_equals_stable_argsort_reference(problem):
    scores, k = problem
    want = lexsort_top_k(scores, k)  # by (-score, index)
    np.testing.assert_array_equal(M.top_k(scores, k), want)
    ids, values = M.top_k_with_scores(scores, k)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, want, axis=1))
    np.testing.assert_array_equal(ids, np.where(np.isneginf(values), -1, want))


def test_mask_rows_sets_the_stored_entries_to_minus_inf():
    scores = np.arange(12, dtype=np.float32).reshape(3, 4)
    M.mask_rows(scores, sp.csr_matrix(np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)))
    assert np.isneginf(scores).tolist() == [[False, True, False, True], [False] * 4, [True, False, False, False]]
    assert scores[1].tolist() == [4, 5, 6, 7]


def test_minus_inf_rows_still_work():
    scores = np.array([[-np.inf, 0.5, -np.inf, 0.2], [-np.inf, -np.inf, -np.inf, -np.inf]])
    h = sp.csr_matrix(np.array([[0, 0, 0, 1.0], [0, 1.0, 0, 0]]))
    np.testing.assert_array_equal(M.top_k(scores, 3), [[1, 3, 0], [0, 1, 2]])
    # an all -inf row ranks by index; metrics do not special-case -inf (evaluate keeps
    # held-out items disjoint from the excluded fold-in items)
    np.testing.assert_allclose(M.recall_at_k(scores, h, 2), [1.0, 1.0])
    np.testing.assert_allclose(M.recall_at_k(scores, h, 1), [0.0, 0.0])
    np.testing.assert_allclose(M.ndcg_at_k(scores, h, 2), [L(2), L(2)])


def test_top_k_prefix_property():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(20, 30)).astype(float)
    big = M.top_k(scores, 25)
    for k in (1, 3, 10):
        np.testing.assert_array_equal(M.top_k(scores, k), big[:, :k])


# ----------------------------------------------------------------- reference loop on random data


def loop_reference(scores, heldout, k):
    """Plain per-user implementation written independently from the library."""
    heldout = sp.csr_matrix(heldout)
    out = {name: [] for name in PER_USER}
    for u in range(scores.shape[0]):
        relevant = set(heldout[u].indices[heldout[u].data > 0].tolist())
        ranking = sorted(range(scores.shape[1]), key=lambda i: (-scores[u, i], i))[:k]
        rel = [1 if i in relevant else 0 for i in ranking]
        n = len(relevant)
        hits = sum(rel)
        dcg = sum(r / math.log2(pos + 2) for pos, r in enumerate(rel))
        idcg = sum(1 / math.log2(pos + 2) for pos in range(min(k, n)))
        out["recall"].append(hits / min(k, n))
        out["ndcg"].append(dcg / idcg)
        out["precision"].append(hits / k)
        out["hit_rate"].append(1.0 if hits else 0.0)
        out["mrr"].append(1.0 / (rel.index(1) + 1) if hits else 0.0)
    return {name: np.array(v) for name, v in out.items()}


def random_case(seed, n_users=40, n_items=60, density=0.15):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n_users, n_items))  # continuous: no ties
    h = (rng.random((n_users, n_items)) < density).astype(float)
    h[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1  # everyone has >= 1 item
    return scores, sp.csr_matrix(h)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 20, 60])
def test_matches_loop_reference(seed, k):
    scores, h = random_case(seed)
    ref = loop_reference(scores, h, k)
    for name, fn in PER_USER.items():
        np.testing.assert_allclose(fn(scores, h, k), ref[name], rtol=1e-12, err_msg=name)


def test_per_user_metrics_equals_individual_functions():
    scores, h = random_case(5)
    scores = scores.astype(np.float32)
    out = M.per_user_metrics(scores, h, ks=(3, 10, 50), metrics=M.USER_METRICS)
    assert len(out) == 15
    for name, fn in PER_USER.items():
        for k in (3, 10, 50):
            np.testing.assert_array_equal(out[f"{name}@{k}"], fn(scores, h, k))


# ----------------------------------------------------------------- properties


@st.composite
def ranking_problems(draw):
    n_users = draw(st.integers(1, 5))
    n_items = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, draw(st.integers(1, 6)), size=(n_users, n_items)).astype(float)  # ties allowed
    h = rng.random((n_users, n_items)) < draw(st.floats(0.05, 0.9))
    h[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    k = draw(st.integers(1, n_items))
    return scores, h, k, rng


@settings(max_examples=60, deadline=None)
@given(ranking_problems())
def test_values_in_unit_interval(problem):
    scores, h, k, _ = problem
    for name, fn in PER_USER.items():
        v = fn(scores, sp.csr_matrix(h), k)
        assert ((v >= 0) & (v <= 1 + 1e-12)).all(), name
    assert 0 < M.coverage_at_k(scores, k) <= 1


@settings(max_examples=60, deadline=None)
@given(ranking_problems())
def test_permuting_items_consistently_leaves_values_unchanged(problem):
    scores, h, k, rng = problem
    scores = scores + rng.random(scores.shape) * 0.5  # permutation changes tie order: avoid ties
    perm = rng.permutation(scores.shape[1])
    for name, fn in PER_USER.items():
        a = fn(scores, sp.csr_matrix(h), k)
        b = fn(scores[:, perm], sp.csr_matrix(h[:, perm]), k)
        np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name)
    assert M.coverage_at_k(scores, k) == M.coverage_at_k(scores[:, perm], k)


@settings(max_examples=60, deadline=None)
@given(ranking_problems())
def test_adding_a_hit_never_lowers_recall_or_ndcg(problem):
    scores, h, k, rng = problem
    top = M.top_k(scores, k)
    before_r = M.recall_at_k(scores, sp.csr_matrix(h), k)
    before_n = M.ndcg_at_k(scores, sp.csr_matrix(h), k)
    # turn a non-relevant item of some user's top K into a held-out item
    u = rng.integers(0, scores.shape[0])
    misses = [i for i in top[u] if not h[u, i]]
    if not misses:
        return
    h2 = h.copy()
    h2[u, misses[0]] = True
    after_r = M.recall_at_k(scores, sp.csr_matrix(h2), k)
    after_n = M.ndcg_at_k(scores, sp.csr_matrix(h2), k)
    assert after_r[u] >= before_r[u] - 1e-12
    assert after_n[u] >= before_n[u] - 1e-12
    others = np.arange(scores.shape[0]) != u
    np.testing.assert_array_equal(after_r[others], before_r[others])


# ----------------------------------------------------------------- summaries


def test_mean_stderr_uses_ddof_0_like_the_paper():
    v = np.array([0.0, 1.0, 1.0, 0.0])
    mean, se = M.mean_stderr(v)
    assert mean == 0.5
    assert se == pytest.approx(0.5 / 2.0)  # std(ddof=0) = 0.5, sqrt(4) = 2
    s = M.summarize({"recall@20": v})["recall@20"]
    assert (s.mean, s.n_users) == (0.5, 4) and s.stderr == pytest.approx(0.25)


def test_mean_stderr_rejects_empty():
    with pytest.raises(ValueError, match="values: expected at least one"):
        M.mean_stderr([])


# ----------------------------------------------------------------- errors


def test_error_user_without_heldout_items():
    scores = np.zeros((3, 4))
    h = sp.csr_matrix(np.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0, 0]]))
    for fn in PER_USER.values():
        with pytest.raises(ValueError, match=r"heldout: 1 user\(s\) have no held-out items \(rows \[1\]"):
            fn(scores, h, 2)


@pytest.mark.parametrize("k", [0, -1, 5])
def test_error_k_out_of_range(k):
    scores, h = one_user(RANK[:4], [0], 4)
    for fn in PER_USER.values():
        with pytest.raises(ValueError, match=r"k: expected 1 <= k <= number of items \(4\), got"):
            fn(scores, h, k)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        M.coverage_at_k(scores, k)


@pytest.mark.parametrize("k", [2.0, "3", True, None])
def test_error_k_not_integer(k):
    scores, h = one_user(RANK[:4], [0], 4)
    with pytest.raises(TypeError, match="k: expected an integer cut-off"):
        M.recall_at_k(scores, h, k)


def test_error_nan_scores():
    scores, h = one_user(RANK[:4], [0], 4)
    scores[0, 2] = np.nan
    for fn in PER_USER.values():
        with pytest.raises(ValueError, match=r"scores: contains NaN in 1 row\(s\)"):
            fn(scores, h, 2)
    with pytest.raises(ValueError, match="scores: contains NaN"):
        M.top_k(scores, 2)


def test_error_shapes():
    with pytest.raises(ValueError, match=r"scores: expected a 2-d \(users x items\) array, got shape \(4,\)"):
        M.ndcg_at_k(np.zeros(4), sp.csr_matrix(np.ones((1, 4))), 2)
    with pytest.raises(ValueError, match=r"heldout: expected shape \(1, 4\) \(same as scores\), got \(1, 5\)"):
        M.ndcg_at_k(np.zeros((1, 4)), sp.csr_matrix(np.ones((1, 5))), 2)
    with pytest.raises(ValueError, match="metrics: unknown metric"):
        M.per_user_metrics(np.zeros((1, 4)), sp.csr_matrix(np.ones((1, 4))), ks=(2,), metrics=("auc",))


@pytest.mark.parametrize("name", M.USER_METRICS)
def test_each_metric_documents_its_own_example(name):
    """Each per-user metric's docstring shows a >>> call of that function and of no other (the API
    reference renders one function's examples under it)."""
    doc = getattr(M, f"{name}_at_k").__doc__
    calls = {other for other in M.USER_METRICS if f">>> {other}_at_k(" in doc}
    assert calls == {name}
