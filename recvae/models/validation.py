"""What ``fit(..., validation=...)`` scores after each epoch: NDCG@100 of held-out users by
default, the paper's selection metric (early stopping and the best epoch are chosen on it).
Under torchrun the users (or, with ``parallel="items"``, the items) are split over the processes
and every process gets the same score."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recvae import distributed
from recvae import metrics as M
from recvae.errors import ParameterError
from recvae.models import item_parallel
from recvae.models.base import as_csr


def as_validation(validation, n_items: int, batch_size: int, n_users: int | None = None):
    """``fit``'s ``validation`` as a function ``model -> score`` (higher is better), or None.

    A callable is used as it is. Held-out users (a ``HeldOutUsers`` with ``.fold_in`` and
    ``.heldout``, or a ``(fold_in, heldout)`` tuple) are scored by NDCG@100 (every item when the
    catalogue is smaller), the paper's selection metric: :func:`holdout_ndcg`. scikit-learn's
    ``y`` (a 1-d array or Series of one value per training row, ``n_users``), which its pipelines
    and checks pass as ``fit``'s second argument, is ignored, as its unsupervised estimators
    ignore it: a recommender has no target.
    """
    if validation is None or callable(validation):
        return validation
    if hasattr(validation, "fold_in") and hasattr(validation, "heldout"):
        fold_in, heldout = validation.fold_in, validation.heldout
    elif isinstance(validation, (tuple, list)) and len(validation) == 2:
        fold_in, heldout = validation
    elif not sp.issparse(validation) and len(getattr(validation, "shape", ())) == 1 and validation.shape[0] == n_users:
        return None  # scikit-learn's y: a dense 1-d array or Series of one value per row
    else:
        raise TypeError(
            "validation: expected a HeldOutUsers (with .fold_in and .heldout), a (fold_in, heldout) "
            f"tuple of CSR matrices, a function model -> score or scikit-learn's y (a 1-d array of one value "
            f"per row of train, ignored), got {type(validation).__name__}"
            + (f" of shape {validation.shape}" if hasattr(validation, "shape") else "")
        )
    fold_in = as_csr(fold_in, "validation fold_in", n_items)
    heldout = as_csr(heldout, "validation heldout", n_items)
    if fold_in.shape != heldout.shape:
        raise ParameterError("validation", f"fold_in {fold_in.shape} and heldout {heldout.shape} differ in shape")
    k = min(100, n_items)  # with fewer items, NDCG@100 ranks them all: the same quantity
    return lambda model: holdout_ndcg(model, fold_in, heldout, k, batch_size)


def holdout_ndcg(model, fold_in: sp.csr_matrix, heldout: sp.csr_matrix, k: int, batch_size: int) -> float:
    """Mean NDCG@k of ``model`` over the users with held-out items, as
    :func:`recvae.evaluation.evaluate` computes it (same ranking, same mean). Under torchrun each
    process scores its share of the users; sums and counts are reduced, so every process gets
    the same score and takes the same early-stopping decision. A network split by items
    (``parallel="items"``) is scored by :func:`recvae.models.item_parallel.holdout_ndcg`."""
    if getattr(getattr(model, "module_", None), "shard", None) is not None:
        return item_parallel.holdout_ndcg(model, fold_in, heldout, k, batch_size)
    group = distributed.current()
    if group.parallel:
        start, stop = distributed.shard_bounds(fold_in.shape[0], group.rank, group.world_size)
        fold_in, heldout = fold_in[start:stop], heldout[start:stop]
    heldout = M.binary_relevance(heldout)
    users = np.flatnonzero(np.diff(heldout.indptr) > 0)
    fold_in, heldout = fold_in[users], heldout[users]
    values = M.user_values(model.score, fold_in, heldout, (k,), ("ndcg",), batch_size)[0][f"ndcg@{k}"]
    if not group.parallel:
        return M.mean_stderr(values)[0]
    total = np.zeros(2)
    if values.size:
        total[:] = M.mean_stderr(values)[0] * values.size, values.size
    total = distributed.allreduce_sum(total)
    return float(total[0] / total[1])
