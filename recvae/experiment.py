"""One training run end to end: load data, split as the paper, fit, evaluate, write a run directory.

A run directory holds everything needed later::

    run.json            data source, preprocessing, split description, model name and parameters
    model/              the fitted model (weights, hyperparameters, item ids; no pickle)
    train.npz           training interactions (histories of known users, popularity fallback)
    validation.npz      held-out validation users (fold-in and held-out items)
    test.npz            held-out test users
    seen.npz            every interaction of the run's users at any rating (items `recommend` excludes)
    history.csv/.json   per-epoch history (neural models)
    metrics.json        validation and test metrics (mean, stderr, n_users)
    learning_curve.png  loss, KL, beta and validation NDCG@100 per epoch (needs matplotlib)
    checkpoint.pt       while a neural model trains (removed when it finishes unless kept)
    tuning.csv          the trials that chose the model (runs written by ``recvae tune``)

``run.json`` and the three ``.npz`` files are written before training starts, so an interrupted
run directory says what it was; ``metrics.json`` is written last, once the model is there.
"""

from __future__ import annotations

import inspect
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
from recvae.fileio import (
    atomic_write, ensure_writable_dir, is_temporary, read_json, read_npz, remove_temporaries, write_json,
)
from recvae.data import Interactions, load_movielens, read_interactions
from recvae.data.prepared import load_prepared, read_prepared_description
from recvae.data.splits import HeldOutUsers, strong_generalization_split
from recvae.evaluation import EvaluationResult, evaluate
from recvae.models import EASE, BinaryMultVAE, MultDAE, MultVAE, Popularity, RecVAE, load_model
from recvae.models.base import MODEL_FILE
from recvae.models.vae import CHECKPOINT_FILE, MODEL_DIR, NonFiniteLossError
from recvae.optional import available, require

SEEN_FILE = "seen.npz"  # read by recvae.recommend
TUNING_FILE = "tuning.csv"  # written by recvae.tuning.tune

logger = logging.getLogger(__name__)

MODELS = {"multvae": MultVAE, "multdae": MultDAE, "binary-multvae": BinaryMultVAE, "recvae": RecVAE, "ease": EASE,
          "popularity": Popularity}
NEURAL_MODELS = ("multvae", "multdae", "binary-multvae", "recvae")
REPORT_METRICS = ("recall@20", "recall@50", "ndcg@100")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: what a run directory may hold: --overwrite empties only a folder made of these
RUN_FILES = {"run.json", MODEL_DIR, "train.npz", SEEN_FILE, "validation.npz", "test.npz", "history.csv", "history.json",
             "metrics.json", "learning_curve.png", CHECKPOINT_FILE, TUNING_FILE}
#: model parameters a resumed run may change (see MultVAE.fit); the rest must equal run.json's
RESUMABLE_PARAMS = ("epochs", "patience", "lr", "device", "precision", "show_progress", "eval_batch_size",
                    "run_dir", "keep_checkpoint")


class RunFinished(Exception):
    """``resume=True`` on a run directory whose run finished: there is nothing to continue."""


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
        if self.prepared is not None:
            return load_prepared(self.prepared)
        if self.dataset is not None:
            return load_movielens(
                self.dataset,
                data_dir=self.data_dir,
                rating_threshold=self.rating_threshold,
                min_user_interactions=self.min_user_interactions,
                min_item_interactions=self.min_item_interactions,
                show_progress=show_progress,
            )
        return read_interactions(
            self.path,
            user_col=self.user_col,
            item_col=self.item_col,
            rating_col=self.rating_col,
            sep=self.sep,
            rating_threshold=self.rating_threshold if self.rating_col else None,
            min_user_interactions=self.min_user_interactions,
            min_item_interactions=self.min_item_interactions,
        )


@dataclass
class RunConfig:
    data: DataSpec
    model: str = "multvae"
    params: dict = field(default_factory=dict)  # hyperparameters passed to the model's __init__
    split_seed: int = 0
    n_heldout_users: int | None = None
    ks: tuple = (20, 50, 100)


def make_model(name: str, **params):
    """A model of the library by name (one of ``MODELS``), its hyperparameters checked (so a
    bad value fails before any data is read or written)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    model = MODELS[name](**params)
    model._check_params()
    return model


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
    """Train ``config.model`` with the paper's protocol; write the run directory when ``out`` is given.

    ``out`` must be new or empty, unless ``overwrite`` (a run directory is emptied first) or
    ``resume`` (continue the run there from its checkpoint: the settings must equal its
    ``run.json`` except ``RESUMABLE_PARAMS``; :class:`RunFinished` when it finished).
    ``keep_checkpoint`` keeps ``checkpoint.pt`` after a successful finish. Everything is checked
    before anything is written. A non-finite loss after a good epoch writes the whole run
    directory with that epoch's model, then raises the :class:`NonFiniteLossError`; at epoch 1
    it removes what this run wrote.
    """
    make_model(config.model, **config.params)
    config.data.check_optional()
    out = Path(out) if out is not None else None
    if out is None and (resume or overwrite or keep_checkpoint):
        raise ValueError("resume, overwrite and keep_checkpoint need a run directory (out)")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    if out is not None and distributed.current().is_main:  # the others could see rank 0's files
        check_out_dir(out, config, resume=resume, overwrite=overwrite)
    plot = available("matplotlib")
    if out is not None and not plot:
        logger.warning("matplotlib is not installed: no learning_curve.png (pip install 'recvae[plot]')")
    split = load_split(config, show_progress)
    main = distributed.current().is_main  # with several processes, rank 0 alone writes the run
    created = False
    if out is not None and main:  # only once the data is known good: a bad input leaves no folder behind
        created = not out.exists()
        _prepare_dir(out)
        if overwrite:
            _empty_dir(out)
        elif resume:  # a kill (SIGKILL) mid-write leaves the atomic writer's temporary file behind
            remove_temporaries(out)
        _write_description(out, config, split)
    params = dict(config.params)
    if out is not None and config.model in NEURAL_MODELS:
        params.update(run_dir=str(out), keep_checkpoint=keep_checkpoint)
    try:
        result = fit_and_evaluate(split, config.model, params, ks=config.ks, resume=resume)
    except NonFiniteLossError:
        if out is not None and main and not resume:  # nothing learnt: leave nothing of this run behind
            shutil.rmtree(out) if created else _empty_dir(out)
        raise
    if out is not None and main:
        _write_results(out, result, plot)
    if result.error is not None:
        raise result.error
    return result


def load_split(config: RunConfig, show_progress: bool = False):
    """``config``'s data, read and split as the paper (its ``split_seed``, ``n_heldout_users``);
    refused when the catalogue is smaller than the largest cutoff, as the run would train, then
    fail to evaluate."""
    interactions = config.data.load(show_progress=show_progress)
    split = strong_generalization_split(interactions, n_heldout_users=config.n_heldout_users, seed=config.split_seed)
    if max(config.ks) > split.train.n_items:
        raise ValueError(f"data {config.data.name}: {split.train.n_items} items after preprocessing, fewer than "
                         f"the largest cutoff of the metrics (K = {max(config.ks)}, ks={list(config.ks)})")
    return split


def fit_and_evaluate(split, model: str, params: dict, ks=(20, 50, 100), resume: bool = False) -> RunResult:
    """Fit a model by name on ``split.train`` (early stopping on validation), evaluate validation and test.

    A neural model with ``run_dir`` in ``params`` checkpoints there and saves itself into
    ``run_dir/model``; ``resume`` continues from its checkpoint (or, when fit had finished and
    only the evaluation was cut short, takes its saved model). A non-finite loss after a good
    epoch evaluates the epoch kept and returns the error in ``RunResult.error``.
    """
    estimator = make_model(model, **params)
    run_dir = getattr(estimator, "run_dir", None)
    resume = resume and run_dir is not None
    error = None
    start = time.perf_counter()
    try:
        if resume and not (Path(run_dir) / CHECKPOINT_FILE).exists() and (Path(run_dir) / MODEL_DIR / MODEL_FILE).exists():
            estimator = load_model(Path(run_dir) / MODEL_DIR, device=params.get("device"))
        else:
            estimator.fit(split.train, validation=split.validation, **({"resume": True} if resume else {}))
    except NonFiniteLossError as e:
        if e.kept_epoch is None:
            raise
        error = e
    train_seconds = time.perf_counter() - start
    val = evaluate(estimator, split.validation, ks=ks)
    test = evaluate(estimator, split.test, ks=ks)
    return RunResult(estimator, val, test, train_seconds, split, error)


def check_out_dir(out: Path, config: RunConfig, resume: bool = False, overwrite: bool = False,
                  resumable: bool = True) -> None:
    """Whether ``out`` may take this run: new or empty; a run directory with ``overwrite``; the
    same run's directory with ``resume``. Raises naming the directory (and setting) otherwise;
    ``resumable=False``: the message offers no resume (``tune``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        if resume:
            logger.info("resume: %s is empty or absent; starting the run from scratch", out)
        return
    listing = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not resume and not overwrite:
        raise ValueError(f"--out {out}: the directory already holds files ({listing}); pass --overwrite to "
                         "replace them" + (", or --resume to continue the run there" if resumable else ""))
    if overwrite:
        foreign = [n for n in entries if n not in RUN_FILES and not is_temporary(n)]
        if foreign:
            raise ValueError(f"--out {out}: --overwrite empties only run directories, and this one holds other "
                             f"files ({', '.join(foreign[:5])}); choose a new or empty directory")
        return
    if not (out / "run.json").is_file():
        raise ValueError(f"--out {out}: not a run directory (no run.json): nothing to resume")
    saved = read_json(out / "run.json")
    differences = resume_differences(config, saved)
    if differences:
        detail = "; ".join(f"{k}: {a!r} in run.json, now {b!r}" for k, a, b in differences)
        raise ResumeMismatch(f"resume: the settings differ from {out / 'run.json'} ({detail})", differences)
    if (out / "metrics.json").is_file() and not (out / CHECKPOINT_FILE).is_file():
        raise RunFinished(f"--out {out}: the run has finished (metrics.json, no {CHECKPOINT_FILE}): nothing to resume")


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
    defaults = {k: p.default for k, p in inspect.signature(MODELS[model].__init__).parameters.items() if k != "self"}
    return json.loads(json.dumps({**defaults, **params}, default=str))


def _description(config: RunConfig, split=None) -> dict:
    description = {
        "recvae_version": __version__,
        "data": asdict(config.data),
        "split_settings": {"split_seed": config.split_seed, "n_heldout_users": config.n_heldout_users},
        "model": config.model,
        "params": config.params,
        "ks": list(config.ks),
    }
    if split is not None:
        description["split"] = split.describe()
    return json.loads(json.dumps(description, default=str))


def _prepare_dir(out: Path) -> None:
    try:
        ensure_writable_dir(out)
    except PermissionError as e:
        raise PermissionError(f"--out {out}: {e}") from e


def _empty_dir(out: Path) -> None:
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _write_description(out: Path, config: RunConfig, split) -> None:
    """What the run is, before it trains: run.json and the split's interactions."""
    split.train.save(out / "train.npz")
    save_heldout(out / "validation.npz", split.validation)
    save_heldout(out / "test.npz", split.test)
    write_seen(out / SEEN_FILE, config.data, split)
    write_json(out / "run.json", _description(config, split))


def _write_results(out: Path, result: RunResult, plot: bool = True) -> None:
    """The model (neural models saved themselves into out/model), metrics.json, then the picture:
    a failure drawing it must not lose the numbers."""
    if getattr(result.model, "run_dir", None) is None:
        result.model.save(out / MODEL_DIR)
    metrics = {
        "train_seconds": result.train_seconds,
        "validation": result.validation.to_dict() if result.validation else None,
        "test": result.test.to_dict(),
        "ended": "completed" if result.error is None else str(result.error),
    }
    write_json(out / "metrics.json", metrics)
    history = getattr(result.model, "history_", None)
    if history and plot:
        plot_learning_curve(history, out / "learning_curve.png")


def write_seen(path: Path, data: DataSpec, split) -> None:
    """Every interaction of the source data, at any rating, of the run's users (training,
    validation, test; in that order) over the run's catalogue, as an :class:`Interactions`.

    The training data keeps only ratings above the threshold; ``recommend`` must also exclude
    what a user rated lower. Without a threshold this is the known history, so nothing is read.
    """
    users = np.concatenate([np.asarray(split.train.user_ids), np.asarray(split.validation.user_ids),
                            np.asarray(split.test.user_ids)])
    items = np.asarray(split.train.item_ids)
    if data.rating_threshold is None:
        known = [split.train.matrix] + [h.fold_in + h.heldout for h in (split.validation, split.test)]
        matrix = sp.vstack(known, format="csr")
    else:
        raw = DataSpec(**{**asdict(data), "rating_threshold": None, "min_user_interactions": 0,
                          "min_item_interactions": 0}).load()
        rows = raw.user_index(users)
        cols = raw.item_index(items)  # raw column of each catalogue item
        sub = raw.matrix[np.where(rows >= 0, rows, 0)][:, cols]
        sub = sp.diags((rows >= 0).astype(np.float32)) @ sub
        matrix = sub.tocsr()
    matrix.data[:] = 1.0
    matrix.eliminate_zeros()
    Interactions(matrix.astype(np.float32).tocsr(), users, items).save(path)


def write_run_dir(out: str | os.PathLike, config: RunConfig, split, result: RunResult, plot: bool = True,
                  overwrite: bool = False) -> Path:
    """A complete run directory for a model trained elsewhere (benchmarks, notebooks, ``tune``):
    what :func:`run` writes, in the same order: description and split, then model, metrics,
    plot. ``overwrite`` empties the directory first (check it with :func:`check_out_dir`)."""
    out = Path(out)
    _prepare_dir(out)
    if overwrite:
        _empty_dir(out)
    _write_description(out, config, split)
    _write_results(out, result, plot and available("matplotlib"))
    return out


def load_run(run_dir: str | os.PathLike, device=None) -> tuple[object, dict]:
    """The fitted model of a run directory and its ``run.json`` description; ``device`` (neural
    models) overrides the device stored with the model. Errors name the file at fault."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"RUN_DIR {run_dir}: not a run directory (no run.json)")
    if not (run_dir / MODEL_DIR / MODEL_FILE).is_file() and not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"RUN_DIR {run_dir}: the run has not finished (no model yet); continue it with "
                                "the `recvae train` command that started it plus --resume")
    description = read_json(run_dir / "run.json")
    for key, kind in (("model", str), ("data", dict)):
        if not isinstance(description.get(key), kind):
            raise ValueError(f"{run_dir / 'run.json'}: {key}: expected a {'string' if kind is str else 'JSON object'}, "
                             f"got {description.get(key)!r}")
    return load_model(run_dir / "model", device=device), description


def load_run_train(run_dir: str | os.PathLike, model) -> Interactions:
    """The training interactions ``train.npz`` of a run directory, checked against ``model``:
    its item ids must be the model's, in the same order (else every recommended id would be
    another item's); ``ValueError`` naming the file otherwise."""
    path = Path(run_dir) / "train.npz"
    train = Interactions.load(path)
    _check_items(path, train.n_items, model, train.item_ids)
    return train


def load_run_users(run_dir: str | os.PathLike, split: str, model) -> HeldOutUsers:
    """The held-out users ``<split>.npz`` of a run directory, checked against ``model``'s items."""
    path = Path(run_dir) / f"{split}.npz"
    users = load_heldout(path)
    _check_items(path, users.fold_in.shape[1], model)
    return users


def _check_items(path: Path, n_items: int, model, item_ids=None) -> None:
    if n_items != model.n_items_:
        raise ValueError(f"{path}: {n_items} items, but the model has {model.n_items_}: not the model's data")
    model_ids = getattr(model, "item_ids_", None)
    if item_ids is not None and model_ids is not None:
        same = len(model_ids) == len(item_ids) and all(
            type(a) is type(b) and a == b for a, b in zip(np.asarray(item_ids).tolist(), np.asarray(model_ids).tolist())
        )
        if not same:
            raise ValueError(f"{path}: its item ids differ from the model's (model/model.json): not the model's data")


def save_heldout(path: Path, users: HeldOutUsers) -> None:
    arrays = {"user_ids": np.asarray(users.user_ids)}
    for name in ("fold_in", "heldout"):
        m = users.__getattribute__(name).tocsr()
        arrays.update({f"{name}_indptr": m.indptr, f"{name}_indices": m.indices, f"{name}_shape": np.array(m.shape)})
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_heldout(path: Path) -> HeldOutUsers:
    z = read_npz(path, "held-out users")
    try:
        mats = {}
        for name in ("fold_in", "heldout"):
            indptr, indices = z[f"{name}_indptr"], z[f"{name}_indices"]
            mats[name] = sp.csr_matrix(
                (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=tuple(z[f"{name}_shape"])
            )
        return HeldOutUsers(fold_in=mats["fold_in"], heldout=mats["heldout"], user_ids=z["user_ids"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a valid held-out users file ({e})") from e


def plot_learning_curve(history: list[dict], path: Path) -> None:
    """Loss, KL, beta and validation NDCG@100 per epoch, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    panels = [k for k in ("loss", "nll", "kl", "beta", "val_ndcg@100") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
