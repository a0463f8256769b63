"""Recommendations: the batch API of every model and the original-id convenience."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recvae.data import Interactions
from recvae.metrics import top_k_with_scores as top_k
from recvae.models import EASE, MultDAE, Popularity
from recvae.recommend import IdError, convert_ids, recommend_ids


def interactions(rows) -> Interactions:
    df = pd.DataFrame(rows, columns=["user", "item"])
    return Interactions.from_dataframe(df, "user", "item", min_user_interactions=0)


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
    # arrays are sized by the catalogue (4), not N; only item 1 (b) is left, the rest is padding
    assert ids.tolist() == [[1, -1, -1, -1]]
    assert scores[0, 0] == 1.0 and np.isneginf(scores[0, 1:]).all()
    ids, scores = model.recommend(x, N=10**12)  # would need terabytes if sized by N
    assert ids.shape == (1, 4) and ids[0, :2].tolist() == [1, 3]


def test_recommend_exclude_per_user(popular):
    model, _ = popular
    x = sp.csr_matrix(np.array([[0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32))
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    ids, _ = model.recommend(x, N=4, exclude=exclude)
    # user 0: c liked, a excluded -> b, d; user 1: d liked, c excluded -> a, b
    assert ids.tolist() == [[1, 3, -1, -1], [0, 1, -1, -1]]
    with pytest.raises(ValueError, match="exclude: expected 2 rows"):
        model.recommend(x, exclude=exclude[:1])


def test_top_k_orders_ties_by_index_across_the_cut():
    scores = np.array([[1, 3, 3, -np.inf, 2], [5, 5, 5, 5, 5], [0, 1, 1, 1, 2]], dtype=np.float32)
    ids, values = top_k(scores, 2)
    assert ids.tolist() == [[1, 2], [0, 1], [4, 1]]
    assert values.tolist() == [[3, 3], [5, 5], [2, 1]]
    ids, values = top_k(scores, 5)
    assert ids[0].tolist() == [1, 2, 4, 0, -1] and np.isneginf(values[0, 4])


@pytest.mark.parametrize("container", [pd.Series, list], ids=["column", "request"])
def test_convert_ids_to_the_vocabulary_type(container):
    # a file's column (vectorised) and a request's few ids (value by value) follow the same rules
    ints = np.array([1, 2])
    got, bad = convert_ids(container(["1", " 2", "3.0", "1.5", "abc", None, "99999999999999999999", "-4"]), ints)
    assert got[:3].tolist() == [1, 2, 3] and got[7] == -4
    assert bad.tolist() == [False, False, False, True, True, True, True, False]
    got, bad = convert_ids(container([7, 8]), np.array(["a"]))
    assert got.tolist() == ["7", "8"] and not bad.any()
    got, _ = convert_ids(container([7.0]), np.array(["a"]))  # a float column of a Parquet file
    assert got.tolist() == ["7"]


@pytest.mark.parametrize("container", [pd.Series, list, tuple], ids=["column", "request", "tuple"])
def test_convert_ids_already_of_the_vocabulary_type(container):
    # ids of the vocabulary's own type (a request's usual ids) convert as any other, many or few
    ints = np.array([1, 2])
    for values in ([5, -3, 2**63 - 1], list(range(300)), []):
        got, bad = convert_ids(container(values), ints)
        assert got.dtype == np.int64 and got.tolist() == values and not bad.any()
    got, bad = convert_ids(container([1, 2**63, True]), ints)  # beyond int64; a bool is not an id
    assert bad.tolist() == [False, True, True] and got[0] == 1
    got, bad = convert_ids(container(["a", "é", " b "]), np.array(["x"], dtype=object))
    assert got.tolist() == ["a", "é", "b"] and not bad.any()  # text ids without the spaces around them


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
    assert list(out.columns) == ["user", "rank", "item", "score", "source"]
    assert out[out.user == "new"].item.tolist() == ["b", "d"]  # only two unseen items exist
    assert out[out.user == "other"].item.tolist() == ["c", "a", "b"]
    assert set(out.source) == {"model"}
    single = recommend_ids(model, ["c"], N=1)
    assert single.item.tolist() == ["a"] and single.user.tolist() == [0]


def test_recommend_ids_unknown_items(popular, caplog):
    model, _ = popular
    hist = pd.DataFrame({"user": [1, 1, 2], "item": ["a", "zzz", "yyy"]})
    with caplog.at_level(logging.WARNING, logger="recvae.recommend"):
        with pytest.raises(ValueError, match=r"1 user\(s\) have no known item"):
            recommend_ids(model, hist, N=2)
    assert [r.getMessage() for r in caplog.records] == ["2 of 3 item ids unknown to the run (e.g. 'zzz', 'yyy')"]
    out = recommend_ids(model, hist, N=2, popularity=np.array([0, 0, 0, 0.5]))
    fallback = out[out.user == 2]
    assert fallback.item.tolist()[0] == "d" and fallback.score.tolist()[0] == 0.5
    assert set(fallback.source) == {"popularity"} and set(out[out.user == 1].source) == {"model"}
    with pytest.raises(ValueError, match="unknown to the model"):
        recommend_ids(model, hist, N=2, strict=True)


def test_recommend_ids_matches_int_ids_given_as_text():
    data = interactions([(1, 10), (1, 30), (2, 10), (2, 30), (3, 30), (3, 20), (4, 40)])
    model = Popularity().fit(data)
    out = recommend_ids(model, pd.DataFrame({"user": ["a"], "item": ["30"]}), N=2)
    assert out.item.tolist() == [10, 20]  # "30" is item 30: filtered as seen
    with pytest.raises(IdError, match="row 1 of column 'item' holds '1.5', which cannot be an item id"):
        recommend_ids(model, pd.DataFrame({"user": ["a", "a"], "item": ["30", "1.5"]}), N=2)


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
