"""Recommendations: the batch API of every model and the original-id convenience."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recvae.data import Interactions
from recvae.models import EASE, MultDAE, Popularity
from recvae.recommend import UnknownItemsWarning, recommend_ids


def interactions(rows) -> Interactions:
    df = pd.DataFrame(rows, columns=["user", "item"])
    return Interactions.from_dataframe(df, "user", "item")


@pytest.fixture(scope="module")
def popular():
    # item "c" liked by 3 users, "a" by 2, "b" and "d" by 1
    data = interactions([(1, "a"), (1, "c"), (2, "a"), (2, "c"), (3, "c"), (3, "b"), (4, "d")])
    return Popularity().fit(data), data


def test_recommend_filters_history_and_orders_scores(popular):
    model, data = popular
    x = sp.csr_matrix(np.array([[0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32))  # item order a,b,c,d
    ids, scores = model.recommend(x, N=2)
    assert data.item_ids[ids[0]].tolist() == ["a", "b"]  # c already liked; b before d on the tie
    assert data.item_ids[ids[1]].tolist() == ["c", "a"]
    assert scores.tolist() == [[2.0, 1.0], [3.0, 2.0]]
    ids, _ = model.recommend(x, N=2, filter_already_liked_items=False)
    assert data.item_ids[ids[0]].tolist() == ["c", "a"]


def test_recommend_filter_items_and_n_beyond_catalogue(popular):
    model, _ = popular
    x = sp.csr_matrix(np.array([[1, 0, 1, 0]], dtype=np.float32))
    ids, scores = model.recommend(x, N=6, filter_items=[3])
    # only item 1 (b) is left: the rest is padding, never a real id
    assert ids.tolist() == [[1, -1, -1, -1, -1, -1]]
    assert scores[0, 0] == 1.0 and np.isneginf(scores[0, 1:]).all()


@pytest.mark.parametrize("bad, message", [(0, "N: expected a positive integer"), (2.5, "N: expected")])
def test_recommend_bad_n(popular, bad, message):
    model, _ = popular
    with pytest.raises(ValueError, match=message):
        model.recommend(sp.csr_matrix((1, 4), dtype=np.float32), N=bad)


def test_recommend_wrong_width(popular):
    model, _ = popular
    with pytest.raises(ValueError, match="user_items: expected 4 item columns"):
        model.recommend(sp.csr_matrix((1, 5), dtype=np.float32))


def test_recommend_ids_from_dataframe_and_list(popular):
    model, _ = popular
    hist = pd.DataFrame({"user": ["new", "new", "other"], "item": ["c", "a", "d"]})
    out = recommend_ids(model, hist, N=3)
    assert list(out.columns) == ["user", "rank", "item", "score"]
    assert out[out.user == "new"].item.tolist() == ["b", "d"]  # only two unseen items exist
    assert out[out.user == "other"].item.tolist() == ["c", "a", "b"]
    single = recommend_ids(model, ["c"], N=1)
    assert single.item.tolist() == ["a"] and single.user.tolist() == [0]


def test_recommend_ids_unknown_items(popular):
    model, _ = popular
    hist = pd.DataFrame({"user": [1, 1, 2], "item": ["a", "zzz", "yyy"]})
    with pytest.warns(UnknownItemsWarning, match="2 history row"):
        with pytest.raises(ValueError, match=r"1 user\(s\) have no known item"):
            recommend_ids(model, hist, N=2)
    with pytest.warns(UnknownItemsWarning):
        out = recommend_ids(model, hist, N=2, fallback_scores=np.array([0, 0, 0, 5.0]))
    assert out[out.user == 2].item.tolist()[0] == "d"  # the fallback ranking
    with pytest.raises(ValueError, match="unknown to the model"):
        recommend_ids(model, hist, N=2, strict=True)


def test_recommend_ids_needs_item_vocabulary():
    model = Popularity().fit(sp.csr_matrix(np.eye(3, dtype=np.float32)))
    with pytest.raises(ValueError, match="item_ids_"):
        recommend_ids(model, [0], N=1)


def test_amortised_fold_in_for_new_users():
    """A user absent from training is scored from the history row alone, like a training user
    with the same history (Mult-DAE is deterministic at inference)."""
    rng = np.random.default_rng(0)
    x = sp.random(60, 30, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x.data[:] = 1
    model = MultDAE(epochs=2, batch_size=20, random_state=0).fit(x)
    row = x[5]
    np.testing.assert_allclose(model.score(row), model.score(x)[5:6], rtol=1e-5, atol=1e-6)
    new = sp.csr_matrix(rng.integers(0, 2, size=(1, 30)).astype(np.float32))
    ids, _ = model.recommend(new, N=5)
    assert not set(ids[0]) & set(new.indices)


def test_ease_and_popularity_agree_on_ids_interface():
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=np.float32))
    for model in (EASE(l2=1.0).fit(x), Popularity().fit(x)):
        ids, scores = model.recommend(x, N=4)
        assert ids.shape == scores.shape == (3, 4)
        for r in range(3):
            got = ids[r][ids[r] >= 0]
            assert not set(got) & set(x[r].indices)
            assert len(got) == 4 - x[r].nnz
