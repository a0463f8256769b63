"""One training run end to end: load data, split as the paper, fit, evaluate, keep the run.

What a run directory holds and how it is written, read and locked: :mod:`recvae.rundir`. This
module decides what a run does (the paper's protocol, resume, the order of the steps); the
estimator learns and writes nothing; the run directory's callbacks keep its checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae import __version__, distributed
from recvae.errors import ParameterError
from recvae.data import Interactions, load_movielens, read_table
from recvae.data.interactions import describe_kept
from recvae.data.prepared import load_prepared, read_prepared_description
from recvae.data.splits import strong_generalization_split
from recvae.evaluation import EvaluationResult, evaluate
from recvae.models import make_model
from recvae.models.device import resolve_device
from recvae.models.registry import default_params, is_neural
from recvae.models.training_loop import CheckpointMismatch, NonFiniteLossError
from recvae.optional import available, require
from recvae.rundir import CHECKPOINT_FILE, CURVE_FILE, RUN_JSON, RunDir, RunFinished

logger = logging.getLogger(__name__)

REPORT_METRICS = ("recall@20", "recall@50", "ndcg@100")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: model parameters a resumed run may change (see MultVAE.fit); the rest must equal run.json's
RESUMABLE_PARAMS = ("epochs", "patience", "lr", "device", "precision", "show_progress", "eval_batch_size")

__all__ = ["DataSpec", "RunConfig", "RunResult", "RunFinished", "ResumeMismatch", "run", "load_split",
           "fit_and_evaluate", "write_run_dir", "load_run", "make_model", "REPORT_METRICS"]


class ResumeMismatch(ValueError):
    """``resume=True`` with settings that differ from the run directory's ``run.json``.
    ``differences``: ``(setting, in run.json, now)`` with settings named as ``RunConfig`` fields
    (``data.path``, ``split_seed``, ``params.dropout``, ...)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences


@dataclass
class DataSpec:
    """Where interactions come from and how they are preprocessed (defaults: the paper's)."""

    dataset: str | None = None  # a MovieLens name, or None when `path` is given
    path: str | None = None  # an interaction file (CSV, TSV, ::, Parquet)
    # a prepared directory (recvae.data.prepared), read instead of the source; the other fields
    # then record where it came from and how it was preprocessed
    prepared: str | None = None
    data_dir: str | None = None
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str | None = "rating"
    sep: str | None = None
    rating_threshold: float | None = 3.5
    min_user_interactions: int = 5
    min_item_interactions: int = 0

    def __post_init__(self) -> None:
        if self.prepared is None and (self.dataset is None) == (self.path is None):
            raise ValueError("data: give exactly one of a MovieLens dataset name or an interaction file path")

    @classmethod
    def of_prepared(cls, prepared: str | os.PathLike) -> "DataSpec":
        """The spec of a prepared directory: its source and preprocessing, as ``recvae prepare`` recorded them."""
        recorded = read_prepared_description(prepared)["preprocessing"]
        known = {f.name for f in fields(cls)} - {"prepared"}
        return cls(**{k: v for k, v in recorded.items() if k in known}, prepared=str(prepared))

    @property
    def name(self) -> str:
        if self.dataset or self.path:
            return self.dataset if self.dataset else Path(self.path).stem
        return Path(self.prepared).name

    def check_optional(self) -> None:
        """Fail now, not after hours, when reading the data needs a package that is missing."""
        if self.path is not None and Path(self.path).suffix.lower() in PARQUET_SUFFIXES:
            require("pyarrow", f"{self.path}: reading Parquet")

    def load(self, show_progress: bool = False) -> Interactions:
        return self.load_with_seen(show_progress, seen=False)[0]

    def load_with_seen(self, show_progress: bool = False, seen: bool = True) -> tuple[Interactions, Interactions | None,
                                                                                       dict | None]:
        """The preprocessed interactions; with ``seen`` and a rating threshold, every interaction
        of the source at any rating (what ``recommend`` must not offer again), from one read of
        the source (None without a threshold: the positives are all the source holds; or for a
        prepared directory); and what preprocessing kept and dropped (a file's report, see
        :func:`~recvae.data.interactions.describe_kept`; None for MovieLens and prepared data)."""
        if self.prepared is not None:
            return load_prepared(self.prepared), None, None
        threshold = self.rating_threshold if (self.dataset is not None or self.rating_col) else None
        filters = dict(rating_threshold=threshold, min_user_interactions=self.min_user_interactions,
                       min_item_interactions=self.min_item_interactions)
        everything = dict(rating_threshold=None, min_user_interactions=0, min_item_interactions=0)
        want_raw = seen and threshold is not None
        if self.dataset is not None:
            options = dict(data_dir=self.data_dir, show_progress=show_progress)
            try:
                data = load_movielens(self.dataset, **filters, **options)
                # the unfiltered release comes from the cache MovieLens keeps (parsed once, ever)
                return data, load_movielens(self.dataset, **everything, **options) if want_raw else None, None
            except ParameterError as e:  # load_movielens's ``name`` is this spec's ``dataset``
                raise (e.renamed("dataset") if e.param == "name" else e) from None
        frame = read_table(self.path, sep=self.sep)  # parsed once for both
        columns = dict(user_col=self.user_col, item_col=self.item_col, rating_col=self.rating_col,
                       source=str(self.path))
        kept: dict = {}
        data = Interactions.from_dataframe(frame, **columns, **filters, report=kept)
        logger.info("%s: %s", self.path, describe_kept(kept))
        return data, Interactions.from_dataframe(frame, **columns, **everything) if want_raw else None, kept


@dataclass
class RunConfig:
    data: DataSpec
    model: str = "multvae"
    params: dict = field(default_factory=dict)  # hyperparameters passed to the model's __init__
    split_seed: int = 0
    n_heldout_users: int | None = None
    ks: tuple = (20, 50, 100)


@dataclass
class RunResult:
    model: object
    validation: EvaluationResult | None
    test: EvaluationResult
    train_seconds: float
    split: object  # the StrongSplit the model was trained and evaluated on
    error: NonFiniteLossError | None = None  # training diverged; the model is its best epoch before


def run(config: RunConfig, out: str | os.PathLike | None = None, show_progress: bool = False,
        resume: bool = False, overwrite: bool = False, keep_checkpoint: bool = False) -> RunResult:
    """Train ``config.model`` with the paper's protocol; keep the run directory when ``out`` is given.

    ``out`` must be new or empty, unless ``overwrite`` (a run directory, holding nothing of the
    user's, is emptied first) or ``resume`` (continue the run there from its checkpoint: the
    settings must equal its ``run.json`` except ``RESUMABLE_PARAMS``; :class:`RunFinished` when it
    finished). ``keep_checkpoint`` keeps ``checkpoint.pt`` after a successful finish. Everything
    is checked before anything is written, and again once the directory is locked (one writer
    at a time: :class:`recvae.rundir.RunLocked` for a second). A non-finite loss after a good
    epoch writes the whole run directory with that epoch's model, then raises the
    :class:`NonFiniteLossError`; at epoch 1 it removes what this run wrote.
    """
    estimator = make_model(config.model, **config.params)
    config.data.check_optional()
    if out is None and (resume or overwrite or keep_checkpoint):
        raise ValueError("resume, overwrite and keep_checkpoint need a run directory (out)")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    run_dir = RunDir(out) if out is not None else None
    main = distributed.current().is_main  # with several processes, rank 0 alone writes the run
    if run_dir is not None and main:  # the others could see rank 0's files
        _check_run_dir(run_dir, config, resume, overwrite)
    plot = available("matplotlib")
    if run_dir is not None and not plot:
        logger.warning("matplotlib is not installed: no learning_curve.png (pip install 'recvae[plot]')")
    if run_dir is None:
        return fit_and_evaluate(load_split(config, show_progress), estimator, ks=config.ks, raise_error=True)
    split, seen, kept = load_split(config, show_progress, with_seen=True)
    created = not run_dir.path.exists()
    with run_dir.lock() if main else contextlib.nullcontext():
        state = run_dir.state()
        if main:
            _check_run_dir(run_dir, config, resume, overwrite, locked=True)  # another writer may have come and gone
            if overwrite:
                run_dir.empty()
                state = "empty"
            if state in ("absent", "empty"):
                run_dir.write_description(_description(config, split, kept), split, seen)
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
                                      fit=not (resume and state == "trained"))
        except CheckpointMismatch as e:
            raise ValueError(f"resume: {run_dir.file(CHECKPOINT_FILE)} {e}") from None
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
                                       "start it without --resume")
    if not resume or not run_dir.entries():
        if resume:
            logger.info("resume: %s is empty or absent; starting the run from scratch", run_dir)
        return
    saved = run_dir.read_description()
    differences = resume_differences(config, saved)
    if differences:
        detail = "; ".join(f"{k}: {a!r} in run.json, now {b!r}" for k, a, b in differences)
        raise ResumeMismatch(f"resume: the settings differ from {run_dir.file(RUN_JSON)} ({detail})", differences)
    if run_dir.state() == "finished":
        note = ""
        if is_neural(config.model) and not run_dir.file(CURVE_FILE).is_file() and available("matplotlib"):
            if not locked:
                return  # drawn below, under the directory's lock
            run_dir.draw_learning_curve(run_dir.load_model().history_)
            note = "; drew the learning curve it lacked"
        raise RunFinished(f"--out {run_dir}: the run has finished (metrics.json, no {CHECKPOINT_FILE}): "
                          f"nothing to resume{note}")


def load_split(config: RunConfig, show_progress: bool = False, with_seen: bool = False):
    """``config``'s data, read and split as the paper (its ``split_seed``, ``n_heldout_users``);
    refused when the catalogue is smaller than the largest cutoff, as the run would train, then
    fail to evaluate. ``with_seen``: ``(split, seen, kept)``, the run's seen items from the same
    read (:func:`seen_interactions`) and what preprocessing kept."""
    interactions, raw, kept = config.data.load_with_seen(show_progress, seen=with_seen)
    split = strong_generalization_split(interactions, n_heldout_users=config.n_heldout_users, seed=config.split_seed)
    if max(config.ks) > split.train.n_items:
        raise ValueError(f"data {config.data.name}: {split.train.n_items} items after preprocessing, fewer than "
                         f"the largest cutoff of the metrics (K = {max(config.ks)}, ks={list(config.ks)})")
    return (split, seen_interactions(split, raw), kept) if with_seen else split


def fit_and_evaluate(split, estimator, ks=(20, 50, 100), callbacks=(), resume_from: dict | None = None,
                     fit: bool = True, raise_error: bool = False) -> RunResult:
    """Fit ``estimator`` (an unfitted model, e.g. from :func:`make_model`) on ``split.train``
    (early stopping on validation), evaluate validation and test users.

    ``callbacks`` and ``resume_from`` go to a neural model's ``fit``; ``fit=False`` evaluates a
    model already fitted. A non-finite loss after a good epoch evaluates the epoch kept and
    returns the error in ``RunResult.error`` (raised after the evaluation with ``raise_error``).
    """
    error = None
    start = time.perf_counter()
    if fit:
        extra = {"callbacks": callbacks, "resume_from": resume_from} if callbacks or resume_from else {}
        try:
            estimator.fit(split.train, validation=split.validation, **extra)
        except NonFiniteLossError as e:
            if e.kept_epoch is None:
                raise
            error = e
    # a resumed run reports the time of all its segments: the earlier epochs' own timings
    earlier = (resume_from or {}).get("history", []) if fit else getattr(estimator, "history_", None) or []
    train_seconds = time.perf_counter() - start + sum(_epoch_seconds(h) for h in earlier)
    val = evaluate(estimator, split.validation, ks=ks)
    test = evaluate(estimator, split.test, ks=ks)
    result = RunResult(estimator, val, test, train_seconds, split, error)
    if raise_error and error is not None:
        raise error
    return result


def _epoch_seconds(row: dict) -> float:
    return float(row.get("seconds") or 0.0) + float(row.get("val_seconds") or 0.0)


def resume_differences(config: RunConfig, saved: dict) -> list[tuple[str, object, object]]:
    """``(setting, saved, now)`` for each setting of ``config`` a resume may not change."""
    now = _description(config)
    diff = [(f"data.{k}", v, now["data"].get(k)) for k, v in saved.get("data", {}).items() if v != now["data"].get(k)]
    split_now = {"split_seed": config.split_seed, "n_heldout_users": config.n_heldout_users}
    split_saved = saved.get("split_settings", {})
    diff += [(k, split_saved.get(k), v) for k, v in split_now.items() if split_saved.get(k) != v]
    if saved.get("model") != config.model:
        return diff + [("model", saved.get("model"), config.model)]
    a, b = _all_params(config.model, saved.get("params", {})), _all_params(config.model, now["params"])
    diff += [(f"params.{k}", a.get(k), b.get(k)) for k in a if k not in RESUMABLE_PARAMS and a.get(k) != b.get(k)]
    if saved.get("ks") != now["ks"]:
        diff.append(("ks", saved.get("ks"), now["ks"]))
    return diff


def _all_params(model: str, params: dict) -> dict:
    """``params`` completed with the model's defaults, as JSON would store them (tuples as lists)."""
    return json.loads(json.dumps({**default_params(model), **params}, default=str))


def _description(config: RunConfig, split=None, kept: dict | None = None) -> dict:
    description = {
        "recvae_version": __version__,
        "data": asdict(config.data),
        "split_settings": {"split_seed": config.split_seed, "n_heldout_users": config.n_heldout_users},
        "model": config.model,
        "params": config.params,
        "ks": list(config.ks),
    }
    if kept is not None:
        description["kept"] = kept  # what preprocessing kept and each rule dropped
    if split is not None:
        description["split"] = split.describe()
    return json.loads(json.dumps(description, default=str))


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
        "test": result.test.to_dict(),
        "ended": "completed" if result.error is None else str(result.error),
    })
    if curve and plot:
        run_dir.draw_learning_curve(curve)


def seen_interactions(split, raw: Interactions | None) -> Interactions:
    """Every interaction of the run's users (training, validation, test; in that order) over the
    run's catalogue at any rating, from ``raw`` (the source without threshold or minimums), as
    an :class:`Interactions`. The training data keeps only ratings above the threshold;
    ``recommend`` must also exclude what a user rated lower. Without ``raw`` (no threshold)
    this is the known history."""
    users = np.concatenate([np.asarray(split.train.user_ids), np.asarray(split.validation.user_ids),
                            np.asarray(split.test.user_ids)])
    items = np.asarray(split.train.item_ids)
    if raw is None:
        known = [split.train.matrix] + [h.fold_in + h.heldout for h in (split.validation, split.test)]
        matrix = sp.vstack(known, format="csr")
    else:
        rows = raw.user_index(users)
        cols = raw.item_index(items)  # raw column of each catalogue item
        sub = raw.matrix[np.where(rows >= 0, rows, 0)][:, cols]
        sub = sp.diags((rows >= 0).astype(np.float32)) @ sub
        matrix = sub.tocsr()
    matrix.data[:] = 1.0
    matrix.eliminate_zeros()
    return Interactions(matrix.astype(np.float32).tocsr(), users, items)


def write_run_dir(out: str | os.PathLike, config: RunConfig, split, result: RunResult, plot: bool = True,
                  overwrite: bool = False, extra=None, locked: bool = False, seen: Interactions | None = None,
                  kept: dict | None = None, keep=()) -> Path:
    """A complete run directory for a model trained elsewhere (benchmarks, notebooks, ``tune``):
    what :func:`run` writes, in the same order, under the directory's lock (``locked``: the
    caller holds it). ``overwrite`` empties a run directory first. ``extra(run_dir)`` writes
    more files (``tune``'s table) before the metrics, which mark the run complete. ``seen``: the
    run's seen items when the caller read them with the data (``load_split(with_seen=True)``);
    else the source is read again for them. ``keep``: files of the directory that stay (``tune``'s
    study, :data:`recvae.rundir.STUDY_FILES`)."""
    run_dir = RunDir(out)
    run_dir.check_writable_for(overwrite=overwrite)
    with contextlib.nullcontext() if locked else run_dir.lock():
        run_dir.check_writable_for(overwrite=overwrite)
        run_dir.empty(keep)
        if seen is None:
            _, raw, kept = config.data.load_with_seen(seen=True)
            seen = seen_interactions(split, raw)
        run_dir.write_description(_description(config, split, kept), split, seen)
        if extra is not None:
            extra(run_dir)
        write_results(run_dir, result, plot and available("matplotlib"), history=True)
    return run_dir.path


def load_run(run_dir: str | os.PathLike, device=None) -> tuple[object, dict]:
    """The fitted model of a run directory and its ``run.json`` description; ``device`` (neural
    models) overrides the device stored with the model. Errors name the file at fault."""
    return RunDir(run_dir).load_finished(device=device)
