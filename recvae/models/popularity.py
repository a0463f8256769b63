"""Popularity baseline: every user gets the items ranked by how many training users have them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recvae.models.base import Recommender, as_csr


class Popularity(Recommender):
    """Non-personalised baseline: score(u, i) = number of training users who interacted with i.

    Ties (items with equal counts) are ranked by lower item index, like every ranking of
    :mod:`recvae.metrics`. Attributes after ``fit``: ``item_counts_`` (n_items,) float32,
    ``n_items_``.
    """

    def fit(self, train, validation=None):
        """Count each item's training users. ``validation`` is accepted for the shared
        interface and ignored (nothing to tune)."""
        X = as_csr(train, "train")
        if X.shape[1] == 0:
            raise ValueError("train: expected at least one item column, got 0")
        # count users, not summed values, so weighted or repeated entries count once
        self.item_counts_ = np.asarray((X > 0).sum(axis=0), dtype=np.float32).ravel()
        self.n_items_ = X.shape[1]
        return self

    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:
        # a fresh writable array per call: evaluate() writes -inf into it
        return np.tile(self.item_counts_, (user_items.shape[0], 1))
