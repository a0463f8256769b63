"""EDLAE: the full-rank emphasized denoising linear autoencoder (Steck, NeurIPS 2020), closed form.

Steck, H. "Autoencoders that don't overfit towards the Identity." NeurIPS 2020. An item-item
model ``scores = X_batch @ B`` as EASE (:mod:`recvae.models.ease`), trained as a denoising
autoencoder: each entry of the input is dropped with probability ``p`` and the kept ones are
scaled by ``1 / (1 - p)``, ``x~_ui = x_ui d_ui / (1 - p)`` with ``d_ui ~ Bernoulli(1 - p)``.
With *full emphasis* only the errors of the dropped-out entries count, so no item can be
predicted from itself::

    min_B  E_d [ sum_{u,j} (1 - d_uj) / p * (x_uj - sum_i x~_ui B_ij)^2 ]  +  l2 ||B||_F^2

A dropped entry's input is 0, so ``B_jj`` never enters the loss and the L2 term keeps it at 0.
The expectation over the other inputs (mean ``x_ui``, variance ``x_ui^2 p / (1 - p)``) makes
this EASE's objective with a per-item L2 weight, the dropout's::

    ||X - X B||_F^2 + ||Lambda^{1/2} B||_F^2   s.t. diag(B) = 0,
    Lambda = p / (1 - p) * diagMat(diag(X^T X)) + l2 I

whose solution, with ``P = (X^T X + Lambda)^{-1}``, is (the paper's Eqs. 8-9; its code,
``learn_EDLAE_fullrank`` in hasteck/EDLAE_NeurIPS2020, computes the same)::

    B = I - P diagMat(1 / diag(P))      (B_ij = -P_ij / P_jj, B_jj = 0)

Popular items (large ``(X^T X)_jj``) are regularised more. ``p = 0`` is EASE with the same
``l2``. ``emphasis="none"`` is the plain denoising linear autoencoder (DLAE), every entry's
error counting (no ``(1 - d_uj) / p`` weight); the same expectation gives::

    ||X - X B||_F^2 + ||Lambda^{1/2} B||_F^2   ->   B = (X^T X + Lambda)^{-1} X^T X = I - P Lambda

with the diagonal free (``B_jj = 1 - Lambda_jj P_jj``): the dropout's L2 weight is all that
keeps it from the identity, the paper's point. The diagonal only scores items a user already
has, which recommendations leave out. With ``p = 0`` it is the ridge (L2) linear autoencoder
``(X^T X + l2 I)^{-1} X^T X``.
"""

from __future__ import annotations

import numpy as np

from recvae.models.ease import EASE, _check_l2, regularized_inverse, zero_diagonal_weights
from recvae.models.params import Choice, Float, Param, Tune, by_name

#: the default grid of ``recvae tune --model edlae``: every ``p`` with every ``l2`` (one Gram
#: matrix for all). The paper's best: ML-20M p 0.33 / l2 300, Netflix 0.33 / 500, MSD 0.25 / 70.
#: Validation NDCG@100 (split seed 0) peaked at p 0.4 / l2 200 on ML-100K, 0.75 / 100 on
#: ml-latest-small and 0.5 / 300 on ML-1M, within noise of p 0.25-0.5 at the same l2.
EDLAE_P_GRID = (0.1, 0.25, 0.33, 0.5, 0.75)
EDLAE_L2_GRID = (30.0, 100.0, 300.0, 1000.0)

#: the rows of ``p`` and ``emphasis`` (:class:`EDLAE`'s table), which :func:`edlae_weights` checks too
P_ROW = Param("p", Float(0.0, 1.0, high_open=True), 0.33, "architecture",
              "dropout probability of each input entry; its L2 weight on item j is p/(1-p) (X^T X)_jj "
              "(Steck: ML-20M and Netflix 0.33, MSD 0.25; 0 is EASE)",
              tune=Tune(space="float:0.05:0.9", grid=EDLAE_P_GRID))
EMPHASIS_ROW = Param("emphasis", Choice(("full", "none")), "full", "architecture",
                     "full: only the dropped-out entries' errors count (EDLAE, zero diagonal); none: every "
                     "entry's (DLAE, B = (X^T X + Lambda)^-1 X^T X)", tune=Tune())


def dropout_l2(G: np.ndarray, l2: float, p: float) -> np.ndarray:
    """The diagonal of ``Lambda``: ``l2 + p / (1 - p) * diag(G)``, one L2 weight per item (float64)."""
    return l2 + p / (1.0 - p) * np.diag(G).astype(np.float64)


def edlae_weights(G: np.ndarray, l2: float, p: float, emphasis: str = "full", overwrite: bool = False) -> np.ndarray:
    """EDLAE's ``B`` (``emphasis="full"``) or DLAE's (``"none"``) from the dense Gram matrix
    ``G = X^T X``, by one Cholesky inverse of ``G + Lambda``; with ``overwrite`` ``G`` is the
    workspace (destroyed), so the peak memory is one items x items matrix."""
    l2 = _check_l2(l2)
    P_ROW.check(p)
    EMPHASIS_ROW.check(emphasis)
    lam = dropout_l2(G, l2, float(p))
    P = regularized_inverse(G, lam, overwrite, f"l2={l2:g}, p={p:g}", "X^T X + Lambda",
                            "use a larger l2 or dtype=float64")
    if emphasis == "full":
        return zero_diagonal_weights(P)
    P *= -lam[None, :]  # I - P Lambda: column j scaled by Lambda_jj
    P[np.diag_indices_from(P)] += 1.0
    return P


class EDLAE(EASE):
    """Full-rank EDLAE (Steck, NeurIPS 2020): EASE whose L2 weight is input dropout's,
    ``scores = X_batch @ B`` with ``B = I - P diagMat(1 / diag(P))``, ``P = (X^T X + Lambda)^{-1}``,
    ``Lambda = p / (1 - p) diagMat(diag(X^T X)) + l2 I`` (the derivation: :mod:`recvae.models.edlae`).

    ``p`` and ``l2``: the paper's best are p 0.33 with l2 300 (ML-20M) or 500 (Netflix) and
    p 0.25 with l2 70 (MSD); choose them on validation users with ``recvae tune --model edlae``
    (its default grid: every ``p`` of ``EDLAE_P_GRID`` with every ``l2`` of ``EDLAE_L2_GRID``,
    one Gram matrix for all) or :func:`recvae.tuning.search`. ``emphasis="none"`` gives the
    denoising linear autoencoder without emphasis (DLAE, ``B = (X^T X + Lambda)^{-1} X^T X``,
    its diagonal free). ``dtype``, memory and time are EASE's: one dense items x items matrix
    while fitting (8 bytes per entry in float64; 3.2 GB for ML-20M's 20,108 items), ``B_`` of
    that size afterwards, O(n_items^3) for the factorisation.

    Attributes after ``fit``: ``B_`` (n_items, n_items), the whole model: a user's scores are the
    history times ``B_``, and row ``i`` is what ``similar_items(i)`` ranks. No factors:
    ``item_factors`` and ``user_factors`` raise :class:`~recvae.errors.ParameterError`. Also
    ``n_items_``, ``fit_seconds_``.
    """

    PARAMETERS = (
        Param("l2", Float(0.0, low_open=True), 300.0, "architecture",
              "L2 weight lambda added to the dropout's p/(1-p) diag(X^T X) (Steck: ML-20M 300, Netflix 500, MSD 70)",
              tune=Tune(space="log:1:10000", grid=EDLAE_L2_GRID)),
        P_ROW,
        EMPHASIS_ROW,
        by_name(EASE.PARAMETERS)["dtype"],
    )

    def _weights(self, G: np.ndarray, overwrite: bool = False) -> np.ndarray:
        return edlae_weights(G, self.l2, self.p, self.emphasis, overwrite=overwrite)
