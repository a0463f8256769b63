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


def planted_pairs_and_groups(n_users: int, seed: int, per_group: int = 50, n_pairs: int = 20):
    """Users in 4 groups of ``per_group`` items (4 items of their group: low-rank structure a
    VAE pools over, too sparse for item-item counts) who also hold one of ``n_pairs`` item pairs
    (an item-item link a linear model reads off; 20 pairs do not fit a 4-d code). Returns the
    whole matrix and a fold-in / held-out split: 2 group items and one item of the pair each."""
    rng = np.random.default_rng(seed)
    n_items = 4 * per_group + 2 * n_pairs
    fold_in, heldout = [], []
    for _ in range(n_users):
        group = rng.integers(4) * per_group + rng.choice(per_group, 4, replace=False)
        pair = 4 * per_group + 2 * rng.integers(n_pairs) + rng.permutation(2)
        fold_in.append([*group[:2], pair[0]])
        heldout.append([*group[2:], pair[1]])

    def matrix(rows):
        return sp.csr_matrix((np.ones(3 * n_users, np.float32), (np.repeat(np.arange(n_users), 3),
                                                                  np.concatenate(rows))), shape=(n_users, n_items))

    fi, ho = matrix(fold_in), matrix(heldout)
    return (fi + ho).tocsr(), (fi, ho)
