"""How each family's trial is fit, each way once: EASE's and EDLAE's trials share one Gram matrix, Mult-VAE
runs the paper's beta heuristic in two runs (and, in a plain grid, the paper as published
first), any other model one plain fit with early stopping on validation."""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from recvae.evaluation import evaluate
from recvae.models import make_model
from recvae.models.base import as_csr
from recvae.models.ease import EASE, _check_l2, gram_matrix
from recvae.tuning import spaces
from recvae.tuning.candidates import Candidate, describe
from recvae.tuning.spaces import EASE_GRID, HEURISTIC_NETWORK, RUN_SETTINGS
from recvae.tuning.trials import SELECTION_METRIC, Trial, Trials, validation_score

logger = logging.getLogger("recvae.tuning")

#: run 2 of the beta heuristic takes this model seed offset: with run 1's seed it would repeat run
#: 1 exactly up to run 1's best epoch (same initialisation, same slope) and so add nothing
HEURISTIC_SEED_OFFSET = 1000


class Gram:
    """The closed-form item-item models (EASE, EDLAE) on one training matrix: the Gram matrix
    computed once per dtype, for every trial of every such model."""

    def __init__(self, train):
        self.X = as_csr(train, "train")
        self.cache = {}  # dtype -> (G, seconds it took)

    def model(self, params: dict, name: str = "ease") -> tuple[EASE, float]:
        """The model ``name`` with ``params`` fitted from the shared Gram matrix (its
        ``_weights``, as its ``fit`` computes them), and what a fit alone would take."""
        estimator = make_model(name, **params)
        dtype = np.dtype(estimator.dtype)
        start = time.perf_counter()
        if dtype not in self.cache:
            self.cache[dtype] = (gram_matrix(self.X, dtype), time.perf_counter() - start)
            start = time.perf_counter()
        G, gram_seconds = self.cache[dtype]
        estimator.B_ = estimator._weights(G)
        estimator.n_items_ = self.X.shape[1]
        return estimator, time.perf_counter() - start + gram_seconds


def select_ease_l2(train, validation, grid=EASE_GRID, metric: str = SELECTION_METRIC, batch_size: int = 1000,
                   dtype="float64"):
    """Pick EASE's ``l2`` on validation: fit on ``train`` for each value of ``grid`` and keep
    the one with the highest validation ``metric`` (default NDCG@100, the paper's selection
    metric; ties go to the first grid value).

    ``validation`` is a HeldOutUsers-like object (``.fold_in``/``.heldout``) or a
    ``(fold_in, heldout)`` tuple. The Gram matrix is computed once for the whole grid.

    Returns ``(best_l2, table)``: ``table`` is a list of dicts ``{"l2", metric, "stderr",
    "seconds"}`` in grid order.
    """
    gram = Gram(train)
    grid = [_check_l2(v, "grid") for v in np.atleast_1d(grid)]
    if not grid:
        raise ValueError("grid: expected at least one l2 value")
    try:
        name, k = metric.split("@")
        k = int(k)
    except (AttributeError, ValueError):
        raise ValueError(f"metric: expected a name like 'ndcg@100', got {metric!r}") from None
    EASE(dtype=dtype)._check_params()
    table = []
    for l2 in grid:
        model, seconds = gram.model({"l2": l2, "dtype": dtype})
        s = evaluate(model, validation, ks=(k,), batch_size=batch_size, metrics=(name,), warn_few=False)[metric]
        table.append({"l2": l2, metric: s.mean, "stderr": s.stderr, "seconds": seconds})
        logger.info("EASE l2=%g: validation %s=%.5f (%.5f)", l2, metric, s.mean, s.stderr)
    best = max(table, key=lambda row: row[metric])
    return best["l2"], table


def ease_trials(trials: Trials, grid=EASE_GRID, params: dict | None = None) -> None:
    """One trial per ``l2`` of ``grid`` (named ``l2=V``), through :func:`select_ease_l2`."""
    params = params or {}
    trials.check_stop("l2 grid")
    _, table = select_ease_l2(trials.train, trials.validation, grid=grid, dtype=params.get("dtype", "float64"))
    for row in table:
        trials.add(Trial(f"l2={row['l2']:g}", "ease", {**params, "l2": row["l2"]}, row[SELECTION_METRIC],
                         row["seconds"]))


def full_run_updates(model: str, params: dict, n_train_users: int) -> int:
    """Updates in a whole run (epochs x updates per epoch): the slope over which beta is
    annealed to 1.0, so the schedule scales with the data instead of being fixed in updates."""
    estimator = make_model(model, **params)
    return estimator.epochs * math.ceil(n_train_users / estimator.batch_size)


def beta_heuristic(trials: Trials, model: str, params: dict, suffix: str = "") -> tuple[Trial, Trial | None]:
    """The paper's heuristic for beta (Liang et al. 2018, section 2.2.2) in two runs.

    Run 1 (``anneal-1``) anneals beta linearly to 1.0 over the whole run (``total_anneal_steps``
    = epochs x updates per epoch, so the schedule scales with the data instead of being fixed
    in updates); its beta at the best validation epoch becomes the cap of run 2
    (``heuristic``), which starts afresh with model seed ``random_state +
    HEURISTIC_SEED_OFFSET`` and the same slope, so beta reaches the cap where run 1 peaked
    and stays there. Run 1 diverging before an epoch finished leaves no cap: no run 2 (None).
    """
    slope = full_run_updates(model, params, trials.train.n_users)
    run1 = trials.run("anneal-1" + suffix, model, {**params, "anneal_cap": 1.0, "total_anneal_steps": slope})
    if run1.beta is None:  # it diverged before an epoch finished: no beta to cap run 2 at
        logger.warning("trial %s: no best epoch, so no heuristic run 2", run1.name)
        return run1, None
    seed = params.get("random_state") or 0
    run2 = trials.run("heuristic" + suffix, model, {**params, "anneal_cap": run1.beta, "total_anneal_steps": slope,
                                                    "random_state": seed + HEURISTIC_SEED_OFFSET})
    return run1, run2


def paper_params(params: dict) -> dict:
    """Mult-VAE as published: only the run settings of ``params``, the paper's network and schedule,
    and no early stopping unless ``params`` give a ``patience`` (the notebook trains every epoch)."""
    return {"patience": None, **{k: v for k, v in params.items() if k in RUN_SETTINGS}}


def multvae_trials(trials: Trials, params: dict, points=({},), network: dict | None = None) -> None:
    """The paper as published (``paper``), then :func:`beta_heuristic` on ``network`` (default
    ``HEURISTIC_NETWORK``) for each grid point, the point's values over ``params``."""
    network = HEURISTIC_NETWORK if network is None else network
    trials.run("paper", "multvae", paper_params(params))
    for point in points:
        suffix = " " + describe(point) if point else ""
        beta_heuristic(trials, "multvae", {**network, **params, **spaces.model_values(point)}, suffix)


class Plan:
    """Fits candidates on one split, each by its family's way: :meth:`fit` returns the runs of
    one trial (Mult-VAE's heuristic: two) into ``trials``; ``params``: each model's fixed
    parameters; ``named``: runs named by their values (a plain grid's table lists every run),
    else by the trial (a study's table lists each trial's better run)."""

    def __init__(self, trials: Trials, params: dict, named: bool):
        self.trials, self.params, self.named = trials, params, named
        self.gram = None

    def fit(self, candidate: Candidate) -> list[Trial]:
        model = candidate.model
        fixed = self.params.get(model, {})
        params = {**spaces.base_params(model), **fixed, **spaces.model_values(candidate.values)}
        if candidate.plan == "paper":
            return [self.trials.run("paper", model, paper_params(fixed))]
        kind = spaces.family(model)
        name = candidate.name
        if kind == "gram":
            self.trials.check_stop(name)
            if self.gram is None:
                self.gram = Gram(self.trials.train)
            estimator, seconds = self.gram.model(params, model)
            score = validation_score(estimator, self.trials.validation)
            # the run's model is fitted afresh (its fit) once chosen: none kept here
            return [self.trials.add(Trial(name if self.named else model, model, params, score, seconds))]
        if kind == "beta-heuristic":
            suffix = (" " + name if name else "") if self.named else ""
            return [r for r in beta_heuristic(self.trials, model, params, suffix) if r is not None]
        return [self.trials.run(name if self.named else model, model, params)]
