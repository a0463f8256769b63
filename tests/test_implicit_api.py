"""The habits of the field: implicit's documented call forms (``recommend(userid,
user_items[userid], N=10)`` for one user and for a batch; ``similar_items(itemid, N)``) on
fitted models, as implicit's documentation shows them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recvae.errors import ParameterError
from recvae.models import EASE, EDLAE, MultDAE, MultVAE, Popularity, RecVAE


def clusters(n_users=120, n_items=40, seed=0):
    """Users of 4 clusters, each liking 8 of its cluster's 10 items."""
    rng = np.random.default_rng(seed)
    rows = [(u, i) for u in range(n_users) for i in rng.choice(np.arange(u % 4 * 10, u % 4 * 10 + 10), 8, replace=False)]
    r, c = np.array(rows).T
    return sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n_users, n_items))


pytestmark = pytest.mark.slow  # trains four models (about 10 s)
SMALL = dict(latent_dim=4, epochs=30, batch_size=20, random_state=0, device="cpu", precision="fp32", lr=1e-2)


@pytest.fixture(scope="module")
def models():
    X = clusters()
    return X, {
        "multvae": MultVAE(hidden_dims=(16,), **SMALL).fit(X),
        "multdae": MultDAE(**SMALL).fit(X),
        "recvae": RecVAE(hidden_dims=(16, 16), **{**SMALL, "epochs": 10}).fit(X),
        "ease": EASE(l2=10.0).fit(X),
        "edlae": EDLAE(l2=10.0).fit(X),
        "popularity": Popularity().fit(X),
    }


@pytest.mark.parametrize("name", ["multvae", "multdae", "recvae", "ease", "edlae", "popularity"])
def test_implicit_recommend_one_user_and_a_batch(models, name):
    X, fitted = models
    model = fitted[name]
    # implicit: ids, scores = model.recommend(userid, user_items[userid], N=10)
    ids, scores = model.recommend(0, X[0], N=10)
    assert ids.shape == scores.shape == (10,) and np.all(np.diff(scores) <= 0)
    assert not set(ids) & set(X[0].indices), "already liked items are filtered"
    # implicit: userids = np.arange(10); ids, scores = model.recommend(userids, user_items[userids])
    userids = np.arange(10)
    batch_ids, batch_scores = model.recommend(userids, X[userids], N=10)
    assert batch_ids.shape == (10, 10)
    np.testing.assert_array_equal(batch_ids[0], ids)
    # the library's own form gives the same lists
    np.testing.assert_array_equal(model.recommend(X[userids], N=10)[0], batch_ids)
    with pytest.raises(ParameterError, match=r"user_items: expected the 10 row\(s\) of userid"):
        model.recommend(userids, X, N=10)


@pytest.mark.parametrize("name", ["multvae", "multdae", "recvae", "ease", "edlae"])
def test_similar_items_stay_in_the_items_cluster(models, name):
    _, fitted = models
    model = fitted[name]
    ids, scores = model.similar_items(3, N=5)
    assert ids.shape == (5,) and 3 not in ids and np.all(np.diff(scores) <= 0)
    if name != "recvae":  # ten epochs of RecVAE on 120 users: its vectors are not yet clustered
        assert set(ids) <= set(range(10)), ids  # item 3's cluster is items 0-9
    batch, _ = model.similar_items(np.array([3, 25]), N=5)
    assert batch.shape == (2, 5)
    np.testing.assert_array_equal(batch[0], ids)


def test_similar_items_refuses_what_it_cannot_answer(models):
    _, fitted = models
    with pytest.raises(ParameterError, match="Popularity has no item vectors"):
        fitted["popularity"].similar_items(3)
    with pytest.raises(ParameterError, match=r"itemid: expected item indices in \[0, 40\)"):
        fitted["ease"].similar_items(40)


def test_the_librarys_own_keyword_form_still_works(models):
    X, fitted = models
    model = fitted["ease"]
    np.testing.assert_array_equal(model.recommend(user_items=X[:3], N=4)[0], model.recommend(X[:3], N=4)[0])
