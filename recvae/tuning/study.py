"""Optuna, confined here: the persistent trial store and the TPE candidate generator.

The store is an Optuna study in a database: the run directory's ``study.db`` (so ``--resume``
after a kill keeps every finished trial) or a SQLAlchemy URL several processes share. A recvae
trial's number lives in its Optuna trial's user attribute ``trial`` (Optuna's own numbers also
count attempts cut short); its candidate is recorded as the trial starts, so an attempt run again
keeps its number and values. Processes take trials through Optuna's queue: each enqueues the
lowest number nobody holds and pops the oldest queued one (a pop is atomic); of two attempts at
one number, the later-made one stands down (pruned).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings

import numpy as np

from recvae.errors import ParameterError
from recvae.fileio import jsonable
from recvae.optional import require
from recvae.tuning.candidates import Candidate
from recvae.tuning.engine import Claim, Done
from recvae.tuning.trials import Trial

logger = logging.getLogger("recvae.tuning")

STUDY_NAME = "recvae-tune"
#: shared storages: a worker records a heartbeat this often; a trial without one for GRACE
#: seconds (its worker was killed) is failed, and its number is taken again with its values
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 60
#: how long a worker that joins a study waits for its maker to finish setting it up
SETUP_WAIT_SECONDS = 60.0
POLL_SECONDS = 1.0


def load_optuna(purpose: str):
    optuna = require("optuna", purpose)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines: ours say more
    return optuna


def _quietly(optuna, fn, *args, **kwargs):
    """Call an Optuna function that warns it is experimental (its heartbeat API), without the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return fn(*args, **kwargs)


def open_storage(optuna, url: str, shared: bool):
    """An RDB storage; a shared one records heartbeats so a killed worker's trial is run again."""
    kwargs = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS} if shared else {}
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


def open_study(optuna, storage, name: str, settings: dict, create: bool, where: str, n_trials, differences):
    # ``where``: the parameter that named the study's place (``resume``: --out's; ``storage``)
    """Create the study (when ``create``) or load it; a study made by another process is
    joined once its maker has set it up, and only if its settings are these (``differences``:
    the one comparison of settings). Returns ``(study, made)``."""
    sampler = optuna.samplers.RandomSampler(seed=0)  # never asked: candidates come from the generator
    if create:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
        except optuna.exceptions.DuplicatedStudyError:
            pass
        else:
            study.set_user_attr("recvae", settings)
            study.set_user_attr("n_trials", n_trials)
            return study, True
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise ParameterError(where, f"no study named {name!r} there to continue") from None
    deadline = time.monotonic() + SETUP_WAIT_SECONDS
    while not study.user_attrs.get("ready"):
        if time.monotonic() > deadline:
            raise ParameterError(where, f"the study {name!r} was not made by recvae tune, or its maker stopped while "
                                        "setting it up; choose another {study_name}", names=("study_name",))
        time.sleep(POLL_SECONDS / 4)
    found = differences(study.user_attrs.get("recvae", {}), settings)
    if found:
        detail = "; ".join(f"{k}: {a!r} in the study, now {b!r}" for k, a, b in found[:3])
        raise ParameterError(where, f"the study {name!r} was made with other settings ({detail}); give the study's "
                                    "settings, or another {study_name}", names=("study_name",))
    return study, False


def stored_settings(optuna, storage, name: str) -> dict | None:
    """The settings a study at ``storage`` was made with (None: no such study)."""
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get("recvae")
    except KeyError:
        return None


class OptunaStore:
    """Trials kept in an Optuna study (see the module's note); ``shared``: other processes work
    on it too (wait for their running trials at the end; a killed worker's trial is failed by
    its missing heartbeat); else a trial left running is one this process's predecessor was
    killed in, failed here so that its number runs again."""

    def __init__(self, optuna, study, shared: bool, models, space: dict | None, grid: dict | None):
        self.optuna, self.study, self.shared = optuna, study, shared
        self.models, self.space, self.grid = tuple(models), space, grid
        self.State = optuna.trial.TrialState
        self.waiting_said = False
        if not shared:
            for t in study.get_trials(deepcopy=False, states=(self.State.RUNNING,)):
                study.tell(t.number, state=self.State.FAIL, skip_if_finished=True)

    # -- what the study holds ----------------------------------------------------------------
    def _trials(self):
        return [t for t in self.study.get_trials(deepcopy=False) if "trial" in t.user_attrs]

    def finished(self) -> list[Done]:
        done = {}
        for t in sorted(self._trials(), key=lambda t: t.number):
            k = t.user_attrs["trial"]
            if t.state == self.State.COMPLETE and "runs" in t.user_attrs and k not in done:
                done[k] = Done(k, Candidate.from_record(t.user_attrs["candidate"]),
                               [Trial.from_record(r) for r in t.user_attrs["runs"]], int(t.user_attrs["kept"]))
        return [done[k] for k in sorted(done)]

    def history(self, k: int) -> list[Done]:
        return [d for d in self.finished() if d.number < k]

    # -- taking a trial ------------------------------------------------------------------------
    def claim(self, n: int) -> Claim | None:
        held_states = (self.State.WAITING, self.State.RUNNING, self.State.COMPLETE)
        if self.shared:  # a trial whose worker fell silent (killed) is failed: its number is free again
            _quietly(self.optuna, self.optuna.storages.fail_stale_trials, self.study)
        while True:
            trials = self._trials()
            held = {t.user_attrs["trial"] for t in trials if t.state in held_states}
            k = next((k for k in range(n) if k not in held), None)
            waiting = any(t.state == self.State.WAITING for t in trials)
            if k is None and not waiting:
                running = sorted(t.user_attrs["trial"] for t in trials if t.state == self.State.RUNNING)
                if not self.shared or not running:
                    return None
                self._wait_for(running)  # the choice needs the other workers' trials
                continue
            if k is not None:
                self.study.enqueue_trial({}, user_attrs=self._placeholder(k, trials))
            trial = self.study.ask()
            number = trial.user_attrs.get("trial")
            if number is None or self._taken(trial, number):
                self.study.tell(trial, state=self.State.PRUNED)  # another worker holds it: stand down
                continue
            if self.shared:  # from the start: a worker killed before its fit leaves a stale trial, not a lost one
                trial.storage.record_heartbeat(trial._trial_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            record = trial.user_attrs.get("candidate")
            if record is not None:
                self._record_params(trial, Candidate.from_record(record))
                logger.info("trial %d runs again with its values (cut short before)", number)
            return Claim(number, None if record is None else Candidate.from_record(record), trial)

    def _placeholder(self, k: int, trials) -> dict:
        """Trial k's queue entry: the values of its last attempt, if one had drawn them."""
        attempts = [t for t in trials if t.user_attrs["trial"] == k and "candidate" in t.user_attrs]
        if not attempts:
            return {"trial": k}
        last = max(attempts, key=lambda t: t.number)
        return {"trial": k, "candidate": last.user_attrs["candidate"], "retry_of": last.number}

    def _taken(self, trial, k: int) -> bool:
        """Whether an earlier-made attempt at ``k`` is queued, running or finished."""
        held = (self.State.WAITING, self.State.RUNNING, self.State.COMPLETE)
        return any(t.user_attrs.get("trial") == k and t.number < trial.number and t.state in held
                   for t in self.study.get_trials(deepcopy=False))

    def _wait_for(self, running: list[int]) -> None:
        if not self.waiting_said:
            logger.info("waiting for %d trial(s) of other workers (%s)", len(running), ", ".join(map(str, running)))
            self.waiting_said = True
        time.sleep(POLL_SECONDS)
        _quietly(self.optuna, self.optuna.storages.fail_stale_trials, self.study)

    # -- recording -----------------------------------------------------------------------------
    def start(self, claim: Claim, candidate: Candidate) -> None:
        """Record the trial's values before it is fit: a retry takes them again."""
        claim.handle.set_user_attr("candidate", candidate.record())
        self._record_params(claim.handle, candidate)

    def _record_params(self, trial, candidate: Candidate) -> None:
        """The values as the trial's Optuna parameters too (what Optuna's tools show); set, not
        suggested: they are drawn already (Optuna has no public call for that)."""
        dists = distributions(self.optuna, self.models, self.space, self.grid, candidate.model)
        for key, value in params_of(candidate, self.models).items():
            trial.storage.set_trial_param(trial._trial_id, key, dists[key].to_internal_repr(value), dists[key])

    def run_fit(self, claim: Claim, fit):
        """``fit()`` with a heartbeat recorded meanwhile on a shared storage."""
        if not self.shared:
            return fit()
        stop = threading.Event()
        storage, trial_id = self.study._storage, claim.handle._trial_id

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                storage.record_heartbeat(trial_id)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            return fit()
        finally:
            stop.set()

    def finish(self, claim: Claim, done: Done) -> None:
        trial = claim.handle
        trial.set_user_attr("runs", [jsonable(r.record()) for r in done.runs])
        trial.set_user_attr("kept", done.kept)
        self.study.tell(trial, done.value)

    def fail(self, claim: Claim, interrupted: bool) -> None:
        if interrupted:  # SIGINT, SIGTERM: the next start runs it again
            claim.handle.set_user_attr("interrupted", True)
        self.study.tell(claim.handle, state=self.State.FAIL)


def params_of(candidate: Candidate, models) -> dict:
    """A candidate as Optuna parameters: ``model`` and ``model.name`` keys when the study
    chooses among several models, else the names alone."""
    several = len(models) > 1
    out = {"model": candidate.model} if several else {}
    out.update({f"{candidate.model}.{n}" if several else n: v for n, v in candidate.values.items()})
    return out


def distributions(optuna, models, space: dict | None, grid: dict | None, model: str) -> dict:
    """The Optuna distribution of each parameter of ``model``'s candidates (see :func:`params_of`):
    a grid's values, or the ranges of ``space``."""
    d = optuna.distributions
    several = len(models) > 1
    out = {"model": d.CategoricalDistribution(list(models))} if several else {}
    if grid is not None:
        return {**out, **{name: d.CategoricalDistribution(list(values)) for name, values in grid.items()}}
    for name, dim in space[model].items():
        key = f"{model}.{name}" if several else name
        if dim.kind == "cat":
            out[key] = d.CategoricalDistribution(list(dim.choices))
        elif dim.integer:
            out[key] = d.IntDistribution(int(dim.low), int(dim.high), log=dim.kind == "log")
        else:
            out[key] = d.FloatDistribution(float(dim.low), float(dim.high), log=dim.kind == "log")
    return out


class TPE:
    """Optuna's TPE as a candidate generator: trial k's values are drawn from the finished
    trials numbered below k, by a sampler seeded by ``(seed, k)``; so a study draws the same
    values however often it was stopped and resumed, and processes sharing a study draw
    different points (one TPE seeded alike in each would draw the same startup points)."""

    def __init__(self, optuna, models, space: dict, n: int, seed: int | None):
        self.optuna, self.models, self.space, self.n = optuna, tuple(models), space, n
        self.seed = 0 if seed is None else int(seed)

    def __len__(self) -> int:
        return self.n

    def _distributions(self, model: str) -> dict:
        return distributions(self.optuna, self.models, self.space, None, model)

    def candidate(self, k: int, history) -> Candidate:
        optuna = self.optuna
        state = np.random.SeedSequence([self.seed, k]).generate_state(1)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=int(state[0])))
        for done in history:
            c = done.candidate
            if c.model in self.space:
                study.add_trial(optuna.trial.create_trial(params=params_of(c, self.models), value=done.value,
                                                          distributions=self._distributions(c.model)))
        trial = study.ask()
        several = len(self.models) > 1
        model = trial.suggest_categorical("model", list(self.models)) if several else self.models[0]
        values = {}
        for name, dim in self.space[model].items():
            key, log = f"{model}.{name}" if several else name, dim.kind == "log"
            if dim.kind == "cat":
                values[name] = trial.suggest_categorical(key, list(dim.choices))
            elif dim.integer:
                values[name] = trial.suggest_int(key, int(dim.low), int(dim.high), log=log)
            else:
                values[name] = trial.suggest_float(key, float(dim.low), float(dim.high), log=log)
        return Candidate(model, values)


def count_finished(storage: str, study_name: str = STUDY_NAME) -> int | None:
    """How many trials of the study at ``storage`` (a URL) finished; None when it cannot be read."""
    optuna = load_optuna("a tuning study")
    try:
        study = _quietly(optuna, optuna.load_study, study_name=study_name, storage=storage)
        return len({t.user_attrs["trial"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if "trial" in t.user_attrs})
    except Exception:  # a stop message must not fail on the database
        return None
