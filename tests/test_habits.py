"""The habits users bring: scikit-learn's model selection (tags, clone, GridSearchCV with the
library's ranking scorer) and implicit's factors, similar items and similar users, on small
cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.errors import ParameterError
from recvae.evaluation import ranking_scorer
from recvae.models import EASE, BinaryMultVAE, MultDAE, MultVAE, Popularity, RecVAE, Recommender, model_class, model_names
from synthetic import planted

TINY = dict(latent_dim=3, epochs=1, batch_size=20, random_state=0, device="cpu", precision="fp32")


def csr(rows, n_items):
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items))


class ByIndex:
    """Scores item i as ``sign * i``: the ranking is known whatever item is held out."""

    def __init__(self, sign):
        self.sign = sign

    def score(self, user_items):
        return np.tile(self.sign * np.arange(user_items.shape[1], dtype=np.float32), (user_items.shape[0], 1))


# -- scikit-learn ---------------------------------------------------------------------------------
def test_the_ranking_scorer_is_mean_ndcg_over_users_with_a_held_out_item():
    # users 0 and 1 hold items 0-4 (one of them is held out: floor(0.2 * 5) = 1); user 2 has 4
    # items (fewer than 5: nothing held out, left out of the mean)
    X = csr([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [5, 6, 7, 8]], 10)
    # lowest index first: the held-out item (< 5) beats every unseen item (5-9): rank 1
    assert ranking_scorer(k=100)(ByIndex(-1), X) == 1.0
    # highest index first: 9, 8, 7, 6, 5, then the held-out item: rank 6, NDCG 1 / log2(7)
    assert ranking_scorer(k=100)(ByIndex(1), X) == pytest.approx(1 / math.log2(7))  # k beyond 10 items: all
    assert ranking_scorer(k=5)(ByIndex(1), X) == 0.0
    # GridSearchCV passes y=None to a scorer when it has no y
    assert ranking_scorer(k=100)(ByIndex(-1), X, None) == 1.0


def test_the_ranking_scorer_names_a_bad_setting_and_a_matrix_with_nothing_to_hold_out():
    with pytest.raises(ParameterError, match=r"^k: expected a positive integer, got 0$"):
        ranking_scorer(k=0)
    with pytest.raises(ParameterError, match=r"^heldout_fraction: expected a number in \(0, 1\), got 1$"):
        ranking_scorer(heldout_fraction=1)
    with pytest.raises(ParameterError, match=r"^seed: expected an integer, got 'a'$"):
        ranking_scorer(seed="a")
    with pytest.raises(ParameterError, match=r"^X: none of its 1 user\(s\) has an item to hold out"):
        ranking_scorer()(ByIndex(1), csr([[0, 1]], 4))


def test_gridsearchcv_over_eases_l2_picks_the_best_value_and_refits_on_every_row():
    pytest.importorskip("sklearn", reason="scikit-learn is an optional test dependency (the test extra)")
    from sklearn.model_selection import GridSearchCV, KFold

    X = planted(n_users=120, n_items=40, per_user=8, seed=3)
    scorer = ranking_scorer(k=10)
    cv = KFold(2, shuffle=True, random_state=0)
    search = GridSearchCV(EASE(), {"l2": [1.0, 5000.0]}, scoring=scorer, cv=cv).fit(X)
    # each fold's score is the scorer on the held-out rows of an EASE fitted on the others
    for j, l2 in enumerate([1.0, 5000.0]):
        for f, (train, test) in enumerate(cv.split(X)):
            expected = scorer(EASE(l2=l2).fit(X[train]), X[test])
            assert search.cv_results_[f"split{f}_test_score"][j] == pytest.approx(expected)
    means = search.cv_results_["mean_test_score"]
    assert means[0] != means[1]
    best = [1.0, 5000.0][int(np.argmax(means))]
    assert search.best_params_ == {"l2": best}
    np.testing.assert_array_equal(search.best_estimator_.B_, EASE(l2=best).fit(X).B_)


@pytest.mark.parametrize("name", model_names())
def test_every_model_clones_and_tells_scikit_learn_what_it_is(name):
    pytest.importorskip("sklearn", reason="scikit-learn is an optional test dependency (the test extra)")
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    model = model_class(name)()
    copy = clone(model)
    assert type(copy) is type(model) and copy.get_params() == model.get_params()
    try:
        from sklearn.utils import get_tags  # scikit-learn >= 1.6 asks for __sklearn_tags__
    except ImportError:
        pass
    else:
        tags = get_tags(model)
        assert tags.input_tags.sparse and not tags.target_tags.required and tags.requires_fit
    with pytest.raises(NotFittedError):
        check_is_fitted(model)
    model.n_items_ = 3
    check_is_fitted(model)


# -- implicit: recommend's keywords ---------------------------------------------------------------
def brute_force_top(scores, user_items, items, N, blocked=()):
    """Each user's best N of ``items`` by score (lower index first among equals), their history
    and ``blocked`` left out; -1 fills what is left of min(N, len(items)) slots."""
    candidates = sorted(set(items))
    k = min(N, len(candidates))
    out = []
    for u in range(scores.shape[0]):
        left = [i for i in candidates if i not in set(user_items[u].indices) and i not in blocked]
        ranked = sorted(left, key=lambda i: (-scores[u, i], i))[:k]
        out.append(ranked + [-1] * (k - len(ranked)))
    return np.array(out)


@pytest.mark.parametrize("cls", [EASE, MultDAE])
def test_recommend_items_ranks_only_those_items_as_a_brute_force_ranking_does(cls):
    X = planted(n_users=60, n_items=30, n_clusters=3, per_user=4, seed=2)
    model = cls(**({"l2": 5.0} if cls is EASE else TINY)).fit(X)
    histories = X[:12]
    scores = model.score(histories)
    rng = np.random.default_rng(0)
    items = rng.choice(30, size=9, replace=False)
    for N in (3, 9, 20):  # 20: more than the items left after each history
        ids, values = model.recommend(histories, N=N, items=items)
        np.testing.assert_array_equal(ids, brute_force_top(scores, histories, items, N))
        assert ids.shape == (12, min(N, 9))
        np.testing.assert_array_equal(values[ids >= 0], np.take_along_axis(scores, np.maximum(ids, 0), 1)[ids >= 0])
        assert np.isneginf(values[ids < 0]).all()
    # with filter_items too (implicit refuses the pair; here both apply), and implicit's one-user form
    ids, _ = model.recommend(histories, N=5, items=list(items) + [items[0]], filter_items=items[:2])
    np.testing.assert_array_equal(ids, brute_force_top(scores, histories, items, 5, blocked=set(items[:2])))
    one, _ = model.recommend(4, histories[4], N=5, items=items)
    np.testing.assert_array_equal(one, brute_force_top(scores, histories, items, 5)[4])


def test_recommend_accepts_implicits_recalculate_user_and_checks_items():
    X = planted(n_users=40, n_items=12, per_user=3, seed=1)
    model = EASE(l2=5.0).fit(X)
    expected = model.recommend(X[:5], N=4)
    for value in (True, False):  # every user is computed from user_items either way
        for got, want in zip(model.recommend(np.arange(5), X[:5], N=4, recalculate_user=value), expected):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ParameterError, match=r"^recalculate_user: expected True or False, got 'yes'$"):
        model.recommend(X[:5], recalculate_user="yes")
    with pytest.raises(ParameterError, match=r"^items: expected item indices in \[0, 12\), got \[3, 12\]$"):
        model.recommend(X[:5], items=[3, 12])
    with pytest.raises(ParameterError, match=r"^items: expected at least one item index to rank, got none$"):
        model.recommend(X[:5], items=np.array([], dtype=np.int64))


# -- implicit: similar items ----------------------------------------------------------------------
def ease_with(B):
    model = EASE()
    model.B_, model.n_items_ = np.asarray(B, dtype=np.float64), len(B)
    return model


B = [[0.0, 0.5, 0.2], [0.1, 0.0, 0.3], [0.4, 0.4, 0.0]]


def test_similar_items_leaves_the_query_out_unless_include_query_asks_for_implicits_order():
    model = ease_with(B)
    ids, scores = model.similar_items(0, N=2)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(scores, [0.5, 0.2])
    # implicit's order: the item itself first, with its row's highest score (EASE's own is 0)
    ids, scores = model.similar_items(0, N=2, include_query=True)
    np.testing.assert_array_equal(ids, [0, 1])
    np.testing.assert_allclose(scores, [0.5, 0.5])
    ids, _ = model.similar_items(np.array([0, 2]), N=3, include_query=True)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [2, 0, 1]])
    # N beyond the others: the empty slot is id -1, score -inf (as recommend)
    ids, scores = model.similar_items(0, N=3)
    np.testing.assert_array_equal(ids, [1, 2, -1])
    assert np.isneginf(scores[2])


def test_filter_items_leaves_items_out_the_query_too():
    model = ease_with(B)
    np.testing.assert_array_equal(model.similar_items(0, N=2, filter_items=[1])[0], [2, -1])
    np.testing.assert_array_equal(model.similar_items(0, N=2, filter_items=[0], include_query=True)[0], [1, 2])
    ids, scores = model.similar_items(0, N=2, filter_items=[1], include_query=True)
    np.testing.assert_array_equal(ids, [0, 2])
    np.testing.assert_allclose(scores, [0.2, 0.2])
    with pytest.raises(ParameterError, match=r"^filter_items: expected item indices in \[0, 3\), got \[3\]$"):
        model.similar_items(0, filter_items=[3])


def test_an_autoencoders_similar_items_are_the_cosines_of_its_item_factors():
    X = planted(n_users=40, n_items=4, n_clusters=2, per_user=2, seed=0)
    model = MultDAE(**TINY).fit(X)
    with torch.no_grad():  # item vectors set by hand: 0 and 1 point the same way, 2 at 45 degrees, 3 opposite
        model.module_.output_weight.copy_(torch.tensor([[1.0, 0, 0], [2, 0, 0], [1, 1, 0], [-1, 0, 0]]))
    np.testing.assert_array_equal(model.item_factors, [[1, 0, 0], [2, 0, 0], [1, 1, 0], [-1, 0, 0]])
    ids, scores = model.similar_items(0, N=3)
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_allclose(scores, [1.0, 1 / math.sqrt(2), -1.0], rtol=1e-6)
    ids, scores = model.similar_items(0, N=2, include_query=True)
    np.testing.assert_array_equal(ids, [0, 1])  # first even though item 1 ties it (cosine 1)
    np.testing.assert_allclose(scores, [1.0, 1.0], rtol=1e-6)


# -- implicit: factors ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MultVAE, MultDAE, RecVAE])
def test_scores_are_the_user_factors_times_the_item_factors_plus_the_bias(cls):
    # one layer from the code to the items (hidden_dims=() for MultVAE/MultDAE; RecVAE's decoder)
    X = planted(n_users=40, n_items=12, per_user=3, seed=1)
    params = dict(TINY, hidden_dims=(8,) if cls is RecVAE else ())
    model = cls(**params).fit(X)
    users, items = model.user_factors(X[:7]), model.item_factors
    assert users.shape == (7, 3) and items.shape == (12, 3) and users.dtype == items.dtype == np.float32
    bias = next(v for k, v in model.module_.state_dict().items() if k.endswith("output_bias")).numpy()
    np.testing.assert_allclose(users @ items.T + bias, model.score(X[:7]), rtol=1e-5, atol=1e-5)
    assert model.user_factors(X[:0]).shape == (0, 3)


def test_binary_vae_user_factors_are_the_bits_probabilities_or_the_bits():
    X = planted(n_users=40, n_items=12, per_user=3, seed=1)
    model = BinaryMultVAE(**dict(TINY, latent_dim=5)).fit(X)
    probabilities = model.user_factors(X[:6])
    assert ((probabilities > 0) & (probabilities < 1)).all()
    model.set_params(binary_inference="bits")
    bits = model.user_factors(X[:6])
    np.testing.assert_array_equal(bits, np.unpackbits(model.codes(X[:6]), axis=1, count=5))
    np.testing.assert_array_equal(bits, probabilities > 0.5)


def test_models_without_factors_say_so_and_ease_points_to_its_matrix():
    X = csr([[0, 1], [1, 2]], 3)
    ease = EASE(l2=1.0).fit(X)
    hint = r"; its item-item weight matrix B_ \(n_items x n_items: a user's scores are the history times B_\) is the model$"
    with pytest.raises(ParameterError, match=r"^model: EASE has no item factors" + hint):
        ease.item_factors
    with pytest.raises(ParameterError, match=r"^model: EASE has no user factors" + hint):
        ease.user_factors(X)
    with pytest.raises(ParameterError, match=r"^model: EASE has no user factors"):
        ease.similar_users(0, X)
    popularity = Popularity().fit(X)
    with pytest.raises(ParameterError, match=r"^model: Popularity has no item factors$"):
        popularity.item_factors
    with pytest.raises(RuntimeError, match="EASE is not fitted yet"):
        EASE().item_factors


# -- implicit: similar users ----------------------------------------------------------------------
class HistoryFactors(Recommender):
    """A toy model whose user factors are the histories themselves."""

    def fit(self, train, validation=None):
        self.n_items_ = train.shape[1]
        return self

    def _user_factors(self, user_items):
        return user_items.toarray()


def test_similar_users_ranks_the_rows_of_user_items_by_the_cosine_of_their_factors():
    X = csr([[0, 1], [0], [2, 3], [0, 1, 2]], 4)
    model = HistoryFactors().fit(X)
    # cosines to user 0: user 1 1/sqrt(2), user 2 0, user 3 2/sqrt(6)
    ids, scores = model.similar_users(0, X, N=2)
    np.testing.assert_array_equal(ids, [3, 1])
    np.testing.assert_allclose(scores, [2 / math.sqrt(6), 1 / math.sqrt(2)], rtol=1e-6)
    ids, scores = model.similar_users(0, X, N=2, include_query=True)
    np.testing.assert_array_equal(ids, [0, 3])
    np.testing.assert_allclose(scores, [1.0, 2 / math.sqrt(6)], rtol=1e-6)
    np.testing.assert_array_equal(model.similar_users(0, X, N=2, filter_users=[3])[0], [1, 2])
    np.testing.assert_array_equal(model.similar_users(np.array([0, 2]), X, N=1)[0], [[3], [3]])
    with pytest.raises(ParameterError, match=r"^userid: expected user \(row of user_items\) indices in \[0, 4\), got 4$"):
        model.similar_users(4, X)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_the_library_imports_no_scikit_learn():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, recvae.models, recvae.evaluation; print('sklearn' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout
    assert out.strip() == "False"  # scikit-learn is optional: only its own calls import it
