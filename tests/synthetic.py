"""Small synthetic interaction matrices shared by the tests (the fixtures built on them are in
conftest.py)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def planted(n_users=400, n_items=60, n_clusters=4, per_user=8, seed=0):
    """Users in clusters; each user picks items of its cluster only."""
    rng = np.random.default_rng(seed)
    width = n_items // n_clusters
    rows, cols = [], []
    for u in range(n_users):
        c = rng.integers(n_clusters)
        rows += [u] * per_user
        cols += list(rng.choice(np.arange(c * width, (c + 1) * width), per_user, replace=False))
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))


def fold_in_split(X, n_fold_in=4):
    fi, ho = X.tolil(copy=True), X.tolil(copy=True)
    for u in range(X.shape[0]):
        idx = X[u].indices
        fi[u, idx[n_fold_in:]] = 0
        ho[u, idx[:n_fold_in]] = 0
    fi, ho = fi.tocsr(), ho.tocsr()
    fi.eliminate_zeros()
    ho.eliminate_zeros()
    return fi, ho
