"""scikit-learn's estimator checks over every registered model, with tiny settings, and what those
checks cannot see here.

Three checks do not apply to a recommender (:data:`DO_NOT_APPLY`, each with its reason); they run
as strict expected failures (scikit-learn >= 1.8), so one that starts passing fails the suite and
the list stays true. Every other check passes. Several checks compare the outputs of ``predict``,
``transform`` or ``decision_function`` (fitting twice, pickling, subsets of rows, ``__dict__``
unchanged); a recommender has none of them, so those checks only see ``fit`` run: the tests after
them check the same properties on ``score``."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recvae.errors import NotFittedError, ParameterError, RecvaeError
from recvae.models import make_model, model_class, model_names
from recvae.models.registry import is_neural
from synthetic import planted

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is an optional test dependency (the test extra)")
SKLEARN = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", sklearn.__version__).groups())
if SKLEARN < (1, 6):
    pytest.skip(f"scikit-learn {sklearn.__version__} is installed: the estimator checks need >= 1.6 (the "
                "models' __sklearn_tags__ and parametrize_with_checks' expected_failed_checks)",
                allow_module_level=True)

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402 (after the version skip)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks, fitted hundreds of times

#: a network of a few units and one epoch in one batch: the whole file runs in seconds
TINY = dict(hidden_dims=(3,), latent_dim=2, epochs=1, batch_size=1000, encoder_epochs=1, device="cpu",
            precision="fp32")

#: the checks that do not apply to a recommender, and why
DO_NOT_APPLY = {
    "check_fit_score_takes_y": (
        "fit's second argument is validation (held-out users for early stopping), not y: a recommender has "
        "no target. A y passed there (a 1-d array of one value per row, as scikit-learn's pipelines and "
        "checks pass it) is ignored, so every other check fits with y"),
    "check_pipeline_consistency": (
        "it compares score(X, y) numbers: a recommender's score(user_items) is the users x items score "
        "matrix that recommend ranks, not a number; model selection scores with "
        "recvae.evaluation.ranking_scorer"),
    "check_n_features_in_after_fitting": (
        "it calls score(X, y=y), scikit-learn's signature (see check_pipeline_consistency); n_features_in_ "
        "is set (check_n_features_in passes) and a wrong number of columns is a ParameterError naming the "
        "argument (test_a_bad_matrix_is_one_error_naming_the_argument)"),
}


def tiny(name: str, **changed):
    """The registered model ``name`` with the parameters of :data:`TINY` it has."""
    names = model_class(name)._param_names()
    return make_model(name, **{k: v for k, v in {**TINY, **changed}.items() if k in names})


strict = {"xfail_strict": True} if SKLEARN >= (1, 8) else {}


with warnings.catch_warnings():  # "does not inherit from BaseEstimator": on purpose, scikit-learn is optional
    warnings.filterwarnings("ignore", message="Estimator .* does not inherit from", category=UserWarning)
    checks = parametrize_with_checks([tiny(name) for name in model_names()],
                                     expected_failed_checks=lambda _: DO_NOT_APPLY, **strict)


@checks
def test_scikit_learn_estimator_check(estimator, check):
    check(estimator)


# -- what the checks compare on predict, on score ------------------------------------------------
@pytest.fixture(scope="module")
def X():
    return planted(n_users=40, n_items=12, n_clusters=3, per_user=3, seed=1)


@pytest.mark.parametrize("name", model_names())
def test_fitting_twice_pickling_and_scoring_keep_the_model(name, X):
    model = tiny(name).fit(X)
    scores = model.score(X)
    state = dict(model.__dict__)
    model.score(X[:7])
    assert model.__dict__ == state  # scoring changes no attribute (check_dict_unchanged's point)
    np.testing.assert_array_equal(model.fit(X).score(X), scores)  # the same random_state: the same model
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).score(X), scores)
    # a user's scores do not depend on the users scored beside them
    np.testing.assert_allclose(np.vstack([model.score(X[u : u + 1]) for u in range(5)]), scores[:5],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", model_names())
def test_a_dense_array_and_scikit_learns_y_fit_the_same_model_as_the_sparse_matrix(name, X):
    from sklearn.pipeline import make_pipeline

    scores = tiny(name).fit(X).score(X)
    y = np.arange(X.shape[0]) % 2
    np.testing.assert_array_equal(tiny(name).fit(X.toarray()).score(X), scores)
    np.testing.assert_array_equal(tiny(name).fit(X, y).score(X.toarray()), scores)
    np.testing.assert_array_equal(tiny(name).fit(X, pd.Series(y)).score(X), scores)
    pipeline = make_pipeline(tiny(name)).fit(X, y)  # a Pipeline passes y on to the last step's fit
    np.testing.assert_array_equal(pipeline[-1].score(X), scores)
    assert pipeline[-1].n_features_in_ == X.shape[1] == pipeline.n_features_in_


def test_a_bad_matrix_is_one_error_naming_the_argument(X):
    for name in ("multdae", "ease", "edlae"):
        with pytest.raises(ParameterError, match=re.escape(
                "train: found 0 sample(s) (shape=(0, 3)) while a minimum of 1 is required: expected at least "
                "one user (row)")):
            tiny(name).fit(np.zeros((0, 3)))
        with pytest.raises(ParameterError, match=re.escape(
                "train: found 0 feature(s) (shape=(12, 0)) while a minimum of 1 is required: expected at least "
                "one item (column)")):
            tiny(name).fit(sp.csr_matrix((12, 0)))
        nan = X.toarray()
        nan[3, 4] = np.nan
        with pytest.raises(ParameterError, match=re.escape(
                "train: contains 1 non-finite value(s) (NaN or infinity); expected finite interaction values")):
            tiny(name).fit(nan)
        with pytest.raises(ParameterError, match=re.escape(
                "train: Complex data not supported (dtype complex64); expected real interaction values")):
            tiny(name).fit(X.toarray() + 1j)
        with pytest.raises(ParameterError, match=re.escape(
                "train: expected a 2-d users x items matrix, got a 1-d array of shape (12,)")):
            tiny(name).fit(np.ones(12))
        values = X.toarray().astype(object)
        values[0, 0] = {"a": 1}
        with pytest.raises(TypeError, match=re.escape(
                "train: expected numbers, got object values (float() argument must be a string or a real "
                "number, not 'dict')")):
            tiny(name).fit(values)
        with pytest.raises(TypeError, match=re.escape(
                "train: expected a scipy.sparse matrix, a 2-d numpy array (users x items) or "
                "recvae.data.Interactions, got DataFrame; a table of (user, item) rows is read by "
                "recvae.data.Interactions.from_dataframe")):
            tiny(name).fit(pd.DataFrame({"user": [0, 1], "item": [2, 3]}))
        model = tiny(name).fit(X.toarray().astype(object))  # an object array of numbers is numbers
        with pytest.raises(ParameterError, match=re.escape("user_items: expected 12 item columns (as in "
                                                           "training), got 1")):
            model.score(X[:, [1]])
    negative = X.copy()
    negative.data[[0, 5]] = [-1.0, -0.5]
    with pytest.raises(ParameterError, match=re.escape(
            f"train: Negative values in data (2 of {X.nnz}, the smallest -1): expected non-negative interaction "
            "values (counts or 1s)")):
        tiny("multdae").fit(negative)
    tiny("ease").fit(negative)  # EASE weighs them (its positive_only tag is False)
    with pytest.raises(TypeError, match=re.escape(
            "validation: expected a HeldOutUsers (with .fold_in and .heldout), a (fold_in, heldout) tuple of CSR "
            "matrices, a function model -> score or scikit-learn's y (a 1-d array of one value per row of train, "
            "ignored), got ndarray of shape (39,)")):
        tiny("multdae").fit(X, np.zeros(X.shape[0] - 1))


@pytest.mark.parametrize("name", model_names())
def test_the_tags_say_which_models_refuse_negative_values_and_an_unfitted_model_says_so(name):
    from sklearn.exceptions import NotFittedError as SklearnNotFitted
    from sklearn.utils import get_tags
    from sklearn.utils.validation import check_is_fitted

    model = tiny(name)
    assert get_tags(model).input_tags.positive_only == is_neural(name)  # the autoencoders' values are counts
    assert not hasattr(model, "n_features_in_")
    with pytest.raises(SklearnNotFitted):
        check_is_fitted(model)
    with pytest.raises(NotFittedError, match=f"^{type(model).__name__} is not fitted yet: call fit\\(\\) first$") as e:
        model.recommend(sp.csr_matrix((1, 3)))
    assert isinstance(e.value, RecvaeError) and isinstance(e.value, RuntimeError)
