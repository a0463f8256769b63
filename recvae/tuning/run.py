"""``tune``: choose a model and its hyperparameters on validation users, and keep the chosen
model as a run; ``search``: a grid's trials on one split, in memory.

One engine (:mod:`recvae.tuning.engine`) runs every search; they differ in their candidates: a
plain grid (every point; Mult-VAE's paper trial first; the table lists each run by name), or a
study (``n_trials``, ``space``, several models or a shared ``storage``: TPE over ranges, or a
grid's first points; the table lists each trial by number with its model). With a run
directory the trials are kept in its ``study.db`` (``resume`` continues without running a
finished trial again), so every kept search needs optuna (``recvae[tune]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass

from recvae.errors import ParameterError
from recvae.fileio import jsonable
from recvae.evaluation import evaluate
from recvae.experiment import DataSpec, RunConfig, RunResult, load_split, write_run_dir
from recvae.progress import interactive
from recvae.rundir import STUDY_FILES, RunDir, RunFinished
from recvae.settings import differences, split_settings
from recvae.tuning import spaces
from recvae.tuning.candidates import Candidate, Grid, Points
from recvae.tuning.caveats import warn_choice
from recvae.tuning.engine import MemoryStore, Search
from recvae.tuning.plans import Plan
from recvae.tuning import study as studies
from recvae.tuning.study import STUDY_NAME
from recvae.tuning.trials import Trial, Trials, select

STUDY_PURPOSE = "a tuning study (recvae tune --trials, --space, --storage, --resume)"
GRID_PURPOSE = "a tuning grid kept for --resume (recvae tune --out)"


@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial
    run: RunResult  # the chosen configuration's model, evaluated on validation and test users
    columns: tuple  # the hyperparameters the table shows
    #: the chosen trial as a run's settings (what ``run.json`` records): a later ``tune --refit``
    #: hands it to ``recvae refit`` to retrain the chosen model on every user
    config: RunConfig | None = None
    study: bool = False  # numbered trials of a study (the table names each trial's model)

    def table(self) -> list[dict]:
        return [{**t.row(self.columns, with_model=self.study), "selected": t is self.best} for t in self.trials]


def search(model: str, train, validation, grid: dict, params: dict | None = None, on_trial=None,
           before_trial=None) -> Trials:
    """Every trial of ``grid`` (see :func:`parse_grid`) for ``model`` on one split, ``params``
    fixed (run settings such as epochs and device, and any hyperparameter not in the grid).
    ``on_trial`` and ``before_trial``: as :class:`~recvae.tuning.trials.Trials` takes them (each
    finished trial; a time budget, stopping before the next trial with ``TuningStopped``).
    scikit-learn's ``GridSearchCV`` works too, with :func:`recvae.evaluation.ranking_scorer`
    (NDCG@k on a seeded holdout of each user's items); this search keeps the paper's protocol:
    held-out users, early stopping on their validation NDCG@100, Mult-VAE's beta heuristic."""
    params = dict(params or {})
    spaces.check_grid(model, grid, params)
    trials = Trials(train, validation, on_trial=on_trial, before_trial=before_trial)
    generator = _grid(model, grid, plain=True)
    Search(generator, Plan(trials, {model: params}, named=True), MemoryStore(), len(generator), named=True).run()
    return trials


def _grid(model: str, grid: dict, plain: bool, n: int | None = None):
    """A grid's candidates: a plain grid's first ones (the paper's trial) before its points; a
    study's first ``n`` points."""
    if plain:
        return Grid(model, grid, first=[Candidate(model, {}, plan) for plan in spaces.first_candidates(model)])
    return Points(Grid(model, grid).candidates[:n])


def _per_model(models, params) -> dict:
    """``params`` per model: ``{"recvae": {...}}``, or one model's own dict."""
    params = dict(params or {})
    if params and all(k in models and isinstance(v, dict) for k, v in params.items()):
        return {m: dict(params.get(m, {})) for m in models}
    if len(models) > 1 and params:
        raise ParameterError("params", "with several models give each model's parameters: {model: {...}}")
    return {m: dict(params) for m in models}


def check_search(models, grid=None, space=None) -> None:
    """A search is a grid of one model or ranges of one or several: never both."""
    if grid is not None and len(models) > 1:
        raise ParameterError("grid", "a grid tunes one model; with several models give ranges ({space})",
                             names=("space",))
    if grid is not None and space is not None:
        raise ParameterError("grid", "a search is a grid or ranges ({space}), not both", names=("space",))


def tune(data: DataSpec, models, grid: dict | None = None, params: dict | None = None,
         out: str | os.PathLike | None = None, *, n_trials: int | None = None, space: dict | None = None,
         storage: str | None = None, study_name: str = STUDY_NAME, resume: bool = False, study: bool | None = None,
         split_seed: int = 0, n_heldout_users: int | None = None, overwrite: bool = False,
         show_progress: bool = False, seed: int | None = 0, cutoff=None, leave_last: int | None = None,
         before_trial=None) -> TuneResult:
    """Choose a model and its hyperparameters on validation users and keep the chosen model.

    ``models``: one tunable model or several (a study, which chooses the family too). A plain
    grid (``grid``, default the model's) tries every point; a study (``study=True``, implied by
    ``n_trials``, ``space``, ``storage`` or several models) samples ``space`` (default: each
    model's ranges) by TPE seeded by ``seed``, or tries a grid's first ``n_trials`` points.
    ``params``: fixed settings (one model's dict, or per model ``{"recvae": {"epochs": 50}}``).
    The data are split as :func:`recvae.experiment.run` splits them; every trial is fit on the
    training users and scored on the validation users; the best trial's model (the first of
    equal ones) is then evaluated once on the validation and test users and, with ``out``,
    written as a normal run directory (``run.json``: the chosen trial's exact parameters) with
    ``tuning.csv``, the trial table. The trials are kept in ``out``'s ``study.db`` (``resume``
    continues: finished trials are kept, one cut short runs again with its values) or at
    ``storage``, a SQLAlchemy URL several processes share (each joins ``study_name``).
    ``before_trial(k, candidate)``: called as trial k starts.
    """
    models = spaces.parse_models(models)
    params = _per_model(models, params)
    check_search(models, grid, space)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ParameterError("trials", f"expected a positive number of trials, got {n_trials!r}")
    if resume and storage is not None:
        raise ParameterError("resume", "continues the study in {out}; a study at {storage} is continued by "
                                       "running the same command again, without {resume}",
                             names=("out", "storage", "resume"))
    if resume and out is None:
        raise ParameterError("resume", "needs the run directory ({out}) that holds the study", names=("out",))
    shared = storage is not None
    run_dir = RunDir(out) if out is not None else None
    optuna = None
    if study is None:
        study = n_trials is not None or space is not None or shared or len(models) > 1
        if resume and grid is None and space is None and n_trials is None and run_dir.has_study():
            # the search the directory holds decides
            optuna = studies.load_optuna(STUDY_PURPOSE)
            study = (studies.stored_settings(optuna, run_dir.study_url(), study_name) or {}).get("search") == "study"
    if not study and len(models) > 1:
        raise ParameterError("model", "a plain grid tunes one model; several are a study's (give n_trials)")
    if study and grid is None and space is None:
        space = spaces.parse_space(None, models, params)
    if not study and grid is None:
        grid = spaces.parse_grid(None, models[0])
    spaces.check_study(models, space, grid, params)
    n_points = None if grid is None else len(_grid(models[0], grid, plain=not study))
    if n_points is not None and n_trials is not None and n_trials > n_points:
        raise ParameterError("trials", f"the grid has {n_points} point(s), fewer than {n_trials} trials; "
                                       "leave {trials} out to try every point", names=("trials",))
    n_trials = n_trials if n_trials is not None else n_points
    if n_trials is None and not resume:
        raise ParameterError("trials", "a study needs its number of trials")
    data.check_optional()
    if optuna is None and (run_dir is not None or shared or space is not None):
        optuna = studies.load_optuna(STUDY_PURPOSE if study else GRID_PURPOSE)
    config = RunConfig(data=data, model=",".join(models), params={}, split_seed=split_seed,
                       n_heldout_users=n_heldout_users, cutoff=cutoff, leave_last=leave_last)
    settings = study_settings(config, models, space, grid, params, study)
    store = studies.open_storage(optuna, storage, shared=True) if shared else None  # checked before --out is made
    if run_dir is not None:
        if resume:
            run_dir.check_resumable_study()
        else:
            run_dir.check_writable_for(overwrite=overwrite, resumable=run_dir.has_study() and not shared)
    created = run_dir is not None and not run_dir.path.exists()
    with run_dir.lock() if run_dir is not None else contextlib.nullcontext():
        try:
            # the data first: a data error leaves nothing behind (no study yet)
            split, read = (load_split(config, show_progress, with_seen=True) if run_dir is not None
                           else (load_split(config, show_progress), None))
            if run_dir is not None and not resume:
                run_dir.empty()  # --overwrite: a new search, in an emptied directory
            # a log file gets one line per trial, not one per epoch of every trial
            trials = Trials(split.train, split.validation, log=not study, show_progress=show_progress and interactive())
            plan = Plan(trials, params, named=not study)
            if optuna is None or (run_dir is None and not shared):
                kept_in = MemoryStore()
            else:
                kept_in, n_trials = _open(optuna, store, run_dir, study_name, settings, n_trials, resume, study,
                                       (models, space, grid))
            generator = (_grid(models[0], grid, plain=not study, n=n_trials) if grid is not None
                         else studies.TPE(optuna, models, space, n_trials, seed))
            engine = Search(generator, plan, kept_in, n_trials, named=not study, before_trial=before_trial)
            engine.run()
            rows = engine.results()
            if not rows:
                raise ParameterError("storage" if shared else "out", f"the study {study_name!r}: no trial finished")
            columns = tuple(dict.fromkeys(grid if grid is not None else (n for m in models for n in space[m])))
            return _conclude(config, engine, rows, split, read, run_dir, columns + spaces.table_columns(models),
                             study, keep=() if shared else STUDY_FILES, space=space)
        except BaseException:
            if created and run_dir is not None and not run_dir.entries():
                shutil.rmtree(run_dir.path, ignore_errors=True)
            raise


def tune_study(data: DataSpec, models, n_trials: int | None = None, **options) -> TuneResult:
    """:func:`tune` as a study (numbered trials), whatever its candidates."""
    return tune(data, models, n_trials=n_trials, study=True, **options)


def _open(optuna, storage, run_dir, name, settings, n_trials, resume, study, shape):
    """The persistent store, its study created, resumed or joined; and the number of trials."""
    shared = storage is not None
    if storage is None:
        storage = studies.open_storage(optuna, run_dir.study_url(), shared=False)
    found, made = studies.open_study(optuna, storage, name, settings, create=not resume,
                                     where="resume" if resume else "storage", n_trials=n_trials,
                                     differences=_differences)
    if n_trials is None:
        n_trials = int(found.user_attrs.get("n_trials"))
    kept_in = studies.OptunaStore(optuna, found, shared, *shape)
    if resume and run_dir.state() == "finished" and len(kept_in.finished()) >= n_trials:
        raise RunFinished(f"the {'study' if study else 'grid'} has its {n_trials} trials and the run is written: "
                          "nothing to resume" + ("; give a larger {trials} to run more" if study else ""),
                          param="out", given=run_dir.path, names=("trials",))
    if made or resume:
        if resume and n_trials != found.user_attrs.get("n_trials"):
            found.set_user_attr("n_trials", n_trials)
        found.set_user_attr("ready", True)
    return kept_in, n_trials


def _conclude(config: RunConfig, engine: Search, rows, split, read, run_dir: RunDir | None, columns: tuple,
              study: bool, keep=(), space: dict | None = None) -> TuneResult:
    """The chosen trial's model evaluated once on validation and test users and, with
    ``run_dir``, written there as a normal run with ``tuning.csv``; ``keep``: files of the
    directory that stay (the study). What the choice rests on is warned about once: few
    validation users, a value on the edge of its grid or of its range in ``space``."""
    trials = [t for t, _ in rows]
    best = select(trials)
    if best.validation == float("-inf"):
        raise ParameterError("model", f"every trial's training loss became non-finite before an epoch finished "
                                      f"({len(trials)} trials); lower {{lr}}, or try {{precision}} fp32",
                             given=config.model, names=("lr", "precision"))
    where = rows[trials.index(best)][1]
    finished = {d.number: d.candidate for d in engine.store.finished()}
    warn_choice(finished[where[0]], list(finished.values()), space, split.validation.n_users)
    estimator = engine.estimator_of(where, best, split.train, split.validation)
    # the validation users' number was just said (warn_choice): the test users' is evaluate's
    result = RunResult(estimator, evaluate(estimator, split.validation, ks=config.ks, warn_few=False),
                       evaluate(estimator, split.test, ks=config.ks), best.seconds, split)
    chosen = dataclasses.replace(config, model=best.model, params=dict(best.params))
    tuned = TuneResult(trials, best, result, columns, chosen, study)
    if run_dir is not None:
        try:
            write_run_dir(run_dir.path, chosen, split, result, overwrite=True, locked=True, read=read,
                          extra=lambda rd: rd.write_tuning(tuned.table()), keep=keep)
        except BaseException:  # stopped or failed while writing: no half-written run stays
            run_dir.empty(keep)
            raise
    return tuned




def study_settings(config: RunConfig, models, space, grid, params, study: bool = True) -> dict:
    """What a search is (data, split, models, ranges or grid, fixed parameters): stored with it,
    and compared when a process resumes or joins it."""
    return jsonable({
        "data": dataclasses.asdict(config.data),
        **split_settings(config),
        "search": "study" if study else "grid",
        "models": list(models),
        "space": None if space is None else {m: {n: d.describe() for n, d in dims.items()} for m, dims in space.items()},
        "grid": None if grid is None else {n: list(vs) for n, vs in grid.items()},
        "params": {m: dict(params.get(m, {})) for m in models},
    })


def _differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """``(key, saved, now)`` for each setting of a search that differs (:func:`recvae.settings.differences`)."""
    return differences(saved, now, nested=("data", "params", *now.get("models", ())))
