"""One training run end to end: load data, split as the paper, fit, evaluate, write a run directory.

A run directory holds everything needed later::

    run.json            data source, preprocessing, split description, model name and parameters
    model/              the fitted model (weights, hyperparameters, item ids; no pickle)
    train.npz           training interactions (histories of known users, popularity fallback)
    validation.npz      held-out validation users (fold-in and held-out items)
    test.npz            held-out test users
    history.csv/.json   per-epoch history (neural models)
    metrics.json        validation and test metrics (mean, stderr, n_users)
    learning_curve.png  loss, KL, beta and validation NDCG@100 per epoch (needs matplotlib)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae import __version__, distributed
from recvae.fileio import atomic_write, ensure_writable_dir, write_json
from recvae.data import Interactions, load_movielens, read_interactions
from recvae.data.prepared import load_prepared, read_prepared_description
from recvae.data.splits import HeldOutUsers, strong_generalization_split
from recvae.evaluation import EvaluationResult, evaluate
from recvae.models import EASE, MultDAE, MultVAE, Popularity, load_model

logger = logging.getLogger(__name__)

MODELS = {"multvae": MultVAE, "multdae": MultDAE, "ease": EASE, "popularity": Popularity}
REPORT_METRICS = ("recall@20", "recall@50", "ndcg@100")


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
    """A model of the library by name (``multvae``, ``multdae``, ``ease``, ``popularity``)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**params)


@dataclass
class RunResult:
    model: object
    validation: EvaluationResult | None
    test: EvaluationResult
    train_seconds: float
    split: object  # the StrongSplit the model was trained and evaluated on


def run(config: RunConfig, out: str | os.PathLike | None = None, show_progress: bool = False) -> RunResult:
    """Train ``config.model`` with the paper's protocol; write the run directory when ``out`` is given."""
    interactions = config.data.load(show_progress=show_progress)
    split = strong_generalization_split(interactions, n_heldout_users=config.n_heldout_users, seed=config.split_seed)
    out = Path(out) if out is not None else None
    main = distributed.current().is_main  # with several processes, rank 0 alone writes the run
    if out is not None and main:  # only once the data is known good: a bad input leaves no folder behind
        _prepare_dir(out)
    result = fit_and_evaluate(split, config.model, config.params, ks=config.ks, run_dir=out)
    if out is not None and main:
        _write_run(out, config, split, result)
    return result


def fit_and_evaluate(split, model: str, params: dict, ks=(20, 50, 100), run_dir: Path | None = None) -> RunResult:
    """Fit a model by name on ``split.train`` (early stopping on validation), evaluate validation and test."""
    params = dict(params)
    if model in ("multvae", "multdae") and run_dir is not None:
        params.setdefault("run_dir", str(run_dir))
    estimator = make_model(model, **params)
    start = time.perf_counter()
    estimator.fit(split.train, validation=split.validation)
    train_seconds = time.perf_counter() - start
    val = evaluate(estimator, split.validation, ks=ks)
    test = evaluate(estimator, split.test, ks=ks)
    return RunResult(estimator, val, test, train_seconds, split)


def _prepare_dir(out: Path) -> None:
    try:
        ensure_writable_dir(out)
    except PermissionError as e:
        raise PermissionError(f"--out {out}: {e}") from e


def _write_run(out: Path, config: RunConfig, split, result: RunResult) -> None:
    result.model.save(out / "model")
    split.train.save(out / "train.npz")
    save_heldout(out / "validation.npz", split.validation)
    save_heldout(out / "test.npz", split.test)
    description = {
        "recvae_version": __version__,
        "data": asdict(config.data),
        "split": split.describe(),
        "model": config.model,
        "params": config.params,
        "ks": list(config.ks),
    }
    write_json(out / "run.json", description)
    metrics = {
        "train_seconds": result.train_seconds,
        "validation": result.validation.to_dict() if result.validation else None,
        "test": result.test.to_dict(),
    }
    write_json(out / "metrics.json", metrics)
    history = getattr(result.model, "history_", None)
    if history:
        try:
            plot_learning_curve(history, out / "learning_curve.png")
        except ImportError:
            logger.warning("matplotlib is not installed: no learning_curve.png (pip install 'recvae[plot]')")


def load_run(run_dir: str | os.PathLike, device=None) -> tuple[object, dict]:
    """The fitted model of a run directory and its ``run.json`` description; ``device`` (neural
    models) overrides the device stored with the model."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"RUN_DIR {run_dir}: not a run directory (no run.json)")
    description = json.loads((run_dir / "run.json").read_text())
    return load_model(run_dir / "model", device=device), description


def save_heldout(path: Path, users: HeldOutUsers) -> None:
    arrays = {"user_ids": np.asarray(users.user_ids)}
    for name in ("fold_in", "heldout"):
        m = users.__getattribute__(name).tocsr()
        arrays.update({f"{name}_indptr": m.indptr, f"{name}_indices": m.indices, f"{name}_shape": np.array(m.shape)})
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_heldout(path: Path) -> HeldOutUsers:
    with np.load(path, allow_pickle=False) as z:
        mats = {}
        for name in ("fold_in", "heldout"):
            indptr, indices = z[f"{name}_indptr"], z[f"{name}_indices"]
            mats[name] = sp.csr_matrix(
                (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=tuple(z[f"{name}_shape"])
            )
        return HeldOutUsers(fold_in=mats["fold_in"], heldout=mats["heldout"], user_ids=z["user_ids"])


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
