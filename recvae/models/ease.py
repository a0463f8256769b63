"""EASE: Embarrassingly Shallow Autoencoders (Steck, WWW 2019), a closed-form item-item baseline.

Steck, H. "Embarrassingly Shallow Autoencoders for Sparse Data." WWW 2019.
The model solves ``min_B ||X - X B||_F^2 + lambda ||B||_F^2  s.t. diag(B) = 0`` whose
solution is, with ``G = X^T X + lambda I`` and ``P = G^{-1}``::

    B_ij = -P_ij / P_jj  (i != j),   B_jj = 0,   i.e.  B = I - P diag(1 / diag(P))

and a user's scores are ``x_u^T B`` (a row of ``X_batch @ B``).
"""

from __future__ import annotations

from recvae.errors import ParameterError, shown

import logging
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from recvae.data.user_items import training_matrix
from recvae.models.base import Recommender, warn_if_not_binary
from recvae.models.params import Choice, Float, Param, Tune
from recvae.models.popularity import load_baseline, save_baseline

logger = logging.getLogger(__name__)

#: the l2 values tune tries by default (Steck reports a few hundred working well)
EASE_GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
_GRAM_BLOCK_ENTRIES = 1 << 25  # dense entries per block of the Gram matrix (256 MB in float64)


class DType(Choice):
    """float32 or float64, as a name or a numpy dtype."""

    def __init__(self):
        super().__init__(("float64", "float32"))

    def check(self, name: str, value):
        try:
            ok = np.dtype(value).name in self.options
        except TypeError:
            ok = False
        if not ok:
            raise ParameterError(name, f"expected float32 or float64, got {shown(value)}")
        return value

    def to_json(self, value):
        return np.dtype(value).name


def _check_l2(l2, name: str = "l2") -> float:
    if isinstance(l2, bool) or not isinstance(l2, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a positive number, got {l2!r}")
    if not np.isfinite(l2) or l2 <= 0:
        raise ParameterError(name, f"expected a finite number > 0 (it makes X^T X + l2 I invertible), got {shown(l2)}")
    return float(l2)


def gram_matrix(X: sp.csr_matrix, dtype=np.float64) -> np.ndarray:
    """Dense ``X^T X`` (items x items) built from sparse ``X`` block of columns by block,
    so no dense users x items matrix and no full sparse product are ever held."""
    n_items = X.shape[1]
    G = np.empty((n_items, n_items), dtype=dtype)
    Xt = X.T.tocsr()
    Xc = X.tocsc()
    step = max(1, _GRAM_BLOCK_ENTRIES // max(n_items, 1))
    for j0 in range(0, n_items, step):
        G[:, j0 : j0 + step] = (Xt @ Xc[:, j0 : j0 + step]).toarray()
    return G


def ease_weights(G: np.ndarray, l2: float, overwrite: bool = False) -> np.ndarray:
    """``B = -P / diag(P)`` with zero diagonal, ``P = (G + l2 I)^{-1}`` by Cholesky.

    ``G`` is the dense Gram matrix ``X^T X``. With ``overwrite=True`` ``G`` is used as the
    workspace (and destroyed), so the peak memory is one items x items matrix.
    """
    l2 = _check_l2(l2)
    P = regularized_inverse(G, l2, overwrite, f"l2={l2}", "X^T X + l2 I", "use a larger l2 or dtype=float64")
    return zero_diagonal_weights(P)


def zero_diagonal_weights(P: np.ndarray) -> np.ndarray:
    """``I - P diag(1 / diag(P))`` in place of ``P``: each column ``j`` divided by ``-P_jj``,
    then the diagonal set to 0 (EASE's solution for ``P = (X^T X + Lambda)^{-1}`` under
    ``diag(B) = 0``, whatever the diagonal ``Lambda``)."""
    diag = np.diag(P).copy()
    P /= -diag[None, :]
    np.fill_diagonal(P, 0.0)
    return P


#: above this many items the Cholesky inverse runs on torch's LAPACK, in place: OpenBLAS's
#: threaded ``potrf`` (scipy's) crashed this process with a segmentation fault from ~16,000 items
#: on 2 threads (ML-20M's 20,108; 12,000 passed), a fault OpenBLAS's tracker reports at other
#: sizes and thread counts too. Below it scipy's, which every committed table was made with
#: (their catalogues have at most ~9,000 items), so their rows stay bit for bit.
TORCH_CHOLESKY_ITEMS = 8192


def regularized_inverse(G: np.ndarray, add, overwrite: bool, label: str, matrix: str, hint: str) -> np.ndarray:
    """``(G + diag(add))^{-1}`` by Cholesky (``add``: a number or one per item), symmetric, in
    place of ``G`` when ``overwrite``. A factorisation that fails raises
    ``np.linalg.LinAlgError`` starting with ``label`` (the hyperparameters), naming ``matrix``
    and ending with ``hint``."""
    A = G if overwrite else G.copy()
    A[np.diag_indices_from(A)] += add
    if A.shape[0] > TORCH_CHOLESKY_ITEMS:
        return _torch_inverse(A, label, matrix, hint)
    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (A,))
    # Fortran order so LAPACK works in place; the matrix is symmetric so A.T is the same matrix
    c, info = potrf(A.T, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(
            f"{label}: {matrix} is not numerically positive definite (Cholesky info={info}); {hint}")
    P, info = potri(c, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"{label}: inverse from the Cholesky factor failed (info={info})")
    P = P.T  # back to C order: upper triangle of the Fortran result is the lower one here
    _symmetrize_lower(P)
    return P


def _torch_inverse(A: np.ndarray, label: str, matrix: str, hint: str) -> np.ndarray:
    """:func:`regularized_inverse`'s factorisation and inverse on torch's LAPACK, in ``A``'s own
    memory (its transposed view is column-major, which LAPACK works in without a copy)."""
    import torch

    t = torch.from_numpy(A).mT
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(t, out=(t, info))
    if int(info) != 0:
        raise np.linalg.LinAlgError(
            f"{label}: {matrix} is not numerically positive definite (Cholesky info={int(info)}); {hint}")
    torch.cholesky_inverse(t, out=t)  # the whole symmetric inverse
    return A


def _symmetrize_lower(P: np.ndarray, block: int = 2048) -> None:
    """Copy the lower triangle onto the upper one in place."""
    n = P.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        P[:i0, i0:i1] = P[i0:i1, :i0].T
        d = P[i0:i1, i0:i1]
        iu = np.triu_indices(i1 - i0, 1)
        d[iu] = d.T[iu]


class EASE(Recommender):
    """EASE^R item-item model (Steck, WWW 2019): ``scores = X_batch @ B``.

    ``l2``: Steck reports values of a few hundred (ML-20M: 500) working well; pick it on
    validation with :func:`recvae.tuning.select_ease_l2`. ``dtype``: float64 by default, for an
    accurate Cholesky inverse.

    Memory: ``fit`` holds one dense items x items matrix (``n_items**2`` floats: 8 bytes each
    in float64 — 17 MB for ML-100K's 1,447 items, 100 MB for ML-1M's 3,533, 3.2 GB for
    ML-20M's 20,108) plus a block of the Gram product; the inverse is computed in place.
    ``B_`` keeps that size after fitting. Time is O(n_items^3) for the factorisation.

    Attributes after ``fit``: ``B_`` (n_items, n_items), the item-item weight matrix, which is
    the whole model: a user's scores are their history times ``B_``, and row ``i`` of ``B_`` is
    what ``similar_items(i)`` ranks. EASE has no factors: ``item_factors`` and ``user_factors``
    raise :class:`~recvae.errors.ParameterError` pointing here. Also ``n_items_``,
    ``fit_seconds_``.
    """

    PARAMETERS = (
        Param("l2", Float(0.0, low_open=True), 500.0, "architecture",
              "L2 weight lambda, which makes X^T X + lambda I invertible (Steck: a few hundred; ML-20M 500)",
              tune=Tune(space="log:10:10000", grid=EASE_GRID)),
        Param("dtype", DType(), "float64", "runtime", "float64 (an accurate Cholesky inverse) or float32"),
    )

    def fit(self, train, validation=None):
        """Closed-form fit on ``train`` (sparse, a dense 2-d array or Interactions). ``validation``
        is accepted for the shared interface and ignored (scikit-learn's ``y`` too); tune ``l2``
        with :func:`recvae.tuning.select_ease_l2` or ``recvae tune``."""
        _check_l2(self.l2)  # first: a non-number is a TypeError, as for ease_weights
        self._check_params()  # the table's checks (dtype: a DType row)
        dt = np.dtype(self.dtype)
        X = training_matrix(train)
        name = type(self).__name__
        warn_if_not_binary(X, name, "weights (in the item-item Gram matrix X^T X)")
        t0 = time.perf_counter()
        self.B_ = self._weights(gram_matrix(X, dt), overwrite=True)
        self.n_items_ = X.shape[1]
        if getattr(train, "item_ids", None) is not None:
            self.item_ids_ = np.asarray(train.item_ids)
        self.fit_seconds_ = time.perf_counter() - t0
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in self.get_params().items() if k != "dtype")
        logger.info("%s fit: %d items, %s, %.2fs", name, self.n_items_, shown, self.fit_seconds_)
        return self

    def _weights(self, G: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """The item-item weights ``B`` from the dense Gram matrix ``G = X^T X`` (used as the
        workspace when ``overwrite``): the one step a subclass of the same shape (EDLAE) changes.
        ``fit`` and ``recvae tune``'s shared Gram matrix both call it."""
        return ease_weights(G, self.l2, overwrite=overwrite)

    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:
        return np.asarray(user_items @ self.B_, dtype=np.float32)

    #: EASE has no factors: its item-item matrix is the model
    _no_factors_hint = ("; its item-item weight matrix B_ (n_items x n_items: a user's scores are the history "
                        "times B_) is the model")

    def _item_similarities(self, items: np.ndarray) -> np.ndarray:
        """Row ``i`` of B: how much having item ``i`` raises each item's score."""
        return np.asarray(self.B_[items], dtype=np.float32)

    def save(self, path) -> Path:
        """Write ``B_`` and the hyperparameters to the folder ``path`` (``model.json`` +
        ``arrays.npz``, n_items^2 floats)."""
        self._check_fitted()
        return save_baseline(self, path, self._json_params(), {"B": self.B_})

    @classmethod
    def load(cls, path, device=None) -> "EASE":
        """A fitted model from a folder written by :meth:`save` (numpy on the CPU: ``device`` is unused)."""
        meta, arrays = load_baseline(cls, path, lambda n: {"B": (n, n)})
        model = cls(**meta["params"])
        model.B_ = arrays["B"]
        model.n_items_ = int(meta["n_items"])
        if meta["item_ids"] is not None:
            model.item_ids_ = np.asarray(meta["item_ids"])
        return model
