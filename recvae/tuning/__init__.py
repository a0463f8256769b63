"""Choosing hyperparameters on validation users: one engine, interchangeable candidates.

``recvae tune`` and ``benchmarks/paper_table.py`` choose through this package: every trial is
fit on the training users and scored by its validation NDCG@100 (a neural model's best epoch,
the one early stopping keeps); the best trial wins, the first on ties. Test users are never
seen here.

* :mod:`~recvae.tuning.spaces`: what each model may tune (grids, ranges, their parsers), read
  from each model's parameter table; the one module that names model families.
* :mod:`~recvae.tuning.candidates`: a grid, a list of points (TPE: :mod:`~recvae.tuning.study`).
* :mod:`~recvae.tuning.trials`: a trial, a process's trials, the choice among them.
* :mod:`~recvae.tuning.plans`: how each family's trial is fit (EASE's and EDLAE's shared Gram matrix,
  Mult-VAE's beta heuristic in two runs, a plain fit).
* :mod:`~recvae.tuning.engine`: trials 0..n-1, kept in a store.
* :mod:`~recvae.tuning.study`: the Optuna store and TPE (Optuna is imported there only).
* :mod:`~recvae.tuning.run`: ``tune`` (the chosen model's run directory) and ``search``.
"""

from recvae.tuning.candidates import Candidate, Grid, Points, describe, describe_grid, grid_points
from recvae.tuning.engine import Done, MemoryStore, Search
from recvae.tuning.plans import (
    HEURISTIC_SEED_OFFSET, Gram, Plan, beta_heuristic, ease_trials, full_run_updates, multvae_trials,
    select_ease_l2,
)
from recvae.tuning.run import TuneResult, check_search, search, study_settings, tune, tune_study
from recvae.tuning.spaces import (
    EASE_GRID, HEURISTIC_NETWORK, RUN_SETTINGS, SPACE_FORMS, SPACE_KINDS, Dimension, check_grid, check_study,
    default_grid, default_space, parse_grid, parse_models, parse_space, tunable, tunable_models,
)
from recvae.tuning.study import STUDY_NAME, count_finished
from recvae.tuning.trials import (
    SELECTION_METRIC, Trial, Trials, TuningStopped, best_estimator, select, validation_score,
)

__all__ = [
    "Candidate", "Dimension", "Done", "EASE_GRID", "Gram", "Grid", "HEURISTIC_NETWORK", "HEURISTIC_SEED_OFFSET",
    "MemoryStore", "Plan", "Points", "RUN_SETTINGS", "SELECTION_METRIC", "SPACE_FORMS", "SPACE_KINDS", "STUDY_NAME",
    "Search", "check_search", "default_grid", "default_space", "tunable", "tunable_models",
    "Trial", "Trials", "TuneResult", "TuningStopped", "beta_heuristic", "best_estimator", "check_grid",
    "check_study", "count_finished", "describe", "describe_grid", "ease_trials", "full_run_updates", "grid_points",
    "multvae_trials", "parse_grid", "parse_models", "parse_space", "search", "select", "select_ease_l2",
    "study_settings", "tune", "tune_study", "validation_score",
]
