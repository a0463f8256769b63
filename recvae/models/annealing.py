"""Schedules for beta, the weight of the KL term in the Mult-VAE objective (where the KL is annealed).

The objective of one batch is ``NLL + beta * KL``. The paper (Liang et al., 2018, Sec. 2.2.2)
anneals beta linearly from 0 by one step per gradient update,

    beta(step) = min(anneal_cap, step / total_anneal_steps),

with ``anneal_cap=0.2`` and ``total_anneal_steps=200_000`` in the released notebook (``step`` is
the number of updates done before the current one, so the first update uses beta = 0).

Its heuristic for choosing the cap: train once annealing towards 1.0, track validation
NDCG@100 per epoch, and take the beta reached at the best epoch (``MultVAE.best_beta_``) as
``anneal_cap`` of a second run from scratch; :func:`cap_from_history` reads it off a history.
"""

from __future__ import annotations

from recvae.errors import ParameterError

from dataclasses import dataclass

#: notebook values
ANNEAL_CAP = 0.2
TOTAL_ANNEAL_STEPS = 200_000


@dataclass(frozen=True)
class LinearAnnealing:
    """beta = min(cap, step / total_steps); ``total_steps=0`` means beta = cap from the start."""

    cap: float = ANNEAL_CAP
    total_steps: int = TOTAL_ANNEAL_STEPS

    def __post_init__(self) -> None:
        if not self.cap >= 0:
            raise ParameterError("anneal_cap", f"expected a number >= 0, got {self.cap!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 0:
            raise ParameterError("total_anneal_steps", f"expected an integer >= 0, got {self.total_steps!r}")

    def __call__(self, step: int) -> float:
        if self.total_steps == 0:
            return float(self.cap)
        return float(min(self.cap, step / self.total_steps))


@dataclass(frozen=True)
class ConstantBeta:
    """beta fixed for every update (beta=1 is the plain ELBO)."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ParameterError("beta", f"expected a number >= 0, got {self.beta!r}")

    def __call__(self, step: int) -> float:
        return float(self.beta)


def make_schedule(beta: float | None, anneal_cap: float, total_anneal_steps: int):
    """A constant schedule when ``beta`` is given, else linear annealing."""
    if beta is not None:
        return ConstantBeta(float(beta))
    return LinearAnnealing(float(anneal_cap), total_anneal_steps)


def cap_from_history(history: list[dict], metric: str = "val_ndcg@100") -> float:
    """The beta of the epoch with the best ``metric``: the cap for the paper's second run.

    ``history`` is ``MultVAE.history_`` of a run annealed towards 1.0 (first best on ties).
    """
    rows = [r for r in history if r.get(metric) is not None]
    if not rows:
        raise ParameterError("history", f"no epoch has {metric!r}; fit with validation data first")
    best = max(rows, key=lambda r: r[metric])  # max keeps the first of equal values
    return float(best["beta"])
