"""The habits users bring from scikit-learn and implicit, shared by every model through
:class:`Habits` (a base of :class:`~recvae.models.base.Recommender`).

scikit-learn: ``__sklearn_tags__`` (scikit-learn >= 1.6 asks every estimator for it in
``GridSearchCV``), ``__sklearn_is_fitted__`` and ``n_features_in_``; with them the models pass
scikit-learn's estimator checks but three, which do not apply to a recommender
(tests/test_sklearn_checks.py lists them, with the reason). scikit-learn stays an optional dependency: it is
imported only when scikit-learn itself asks for the tags. Search with
:func:`recvae.evaluation.ranking_scorer` as ``scoring=`` (``score`` returns a matrix, not a number).

implicit: ``item_factors`` and ``user_factors(user_items)`` where the model has factors,
``similar_items`` and ``similar_users``. Where implicit's behaviour differs it is one keyword
away (``include_query=True``), and the differences are documented on each method.
"""

from __future__ import annotations

import numpy as np

from recvae.data.user_items import as_csr
from recvae.errors import ParameterError
from recvae.metrics import top_k_with_scores


def _check_n(N) -> int:
    if not isinstance(N, (int, np.integer)) or isinstance(N, bool) or N < 1:
        raise ParameterError("N", f"expected a positive integer, got {N!r}")
    return int(N)


def check_indices(name: str, values, n: int, what: str) -> np.ndarray:
    """``values`` (one index or an array of them) as int64 indices in ``[0, n)``; a
    :class:`ParameterError` naming ``name`` (``what``: what they index) otherwise."""
    idx = np.atleast_1d(np.asarray(values))
    if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= n)):
        raise ParameterError(name, f"expected {what} indices in [0, {n}), got {values!r}")
    return idx.astype(np.int64)


def top_similar(scores: np.ndarray, query: np.ndarray, N: int, filtered, filter_name: str, include_query: bool):
    """``(ids, values)`` (len(query), min(N, n)) of each row of ``scores`` (the similarities of
    ``query[r]`` to all ``n`` items or users; overwritten), best first. The query itself is left
    out, or with ``include_query`` put first (implicit's order) with its row's highest score, so
    the values stay in descending order whatever the model's self-similarity (EASE's is 0).
    Indices in ``filtered`` (the parameter ``filter_name``) are left out, the query too when
    filtered. Slots left empty hold id -1 and score -inf."""
    n = scores.shape[1]
    rows = np.arange(len(query))
    shown = np.ones(len(query), dtype=bool)
    if filtered is not None:
        filtered = check_indices(filter_name, filtered, n, filter_name.split("_")[1].rstrip("s"))
        shown = ~np.isin(query, filtered)
        scores[:, filtered] = -np.inf
    own = scores.max(axis=1) if scores.size else np.zeros(len(query), dtype=np.float32)
    scores[rows, query] = -np.inf
    k = min(N, n)
    if not include_query:
        return top_k_with_scores(scores, k)
    ids = np.full((len(query), k), -1, dtype=np.int64)
    values = np.full((len(query), k), -np.inf, dtype=np.float32)
    ids[shown, 0], values[shown, 0] = query[shown], own[shown]
    if k > 1:  # the others after the query
        ids[shown, 1:], values[shown, 1:] = top_k_with_scores(scores[shown], k - 1)
    if (~shown).any():
        ids[~shown], values[~shown] = top_k_with_scores(scores[~shown], k)
    return ids, values


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.asarray(a @ b.T, dtype=np.float32)


class Habits:
    """scikit-learn's and implicit's conventions on top of a model's ``_item_similarities``,
    ``_item_factors`` and ``_user_factors`` (a model without factors keeps the defaults, which
    raise :class:`~recvae.errors.ParameterError` saying so)."""

    #: whether ``fit`` refuses negative values (the autoencoders: counts); scikit-learn's
    #: ``positive_only`` tag says the same
    _non_negative_input: bool = False

    # -- scikit-learn ----------------------------------------------------------------------------
    def __sklearn_tags__(self):
        """What scikit-learn (>= 1.6) asks of an estimator: unsupervised (no ``y``), sparse input
        (dense 2-d arrays too), non-negative input where ``fit`` requires it, fitted before use.
        Imported here: scikit-learn is optional."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    input_tags=InputTags(sparse=True, positive_only=self._non_negative_input), requires_fit=True)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "n_items_")

    @property
    def n_features_in_(self) -> int:
        """scikit-learn's name for the number of columns ``fit`` saw: the items, ``n_items_``
        (absent before ``fit``, as scikit-learn's attribute is)."""
        if not hasattr(self, "n_items_"):
            raise AttributeError(f"{type(self).__name__} is not fitted yet: it has no n_features_in_")
        return self.n_items_

    # -- implicit: factors -----------------------------------------------------------------------
    @property
    def item_factors(self) -> np.ndarray:
        """The item vectors, float32 (n_items, d), as implicit's ``model.item_factors``. The
        autoencoders: the rows of the decoder's output layer (a user's logits are its last
        hidden layer times these, plus a bias), ``d`` the decoder's last width (``latent_dim``
        when ``hidden_dims=()``). EASE and Popularity have none and raise
        :class:`~recvae.errors.ParameterError`: EASE's model is its item-item weight matrix, the
        attribute ``B_`` (n_items x n_items; a user's scores are the history times ``B_``)."""
        self._check_fitted()
        return self._item_factors()

    def user_factors(self, user_items) -> np.ndarray:
        """The user vectors, float32 (users, latent_dim), of the histories ``user_items`` (a
        users x items CSR): the autoencoders fold any history in, so unlike implicit's
        attribute this is a method of the histories. They are what the decoder reads when
        scoring: the posterior mean (MultVAE, RecVAE), the code (MultDAE), the bits'
        probabilities (BinaryMultVAE, or the bits with ``binary_inference="bits"``). EASE and
        Popularity raise :class:`~recvae.errors.ParameterError`."""
        self._check_fitted()
        return self._user_factors(as_csr(user_items, "user_items", self.n_items_))

    def _item_factors(self) -> np.ndarray:
        raise ParameterError("model", f"{type(self).__name__} has no item factors{self._no_factors_hint}")

    def _user_factors(self, user_items) -> np.ndarray:
        raise ParameterError("model", f"{type(self).__name__} has no user factors{self._no_factors_hint}")

    #: appended to the "has no factors" errors (EASE points to its item-item matrix)
    _no_factors_hint = ""

    # -- implicit: similar items and users -------------------------------------------------------
    def similar_items(self, itemid, N: int = 10, filter_items=None, include_query: bool = False):
        """The ``N`` items most similar to ``itemid`` (an item index, or an array of them: then
        2-d answers), best first: ``(ids, scores)`` as implicit's.

        **The query item is left out by default**, unlike implicit, whose answer starts with the
        item itself (so ported ``ids[1:]`` code would drop the best neighbour);
        ``include_query=True`` gives implicit's behaviour: the item itself first, with its row's
        highest score, then ``N - 1`` others. Item indices in ``filter_items`` are left out
        (the query too, when filtered). Similarity is the model's own: the cosine of the
        decoder's item vectors (:attr:`item_factors`) for the autoencoders, EASE's row of
        ``B_``; a model without item vectors (Popularity) raises ``ParameterError`` saying so."""
        self._check_fitted()
        single = np.ndim(itemid) == 0
        items = check_indices("itemid", itemid, self.n_items_, "item")
        N = _check_n(N)
        scores = np.array(self._item_similarities(items), dtype=np.float32)
        ids, values = top_similar(scores, items, N, filter_items, "filter_items", include_query)
        return (ids[0], values[0]) if single else (ids, values)

    def _item_similarities(self, items: np.ndarray) -> np.ndarray:
        """Dense (len(items), n_items) similarities of ``items`` to every item."""
        raise ParameterError("model", f"{type(self).__name__} has no item vectors, so no similar items")

    def similar_users(self, userid, user_items, N: int = 10, filter_users=None, include_query: bool = False):
        """The ``N`` users (rows of ``user_items``) most similar to user ``userid`` (a row index,
        or an array of them: then 2-d answers), best first: ``(ids, scores)``, the cosine of
        their :meth:`user_factors`.

        implicit's ``similar_users(userid, N)`` reads factors stored at training; here the users
        are the rows of ``user_items`` you pass (e.g. the training matrix, or any histories:
        the model folds them in), all of them scored, so memory grows with
        ``len(userid) x user_items.shape[0]``. **The query user is left out by default**, as in
        :meth:`similar_items` and unlike implicit, whose answer starts with the user itself;
        ``include_query=True`` gives implicit's behaviour (the user first, with its row's highest
        score, then ``N - 1`` others). Row indices in ``filter_users`` are left out (the query
        too, when filtered). Models without user factors (EASE, Popularity) raise
        ``ParameterError``."""
        self._check_fitted()
        user_items = as_csr(user_items, "user_items", self.n_items_)
        n_users = user_items.shape[0]
        single = np.ndim(userid) == 0
        users = check_indices("userid", userid, n_users, "user (row of user_items)")
        N = _check_n(N)
        factors = self.user_factors(user_items)
        scores = _cosine(factors[users], factors)
        ids, values = top_similar(scores, users, N, filter_users, "filter_users", include_query)
        return (ids[0], values[0]) if single else (ids, values)
