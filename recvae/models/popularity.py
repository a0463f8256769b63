"""Popularity baseline: every user gets the items ranked by how many training users have them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae.data.user_items import training_matrix
from recvae.fileio import atomic_write, read_npz
from recvae.models.base import (
    Recommender, check_finite, check_shapes, read_model_meta, verified_file, write_model_meta,
)

ARRAYS_FILE = "arrays.npz"


def save_baseline(model, path, params: dict, arrays: dict) -> Path:
    """Write ``arrays.npz`` and then ``model.json`` (class, hyperparameters, item ids, the
    archive's SHA-256) into the folder ``path``, each atomically; no pickle."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / ARRAYS_FILE, lambda f: np.savez(f, **arrays))
    write_model_meta(path, model, params, [ARRAYS_FILE])
    return path


def load_baseline(cls, path, shapes) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a folder written by :func:`save_baseline` for class ``cls``, verified:
    the archive's digest, ``shapes(n_items)`` (array name -> expected shape), finite values."""
    meta_file, meta = read_model_meta(path, cls)
    arrays_file = verified_file(meta_file, meta, ARRAYS_FILE)
    arrays = read_npz(arrays_file, f"{cls.__name__} arrays")
    check_shapes(arrays_file, arrays, shapes(meta["n_items"]))
    check_finite(arrays_file, arrays)
    return meta, arrays


class Popularity(Recommender):
    """Non-personalised baseline: score(u, i) = number of training users who interacted with i.

    Ties (items with equal counts) are ranked by lower item index, like every ranking of
    :mod:`recvae.metrics`. Attributes after ``fit``: ``item_counts_`` (n_items,) float32,
    ``n_items_``.
    """

    def fit(self, train, validation=None):
        """Count each item's training users. ``validation`` is accepted for the shared
        interface and ignored (nothing to tune; scikit-learn's ``y`` too)."""
        X = training_matrix(train)
        # count users, not summed values, so weighted or repeated entries count once
        self.item_counts_ = np.asarray((X > 0).sum(axis=0), dtype=np.float32).ravel()
        self.n_items_ = X.shape[1]
        if getattr(train, "item_ids", None) is not None:
            self.item_ids_ = np.asarray(train.item_ids)
        return self

    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:
        # a fresh writable array per call: evaluate() writes -inf into it
        return np.tile(self.item_counts_, (user_items.shape[0], 1))

    def save(self, path) -> Path:
        """Write the fitted counts to the folder ``path`` (``model.json`` + ``arrays.npz``)."""
        self._check_fitted()
        return save_baseline(self, path, {}, {"item_counts": self.item_counts_})

    @classmethod
    def load(cls, path, device=None) -> "Popularity":
        """A fitted model from a folder written by :meth:`save` (numpy on the CPU: ``device`` is unused)."""
        meta, arrays = load_baseline(cls, path, lambda n: {"item_counts": (n,)})
        model = cls()
        model.item_counts_ = arrays["item_counts"].astype(np.float32)
        model.n_items_ = int(meta["n_items"])
        if meta["item_ids"] is not None:
            model.item_ids_ = np.asarray(meta["item_ids"])
        return model
