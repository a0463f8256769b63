"""The contract every registered model keeps, as implicit's ``RecommenderBaseTestMixin``: one
mixin of tests (fit, recommend, similar_items, save/load, clone; resume for the models trained by
epochs), one subclass per model with its tiny settings. A new model registers, adds a subclass
here, and is held to the same behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import ckpt, resume
from recvae.errors import ParameterError
from recvae.models import load_model, model_names
from recvae.models.registry import is_neural, make_model
from synthetic import fold_in_split, planted

N_ITEMS = 40


@pytest.fixture(scope="module")
def tiny():
    """120 users in 4 clusters over 40 items (6 items each): 100 training users, 20 held out."""
    X = planted(n_users=120, n_items=N_ITEMS, per_user=6, seed=3)
    return X[:100], fold_in_split(X[100:], n_fold_in=3)


class RecommenderContract:
    name: str  # the registered name
    params: dict = {}  # tiny settings: the whole file runs in seconds
    #: the message of the ParameterError similar_items raises; None: it answers
    similar_items_error: str | None = None

    @classmethod
    def make(cls, **changed):
        return make_model(cls.name, **{**cls.params, **changed})

    @classmethod
    def fit(cls, model, tiny, **kwargs):
        train, validation = tiny
        return model.fit(train, validation, **kwargs) if is_neural(cls.name) else model.fit(train)

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, tiny):
        """(the model, what its fit returned): one fit per model for the tests that only read it."""
        model = cls.make()
        return model, cls.fit(model, tiny)

    def test_fit_returns_the_model_fitted(self, fitted, tiny):
        model, returned = fitted
        assert returned is model
        assert model.n_items_ == N_ITEMS
        with pytest.raises(RuntimeError, match="is not fitted yet: call fit"):
            self.make().recommend(tiny[0][:2])

    def test_recommend_ranks_best_first_without_the_history(self, fitted, tiny):
        model, _ = fitted
        histories = tiny[1][0]
        ids, scores = model.recommend(histories, N=5)
        assert ids.shape == scores.shape == (histories.shape[0], 5)
        assert ids.dtype.kind == "i" and ((ids >= 0) & (ids < N_ITEMS)).all()
        assert (np.diff(scores, axis=1) <= 0).all() and np.isfinite(scores).all()
        for u in range(histories.shape[0]):
            assert not set(ids[u]) & set(histories[u].indices), u
            assert len(set(ids[u])) == 5
        np.testing.assert_array_equal(model.recommend(3, histories[3], N=5)[0], ids[3])  # implicit's form

    def test_an_n_beyond_the_catalogue_returns_the_catalogue(self, fitted, tiny):
        model, _ = fitted
        histories = tiny[1][0][:4]
        ids, scores = model.recommend(histories, N=1000)
        assert ids.shape == scores.shape == (4, N_ITEMS)
        for u in range(4):
            seen = set(histories[u].indices)
            free = N_ITEMS - len(seen)
            assert set(ids[u, :free]) == set(range(N_ITEMS)) - seen  # every other item, once
            assert (ids[u, free:] == -1).all() and np.isneginf(scores[u, free:]).all()

    def test_similar_items(self, fitted):
        model, _ = fitted
        if self.similar_items_error is not None:
            with pytest.raises(ParameterError, match=self.similar_items_error):
                model.similar_items(3, N=5)
            return
        ids, scores = model.similar_items(3, N=5)
        assert ids.shape == scores.shape == (5,)
        assert 3 not in ids and len(set(ids)) == 5
        assert (np.diff(scores) <= 0).all()
        many, _ = model.similar_items(np.array([3, 17]), N=5)
        assert many.shape == (2, 5) and 17 not in many[1]
        np.testing.assert_array_equal(many[0], ids)

    def test_save_and_load_give_the_same_scores(self, fitted, tiny, tmp_path):
        model, _ = fitted
        model.save(tmp_path / "model")
        for loaded in (load_model(tmp_path / "model"), type(model).load(tmp_path / "model")):
            assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
            np.testing.assert_array_equal(loaded.score(tiny[1][0]), model.score(tiny[1][0]))

    def test_a_clone_fits_to_the_same_model(self, fitted, tiny):
        model, _ = fitted
        copy = type(model)(**model.get_params())
        assert copy.get_params() == model.get_params() and not hasattr(copy, "n_items_")
        self.fit(copy, tiny)
        np.testing.assert_array_equal(copy.score(tiny[1][0]), model.score(tiny[1][0]))
        try:
            from sklearn.base import clone
        except ImportError:  # optional: the test extra installs it
            return
        cloned = clone(model)
        assert type(cloned) is type(model) and cloned.get_params() == model.get_params()
        assert not hasattr(cloned, "n_items_")


class EpochsSeen:
    """A fit callback noting the epochs it trains."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, info):
        self.epochs.append(info.row["epoch"])


class NeuralContract(RecommenderContract):
    """Models trained by epochs: a fit stopped after 2 epochs and resumed from its checkpoint to 4
    is the uninterrupted 4-epoch fit, bit for bit (on one machine; across machines the
    arithmetic may differ)."""

    def test_resume_is_the_uninterrupted_fit(self, fitted, tiny, tmp_path):
        straight, _ = fitted  # TINY_NET's 4 epochs, uninterrupted
        self.fit(self.make(epochs=2), tiny, callbacks=[ckpt(tmp_path)])
        trained = EpochsSeen()
        resumed = self.fit(self.make(), tiny, callbacks=[ckpt(tmp_path), trained], resume_from=resume(tmp_path))
        assert trained.epochs == [3, 4]  # resumed, not trained again from the start
        assert len(resumed.history_) == len(straight.history_) == 4
        assert [h["epoch"] for h in resumed.history_] == [1, 2, 3, 4]
        a, b = resumed.module_.state_dict(), straight.module_.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        np.testing.assert_array_equal(resumed.score(tiny[1][0]), straight.score(tiny[1][0]))


# fp32: the contract is the same in bf16, and fp32 is quicker for networks this small
TINY_NET = dict(latent_dim=4, epochs=4, batch_size=50, random_state=0, device="cpu", precision="fp32")


class TestMultVAE(NeuralContract):
    name = "multvae"
    params = dict(hidden_dims=(8,), total_anneal_steps=10, **TINY_NET)


class TestMultDAE(NeuralContract):
    name = "multdae"
    params = dict(TINY_NET)


class TestBinaryMultVAE(NeuralContract):
    name = "binary-multvae"
    params = dict(hidden_dims=(8,), total_anneal_steps=10, **{**TINY_NET, "latent_dim": 8})


class TestRecVAE(NeuralContract):
    name = "recvae"
    params = dict(hidden_dims=(8, 8), encoder_epochs=1, **TINY_NET)


class TestMultVAELinear(NeuralContract):
    name = "multvae-linear"
    params = dict(hidden_dims=(8,), total_anneal_steps=10, l2=10.0, **TINY_NET)


class TestMultVAELinearLearned(NeuralContract):
    """w learned at its own rate: a resume keeps that rate (its group names the hyperparameter)."""
    name = "multvae-linear"
    params = dict(hidden_dims=(8,), total_anneal_steps=10, l2=10.0, linear_weight_mode="learned", **TINY_NET)


class TestRecVAELinear(NeuralContract):
    """RecVAE trained alone, w * x B added when scoring and validating: a resume keeps the epoch
    chosen on the sum."""
    name = "recvae-linear"
    params = dict(hidden_dims=(8, 8), encoder_epochs=1, l2=10.0, linear_weight=3.0, **TINY_NET)


class TestEASE(RecommenderContract):
    name = "ease"
    params = dict(l2=10.0)


class TestEDLAE(RecommenderContract):
    name = "edlae"
    params = dict(l2=10.0, p=0.25)


class TestDLAE(RecommenderContract):
    """EDLAE without emphasis: its diagonal is not zero, yet history and query stay out."""
    name = "edlae"
    params = dict(l2=10.0, p=0.25, emphasis="none")


class TestPopularity(RecommenderContract):
    name = "popularity"
    similar_items_error = "Popularity has no item vectors, so no similar items"


def _all_subclasses(cls) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


def test_every_registered_model_keeps_the_contract():
    tested = {c.name: c for c in _all_subclasses(RecommenderContract) if c.__name__.startswith("Test")}
    assert sorted(tested) == sorted(model_names()), "add a subclass of RecommenderContract for each registered model"
    for name, cls in tested.items():
        assert issubclass(cls, NeuralContract) == is_neural(name), f"{name}: NeuralContract is for the epoch-trained models"
