"""One training run end to end: load data, split as the paper, fit, evaluate, keep the run;
or train on every user (``holdout="none"``), and :func:`refit` a finished run that way.

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
import pandas as pd
import scipy.sparse as sp

from recvae import __version__, distributed
from recvae.errors import ParameterError
from recvae.data import Interactions, load_movielens, read_table
from recvae.data.interactions import describe_kept
from recvae.data.preprocessing import PAPER, Preprocessing
from recvae.data.prepared import load_prepared, read_prepared_description
from recvae.data.splits import NoHoldout, check_time_split, make_split, no_holdout
from recvae.evaluation import EvaluationResult, evaluate
from recvae.models import make_model
from recvae.models.device import resolve_device
from recvae.models.registry import default_params, is_neural
from recvae.models.training_loop import CheckpointMismatch, NonFiniteLossError
from recvae.optional import available, require
from recvae.fileio import read_json
from recvae.rundir import CHECKPOINT_FILE, CURVE_FILE, METRICS_FILE, RUN_JSON, RunDir, RunFinished

logger = logging.getLogger(__name__)

REPORT_METRICS = ("recall@20", "recall@50", "ndcg@100")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: model parameters a resumed run may change (see MultVAE.fit); the rest must equal run.json's
RESUMABLE_PARAMS = ("epochs", "patience", "lr", "device", "precision", "show_progress", "eval_batch_size")
#: ``RunConfig.holdout``: the paper's held-out validation and test users, or none (every user trains)
HOLDOUTS = ("users", "none")

__all__ = ["DataSpec", "RunConfig", "RunResult", "RunFinished", "ResumeMismatch", "run", "refit", "refit_config",
           "check_config", "load_split", "fit_and_evaluate", "write_run_dir", "load_run", "make_model",
           "dropped_users", "REPORT_METRICS"]


class ResumeMismatch(ValueError):
    """``resume=True`` with settings that differ from the run directory's ``run.json``.
    ``differences``: ``(setting, in run.json, now)`` with settings named as ``RunConfig`` fields
    (``data.path``, ``split_seed``, ``params.dropout``, ...)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences


@dataclass
class DataSpec:
    """Where interactions come from and how they are preprocessed (defaults: the paper's,
    :class:`~recvae.data.Preprocessing`'s; ``run.json`` records the three rules as flat fields)."""

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
    rating_threshold: float | None = PAPER.rating_threshold
    min_user_interactions: int = PAPER.min_user_interactions
    min_item_interactions: int = PAPER.min_item_interactions
    # the time column of `path`, read for a split in time (RunConfig.cutoff / leave_last) and only
    # then; a MovieLens dataset has GroupLens's ("timestamp"); a prepared directory keeps none
    timestamp_col: str | None = None

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
    def preprocessing(self) -> Preprocessing:
        """The preprocessing rules of this spec."""
        return Preprocessing(self.rating_threshold, self.min_user_interactions, self.min_item_interactions)

    @property
    def name(self) -> str:
        if self.dataset or self.path:
            return self.dataset if self.dataset else Path(self.path).stem
        return Path(self.prepared).name

    def check_optional(self) -> None:
        """Fail now, not after hours, when reading the data needs a package that is missing."""
        if self.path is not None and Path(self.path).suffix.lower() in PARQUET_SUFFIXES:
            require("pyarrow", f"{self.path}: reading Parquet")

    def load(self, show_progress: bool = False, timestamps: bool = False) -> Interactions:
        return self.load_with_seen(show_progress, seen=False, timestamps=timestamps)[0]

    def load_with_seen(self, show_progress: bool = False, seen: bool = True, timestamps: bool = False,
                       positives: dict | None = None) -> tuple[Interactions, Interactions | None, dict | None]:
        """The preprocessed interactions (with ``timestamps``, each interaction's time, for a
        split in time: from ``timestamp_col``); with ``seen`` and a rating threshold, every interaction
        of the source at any rating (what ``recommend`` must not offer again), from one read of
        the source (None without a threshold: the positives are all the source holds; or for a
        prepared directory); and what preprocessing kept and dropped (a file's report, see
        :func:`~recvae.data.interactions.describe_kept`; None for prepared data).
        ``positives`` (a dict) receives, under ``"positives"``, the source's positive interactions
        of every user, the preprocessing without its minimums (what :func:`dropped_users` counts),
        from the same read (not for prepared data)."""
        if timestamps:
            self.check_timestamps()
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
                kept: dict = {}
                data = load_movielens(self.dataset, **filters, timestamps=timestamps, report=kept, **options)
                logger.info("%s: %s", self.dataset, describe_kept(kept))
                if positives is not None:
                    positives["positives"] = (load_movielens(self.dataset, rating_threshold=threshold,
                                                             min_user_interactions=0, **options)
                                              if self.min_user_interactions or self.min_item_interactions else data)
                # the unfiltered release comes from the cache MovieLens keeps (parsed once, ever)
                return data, load_movielens(self.dataset, **everything, **options) if want_raw else None, kept
            except ParameterError as e:  # load_movielens's ``name`` is this spec's ``dataset``
                raise (e.renamed("dataset") if e.param == "name" else e) from None
        frame, locate = read_table(self.path, sep=self.sep, locate=True)  # parsed once for both
        columns = dict(user_col=self.user_col, item_col=self.item_col, rating_col=self.rating_col,
                       source=str(self.path))
        if timestamps and self.timestamp_col is None:
            raise ParameterError("timestamp_col", "a split in time needs the time of each interaction: name the "
                                                  f"column that holds it (columns: {list(frame.columns)})", str(self.path))
        kept: dict = {}
        data = Interactions.from_dataframe(frame, **columns, **filters, report=kept, locate=locate,
                                           timestamp_col=self.timestamp_col if timestamps else None)
        logger.info("%s: %s", self.path, describe_kept(kept))
        if positives is not None:
            positives["positives"] = (Interactions.from_dataframe(frame, **columns, rating_threshold=threshold,
                                                                  min_user_interactions=0, min_item_interactions=0)
                                      if self.min_user_interactions or self.min_item_interactions else data)
        return data, Interactions.from_dataframe(frame, **columns, **everything) if want_raw else None, kept

    def check_timestamps(self) -> None:
        """Whether this source can give timestamps (before it is read)."""
        if self.prepared is not None:
            raise ParameterError("prepared", f"{self.prepared} holds no timestamps (recvae prepare keeps none): "
                                             "split in time from the interaction file or the dataset")
        if self.dataset is not None and self.timestamp_col not in (None, "timestamp"):
            raise ParameterError("timestamp_col", f"{self.dataset}'s time column is GroupLens's 'timestamp', "
                                                  f"not {self.timestamp_col!r}")


@dataclass
class RunConfig:
    data: DataSpec
    model: str = "multvae"
    params: dict = field(default_factory=dict)  # hyperparameters passed to the model's __init__
    split_seed: int = 0
    n_heldout_users: int | None = None
    ks: tuple = (20, 50, 100)
    # "users": the paper's held-out validation and test users; "none": every user trains for the
    # model's fixed number of epochs (no validation, no early stopping, no test)
    holdout: str = "users"
    refit_of: dict | None = None  # a refit (see refit): the run its settings came from, its best epoch
    # a split in time instead of the paper's random fold-in (recvae.data.splits; one at most):
    cutoff: str | float | None = None  # one global time: ISO date/datetime (UTC without a zone) or Unix seconds
    leave_last: int | None = None  # each held-out user's last N interactions by time are the targets

    @property
    def time_split(self) -> bool:
        return self.cutoff is not None or self.leave_last is not None


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
    settings must equal its ``run.json`` except ``RESUMABLE_PARAMS``; :class:`RunFinished` when it
    finished). ``keep_checkpoint`` keeps ``checkpoint.pt`` after a successful finish. Everything
    is checked before anything is written, and again once the directory is locked (one writer
    at a time: :class:`recvae.rundir.RunLocked` for a second). A non-finite loss after a good
    epoch writes the whole run directory with that epoch's model, then raises the
    :class:`NonFiniteLossError`; at epoch 1 it removes what this run wrote.
    """
    estimator = check_config(config)
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
    split, (seen, kept, dropped) = load_split(config, show_progress, with_seen=True)
    created = not run_dir.path.exists()
    with run_dir.lock() if main else contextlib.nullcontext():
        state = run_dir.state()
        if main:
            _check_run_dir(run_dir, config, resume, overwrite, locked=True)  # another writer may have come and gone
            if overwrite:
                run_dir.empty()
                state = "empty"
            if state in ("absent", "empty"):
                run_dir.write_description(_description(config, split, kept), split, seen, dropped)
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


def check_config(config: RunConfig):
    """``config``'s model (unfitted), once its hyperparameters, holdout and optional packages
    are checked: what :func:`run` checks before it reads or writes anything."""
    estimator = make_model(config.model, **config.params)
    config.data.check_optional()
    if config.holdout not in HOLDOUTS:
        raise ParameterError("holdout", f"expected one of {', '.join(HOLDOUTS)}, got {config.holdout!r}")
    if config.holdout == "none":
        if config.n_heldout_users is not None:
            raise ParameterError("n_heldout_users", "holdout 'none' holds out no user; give one or the other")
        if config.params.get("patience") is not None:
            raise ParameterError("patience", "early stopping needs validation users, and holdout 'none' holds out "
                                             "none: every user trains for the fixed number of epochs")
        if config.time_split:
            raise ParameterError("cutoff" if config.cutoff is not None else "leave_last",
                                 "a split in time chooses held-out users, and holdout 'none' holds out none; "
                                 "give one or the other")
    return estimator


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
    """``config``'s data, read and split (its ``split_seed``, ``n_heldout_users``): as the paper,
    in time with ``cutoff`` or ``leave_last`` (:func:`recvae.data.make_split`), or every user in
    training with ``holdout="none"`` (a :class:`~recvae.data.splits.NoHoldout`); refused when
    the catalogue is smaller than the largest cutoff of the metrics, as the run would train, then
    fail to evaluate. ``with_seen``: ``(split, (seen, kept, dropped))``, with what a run directory
    records of the same read: the run's seen items (:func:`seen_interactions`), what preprocessing
    kept and the users it dropped (:func:`dropped_users`)."""
    _check_split_settings(config)
    if not with_seen:
        return _split(config, config.data.load(show_progress, timestamps=config.time_split))
    interactions, raw, kept, positives = _read(config.data, show_progress, timestamps=config.time_split)
    split = _split(config, interactions)
    return split, (seen_interactions(split, raw), kept, dropped_users(config.data, positives, interactions, split, raw))


def _read(data: DataSpec, show_progress: bool = False, timestamps: bool = False):
    """One read of ``data``'s source: ``(interactions, raw, kept, positives)`` (see
    :meth:`DataSpec.load_with_seen`)."""
    positives: dict = {}
    interactions, raw, kept = data.load_with_seen(show_progress, seen=True, timestamps=timestamps, positives=positives)
    return interactions, raw, kept, positives.get("positives")


def _check_split_settings(config: RunConfig) -> None:
    check_time_split(config.cutoff, config.leave_last)
    if config.data.timestamp_col is not None and not config.time_split:
        raise ParameterError("timestamp_col", f"{config.data.timestamp_col!r} given without a split in time "
                                              "(cutoff or leave_last), the one use of timestamps")


def _split(config: RunConfig, interactions: Interactions):
    if config.holdout == "none":
        return no_holdout(interactions)
    split = make_split(interactions, seed=config.split_seed, n_heldout_users=config.n_heldout_users,
                       cutoff=config.cutoff, leave_last=config.leave_last)
    if config.time_split:
        d = split.describe()
        at = f"at {d['cutoff_utc']} UTC" if config.cutoff is not None else f"leaving the last {config.leave_last} out"
        logger.info("split in time %s: %d + %d held-out users kept of %d + %d drawn; training: %s users, %s "
                    "interactions (%s of their interactions not trained on)", at, d["validation"]["n_users"],
                    d["test"]["n_users"], split.n_heldout_users, split.n_heldout_users, f"{split.train.n_users:,}",
                    f"{split.train.nnz:,}", f"{d['train']['n_interactions_not_trained_on']:,}")
    if max(config.ks) > split.train.n_items:
        raise ValueError(f"data {config.data.name}: {split.train.n_items} items after preprocessing, fewer than "
                         f"the largest cutoff of the metrics (K = {max(config.ks)}, ks={list(config.ks)})")
    return split


#: why a user of the source is not a user of the run (``dropped_users.csv``'s ``reason``)
DROP_REASONS = ("rating_threshold", "min_user_interactions", "min_item_interactions", "split")


def dropped_users(data: DataSpec, positives: Interactions | None, interactions: Interactions, split,
                  raw: Interactions | None) -> pd.DataFrame | None:
    """The users of ``data``'s source that the run does not know, as ``(user, interactions,
    reason)`` rows: no rating above the threshold (``rating_threshold``, 0 interactions), fewer
    positive interactions than the user minimum (``min_user_interactions``, their count), every
    item dropped by the item minimum (``min_item_interactions``), or a held-out user with too few
    items on the training catalogue to hold any out (``split``, their count there).
    ``positives``: the source's positives of every user (see :meth:`DataSpec.load_with_seen`);
    ``interactions``: the preprocessed data ``split`` was made of; ``raw``: the source at any
    rating (None without a threshold). None for prepared data (its source is not at hand)."""
    if data.prepared is not None or positives is None:
        return None
    parts = []
    if raw is not None:
        none = ~pd.Index(raw.user_ids).isin(positives.user_ids)
        parts.append((raw.user_ids[none], np.zeros(int(none.sum()), dtype=np.int64), "rating_threshold"))
    out = ~pd.Index(positives.user_ids).isin(interactions.user_ids)
    counts = np.diff(positives.matrix.indptr)[out]
    for reason, pick in (("min_user_interactions", counts < data.min_user_interactions),
                         ("min_item_interactions", counts >= data.min_user_interactions)):
        parts.append((positives.user_ids[out][pick], counts[pick], reason))
    known = np.concatenate([np.asarray(h.user_ids) for h in (split.train, split.validation, split.test)])
    rows = np.flatnonzero(~pd.Index(interactions.user_ids).isin(known))
    if rows.size:
        cols = interactions.item_index(np.asarray(split.item_ids))
        on_catalogue = np.diff(interactions.matrix[rows][:, cols].tocsr().indptr)
        parts.append((interactions.user_ids[rows], on_catalogue, "split"))
    users = np.concatenate([np.asarray(u, dtype=object) for u, _, _ in parts])
    return pd.DataFrame({"user": users, "interactions": np.concatenate([c for _, c, _ in parts]).astype(np.int64),
                         "reason": np.concatenate([[r] * len(u) for u, _, r in parts]).astype(object)})


def fit_and_evaluate(split, estimator, ks=(20, 50, 100), callbacks=(), resume_from: dict | None = None,
                     fit: bool = True, raise_error: bool = False) -> RunResult:
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


def resume_differences(config: RunConfig, saved: dict) -> list[tuple[str, object, object]]:
    """``(setting, saved, now)`` for each setting of ``config`` a resume may not change."""
    now = _description(config)
    diff = [(f"data.{k}", v, now["data"].get(k)) for k, v in saved.get("data", {}).items() if v != now["data"].get(k)]
    split_now = _split_settings(config)
    split_saved = {"holdout": "users", **saved.get("split_settings", {})}  # runs from before holdout: users
    keys = dict.fromkeys(["split_seed", "n_heldout_users", "holdout", "cutoff", "leave_last", *split_saved, *split_now])
    diff += [(k, split_saved.get(k), split_now.get(k)) for k in keys if split_saved.get(k) != split_now.get(k)]
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


def _split_settings(config: RunConfig) -> dict:
    """The split's settings as run.json records them (a split in time's only when it is one)."""
    settings = {"split_seed": config.split_seed, "n_heldout_users": config.n_heldout_users, "holdout": config.holdout}
    settings.update({k: v for k, v in (("cutoff", config.cutoff), ("leave_last", config.leave_last)) if v is not None})
    return settings


def _description(config: RunConfig, split=None, kept: dict | None = None) -> dict:
    description = {
        "recvae_version": __version__,
        "data": asdict(config.data),
        "split_settings": _split_settings(config),
        "model": config.model,
        "params": config.params,
        "ks": list(config.ks),
    }
    if config.refit_of is not None:
        description["refit_of"] = config.refit_of
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
        "test": result.test.to_dict() if result.test else None,
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
                  overwrite: bool = False, extra=None, locked: bool = False, read: tuple | None = None,
                  keep=()) -> Path:
    """A complete run directory for a model trained elsewhere (benchmarks, notebooks, ``tune``):
    what :func:`run` writes, in the same order, under the directory's lock (``locked``: the
    caller holds it). ``overwrite`` empties a run directory first. ``extra(run_dir)`` writes
    more files (``tune``'s table) before the metrics, which mark the run complete. ``read``: the
    run's seen items, kept counts and dropped users when the caller read them with the data
    (``load_split(with_seen=True)``); else the source is read again for them. ``keep``: files of the directory that stay (``tune``'s
    study, :data:`recvae.rundir.STUDY_FILES`)."""
    run_dir = RunDir(out)
    run_dir.check_writable_for(overwrite=overwrite)
    with contextlib.nullcontext() if locked else run_dir.lock():
        run_dir.check_writable_for(overwrite=overwrite)
        run_dir.empty(keep)
        if read is None:
            interactions, raw, kept, positives = _read(config.data)
            read = (seen_interactions(split, raw), kept, dropped_users(config.data, positives, interactions, split, raw))
        seen, kept, dropped = read
        run_dir.write_description(_description(config, split, kept), split, seen, dropped)
        if extra is not None:
            extra(run_dir)
        write_results(run_dir, result, plot and available("matplotlib"), history=True)
    return run_dir.path


def load_run(run_dir: str | os.PathLike, device=None) -> tuple[object, dict]:
    """The fitted model of a run directory and its ``run.json`` description; ``device`` (neural
    models) overrides the device stored with the model. Errors name the file at fault."""
    return RunDir(run_dir).load_finished(device=device)


# -- refit: the chosen settings on every user ------------------------------------------------

def holdout_of(description: dict) -> str:
    """A run's holdout (``run.json``): ``users`` or ``none``; runs from before the setting held users out."""
    return description.get("split_settings", {}).get("holdout", "users")


def refit_config(run_dir: str | os.PathLike, show_progress: bool = False, device: str | None = None) -> RunConfig:
    """The settings that retrain the finished run ``run_dir`` on every user of the same data:
    its data source and preprocessing, model and hyperparameters, with ``holdout="none"`` and, for
    a neural model, ``epochs`` = the epoch its model was kept from (by validation; no early
    stopping). Refused, naming the directory: not a run directory, a run that has not finished
    (or stopped on a non-finite loss), a damaged one (its files are read and checked), or a run
    that has no held-out users already."""
    source = RunDir(run_dir)
    description = source.read_description()  # not a run directory / a damaged run.json: one line naming it
    if holdout_of(description) == "none":
        origin = description.get("refit_of") or {}
        note = f" (a refit of {origin['run']})" if origin.get("run") else ""
        raise ValueError(f"RUN_DIR {run_dir}: the run has no held-out users already{note}: it trained on every "
                         "user, so there is nothing to refit")
    if not source.completed():
        raise ValueError(f"RUN_DIR {run_dir}: the run has not finished (no model or no {METRICS_FILE}); finish it "
                         "with the `recvae train` command that started it plus --resume, then refit")
    ended = read_json(source.file(METRICS_FILE)).get("ended", "completed")
    if ended != "completed":
        raise ValueError(f"RUN_DIR {run_dir}: its training did not complete ({ended}), so it has no best epoch "
                         "to refit with; resume it with a lower --lr first")
    model = source.load_model(device="cpu")  # a damaged or replaced model is refused by name
    name = description["model"]
    params = dict(description.get("params") or {})
    best_epoch = None
    if is_neural(name):
        best_epoch = int(model.best_epoch_)
        params["epochs"] = best_epoch
        params.pop("patience", None)
    accepted = default_params(name)
    params.update({k: v for k, v in (("show_progress", show_progress), ("device", device))
                   if k in accepted and (v is not None)})
    try:
        # every interaction, whatever its time: a split in time chose the settings, the deployed
        # model learns from all that is known
        data = DataSpec(**{**description["data"], "timestamp_col": None})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source.file(RUN_JSON)}: data: not a data description this recvae reads ({e})") from None
    return RunConfig(data=data, model=name, params=params, split_seed=int(description.get("split_settings", {})
                     .get("split_seed", 0)), ks=tuple(description.get("ks", (20, 50, 100))), holdout="none",
                     refit_of={"run": str(run_dir), "best_epoch": best_epoch})


def refit(run_dir: str | os.PathLike, out: str | os.PathLike, show_progress: bool = False, overwrite: bool = False,
          resume: bool = False, keep_checkpoint: bool = False, device: str | None = None) -> RunResult:
    """Retrain the finished run ``run_dir``'s model on every user of its data into the new run
    directory ``out`` (settings: :func:`refit_config`; EASE and popularity simply fit on all
    users) and return the result (no metrics: nothing is held out). ``out``'s ``run.json``
    records ``holdout: "none"`` and ``refit_of`` (the run, its best epoch). ``overwrite``,
    ``resume`` and ``keep_checkpoint`` are :func:`run`'s, for ``out``."""
    config = refit_config(run_dir, show_progress=show_progress, device=device)
    if Path(out).absolute().resolve() == Path(run_dir).absolute().resolve():
        raise ParameterError("out", f"{out} is the run being refit; write the refit to another directory")
    result = run(config, out, show_progress=show_progress, resume=resume, overwrite=overwrite,
                 keep_checkpoint=keep_checkpoint)
    before = read_json(RunDir(run_dir).file(RUN_JSON)).get("split", {})
    then = sum(int(before.get(k, {}).get(n, 0)) for k, n in (("train", "n_users"), ("validation", "n_users_drawn"),
                                                                ("test", "n_users_drawn")))
    if then and then != result.split.train.n_users:
        logger.warning("%s: the data now hold %d users after preprocessing, the run %s had %d: its source changed",
                       out, result.split.train.n_users, run_dir, then)
    return result
