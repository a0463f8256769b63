"""The one container for implicit feedback: a users x items CSR matrix plus id vocabularies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True, eq=False)
class Interactions:
    """Implicit feedback as a binary users x items CSR matrix.

    ``user_ids[u]`` / ``item_ids[i]`` are the original ids (ints or strings) of row ``u`` /
    column ``i``; indices are contiguous ``0..n-1``.
    """

    matrix: sp.csr_matrix  # (n_users, n_items), float32 ones, sorted indices, no duplicates
    user_ids: np.ndarray  # (n_users,) original user ids
    item_ids: np.ndarray  # (n_items,) original item ids

    def __post_init__(self) -> None:
        if not sp.isspmatrix_csr(self.matrix):
            raise TypeError(f"matrix: expected a scipy.sparse.csr_matrix, got {type(self.matrix).__name__}")
        if self.matrix.shape != (len(self.user_ids), len(self.item_ids)):
            raise ValueError(
                f"matrix: shape {self.matrix.shape} does not match "
                f"{len(self.user_ids)} user ids x {len(self.item_ids)} item ids"
            )

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]

    @property
    def nnz(self) -> int:
        return self.matrix.nnz
