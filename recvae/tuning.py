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

Or an Optuna study (:func:`tune_study`; ``recvae tune --trials``, needs ``recvae[tune]``, imported
only then): ranges (``--space``) sampled by TPE, several model families, a grid's points as
queued trials; the study lives in a database (the run directory's ``study.db``, or a shared
``--storage``), so a stopped search keeps its finished trials and several processes share one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import socket
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
from recvae.models.ease import EASE, EASE_GRID, _check_l2, ease_weights, gram_matrix
from recvae.models.registry import is_neural
from recvae.models.training_loop import NonFiniteLossError
from recvae.models.vae import KL_WEIGHTINGS
from recvae.optional import require
from recvae.rundir import STUDY_FILES, RunDir, RunFinished

logger = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@100"
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
         overwrite: bool = False, show_progress: bool = False, cutoff=None, leave_last: int | None = None) -> TuneResult:
    """Choose ``model``'s hyperparameters on validation users and keep the chosen model.

    The data are split as :func:`recvae.experiment.run` splits them (``split_seed``,
    ``n_heldout_users``; in time with ``cutoff`` or ``leave_last``); every trial of :func:`search` is fit on the training users and
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
    config = RunConfig(data=data, model=model, params=params, split_seed=split_seed, n_heldout_users=n_heldout_users,
                       cutoff=cutoff, leave_last=leave_last)
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
    split, read = _load(config, run_dir, show_progress)
    trials = search(model, split.train, split.validation, grid, params)
    columns = tuple(grid) + (("anneal_cap",) if model == "multvae" else ())
    return _conclude(config, trials.trials, trials.best, lambda: best_estimator(trials), split, read, run_dir,
                     overwrite, columns)


def _load(config: RunConfig, run_dir: RunDir | None, show_progress: bool):
    """``(split, read)``: ``read``, what the run directory records of the same read of the data
    (see :func:`recvae.experiment.load_split`), only when there is a run directory to write."""
    if run_dir is None:
        return load_split(config, show_progress), None
    return load_split(config, show_progress, with_seen=True)


def _conclude(config: RunConfig, trials: list[Trial], best: Trial, fitted, split, read, run_dir: RunDir | None,
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
    chosen = dataclasses.replace(config, model=best.model,
                                 params={k: v for k, v in best.params.items() if k != "show_progress"})
    tuned = TuneResult(trials, best, result, columns, chosen, study)
    if run_dir is not None:
        try:
            write_run_dir(run_dir.path, chosen, split, result, overwrite=overwrite, locked=True, read=read,
                          extra=lambda rd: rd.write_tuning(tuned.table()), keep=keep)
        except BaseException:  # stopped or failed while writing: no half-written run stays
            run_dir.empty(keep)
            raise
    return tuned


# -- studies: recvae tune --trials (Optuna) -----------------------------------------------------
#
# A study keeps every finished trial in a database: by default SQLite in the run directory
# (``study.db``, named by recvae.rundir), so ``--resume`` after a kill keeps them; or any
# SQLAlchemy URL (``--storage``) that several processes or machines share. Each study trial is
# one configuration fit on the training users and scored on the validation users, as a grid's.
# Mult-VAE's trials run the paper's beta heuristic (:func:`beta_heuristic`, two runs) and keep
# the better run. How many trials a study has: a trial counts while it is queued, running or
# complete; one started when the count below it is already the target ends at once, pruned
# without parameters (a surplus trial), so workers that start together never exceed it.

STUDY_NAME = "recvae-tune"
SPACE_KINDS = ("int", "float", "log", "cat")
SPACE_FORMS = "NAME=int:LOW:HIGH, NAME=float:LOW:HIGH, NAME=log:LOW:HIGH or NAME=cat:V1,V2,..."
INT_PARAMS = ("latent_dim", "hidden_dim")
CATEGORICAL_PARAMS = ("kl_weighting",)
#: what a study varies when no --space names a model's parameter
DEFAULT_SPACES = {
    "ease": ("l2=log:10:10000",),
    "multvae": ("latent_dim=int:25:300", "dropout=float:0.3:0.7", "lr=log:3e-4:3e-3"),
    "recvae": ("gamma=log:0.001:0.02", "dropout=float:0.3:0.7", "lr=log:2e-4:2e-3"),
}
#: shared storages: a worker records a heartbeat this often; a trial without one for GRACE
#: seconds (its worker was killed) is failed and queued again with the same parameters
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 60
#: how long a worker that joins a study waits for its maker to finish setting it up
SETUP_WAIT_SECONDS = 60.0
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter's range in a study: ``int``/``float`` uniform, ``log`` log-uniform
    (integers for an integer parameter), ``cat`` a list of values."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "cat":
            return "cat:" + ",".join(_text(v) for v in self.choices)
        return f"{self.kind}:{_text(self.low)}:{_text(self.high)}"

    def suggest(self, trial, key: str):
        if self.kind == "cat":
            return trial.suggest_categorical(key, list(self.choices))
        if self.name in INT_PARAMS:
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.kind == "log")
        return trial.suggest_float(key, float(self.low), float(self.high), log=self.kind == "log")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_models(text: str | list | tuple) -> tuple[str, ...]:
    """``"multvae,recvae"`` -> ``("multvae", "recvae")``; each must be tunable."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    unknown = [n for n in names if n not in TUNABLE]
    if not names or unknown:
        raise ParameterError("model", f"tune takes {', '.join(TUNABLE)} (one, or several separated by commas), "
                                      f"got {text!r}")
    return tuple(dict.fromkeys(names))


def _dimension(spec: str, models) -> Dimension:
    name, sep, rest = str(spec).partition("=")
    name = name.strip().replace("-", "_")
    kind, sep2, bounds = rest.partition(":")
    kind = kind.strip().lower()
    if not sep or not name or not sep2 or kind not in SPACE_KINDS:
        raise ValueError(f"space {spec!r}: expected {SPACE_FORMS}, such as latent_dim=int:50:400")
    takers = [m for m in models if name in TUNABLE[m]]
    if not takers:
        tunable = list(dict.fromkeys(n for m in models for n in TUNABLE[m]))
        raise ValueError(f"space {spec}: {name!r} is not tunable for {', '.join(models)}; tunable: {', '.join(tunable)}")
    parse, expected = TUNABLE[takers[0]][name]
    if kind == "cat":
        texts = [t.strip() for t in bounds.split(",") if t.strip()]
        if not texts:
            raise ValueError(f"space {spec}: no values; expected {name}=cat:V1,V2,... with {expected}")
        try:
            values = [parse(name, t) for t in texts]
        except ValueError:
            raise ValueError(f"space {spec}: expected {name}=cat:V1,V2,... with {expected}") from None
        return Dimension(name, "cat", choices=tuple(dict.fromkeys(values)))
    if name in CATEGORICAL_PARAMS:
        raise ValueError(f"space {spec}: {name} takes a list: {name}=cat:V1,V2,... with {expected}")
    if kind == "float" and name in INT_PARAMS:
        raise ValueError(f"space {spec}: {name} takes integers: int:LOW:HIGH, log:LOW:HIGH or cat:V1,V2,...")
    if kind == "int" and name not in INT_PARAMS:
        raise ValueError(f"space {spec}: {name} takes real numbers: float:LOW:HIGH, log:LOW:HIGH or cat:V1,V2,...")
    parts = bounds.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = (parse(name, p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"space {spec}: expected {name}={kind}:LOW:HIGH with LOW and HIGH {expected}") from None
    if not low < high:
        raise ValueError(f"space {spec}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
        raise ValueError(f"space {spec}: log:LOW:HIGH needs LOW above 0")
    return Dimension(name, kind, low, high)


def _fixed(name: str, params: dict) -> bool:
    return name in params or (name == "hidden_dim" and "hidden_dims" in params)


def parse_space(specs, models, params: dict | None = None) -> dict[str, dict[str, Dimension]]:
    """Each model's ranges: ``DEFAULT_SPACES`` less what ``params[model]`` fixes, with the
    ``--space`` entries (``["lr=log:1e-4:1e-2", "latent_dim=int:50:400"]``) over them, each for
    every model that tunes that name. Errors name the entry and the form it expects."""
    models = parse_models(models)
    params = params or {}
    given: dict[str, Dimension] = {}
    for spec in specs or ():
        dim = _dimension(spec, models)
        if dim.name in given:
            raise ValueError(f"space {spec}: {dim.name!r} given twice; give its range once")
        given[dim.name] = dim
    space = {}
    for model in models:
        fixed = params.get(model, {})
        dims = {d.name: d for d in (_dimension(s, (model,)) for s in DEFAULT_SPACES[model]) if not _fixed(d.name, fixed)}
        for name, dim in given.items():
            if name in TUNABLE[model]:
                if _fixed(name, fixed):
                    raise ValueError(f"space {name}=...: {name} is also given as a fixed value; give it in one place")
                dims[name] = dim
        if not dims:
            raise ValueError(f"space: nothing of {model} is left to tune (its default range is fixed: "
                             f"{', '.join(TUNABLE[model])}); give a --space")
        space[model] = dims
    return space


def check_study(models, space: dict | None, grid: dict | None, params: dict) -> None:
    """What a study will build, checked before any data is read: each model's fixed
    parameters (a model built from them), Mult-VAE's schedule left to the heuristic."""
    for model in models:
        fixed = params.get(model, {})
        if grid is not None:
            check_grid(model, grid, fixed)
            continue
        if model == "multvae":
            check_grid(model, {}, fixed)  # refuses anneal_cap, total_anneal_steps and beta
        try:
            make_model(model, **{**(HEURISTIC_NETWORK if model == "multvae" else {}), **fixed})
        except (TypeError, ValueError) as e:
            if isinstance(e, ParameterError):
                raise
            raise ValueError(f"model {model}: {e}") from None


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))


def study_settings(config: RunConfig, models, space, grid, params) -> dict:
    """What a study is (data, split, models, ranges or grid, fixed parameters): stored with it, and
    compared when a process resumes or joins it."""
    from dataclasses import asdict

    return _jsonable({
        "data": asdict(config.data),
        "split_seed": config.split_seed,
        "n_heldout_users": config.n_heldout_users,
        # a split in time's settings only when it is one: studies from before them stay comparable
        **{k: v for k, v in (("cutoff", config.cutoff), ("leave_last", config.leave_last)) if v is not None},
        "models": list(models),
        "space": None if space is None else {m: {n: d.describe() for n, d in dims.items()} for m, dims in space.items()},
        "grid": None if grid is None else {n: list(vs) for n, vs in grid.items()},
        "params": {m: {k: v for k, v in params.get(m, {}).items() if k != "show_progress"} for m in models},
    })


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key in ("data", "params") + tuple(now.get("models", ())):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


class _StudyRun:
    """One process's work on a study: its trials, the best model it fitted, the final choice."""

    def __init__(self, optuna, study, split, models, space, grid, params, n_trials):
        self.optuna, self.study, self.split = optuna, study, split
        self.models, self.space, self.grid, self.params = models, space, grid, params
        self.n_trials = n_trials
        self.several = len(models) > 1
        self.points = grid_points(grid) if grid is not None else None
        self.kept = None  # (trial number, validation, estimator): this process's best fitted model
        self.gram = {}  # EASE: one Gram matrix per dtype for all this process's EASE trials

    # -- counting ------------------------------------------------------------------------------
    def counted(self, below: int | None = None) -> int:
        """Trials that count towards the target: queued, running or complete (below ``below``)."""
        states = self._states("COMPLETE", "RUNNING", "WAITING")
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if t.state in states and (below is None or t.number < below))

    def _states(self, *names):
        return tuple(getattr(self.optuna.trial.TrialState, n) for n in names)

    # -- one trial -----------------------------------------------------------------------------
    def objective(self, trial) -> float:
        optuna = self.optuna
        if self.counted(below=trial.number) >= self.n_trials:
            raise optuna.TrialPruned("surplus: the study has its trials")
        if self.points is not None:
            index = trial.user_attrs.get("grid_point")
            if index is None:  # a grid's trials are its queued points
                raise optuna.TrialPruned("surplus: not a point of the grid")
            model, values = self.models[0], dict(self.points[index])
        else:
            model = trial.suggest_categorical("model", list(self.models)) if self.several else self.models[0]
            values = {n: d.suggest(trial, f"{model}.{n}" if self.several else n) for n, d in self.space[model].items()}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            result, other = self.fit(model, values)
        except Exception:
            raise
        except BaseException:  # SIGINT, SIGTERM: run again by the next start on the study
            trial.set_user_attr("interrupted", True)
            raise
        note = result.note
        if other is not None:
            kept_run = (f"{result.name} run kept ({other.name} run: validation {SELECTION_METRIC} "
                        f"{other.validation:.4f})")
            note = "; ".join(filter(None, [kept_run, note]))
        attrs = {"model": model, "values": values, "params": {k: v for k, v in result.params.items() if k != "show_progress"},
                 "seconds": result.seconds, "best_epoch": result.best_epoch, "beta": result.beta, "note": note}
        for key, value in _jsonable(attrs).items():
            trial.set_user_attr(key, value)
        if result.estimator is not None and (self.kept is None or result.validation > self.kept[1]):
            self.kept = (trial.number, result.validation, result.estimator)
        logger.info("trial %d of %d: %s %s: validation %s %.4f (%.1f s)", trial.number, self.n_trials, model,
                    describe(values) or "defaults", _metric_name(), result.validation, result.seconds)
        return result.validation

    def fit(self, model: str, values: dict) -> tuple[Trial, Trial | None]:
        """The trial's fit: ``(kept run, the other run)``; Mult-VAE runs the beta heuristic."""
        params = {**self.params.get(model, {}), **_model_values(values)}
        trials = Trials(self.split.train, self.split.validation, log=False)
        if model == "ease":
            return self.fit_ease(params), None
        if model == "multvae":
            start = time.perf_counter()
            run1, run2 = beta_heuristic(trials, "multvae", {**HEURISTIC_NETWORK, **params})
            runs = [r for r in (run1, run2) if r is not None]
            kept = trials.best  # the better run, the first of equal ones; it alone keeps its model
            kept.seconds = time.perf_counter() - start  # the trial's time: both runs
            return kept, next((r for r in runs if r is not kept), None)
        return trials.run(describe(values), model, params), None

    def fit_ease(self, params: dict) -> Trial:
        X = as_csr(self.split.train, "train")
        dtype = np.dtype(params.get("dtype", "float64"))
        start = time.perf_counter()
        if dtype not in self.gram:
            self.gram[dtype] = (gram_matrix(X, dtype), time.perf_counter() - start)
            start = time.perf_counter()
        G, gram_seconds = self.gram[dtype]
        estimator = EASE(**params)
        estimator.B_ = ease_weights(G, estimator.l2)
        estimator.n_items_ = X.shape[1]
        seconds = time.perf_counter() - start + gram_seconds  # what a fit alone would take
        score = validation_score(estimator, self.split.validation)
        # the run's model is fitted afresh (EASE.fit) once chosen: none kept here
        return Trial("ease", "ease", params, score, seconds)

    # -- the study's course --------------------------------------------------------------------
    def run(self, shared: bool) -> None:
        """Trials until the study has its target; then, on a shared storage, wait for the other
        workers' running trials (the choice needs them)."""
        optuna = self.optuna

        def full(study, _trial) -> None:
            if self.counted() >= self.n_trials:
                study.stop()

        waiting_said = False
        while True:
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
            if waiting or self.counted() < self.n_trials:
                self.study.optimize(self.objective, callbacks=[full])
                continue
            running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if not running or not shared:
                return
            if not waiting_said:
                logger.info("waiting for %d trial(s) of other workers (%s)", len(running),
                            ", ".join(map(str, running)))
                waiting_said = True
            time.sleep(POLL_SECONDS)
            _quietly(optuna, optuna.storages.fail_stale_trials, self.study)

    def finished(self) -> list:
        complete = self.optuna.trial.TrialState.COMPLETE
        return sorted((t for t in self.study.get_trials(deepcopy=False) if t.state == complete and "params" in t.user_attrs),
                      key=lambda t: t.number)

    def results(self) -> list[Trial]:
        return [Trial(str(t.number), t.user_attrs["model"], dict(t.user_attrs["params"]), float(t.value),
                      float(t.user_attrs.get("seconds") or 0.0), t.user_attrs.get("best_epoch"), t.user_attrs.get("beta"),
                      note=t.user_attrs.get("note")) for t in self.finished()]

    def estimator_of(self, best: Trial):
        """The chosen trial's fitted model: this process's own when it fitted it, else fitted
        again from the trial's exact parameters (the same weights: every fit is seeded)."""
        if self.kept is not None and str(self.kept[0]) == best.name:
            return self.kept[2]
        logger.info("fitting the model of trial %s again (it ran before a resume, or in another process)", best.name)
        estimator = make_model(best.model, **best.params)
        if is_neural(best.model):
            return estimator.fit(self.split.train, validation=self.split.validation)
        return estimator.fit(self.split.train)


def _metric_name() -> str:
    name, k = SELECTION_METRIC.split("@")
    return f"{name.upper()}@{k}"


def _quietly(optuna, fn, *args, **kwargs):
    """Call an Optuna function that warns it is experimental (its heartbeat API), without the warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return fn(*args, **kwargs)


def _retry(study, trial) -> None:
    """Queue a stopped trial again with its parameters (and grid point): run again, as it was."""
    attrs = {k: trial.user_attrs[k] for k in ("grid_point",) if k in trial.user_attrs}
    study.enqueue_trial(dict(trial.params), user_attrs={**attrs, "retry_of": trial.number})


def _open_storage(optuna, url: str, shared: bool):
    """An RDB storage; a shared one records heartbeats so a killed worker's trial is run again."""
    import inspect

    kwargs = {}
    if shared:
        # Optuna 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback
        names = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"
        kwargs = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS, callback: _retry}
    for attempt in range(4):
        try:
            return _quietly(optuna, optuna.storages.RDBStorage, url, **kwargs)
        except Exception as e:  # a bad URL, a missing driver, a server that cannot be reached
            text = str(e)
            # processes that create a new database together race to make its tables: the loser retries
            if attempt < 3 and any(s in text for s in ("UNIQUE constraint", "already exists", "database is locked",
                                                       "Duplicate entry", "duplicate key")):
                time.sleep(0.5 * (attempt + 1))
                continue
            if not shared:
                raise
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise ParameterError("storage", f"cannot open the study storage {url!r}: {first}") from None


def _open_study(optuna, storage, name: str, settings: dict, sampler, create: bool, where: str, n_trials):
    """Create the study (when ``create``) or load it; a study made by another process is
    joined once its maker has set it up, and only if its settings are these."""
    study = None
    if create:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
        except optuna.exceptions.DuplicatedStudyError:
            study = None
        else:
            study.set_user_attr("recvae", settings)
            study.set_user_attr("n_trials", n_trials)
            return study, True
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise ParameterError(where.lstrip("-").replace("-", "_"),
                             f"no study named {name!r} there to continue") from None
    deadline = time.monotonic() + SETUP_WAIT_SECONDS
    while not study.user_attrs.get("ready"):
        if time.monotonic() > deadline:
            raise ValueError(f"{where}: the study {name!r} was not made by recvae tune, or its maker stopped while "
                             "setting it up; choose another --study-name")
        time.sleep(POLL_SECONDS / 4)
    saved = study.user_attrs.get("recvae", {})
    differences = _differences(saved, settings)
    if differences:
        detail = "; ".join(f"{k}: {a!r} in the study, now {b!r}" for k, a, b in differences[:3])
        raise ValueError(f"{where}: the study {name!r} was made with other settings ({detail}); give the study's "
                         "settings, or another --study-name")
    return study, False


def _queue_grid(study, points: list, n_trials: int) -> None:
    """Queue the grid's first ``n_trials`` points that no trial holds yet, in order."""
    import optuna

    held = {t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False)
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.WAITING)}
    for index in range(min(n_trials, len(points))):
        if index not in held:
            study.enqueue_trial({}, user_attrs={"grid_point": index})


def _retry_stopped(optuna, study, own: bool) -> int:
    """Queue again the trials a stop cut short: interrupted ones (SIGINT, SIGTERM) and, in a
    study only this process can be working on (``own``), those still marked running (SIGKILL)."""
    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = 0
    for t in trials:
        stopped = (own and t.state == TrialState.RUNNING) or (
            t.state in (TrialState.FAIL, TrialState.RUNNING) and t.user_attrs.get("interrupted"))
        if not stopped or t.number in retried:
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        _retry(study, t)
        again += 1
    return again


def _sampler(optuna, seed: int | None):
    """TPE whose random numbers for trial k come from ``(seed, k)``: one process repeats its
    study, and processes sharing a study draw different points (one TPE seeded alike in each
    would draw the same startup points in every process)."""

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number, self._tpe = None, None

        def _for(self, trial):
            if self._number != trial.number:
                state = np.random.SeedSequence([0 if seed is None else int(seed), trial.number]).generate_state(1)
                self._number, self._tpe = trial.number, optuna.samplers.TPESampler(seed=int(state[0]))
            return self._tpe

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            hook = getattr(self._for(trial), "before_trial", None)
            if hook is not None:
                hook(study, trial)

        def after_trial(self, study, trial, state, values):
            hook = getattr(self._for(trial), "after_trial", None)
            if hook is not None:
                hook(study, trial, state, values)

    return TrialSeededTPE()


def tune_study(data: DataSpec, models, n_trials: int | None = None, space: dict | None = None,
               grid: dict | None = None, params: dict | None = None, out: str | os.PathLike | None = None,
               storage: str | None = None, study_name: str = STUDY_NAME, resume: bool = False, split_seed: int = 0,
               n_heldout_users: int | None = None, overwrite: bool = False, show_progress: bool = False,
               seed: int | None = 0, cutoff=None, leave_last: int | None = None) -> TuneResult:
    """Choose a model and its hyperparameters with an Optuna study; keep the chosen model as a run.

    ``models``: one tunable model or several (the study chooses the family too). ``space``:
    each model's ranges (:func:`parse_space`; default ``DEFAULT_SPACES``), sampled by TPE
    seeded by ``seed``; or ``grid`` (one model): its points in order as trials. ``params``:
    fixed settings per model (``{"recvae": {"epochs": 50}}``). ``n_trials``: the study's target
    (a grid: its points; a resumed study: the target it had). The study is kept in ``out``'s
    ``study.db`` (``resume`` continues it: finished trials are kept, trials a stop cut short run
    again) or at ``storage``, a SQLAlchemy URL several processes may share (each joins the
    study named ``study_name``, or creates it). Selection and the run written to ``out`` are as
    :func:`tune`'s: validation users only; ``run.json`` holds the chosen trial's exact parameters.
    """
    optuna = require("optuna", "a tuning study (recvae tune --trials, --space, --storage, --resume)")
    models = parse_models(models)
    params = {m: dict((params or {}).get(m, {})) for m in models}
    if grid is not None and len(models) > 1:
        raise ParameterError("grid", "a grid tunes one model; with several models give ranges (--space)")
    if grid is not None and space is not None:
        raise ParameterError("grid", "a study searches a grid or ranges (--space), not both")
    if grid is None and space is None:
        space = parse_space(None, models, params)
    check_study(models, space, grid, params)
    points = grid_points(grid) if grid is not None else None
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ParameterError("trials", f"expected a positive number of trials, got {n_trials!r}")
    if points is not None and n_trials is not None and n_trials > len(points):
        raise ParameterError("trials", f"the grid has {len(points)} point(s), fewer than {n_trials} trials; "
                                       f"leave --trials out to try every point")
    if n_trials is None and points is not None:
        n_trials = len(points)
    if n_trials is None and not resume:
        raise ParameterError("trials", "a study needs its number of trials")
    if resume and storage is not None:
        raise ParameterError("resume", "continues the study in --out; a study at --storage is continued by "
                                       "running the same command again, without --resume")
    if resume and out is None:
        raise ParameterError("resume", "needs the run directory (out) that holds the study")
    data.check_optional()
    config = RunConfig(data=data, model=",".join(models), params={}, split_seed=split_seed,
                       n_heldout_users=n_heldout_users, cutoff=cutoff, leave_last=leave_last)
    settings = study_settings(config, models, space, grid, params)
    shared = storage is not None
    store = _open_storage(optuna, storage, shared=True) if shared else None  # checked before --out is made
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines: ours say more
    run_dir = RunDir(out) if out is not None else None
    if run_dir is not None:
        if resume:
            run_dir.check_resumable_study()
        else:
            run_dir.check_writable_for(overwrite=overwrite, resumable=run_dir.has_study() and not shared)
    created = run_dir is not None and not run_dir.path.exists()
    keep = () if shared else STUDY_FILES
    with run_dir.lock() if run_dir is not None else _nothing():
        try:
            # the data first: a data error leaves nothing behind (no study yet)
            split, read = _load(config, run_dir, show_progress)
            if run_dir is not None and not resume:
                run_dir.empty()  # --overwrite: a new study, in an emptied directory
            if store is None:
                store = _open_storage(optuna, run_dir.study_url(), shared=False) if run_dir is not None else None
            study, made = _open_study(optuna, store, study_name, settings, _sampler(optuna, seed),
                                      create=not resume, where="--resume" if resume else "--storage", n_trials=n_trials)
            if n_trials is None:
                n_trials = int(study.user_attrs.get("n_trials"))
            if resume and run_dir.state() == "finished" and len(_finished(optuna, study)) >= n_trials:
                raise RunFinished(f"--out {run_dir.path}: the study has its {n_trials} trials and the run is written: "
                                  "nothing to resume; give a larger --trials to run more")
            if made or resume:
                again = _retry_stopped(optuna, study, own=not shared)
                if again:
                    logger.info("%d trial(s) cut short by the stop will run again", again)
                if points is not None:
                    _queue_grid(study, points, n_trials)
                if resume and n_trials != study.user_attrs.get("n_trials"):
                    study.set_user_attr("n_trials", n_trials)
                study.set_user_attr("ready", True)
            else:
                _retry_stopped(optuna, study, own=False)
            work = _StudyRun(optuna, study, split, models, space, grid, params, n_trials)
            work.run(shared)
            trials = work.results()
            if not trials:
                raise ValueError(f"{'--storage' if shared else 'study'} {study_name!r}: no trial finished")
            best = select(trials)
            columns = tuple(dict.fromkeys(grid if grid is not None else (n for m in models for n in space[m])))
            columns += ("anneal_cap",) if "multvae" in models else ()
            return _conclude(config, trials, best, lambda: work.estimator_of(best), split, read, run_dir,
                             True, columns, study=True, keep=keep)
        except BaseException:
            if created and run_dir is not None and not run_dir.entries():
                shutil.rmtree(run_dir.path, ignore_errors=True)
            raise


def _finished(optuna, study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


@contextlib.contextmanager
def _nothing():
    yield None


def count_finished(storage: str, study_name: str = STUDY_NAME) -> int | None:
    """How many trials of the study at ``storage`` (a URL) finished; None when it cannot be read."""
    optuna = require("optuna", "a tuning study")
    try:
        study = _quietly(optuna, optuna.load_study, study_name=study_name, storage=storage)
        return len(_finished(optuna, study))
    except Exception:  # a stop message must not fail on the database
        return None
