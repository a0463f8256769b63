"""Choosing hyperparameters on validation users: grids, the paper's beta heuristic, trial tables.

``recvae tune`` and ``benchmarks/paper_table.py`` choose through this module, one code path:
every trial is fit on the training users and scored by its validation NDCG@100 (a neural
model's best epoch, the one early stopping keeps); the best trial wins, the first on ties.
Test users are never seen here.

What is tried, per model (``DEFAULT_GRIDS``; ``recvae tune --grid NAME=V1,V2`` declares others):

* ``ease``: one trial per ``l2`` (the Gram matrix is computed once for the grid).
* ``multvae``: the paper as published (its network, beta = min(0.2, step / 200,000)), then for
  each grid point the paper's beta heuristic in two runs (:func:`beta_heuristic`) on
  ``HEURISTIC_NETWORK``; the grid varies the network around it (default: latent 50 and 200).
* ``recvae``: one trial per grid point on the reference defaults (default: gamma 0.0025, 0.005,
  0.01).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recvae.evaluation import evaluate
from recvae.errors import ParameterError
from recvae.experiment import DataSpec, RunConfig, RunResult, load_split, write_run_dir
from recvae.models import checks, make_model
from recvae.models.base import as_csr
from recvae.models.ease import EASE, _check_l2, ease_weights, gram_matrix
from recvae.models.registry import is_neural
from recvae.models.training_loop import NonFiniteLossError
from recvae.models.vae import KL_WEIGHTINGS
from recvae.rundir import RunDir

logger = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@100"
EASE_GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
# The heuristic runs' network, chosen on ML-1M validation NDCG@100 (anneal-1 schedule; split
# seed 0, then seeds 1 and 2). The paper's I-600-200-600-I: 0.409 on seed 0. Latent 100: 0.413,
# 50: 0.418, 25: 0.414; latent 50 with hidden 1000: 0.421, 1500: 0.424. Each user's KL weighted
# by activity: latent 50 0.420; with hidden 1000 / 1500 / 2500: 0.425 / 0.429 / 0.424 (seeds
# 0-2, hidden 1000 vs 1500: 0.416 vs 0.418 on average; 1000 kept: 0.54 vs 0.74 s per epoch keeps
# the ML-1M table under 20 minutes). No gain from weight decay (lam 1e-5..1e-4), dropout 0.3 /
# 0.6 / 0.7, batch 100 / 250, relu, lr 3e-4 / 3e-3 or a constant beta (see the closing notes).
HEURISTIC_NETWORK = {"hidden_dims": (1000,), "latent_dim": 50, "kl_weighting": "activity"}
#: run 2 of the beta heuristic takes this model seed offset: with run 1's seed it would repeat run
#: 1 exactly up to run 1's best epoch (same initialisation, same slope) and so add nothing
HEURISTIC_SEED_OFFSET = 1000
#: models whose KL weight beta is annealed (their trials report beta at the best epoch)
BETA_MODELS = ("multvae", "binary-multvae")
#: settings of how a model is trained, not what it is: the paper's trial of ``multvae`` keeps them
RUN_SETTINGS = ("epochs", "patience", "batch_size", "device", "precision", "random_state", "show_progress",
                "eval_batch_size")


def _parsed(convert, check):
    """A grid value's parser: ``convert`` the text, then the model's own check of the value
    (:mod:`recvae.models.checks`), so a grid judges a value as the estimator does."""
    def parse(name: str, text: str):
        return check(name, convert(text))
    return parse


_positive_int = _parsed(int, checks.positive_int)
_positive_float = _parsed(float, checks.positive_number)
_probability = _parsed(float, checks.probability)
_kl_weighting = _parsed(str, lambda name, v: checks.one_of(name, v, KL_WEIGHTINGS))


#: per model, what a grid may vary: name -> (parser of one value, what it expects)
TUNABLE = {
    "ease": {"l2": (_positive_float, "positive numbers such as 100,500")},
    "multvae": {
        "latent_dim": (_positive_int, "positive integers such as 50,200"),
        "hidden_dim": (_positive_int, "positive integers (one hidden layer's width) such as 600,1000"),
        "dropout": (_probability, "probabilities in [0, 1) such as 0.3,0.5"),
        "lr": (_positive_float, "positive numbers such as 3e-4,1e-3"),
        "kl_weighting": (_kl_weighting, "'uniform' and/or 'activity'"),
    },
    "recvae": {
        "gamma": (_positive_float, "positive numbers such as 0.0025,0.005"),
        "latent_dim": (_positive_int, "positive integers such as 100,200"),
        "dropout": (_probability, "probabilities in [0, 1) such as 0.3,0.5"),
        "lr": (_positive_float, "positive numbers such as 3e-4,1e-3"),
    },
}
DEFAULT_GRIDS = {
    "ease": {"l2": EASE_GRID},
    "multvae": {"latent_dim": (50, 200)},
    "recvae": {"gamma": (0.0025, 0.005, 0.01)},
}


@dataclass
class Trial:
    """One configuration fit on the training users and scored on the validation users."""

    name: str  # e.g. "anneal-1 latent_dim=50"
    model: str  # a name of recvae.experiment.MODELS
    params: dict  # the model's hyperparameters (those given; the rest are its defaults)
    validation: float  # validation NDCG@100 (neural models: at the best epoch)
    seconds: float  # fit time
    best_epoch: int | None = None
    beta: float | None = None  # Mult-VAE's KL weight at the best epoch
    estimator: object = field(default=None, repr=False, compare=False)
    note: str | None = None  # e.g. the loss diverged (validation -inf when nothing was learnt)

    def row(self, columns=(), with_model: bool = False) -> dict:
        """A line of the trial table; ``columns``: hyperparameters shown (their effective values;
        empty where the model has no such parameter); ``with_model``: a column naming the model."""
        model = make_model(self.model, **self.params)
        values = {c: _display(getattr(model, "hidden_dims" if c == "hidden_dim" else c, None)) for c in columns}
        return {"trial": self.name, **({"model": self.model} if with_model else {}), **values, f"validation_{SELECTION_METRIC}": round(self.validation, 6),
                "best_epoch": self.best_epoch, "beta_at_best_epoch": None if self.beta is None else round(self.beta, 6),
                "seconds": round(self.seconds, 2), "note": self.note}


def _display(value):
    if isinstance(value, (tuple, list)):
        return "-".join(map(str, value))
    return value


class TuningStopped(Exception):
    """``before_trial`` asked to stop (a time budget): the trials that finished are kept."""


class Trials:
    """Trials run one after another on one split.

    ``on_trial(trial)`` sees each finished trial with its fitted ``estimator`` (paper_table
    evaluates it on test there); afterwards only the best trial keeps its estimator, so memory
    holds at most two fitted models. ``before_trial()`` returning True stops with
    :class:`TuningStopped` before the next trial starts. ``log``: one info line per trial (a
    study logs its own line per study trial instead).
    """

    def __init__(self, train, validation, on_trial=None, before_trial=None, log: bool = True):
        self.train, self.validation = train, validation
        self.on_trial, self.before_trial = on_trial, before_trial
        self.log = log
        self.trials: list[Trial] = []

    def run(self, name: str, model: str, params: dict) -> Trial:
        """Fit ``model`` with ``params`` (early stopping on validation) and record the trial."""
        self.check_stop(name)
        estimator = make_model(model, **params)
        start = time.perf_counter()
        note = None
        try:
            estimator.fit(self.train, validation=self.validation)
        except NonFiniteLossError as e:  # one diverging trial (a large lr of the grid) must not end the search
            note = (f"non-finite loss at epoch {e.epoch}" +
                    ("" if e.kept_epoch is None else f"; epoch {e.kept_epoch} kept"))
            logger.warning("trial %s: %s", name, note)
            if e.kept_epoch is None:  # nothing learnt: a trial that cannot be chosen
                return self.add(Trial(name, model, dict(params), float("-inf"), time.perf_counter() - start,
                                      note=note))
        seconds = time.perf_counter() - start
        if is_neural(model):
            score = estimator.best_score_
            beta = estimator.best_beta_ if model in BETA_MODELS else None  # RecVAE's "beta" is its gamma
            trial = Trial(name, model, dict(params), score, seconds, estimator.best_epoch_, beta, estimator, note)
        else:
            score = validation_score(estimator, self.validation)
            trial = Trial(name, model, dict(params), score, seconds, estimator=estimator)
        return self.add(trial)

    def check_stop(self, name: str) -> None:
        if self.before_trial is not None and self.before_trial():
            raise TuningStopped(name)

    def add(self, trial: Trial) -> Trial:
        if self.log:
                logger.info("trial %s: validation %s %.4f (%.1f s)", trial.name, SELECTION_METRIC, trial.validation,
                        trial.seconds)
        self.trials.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        best = self.best
        for t in self.trials:  # a fitted model can be large (items x hidden): keep the best's only
            if t is not best:
                t.estimator = None
        return trial

    @property
    def best(self) -> Trial:
        """The trial with the highest validation NDCG@100 (the first of equal ones)."""
        if not self.trials:
            raise ValueError("no trial has run")
        return select(self.trials)


def best_estimator(trials: Trials):
    """The best trial's fitted model; EASE's trials share one Gram matrix and keep no model, so
    the chosen one is fitted here (its fit time then becomes the trial's ``seconds``)."""
    best = trials.best
    if best.estimator is None:
        start = time.perf_counter()
        best.estimator = make_model(best.model, **best.params).fit(trials.train)
        best.seconds = time.perf_counter() - start
    return best.estimator


def select(trials: list[Trial]) -> Trial:
    """The trial with the highest validation NDCG@100; ties go to the earliest."""
    return max(trials, key=lambda t: t.validation)  # max() keeps the first of equal values


def validation_score(model, validation) -> float:
    name, k = SELECTION_METRIC.split("@")
    return float(evaluate(model, validation, ks=(int(k),), metrics=(name,))[SELECTION_METRIC].mean)


# -- the searches ------------------------------------------------------------------------------

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
    X = as_csr(train, "train")
    grid = [_check_l2(v, "grid") for v in np.atleast_1d(grid)]
    if not grid:
        raise ValueError("grid: expected at least one l2 value")
    try:
        name, k = metric.split("@")
        k = int(k)
    except (AttributeError, ValueError):
        raise ValueError(f"metric: expected a name like 'ndcg@100', got {metric!r}") from None
    EASE(dtype=dtype)._check_params()
    start = time.perf_counter()
    G = gram_matrix(X, np.dtype(dtype))
    gram_seconds = time.perf_counter() - start
    table = []
    for l2 in grid:
        start = time.perf_counter()
        model = EASE(l2=l2, dtype=dtype)
        model.B_ = ease_weights(G, l2)
        model.n_items_ = X.shape[1]
        seconds = time.perf_counter() - start + gram_seconds  # what a fit alone would take
        res = evaluate(model, validation, ks=(k,), batch_size=batch_size, metrics=(name,))
        s = res[metric]
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


def multvae_trials(trials: Trials, params: dict, points=({},), network: dict | None = None) -> None:
    """The paper as published (``paper``), then :func:`beta_heuristic` on ``network`` (default
    ``HEURISTIC_NETWORK``) for each grid point, the point's values over ``params``."""
    network = HEURISTIC_NETWORK if network is None else network
    trials.run("paper", "multvae", {k: v for k, v in params.items() if k in RUN_SETTINGS})
    for point in points:
        suffix = " " + describe(point) if point else ""
        beta_heuristic(trials, "multvae", {**network, **params, **_model_values(point)}, suffix)


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, in the order declared."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def describe(point: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def describe_grid(grid: dict) -> str:
    return " x ".join(f"{k}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}" for k, vs in grid.items())


def _model_values(point: dict) -> dict:
    """A grid point as the model's parameters (``hidden_dim`` is one hidden layer's width)."""
    return {("hidden_dims" if k == "hidden_dim" else k): ((v,) if k == "hidden_dim" else v) for k, v in point.items()}


def parse_grid(specs, model: str) -> dict:
    """``["latent_dim=50,200", "dropout=0.5"]`` -> ``{"latent_dim": (50, 200), "dropout": (0.5,)}``;
    no specs: ``DEFAULT_GRIDS[model]``. Errors name the grid entry and what it expects."""
    if model not in TUNABLE:
        raise ValueError(f"model: tune takes {', '.join(TUNABLE)}, got {model!r}")
    if not specs:
        return dict(DEFAULT_GRIDS[model])
    tunable = TUNABLE[model]
    grid = {}
    for spec in specs:
        name, sep, values = str(spec).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            first = next(iter(tunable))
            raise ValueError(f"grid {spec!r}: expected NAME=V1,V2,... such as {first}="
                             f"{','.join(f'{v:g}' for v in DEFAULT_GRIDS[model].get(first, ())[:2])}")
        if name not in tunable:
            raise ValueError(f"grid {spec}: {name!r} is not tunable for {model}; tunable: {', '.join(tunable)}")
        if name in grid:
            raise ValueError(f"grid {spec}: {name!r} given twice; list all its values in one NAME=V1,V2")
        parse, expected = tunable[name]
        texts = [t.strip() for t in values.split(",") if t.strip()]
        if not texts:
            raise ValueError(f"grid {name}={values}: no values; expected {expected}")
        parsed = []
        for text in texts:
            try:
                parsed.append(parse(name, text))
            except ValueError:
                raise ValueError(f"grid {name}={text}: expected {expected}") from None
        grid[name] = tuple(dict.fromkeys(parsed))  # a value repeated is one trial
    return grid


def check_grid(model: str, grid: dict, params: dict) -> list[dict]:
    """The grid's points, each checked by building its model (before any data is read).
    A hyperparameter both fixed in ``params`` and varied by the grid is an error."""
    both = [n for n in grid if n in params or (n == "hidden_dim" and "hidden_dims" in params)]
    if both:
        raise ValueError(f"grid {both[0]}=...: {both[0]} is also given as a fixed value; give it in one place")
    if model == "multvae":
        chosen = [k for k in ("anneal_cap", "total_anneal_steps", "beta") if k in params]
        if chosen:
            raise ParameterError(chosen[0], "tune chooses Mult-VAE's beta schedule by the paper's heuristic; "
                                            "leave it out (train takes it)")
    points = grid_points(grid)
    for point in points:
        try:
            make_model(model, **{**(HEURISTIC_NETWORK if model == "multvae" else {}), **params, **_model_values(point)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid {describe(point)}: {e}") from None
    return points


def search(model: str, train, validation, grid: dict, params: dict | None = None, on_trial=None) -> Trials:
    """Every trial of ``grid`` (see :func:`parse_grid`) for ``model`` on one split, ``params``
    fixed (run settings such as epochs and device, and any hyperparameter not in the grid)."""
    params = dict(params or {})
    points = check_grid(model, grid, params)
    trials = Trials(train, validation, on_trial=on_trial)
    if model == "ease":
        ease_trials(trials, grid["l2"], {k: v for k, v in params.items() if k != "l2"})
    elif model == "multvae":
        multvae_trials(trials, params, points)
    else:
        for point in points:
            trials.run(describe(point), model, {**params, **_model_values(point)})
    return trials


# -- recvae tune -------------------------------------------------------------------------------

@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial
    run: RunResult  # the chosen configuration's model, evaluated on validation and test users
    columns: tuple  # the hyperparameters the table shows
    #: the chosen trial as a run's settings (what ``run.json`` records): a later ``tune --refit``
    #: hands it to ``recvae refit`` to retrain the chosen model on every user
    config: RunConfig | None = None
    study: bool = False  # the trials came from an Optuna study (the table names each trial's model)

    def table(self) -> list[dict]:
        return [{**t.row(self.columns, with_model=self.study), "selected": t is self.best} for t in self.trials]


def tune(data: DataSpec, model: str, grid: dict | None = None, params: dict | None = None,
         out: str | os.PathLike | None = None, split_seed: int = 0, n_heldout_users: int | None = None,
         overwrite: bool = False, show_progress: bool = False) -> TuneResult:
    """Choose ``model``'s hyperparameters on validation users and keep the chosen model.

    The data are split as :func:`recvae.experiment.run` splits them (``split_seed``,
    ``n_heldout_users``); every trial of :func:`search` is fit on the training users and
    scored on the validation users; the best trial's fitted model is then evaluated on the
    validation and test users (test users: once, for that model only) and, when ``out`` is
    given, written as a normal run directory (``run.json`` holds the chosen parameters, so
    ``recvae train`` with them gives the same model) with ``tuning.csv``, the trial table.
    Everything is checked before the data are read; nothing is written until the trials end.
    """
    params = dict(params or {})
    if model not in TUNABLE:
        raise ValueError(f"model: tune takes {', '.join(TUNABLE)}, got {model!r}")
    grid = parse_grid(None, model) if grid is None else grid
    check_grid(model, grid, params)
    data.check_optional()
    out = Path(out) if out is not None else None
    config = RunConfig(data=data, model=model, params=params, split_seed=split_seed, n_heldout_users=n_heldout_users)
    if out is None:
        return _tune(config, grid, None, overwrite, show_progress)
    run_dir = RunDir(out)
    run_dir.check_writable_for(overwrite=overwrite, resumable=False)
    created = not run_dir.path.exists()
    with run_dir.lock():  # one writer: held while the trials run, so none can take --out meanwhile
        try:
            return _tune(config, grid, run_dir, overwrite, show_progress)
        except BaseException:
            if created and not run_dir.entries():
                shutil.rmtree(run_dir.path, ignore_errors=True)
            raise


def _tune(config: RunConfig, grid: dict, run_dir: RunDir | None, overwrite: bool, show_progress: bool) -> TuneResult:
    model, params = config.model, config.params
    if run_dir is not None:  # the run directory records the seen items and what was kept
        split, seen, kept = load_split(config, show_progress, with_seen=True)
    else:
        split, seen, kept = load_split(config, show_progress), None, None
    trials = search(model, split.train, split.validation, grid, params)
    columns = tuple(grid) + (("anneal_cap",) if model == "multvae" else ())
    return _conclude(config, trials.trials, trials.best, lambda: best_estimator(trials), split, seen, kept, run_dir,
                     overwrite, columns)


def _conclude(config: RunConfig, trials: list[Trial], best: Trial, fitted, split, seen, kept, run_dir: RunDir | None,
              overwrite: bool, columns: tuple, study: bool = False, keep=()) -> TuneResult:
    """The chosen trial's model (``fitted()``) evaluated once on validation and test users and,
    with ``run_dir``, written there as a normal run with ``tuning.csv``; ``keep``: files of the
    directory that stay (the study)."""
    if best.validation == float("-inf"):
        raise ValueError(f"model {config.model}: every trial's training loss became non-finite before an epoch "
                         f"finished ({len(trials)} trials); lower lr, or try precision='fp32'")
    estimator = fitted()
    result = RunResult(estimator, evaluate(estimator, split.validation, ks=config.ks),
                       evaluate(estimator, split.test, ks=config.ks), best.seconds, split)
    chosen = RunConfig(data=config.data, model=best.model,
                       params={k: v for k, v in best.params.items() if k != "show_progress"},
                       split_seed=config.split_seed, n_heldout_users=config.n_heldout_users)
    tuned = TuneResult(trials, best, result, columns, chosen, study)
    if run_dir is not None:
        try:
            write_run_dir(run_dir.path, chosen, split, result, overwrite=overwrite, locked=True, seen=seen, kept=kept,
                          extra=lambda rd: rd.write_tuning(tuned.table()), keep=keep)
        except BaseException:  # stopped or failed while writing: no half-written run stays
            run_dir.empty(keep)
            raise
    return tuned
