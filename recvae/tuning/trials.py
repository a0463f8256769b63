"""A trial (one configuration fit on the training users and scored on the validation users),
the trials of one process, and the choice among them: the best validation NDCG@100, the first
of equal ones. Test users are never seen here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from recvae.evaluation import evaluate, evaluated_users
from recvae.models import make_model
from recvae.models.registry import is_neural, trains_by_epochs
from recvae.models.training_loop import NonFiniteLossError
from recvae.settings import read_record, to_record
from recvae.tuning import spaces

logger = logging.getLogger("recvae.tuning")

SELECTION_METRIC = "ndcg@100"


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
        values = {c: _display(getattr(model, spaces.shown(c), None)) for c in columns}
        return {"trial": self.name, **({"model": self.model} if with_model else {}), **values,
                f"validation_{SELECTION_METRIC}": round(self.validation, 6), "best_epoch": self.best_epoch,
                "beta_at_best_epoch": None if self.beta is None else round(self.beta, 6),
                "seconds": round(self.seconds, 2), "note": self.note}

    def record(self) -> dict:
        """What a store keeps of it (no model)."""
        return {"name": self.name, "model": self.model,
                "params": dict(self.params),
                "validation": self.validation, "seconds": self.seconds, "best_epoch": self.best_epoch,
                "beta": self.beta, "note": self.note}

    @classmethod
    def from_record(cls, record: dict) -> "Trial":
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in record["params"].items()}
        params = read_record(record["model"], params)  # a trial of an earlier version: as it ran
        return cls(record["name"], record["model"], params, float(record["validation"]),
                   float(record.get("seconds") or 0.0), record.get("best_epoch"), record.get("beta"),
                   note=record.get("note"))


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
    search of numbered trials logs its own line per trial instead). ``show_progress``: each neural
    fit's progress (``fit(show_progress=)``); off by default, one line per trial is the log.
    """

    def __init__(self, train, validation, on_trial=None, before_trial=None, log: bool = True,
                 show_progress: bool = False):
        self.train, self.validation = train, validation
        self.on_trial, self.before_trial = on_trial, before_trial
        self.log, self.show_progress = log, show_progress
        self.trials: list[Trial] = []

    def run(self, name: str, model: str, params: dict) -> Trial:
        """Fit ``model`` with ``params`` (early stopping on validation) and record the trial."""
        self.check_stop(name)
        estimator = make_model(model, **params)
        params = to_record(model, params)  # refitted later (another process, a resume) as it ran now
        start = time.perf_counter()
        note = None
        try:
            fit(estimator, self.train, self.validation, self.show_progress)
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
            beta = estimator.best_beta_ if spaces.is_beta_model(model) else None  # RecVAE's "beta" is its gamma
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

    def __repr__(self) -> str:
        """One line: the models, the number of candidates tried, the best one's parameters and
        its validation score over the validation users it is a mean of."""
        try:
            users = f" over {evaluated_users(self.validation)} users"
        except (TypeError, ValueError):  # validation users of another form: their number is not known here
            users = ""
        if not self.trials:
            return f"Trials(no candidate tried yet; validation {SELECTION_METRIC}{users})"
        models = list(dict.fromkeys(t.model for t in self.trials))
        best = self.best
        n = len(self.trials)
        return (f"Trials({', '.join(models)}: {n} candidate{'' if n == 1 else 's'}; best "
                f"{best.model + ' ' if len(models) > 1 else ''}{best.params}: validation {SELECTION_METRIC} "
                f"{best.validation:.4f}{users})")

    @property
    def best(self) -> Trial:
        """The trial with the highest validation NDCG@100 (the first of equal ones)."""
        if not self.trials:
            raise ValueError("no trial has run")
        return select(self.trials)


def best_estimator(trials: Trials):
    """The best trial's fitted model (fitted here when it kept none: EASE's trials share one
    Gram matrix and keep no model; its fit time then becomes the trial's ``seconds``)."""
    best = trials.best
    if best.estimator is None:
        start = time.perf_counter()
        best.estimator = fit_again(best, trials.train, trials.validation, trials.show_progress)
        best.seconds = time.perf_counter() - start
    return best.estimator


def fit_again(trial: Trial, train, validation, show_progress: bool = False):
    """The model of ``trial`` fitted afresh from its exact parameters (the same weights: every
    fit is seeded); a neural model stops early on ``validation`` as the trial did."""
    return fit(make_model(trial.model, **trial.params), train, validation, show_progress)


def fit(estimator, train, validation, show_progress: bool = False):
    """``estimator.fit`` on ``train``; a neural model validates on ``validation`` (early stopping,
    the epoch kept) and shows its progress when asked."""
    if trains_by_epochs(type(estimator)):
        return estimator.fit(train, validation=validation, show_progress=show_progress)
    return estimator.fit(train)


def select(trials: list[Trial]) -> Trial:
    """The trial with the highest validation NDCG@100; ties go to the earliest."""
    return max(trials, key=lambda t: t.validation)  # max() keeps the first of equal values


def validation_score(model, validation) -> float:
    name, k = SELECTION_METRIC.split("@")
    # one trial of many: tune says once how many validation users its choice rests on
    return float(evaluate(model, validation, ks=(int(k),), metrics=(name,), warn_few=False)[SELECTION_METRIC].mean)
