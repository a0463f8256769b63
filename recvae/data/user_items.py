"""What the models take as a users x items matrix: one conversion (:func:`as_csr`) for every
entry point (``fit``, ``score``, ``recommend``, evaluation), and the training matrix's rules
(:func:`training_matrix`).

Taken: a scipy.sparse matrix or array of any format, an :class:`~recvae.data.Interactions`
(its ``.matrix``) or a 2-d numpy array (dense: small examples, and what scikit-learn's estimator
checks pass). Refused, with one error naming the argument: anything else (a DataFrame of
(user, item) rows is pointed to ``Interactions.from_dataframe``), an array that is not 2-d,
complex values, values that are not numbers, NaN or infinity. Where scikit-learn's checks look
for their own phrase ("Complex data not supported", "Negative values in data", "0 feature(s)
... while a minimum of 1 is required") the message holds it, after recvae's argument name.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recvae.errors import ParameterError

_TAKEN = "a scipy.sparse matrix, a 2-d numpy array (users x items) or recvae.data.Interactions"


def as_csr(X, name: str = "X", n_items: int | None = None) -> sp.csr_matrix:
    """``X`` (see the module) as float32 CSR; ``n_items``: the number of columns it must have.

    Raises a ``TypeError`` (not a matrix, values that are not numbers) or a
    :class:`~recvae.errors.ParameterError` (a ``ValueError``) naming ``name``."""
    matrix = getattr(X, "matrix", X)
    dense = isinstance(matrix, np.ndarray)
    if not dense and not sp.issparse(matrix):
        hint = ("; a table of (user, item) rows is read by recvae.data.Interactions.from_dataframe"
                if type(X).__name__ == "DataFrame" else "")
        raise TypeError(f"{name}: expected {_TAKEN}, got {type(X).__name__}{hint}")
    if matrix.dtype.kind == "c":
        raise ParameterError(name, f"Complex data not supported (dtype {matrix.dtype}); expected real interaction values")
    matrix = sp.csr_matrix(_dense(matrix, name) if dense else matrix, dtype=np.float32)
    if n_items is not None and matrix.shape[1] != n_items:
        raise ParameterError(name, f"expected {n_items} item columns (as in training), got {matrix.shape[1]}")
    if matrix.nnz and not np.isfinite(matrix.data).all():
        bad = int(matrix.nnz - np.isfinite(matrix.data).sum())
        raise ParameterError(name, f"contains {bad} non-finite value(s) (NaN or infinity); expected finite "
                                   "interaction values")
    return matrix


def _dense(array: np.ndarray, name: str) -> np.ndarray:
    """A dense array of real numbers, checked: 2-d, its values numbers (an object array of them
    is converted). Its zeros are not interactions: the CSR made of it stores the others."""
    if array.ndim != 2:
        raise ParameterError(name, f"expected a 2-d users x items matrix, got a {array.ndim}-d array of shape "
                                   f"{array.shape}")
    if array.dtype.kind not in "biuf":
        try:
            array = np.asarray(array, dtype=np.float64)
        except TypeError as e:
            raise TypeError(f"{name}: expected numbers, got {array.dtype} values ({e})") from None
        except ValueError as e:
            raise ParameterError(name, f"expected numbers, got {array.dtype} values ({e})") from None
    return array


def training_matrix(train, non_negative: bool = False) -> sp.csr_matrix:
    """``fit``'s ``train`` as float32 CSR in canonical form (duplicates summed), with at least one
    user (row) and one item (column). ``non_negative`` (the autoencoders, whose values are counts
    in a multinomial likelihood): a negative value is refused."""
    X = as_csr(train, "train")
    for axis, (what, unit) in enumerate((("sample", "user (row)"), ("feature", "item (column)"))):
        if X.shape[axis] < 1:
            raise ParameterError("train", f"found 0 {what}(s) (shape={X.shape}) while a minimum of 1 is required: "
                                          f"expected at least one {unit}")
    if non_negative and X.nnz and X.data.min() < 0:
        negative = int((X.data < 0).sum())
        raise ParameterError("train", f"Negative values in data ({negative} of {X.nnz:,}, the smallest "
                                      f"{float(X.data.min()):g}): expected non-negative interaction values "
                                      "(counts or 1s)")
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    return X
