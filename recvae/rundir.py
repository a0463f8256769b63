"""The run directory: its layout, and the only code that writes, reads, cleans and locks it.

A run directory holds everything needed later::

    run.json            data source, preprocessing, split description, model name and parameters
    model/              the fitted model (model.json, weights.pt or arrays.npz; no pickle)
    train.npz           training interactions (histories of known users, popularity fallback)
    validation.npz      held-out validation users (fold-in and held-out items)
    test.npz            held-out test users
    seen.npz            every interaction of the run's users at any rating (items `recommend` excludes)
    dropped_users.csv   users of the source that preprocessing or the split left out, and why
    dropped_seen.npz    their interactions on the run's items at any rating (what their popularity list leaves out)
    history.csv/.json   per-epoch history (neural models)
    metrics.json        validation and test metrics (mean, stderr, n_users)
    learning_curve.png  loss, KL, beta and validation NDCG@100 per epoch (needs matplotlib)
    checkpoint.pt       while a neural model trains (removed when it finishes unless kept)
    tuning.csv          the trials that chose the model (runs written by ``recvae tune``)
    study.db            the Optuna study of ``recvae tune --trials`` (SQLite; -journal/-wal/-shm beside it
                        while SQLite writes), kept so that ``--resume`` continues it
    .recvae.lock        while a command writes the directory: who holds it (the lock itself is on the
                        directory, :mod:`recvae.locking`; never written through a link)

The split files come first and ``run.json`` last, so a ``run.json`` means the run is described;
the checkpoint is written after each epoch and the history after it, so the history never
lists an epoch a resume could not continue from; ``metrics.json`` is written once the model is
there, and the picture last. Every file is written atomically (:mod:`recvae.fileio`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from recvae import locking, signals
from recvae.errors import InputError, MissingPathError, ParameterError, RecvaeError, UnwritablePathError
from recvae.data import Interactions, read_table
from recvae.data.source import Recorded
from recvae.data.splits import HeldOutUsers
from recvae.dbcheck import check_study
from recvae.fileio import (
    atomic_write, ensure_writable_dir, is_temporary, read_json, read_torch, write_bytes, write_json,
)
from recvae.locking import RunLocked, check_not_link  # noqa: F401  (RunLocked: the callers import it from here)
from recvae.models import load_model
from recvae.models.base import MODEL_FILE
from recvae.models.training_loop import HISTORY_FIELDS

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
MODEL_DIR = "model"
TRAIN_FILE = "train.npz"
VALIDATION_FILE = "validation.npz"
TEST_FILE = "test.npz"
SEEN_FILE = "seen.npz"
DROPPED_FILE = "dropped_users.csv"
DROPPED_SEEN_FILE = "dropped_seen.npz"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "learning_curve.png"
CHECKPOINT_FILE = "checkpoint.pt"
TUNING_FILE = "tuning.csv"
STUDY_FILE = "study.db"
#: the study's database and the files SQLite keeps beside it while it writes (a kill can leave one)
STUDY_FILES = frozenset({STUDY_FILE, *(STUDY_FILE + s for s in ("-journal", "-wal", "-shm"))})
LOCK_FILE = ".recvae.lock"
#: what a run directory may hold at its top level
RUN_FILES = {RUN_JSON, MODEL_DIR, TRAIN_FILE, SEEN_FILE, DROPPED_FILE, DROPPED_SEEN_FILE, VALIDATION_FILE, TEST_FILE,
             HISTORY_CSV, HISTORY_JSON, METRICS_FILE, CURVE_FILE, CHECKPOINT_FILE, TUNING_FILE, *STUDY_FILES}
#: what the model folder may hold (the files of every model class's save())
MODEL_FILES = {MODEL_FILE, "weights.pt", "arrays.npz"}
SPLIT_FILES = {"validation": VALIDATION_FILE, "test": TEST_FILE}


class RunFinished(RecvaeError):
    """``resume`` of a run that finished: there is nothing to continue (the command line says so
    and exits 0). Of the family for its parameters as data (``out``, ``trials``), so the line it
    prints names the flags."""


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_JSON).is_file()


def check_not_in_run(path: str | os.PathLike, param: str) -> None:
    """``ParameterError`` naming ``param`` when ``path`` is (or lies inside) a file of a run
    directory, e.g. ``--output RUN/model/weights.pt``: an output must never replace what a run holds."""
    p = Path(path).resolve()  # a symbolic link on the way (p/m -> RUN/model) leads to the run all the same
    for parent in p.parents:
        if is_run_dir(parent):
            top = p.relative_to(parent).parts[0]
            if top in RUN_FILES or top == LOCK_FILE or is_temporary(top):
                raise ParameterError(param, f"is {p.relative_to(parent)} of the run directory {parent}; "
                                     "choose a path outside the run's files", given=path)
            return


def new_run_dir(parent: str | os.PathLike, stem: str) -> Path:
    """A new, empty run directory ``parent/<stem>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... added
    when taken), created here: two commands started in the same second get two directories."""
    parent = Path(parent)
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_dir(parent)
    for n in range(1, 1000):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ParameterError("out", f"{parent} already holds 999 runs named {name}; give {{out}}", names=("out",))


class RunDir:
    """One run directory (it need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- what is on disk ---------------------------------------------------------------------
    def entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE) if self.path.is_dir() else []

    def foreign_files(self) -> list[str]:
        """Paths (relative) of what is not part of a run, at any depth: the user's own files."""
        if not self.path.is_dir():
            return []
        foreign = []
        for p in sorted(self.path.iterdir()):
            if p.name == LOCK_FILE or is_temporary(p.name):
                continue
            if p.name not in RUN_FILES or (p.name == MODEL_DIR) != (p.is_dir() and not p.is_symlink()):
                foreign.append(p.name)
            elif p.name == MODEL_DIR:
                foreign += [f"{MODEL_DIR}/{q.name}" for q in sorted(p.iterdir())
                            if not (q.name in MODEL_FILES and q.is_file()) and not is_temporary(q.name)]
        return foreign

    def checkpoint_epoch(self) -> int | None:
        """The last finished epoch stored in the checkpoint; None without one. Memory-maps the
        file: reads the counters, not the tensors."""
        path = self.file(CHECKPOINT_FILE)
        if not path.is_file():
            return None
        payload = read_torch(path, "checkpoint", mmap=True)
        if not isinstance(payload, dict) or not isinstance(payload.get("epoch"), int):
            raise InputError(path, "not a recvae checkpoint (no epoch counter)")
        return int(payload["epoch"])

    def state(self) -> str:
        """``absent``, ``empty``, ``partial`` (files, no run.json: stopped while describing the
        run), ``described`` (run.json, nothing trained), ``training`` (a checkpoint to resume from),
        ``trained`` (the model, no metrics) or ``finished`` (metrics.json, no checkpoint)."""
        if not self.path.is_dir():
            return "absent"
        if not self.entries():
            return "empty"
        if not self.file(RUN_JSON).is_file():
            return "partial"
        if self.file(CHECKPOINT_FILE).is_file():  # also a finished run kept to train on (or diverged)
            return "training"
        if self.file(METRICS_FILE).is_file():
            return "finished"
        if self.file(MODEL_DIR).joinpath(MODEL_FILE).is_file():
            return "trained"
        return "described"

    def completed(self) -> bool:
        """Whether the run trained and was evaluated: its model and ``metrics.json`` are there
        (a checkpoint kept with ``--keep-checkpoint`` may be too)."""
        return self.has_model() and self.file(METRICS_FILE).is_file()

    # -- what a command may do with it -------------------------------------------------------
    def check_writable_for(self, resume: bool = False, overwrite: bool = False, resumable: bool = True) -> None:
        """Whether the directory may take a run: new or empty; a run directory (and nothing of
        the user's, at any depth) with ``overwrite``; a described run with ``resume`` (the
        caller compares its settings). Raises naming the directory otherwise."""
        out = self.path
        check_not_link(out, "out", "give the directory it points to")
        locking.check_free(out, LOCK_FILE)  # a writer's files in flight are not what the directory holds
        check_not_in_run(out, "out")
        if out.exists() and not out.is_dir():
            raise ParameterError("out", "exists and is not a directory", given=out)
        entries = self.entries()
        if not entries:
            return
        listing = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        if not resume and not overwrite:
            raise ParameterError("out", f"the directory already holds files ({listing}); pass {{overwrite}} to replace "
                                 "them" + (", or {resume} to continue the run there" if resumable else ""),
                                 given=out, names=("overwrite", "resume"))
        foreign = self.foreign_files()
        if overwrite:
            if foreign:
                raise ParameterError("out", f"{{overwrite}} empties only run directories, and this one holds other "
                                     f"files ({', '.join(foreign[:5])}); choose a new or empty directory",
                                     given=out, names=("overwrite",))
            return
        if not self.file(RUN_JSON).is_file():
            raise ParameterError("out", f"not a run directory (no {RUN_JSON}): nothing to resume"
                                 + ("; it holds only run files, so {overwrite} starts it again" if not foreign else ""),
                                 given=out, names=("overwrite",))
        if foreign:
            raise ParameterError("out", f"holds files that are not the run's ({', '.join(foreign[:5])}); "
                                 "move them away to resume there", given=out)

    def study_url(self) -> str:
        """The SQLAlchemy URL of the run's study (``recvae tune --trials``): SQLite in ``study.db``,
        checked first (:func:`recvae.dbcheck.check_study`: no links, not damaged)."""
        check_study(self.file(STUDY_FILE), [self.file(name) for name in sorted(STUDY_FILES)])
        return f"sqlite:///{self.file(STUDY_FILE).absolute()}"

    def has_study(self) -> bool:
        return self.file(STUDY_FILE).is_file()

    def check_resumable_study(self) -> None:
        """Whether ``tune --resume`` may continue the study here: ``study.db`` present and nothing
        of the user's beside the run's files."""
        check_not_link(self.path, "out", "give the directory it points to")
        locking.check_free(self.path, LOCK_FILE)
        if not self.has_study():
            raise ParameterError("resume", f"{self.path} holds no study ({STUDY_FILE}) to continue; start the "
                                           "tuning without {resume}", names=("resume",))
        foreign = self.foreign_files()
        if foreign:
            raise ParameterError("out", f"holds files that are not the run's ({', '.join(foreign[:5])}); "
                                 "move them away to resume there", given=self.path)

    # -- one writer at a time ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold the directory (created if needed) for this process (:mod:`recvae.locking`: on the
        directory itself, so deleting the lock file lets no one in): a second writer gets
        :class:`RunLocked` naming the holder; a lock left by a dead process is taken over with
        a note. Temporary files of writes killed midway are removed once it is held."""
        check_not_link(self.path, "out", "give the directory it points to")
        ensure_dir(self.path)
        with locking.hold(self.path, LOCK_FILE) as previous:
            if previous:
                logger.warning("%s: took over the lock of a command that is no longer running (%s)",
                               self.path, locking.describe(previous))
            self.remove_temporaries()
            yield self

    def remove_temporaries(self) -> None:
        """Remove the temporary files that writes killed midway (SIGKILL) left, at every depth."""
        for folder in (self.path, self.file(MODEL_DIR)):
            if folder.is_dir() and not folder.is_symlink():  # a planted link leads outside the run
                for p in folder.iterdir():
                    if is_temporary(p.name) and p.is_file():
                        p.unlink()

    def remove_if_empty(self, parent: bool = False) -> None:
        """Remove the directory when it holds nothing (what a failed start left of a new one);
        with ``parent``, its parent folder too when that is left empty."""
        with contextlib.suppress(OSError):
            if not self.entries():
                self.path.rmdir()
                if parent:
                    self.path.parent.rmdir()

    def empty(self, keep=()) -> None:
        """Remove the run's files (only; the caller checked there is nothing else), but those
        named in ``keep`` (``STUDY_FILES``: a tuned run rewritten beside its study)."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name == LOCK_FILE or p.name in keep:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # -- writes ------------------------------------------------------------------------------
    def write_description(self, description: dict, split, recorded: Recorded) -> None:
        """What the run is, before it trains: the split's interactions, the seen items, the users
        left out and their items (each only when ``recorded`` knows them), then ``run.json``."""
        split.train.save(self.file(TRAIN_FILE))
        split.validation.save(self.file(VALIDATION_FILE))
        split.test.save(self.file(TEST_FILE))
        recorded.seen.save(self.file(SEEN_FILE))
        if recorded.dropped is not None:
            write_bytes(self.file(DROPPED_FILE), recorded.dropped.to_csv(index=False).encode())
        if recorded.dropped_seen is not None:
            recorded.dropped_seen.save(self.file(DROPPED_SEEN_FILE))
        write_json(self.file(RUN_JSON), description)

    def checkpoints(self):
        """The callback a neural estimator's ``fit`` takes to checkpoint into this directory."""
        return _CheckpointWriter(self)

    def write_epoch(self, payload: dict, history: list[dict]) -> None:
        """The checkpoint of the epoch just finished, then the history that lists it; signals
        wait until both are written."""
        import torch

        with signals.deferred():
            atomic_write(self.file(CHECKPOINT_FILE), lambda f: torch.save(payload, f))
            self.write_history(history)

    def write_history(self, history: list[dict]) -> None:
        write_json(self.file(HISTORY_JSON), history, indent=1)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in HISTORY_FIELDS})
        write_bytes(self.file(HISTORY_CSV), buf.getvalue().encode())

    def save_model(self, model) -> Path:
        with signals.deferred():  # weights and model.json belong together
            return model.save(self.file(MODEL_DIR))

    def remove_checkpoint(self) -> None:
        self.file(CHECKPOINT_FILE).unlink(missing_ok=True)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.file(METRICS_FILE), metrics)

    def draw_learning_curve(self, history: list[dict]) -> None:
        from recvae.plots import plot_learning_curve

        plot_learning_curve(history, self.file(CURVE_FILE))

    def write_tuning(self, rows: list[dict]) -> None:
        import pandas as pd

        write_bytes(self.file(TUNING_FILE), pd.DataFrame(rows).to_csv(index=False).encode())

    # -- reads -------------------------------------------------------------------------------
    def read_description(self) -> dict:
        path = self.file(RUN_JSON)
        if not path.is_file():
            raise MissingPathError("run_dir", f"not a run directory (no {RUN_JSON})", given=self.path)
        description = read_json(path)
        for key, kind in (("model", str), ("data", dict)):
            if not isinstance(description.get(key), kind):
                raise InputError(path, f"{key}: expected a {'string' if kind is str else 'JSON object'}, "
                                 f"got {description.get(key)!r}")
        return description

    def read_checkpoint(self, map_location="cpu") -> dict:
        path = self.file(CHECKPOINT_FILE)
        advice = "; remove it and {resume} trains the run from its start"
        try:
            payload = read_torch(path, "checkpoint", map_location=map_location)
        except InputError as e:
            raise InputError(e.where, f"{e.message}{advice}", names=("resume",)) from None
        if not isinstance(payload, dict) or "epoch" not in payload:
            raise InputError(path, f"not a recvae checkpoint{advice}", names=("resume",))
        return payload

    def has_model(self) -> bool:
        return self.file(MODEL_DIR).joinpath(MODEL_FILE).is_file()

    def load_model(self, device=None):
        return load_model(self.file(MODEL_DIR), device=device)

    def load_finished(self, device=None) -> tuple[object, dict]:
        """The fitted model and ``run.json`` of a run that has its model; errors name the file at fault."""
        description = self.read_description()
        if not self.has_model():
            raise MissingPathError("run_dir", "the run has not finished (no model yet); continue it with the "
                                   "`recvae train` command that started it plus {resume}", given=self.path,
                                   names=("resume",))
        return self.load_model(device), description

    def load_train(self, model) -> Interactions:
        """``train.npz``, checked against ``model``: its item ids must be the model's, in the same
        order (else every recommended id would be another item's)."""
        path = self.file(TRAIN_FILE)
        train = Interactions.load(path)
        _check_items(path, train.n_items, model, train.item_ids)
        return train

    def load_users(self, split: str, model) -> HeldOutUsers:
        """The held-out users of ``split`` (validation or test), checked against ``model``'s items."""
        path = self.file(SPLIT_FILES[split])
        users = HeldOutUsers.load(path)
        _check_items(path, users.fold_in.shape[1], model)
        return users

    def load_seen(self, dropped: bool = False) -> Interactions | None:
        """``seen.npz`` (with ``dropped``, ``dropped_seen.npz``); None for a run without it (older runs)."""
        path = self.file(DROPPED_SEEN_FILE if dropped else SEEN_FILE)
        return Interactions.load(path) if path.is_file() else None

    def load_dropped(self):
        """``dropped_users.csv`` as a DataFrame (``user`` as text, ``interactions``, ``reason``);
        None for a run without one (older runs, prepared data)."""
        path = self.file(DROPPED_FILE)
        if not path.is_file():
            return None
        frame = read_table(path, id_cols=("user",))
        if list(frame.columns) != ["user", "interactions", "reason"]:
            raise InputError(path, f"expected the columns user, interactions, reason; found {list(frame.columns)}")
        return frame


class _CheckpointWriter:
    def __init__(self, run: RunDir):
        self.run = run

    def on_epoch_end(self, epoch) -> None:
        if epoch.is_main:
            self.run.write_epoch(epoch.checkpoint(), epoch.history)


def ensure_dir(path: Path) -> None:
    try:
        ensure_writable_dir(path)
    except PermissionError as e:
        raise UnwritablePathError("out", str(e), given=path) from e


def _check_items(path: Path, n_items: int, model, item_ids=None) -> None:
    if n_items != model.n_items_:
        raise InputError(path, f"{n_items} items, but the model has {model.n_items_}: not the model's data")
    model_ids = getattr(model, "item_ids_", None)
    if item_ids is not None and model_ids is not None:
        same = len(model_ids) == len(item_ids) and all(
            type(a) is type(b) and a == b for a, b in zip(np.asarray(item_ids).tolist(), np.asarray(model_ids).tolist())
        )
        if not same:
            raise InputError(path, "its item ids differ from the model's (model/model.json): not the model's data")
