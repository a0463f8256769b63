"""One training run end to end: load data, split as the paper, fit, evaluate, keep the run;
or train on every user (``holdout="none"``), and :func:`refit` a finished run that way.

What a run directory holds and how it is written, read and locked: :mod:`recvae.rundir`. This
module decides what a run does (the paper's protocol, resume, the order of the steps); the
estimator learns and writes nothing; the run directory's callbacks keep its checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from recvae import distributed
from recvae.data.interactions import Interactions
from recvae.data.source import DataSpec, Recorded, read_source, record
from recvae.data.splits import NoHoldout, check_evaluable, no_holdout
from recvae.data.time_splits import make_split
from recvae.errors import InputError, ParameterError, RecvaeError
from recvae.evaluation import EvaluationResult, evaluate
from recvae.models.device import resolve_device
from recvae.models.registry import is_neural, trains_by_epochs
from recvae.models.training_loop import CheckpointMismatch, NonFiniteLossError
from recvae.optional import available
from recvae.rundir import CHECKPOINT_FILE, CURVE_FILE, RUN_JSON, RunDir, RunFinished
from recvae.settings import (
    RunConfig, check, check_run_options, check_split, describe, resume_differences, resumed,
)

logger = logging.getLogger(__name__)

REPORT_METRICS = ("recall@20", "recall@50", "ndcg@100")

__all__ = ["DataSpec", "RunConfig", "RunResult", "RunFinished", "ResumeMismatch", "run", "load_split",
           "fit_and_evaluate", "write_run_dir", "load_run", "REPORT_METRICS"]


class ResumeMismatch(RecvaeError, ValueError):
    """``resume=True`` with settings that differ from the run directory's ``run.json``.
    ``differences``: ``(setting, in run.json, now)`` with settings named as ``RunConfig`` fields
    (``data.path``, ``split_seed``, ``params.dropout``, ...)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message, param="resume")
        self.differences = differences


@dataclass
class RunResult:
    model: object
    validation: EvaluationResult | None
    test: EvaluationResult | None  # None without held-out users (holdout "none")
    train_seconds: float
    split: object  # the StrongSplit the model was trained and evaluated on
    error: NonFiniteLossError | None = None  # training diverged; the model is its best epoch before


def run(config: RunConfig, out: str | os.PathLike | None = None, show_progress: bool = False,
        resume: bool = False, overwrite: bool = False, keep_checkpoint: bool = False) -> RunResult:
    """Train ``config.model`` with the paper's protocol; keep the run directory when ``out`` is given.

    ``out`` must be new or empty, unless ``overwrite`` (a run directory, holding nothing of the
    user's, is emptied first) or ``resume`` (continue the run there from its checkpoint: the
    settings must equal its ``run.json`` except those a resume may change (:func:`recvae.settings.resumable`); :class:`RunFinished` when it
    finished). ``keep_checkpoint`` keeps ``checkpoint.pt`` after a successful finish. Everything
    is checked before anything is written, and again once the directory is locked (one writer
    at a time: :class:`recvae.rundir.RunLocked` for a second). A non-finite loss after a good
    epoch writes the whole run directory with that epoch's model, then raises the
    :class:`NonFiniteLossError`; at epoch 1 it removes what this run wrote.
    """
    estimator = check(config)
    check_run_options(out, resume, overwrite, keep_checkpoint)
    run_dir = RunDir(out) if out is not None else None
    main = distributed.current().is_main  # with several processes, rank 0 alone writes the run
    if run_dir is not None and main:  # the others could see rank 0's files
        _check_run_dir(run_dir, config, resume, overwrite)
    if resume and run_dir is not None and run_dir.file(RUN_JSON).is_file():
        config = resumed(config, run_dir.read_description())  # what it is not given again, as it started
        estimator = check(config)
    plot = available("matplotlib")
    if run_dir is not None and not plot:
        logger.warning("matplotlib is not installed: no learning_curve.png (pip install 'recvae[plot]')")
    if run_dir is None:
        return fit_and_evaluate(load_split(config, show_progress), estimator, ks=config.ks, raise_error=True,
                                show_progress=show_progress)
    split, recorded = load_split(config, show_progress, with_seen=True)
    estimator._check_catalogue(split.train.n_items)  # before anything is written
    created = not run_dir.path.exists()
    with run_dir.lock() if main else contextlib.nullcontext():
        state = run_dir.state()
        if main:
            _check_run_dir(run_dir, config, resume, overwrite, locked=True)  # another writer may have come and gone
            if overwrite:
                run_dir.empty()
                state = "empty"
            if state in ("absent", "empty"):
                run_dir.write_description(describe(config, split, recorded.kept), split, recorded)
        resume_from = None
        if resume and (run_dir.path / CHECKPOINT_FILE).is_file():
            resume_from = run_dir.read_checkpoint(map_location=resolve_device(estimator.device))
        elif resume and state == "trained":  # fit had finished; the evaluation was cut short
            estimator = run_dir.load_model(device=config.params.get("device"))
        elif resume:
            logger.info("resume: no checkpoint in %s; training from the start", run_dir)
        callbacks = [run_dir.checkpoints()] if is_neural(config.model) else []
        try:
            result = fit_and_evaluate(split, estimator, ks=config.ks, callbacks=callbacks, resume_from=resume_from,
                                      fit=not (resume and state == "trained"), show_progress=show_progress)
        except CheckpointMismatch as e:
            raise ParameterError("resume", f"{run_dir.file(CHECKPOINT_FILE)} {e}") from None
        except NonFiniteLossError:
            if main and not resume:  # nothing learnt: leave nothing of this run behind
                run_dir.empty()
                if created:
                    shutil.rmtree(run_dir.path, ignore_errors=True)
            raise
        if main:
            write_results(run_dir, result, plot, keep_checkpoint=keep_checkpoint)
    if result.error is not None:
        raise result.error
    return result


def _check_run_dir(run_dir: RunDir, config: RunConfig, resume: bool, overwrite: bool, locked: bool = False) -> None:
    """Whether ``run_dir`` may take this run (see :meth:`RunDir.check_writable_for`); with
    ``resume``, its settings must be the run's own and the run unfinished. A finished run that
    lacks its learning curve gets it drawn, once ``locked`` (this process holds the directory)."""
    run_dir.check_writable_for(resume=resume, overwrite=overwrite)
    if resume and not run_dir.path.exists():
        raise ParameterError("resume", f"{run_dir} does not exist, so there is no run to continue; "
                                       "start it without {resume}", names=("resume",))
    if not resume or not run_dir.entries():
        if resume:
            logger.info("resume: %s is empty or absent; starting the run from scratch", run_dir)
        return
    saved = run_dir.read_description()
    differences = resume_differences(config, saved)
    if differences:
        detail = "; ".join(f"{k}: {a!r} in run.json, now {b!r}" for k, a, b in differences)
        raise ResumeMismatch(f"the settings differ from {run_dir.file(RUN_JSON)} ({detail})", differences)
    if run_dir.state() == "finished":
        note = ""
        if is_neural(config.model) and not run_dir.file(CURVE_FILE).is_file() and available("matplotlib"):
            if not locked:
                return  # drawn below, under the directory's lock
            run_dir.draw_learning_curve(run_dir.load_model().history_)
            note = "; drew the learning curve it lacked"
        raise RunFinished(f"the run has finished (metrics.json, no {CHECKPOINT_FILE}): nothing to resume{note}",
                          param="out", given=run_dir)


def load_split(config: RunConfig, show_progress: bool = False, with_seen: bool = False):
    """``config``'s data, read and split (its ``split_seed``, ``n_heldout_users``): as the paper,
    in time with ``cutoff`` or ``leave_last`` (:func:`recvae.data.make_split`), or every user in
    training with ``holdout="none"`` (a :class:`~recvae.data.splits.NoHoldout`); refused when
    the catalogue is smaller than the largest cutoff of the metrics, as the run would train, then
    fail to evaluate. ``with_seen``: ``(split, recorded)``, with what a run directory records of
    the same read (:class:`~recvae.data.source.Recorded`: the run's seen items, what preprocessing
    kept, the users it dropped and their items)."""
    check_split(config)
    if not with_seen:
        return _split(config, config.data.load(show_progress, timestamps=config.time_split))
    interactions, raw, kept, positives = read_source(config.data, show_progress, timestamps=config.time_split)
    split = _split(config, interactions)
    return split, record(config.data, split, interactions, raw, kept, positives)


def _split(config: RunConfig, interactions: Interactions):
    if config.holdout == "none":
        return no_holdout(interactions)
    try:
        split = make_split(interactions, seed=config.split_seed, n_heldout_users=config.n_heldout_users,
                           cutoff=config.cutoff, leave_last=config.leave_last)
        check_evaluable(split)
    except InputError as e:  # about the data (too few users, or too few interactions each): name its source
        raise e.located(config.data.where) from None
    if config.time_split:
        d = split.describe()
        at = f"at {d['cutoff_utc']} UTC" if config.cutoff is not None else f"leaving the last {config.leave_last} out"
        logger.info("split in time %s: %d + %d held-out users kept of %d + %d drawn; training: %s users, %s "
                    "interactions (%s of their interactions not trained on)", at, d["validation"]["n_users"],
                    d["test"]["n_users"], split.n_heldout_users, split.n_heldout_users, f"{split.train.n_users:,}",
                    f"{split.train.nnz:,}", f"{d['train']['n_interactions_not_trained_on']:,}")
    if max(config.ks) > split.train.n_items:
        ks = ", ".join(map(str, config.ks))
        raise InputError(config.data.where, f"{split.train.n_items} items after preprocessing, fewer than "
                         f"{max(config.ks)}, the largest K of the metrics (Recall@K and NDCG@K at K = {ks}): a run "
                         f"needs at least {max(config.ks)} items")
    return split


def fit_and_evaluate(split, estimator, ks=(20, 50, 100), callbacks=(), resume_from: dict | None = None,
                     fit: bool = True, raise_error: bool = False, show_progress: bool = False) -> RunResult:
    """Fit ``estimator`` (an unfitted model, e.g. from :func:`make_model`) on ``split.train``
    (early stopping on validation), evaluate validation and test users.

    ``callbacks`` and ``resume_from`` go to a neural model's ``fit``; ``fit=False`` evaluates a
    model already fitted. A non-finite loss after a good epoch evaluates the epoch kept and
    returns the error in ``RunResult.error`` (raised after the evaluation with ``raise_error``).
    """
    error = None
    heldout = not isinstance(split, NoHoldout)  # holdout "none": nothing to validate or test
    start = time.perf_counter()
    if fit:
        extra = {"callbacks": callbacks, "resume_from": resume_from} if callbacks or resume_from else {}
        if trains_by_epochs(type(estimator)):
            extra["show_progress"] = show_progress
        try:
            estimator.fit(split.train, validation=split.validation if heldout else None, **extra)
        except NonFiniteLossError as e:
            if e.kept_epoch is None:
                raise
            error = e
    # a resumed run reports the time of all its segments: the earlier epochs' own timings
    earlier = (resume_from or {}).get("history", []) if fit else getattr(estimator, "history_", None) or []
    train_seconds = time.perf_counter() - start + sum(_epoch_seconds(h) for h in earlier)
    val = evaluate(estimator, split.validation, ks=ks) if heldout else None
    test = evaluate(estimator, split.test, ks=ks) if heldout else None
    result = RunResult(estimator, val, test, train_seconds, split, error)
    if raise_error and error is not None:
        raise error
    return result


def _epoch_seconds(row: dict) -> float:
    return float(row.get("seconds") or 0.0) + float(row.get("val_seconds") or 0.0)


def write_results(run_dir: RunDir, result: RunResult, plot: bool = True, keep_checkpoint: bool = False,
                  history: bool = False) -> None:
    """The model, metrics.json, then the picture (a failure drawing it must not lose the
    numbers); the checkpoint goes once the model is there unless ``keep_checkpoint`` (or the
    loss diverged: a resume with a lower lr starts from it)."""
    run_dir.save_model(result.model)
    if not keep_checkpoint and result.error is None:
        run_dir.remove_checkpoint()  # finished: nothing to resume (a diverged run keeps it, to go on)
    curve = getattr(result.model, "history_", None)
    if curve and history:  # a model trained without the run directory's checkpoint callback
        run_dir.write_history(curve)
    run_dir.write_metrics({
        "train_seconds": result.train_seconds,
        "validation": result.validation.to_dict() if result.validation else None,
        "test": result.test.to_dict() if result.test else None,
        "ended": "completed" if result.error is None else str(result.error),
    })
    if curve and plot:
        run_dir.draw_learning_curve(curve)


def write_run_dir(out: str | os.PathLike, config: RunConfig, split, result: RunResult, plot: bool = True,
                  overwrite: bool = False, extra=None, locked: bool = False, read: Recorded | None = None,
                  keep=()) -> Path:
    """A complete run directory for a model trained elsewhere (benchmarks, notebooks, ``tune``):
    what :func:`run` writes, in the same order, under the directory's lock (``locked``: the
    caller holds it). ``overwrite`` empties a run directory first. ``extra(run_dir)`` writes
    more files (``tune``'s table) before the metrics, which mark the run complete. ``read``: what
    the run records of its source (:class:`~recvae.data.source.Recorded`) when the caller read it
    with the data (``load_split(with_seen=True)``); else the source is read again for it. ``keep``: files of the directory that stay (``tune``'s
    study, :data:`recvae.rundir.STUDY_FILES`)."""
    run_dir = RunDir(out)
    run_dir.check_writable_for(overwrite=overwrite)
    with contextlib.nullcontext() if locked else run_dir.lock():
        run_dir.check_writable_for(overwrite=overwrite)
        run_dir.empty(keep)
        if read is None:
            read = record(config.data, split, *read_source(config.data))
        run_dir.write_description(describe(config, split, read.kept), split, read)
        if extra is not None:
            extra(run_dir)
        write_results(run_dir, result, plot and available("matplotlib"), history=True)
    return run_dir.path


def load_run(run_dir: str | os.PathLike, device=None) -> tuple[object, dict]:
    """The fitted model of a run directory and its ``run.json`` description; ``device`` (neural
    models) overrides the device stored with the model. Errors name the file at fault."""
    return RunDir(run_dir).load_finished(device=device)


