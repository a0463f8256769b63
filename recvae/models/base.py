"""The interface every model of the library shares: fit, score, recommend."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from recvae.data.user_items import as_csr
from recvae.errors import InputError, NotFittedError, ParameterError
from recvae.fileio import read_json, sha256_file, write_json
from recvae.metrics import mask_rows, top_k_with_scores
from recvae.models.habits import Habits, check_indices
from recvae.models.params import Choice, Param, check_table, json_params, make_init, parameters_doc

logger = logging.getLogger(__name__)

#: the precisions scoring can run in (:meth:`Recommender.set_scoring_precision`); the torch side
#: maps each to its dtype (``output_layer.SCORE_DTYPES``)
SCORING_PRECISIONS = ("fp32", "bf16")

#: every saved model folder holds this JSON (class name, hyperparameters, item ids, file digests)
MODEL_FILE = "model.json"
#: bumped when the layout of a saved model changes. 2: ``files`` records the SHA-256 of every
#: weight/array file. Folders of version 1 (no digests) still load, with a warning.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: keys of every model.json; a model class adds its own in ``_meta_keys``
_META_KEYS = ("format_version", "class", "params", "n_items", "item_ids", "files")
#: settings that earlier versions saved as hyperparameters (where the run was written): dropped on load
_RETIRED_PARAMS = ("run_dir", "keep_checkpoint", "show_progress")


def warn_if_not_binary(X: sp.csr_matrix, model: str, use: str) -> None:
    """One warning (per call: ``fit`` calls it once) when the training matrix holds values other
    than 1, e.g. raw 0.5-5 star ratings: ``model`` uses them as ``use`` says, which is rarely
    what implicit feedback means. Binary data (the library's preprocessing) passes silently."""
    other = X.data != 1
    if not X.nnz or not other.any():
        return
    logger.warning(
        "train: %s of %s values are not 1 (from %g to %g): %s uses them as %s; for implicit feedback "
        "binarize them first, e.g. keep ratings > 3.5 with recvae.data.Preprocessing (the default of "
        "read_interactions and Interactions.from_dataframe with rating_col) or pass X.sign()",
        f"{int(other.sum()):,}", f"{X.nnz:,}", float(X.data.min()), float(X.data.max()), model, use)


def write_model_meta(folder: Path, model: "Recommender", params: dict, files: Sequence[str], **extra) -> Path:
    """Write ``folder/model.json`` for ``model`` whose weight/array ``files`` (names in
    ``folder``) are already written: class, hyperparameters, item ids, the SHA-256 of each
    file (checked by :func:`verified_file` at load) and the class's ``extra`` fields."""
    item_ids = getattr(model, "item_ids_", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "class": type(model).__name__,
        "params": params,
        "n_items": int(model.n_items_),
        "item_ids": None if item_ids is None else np.asarray(item_ids).tolist(),
        "files": {name: sha256_file(folder / name) for name in files},
        **extra,
    }
    write_json(folder / MODEL_FILE, meta, indent=1)
    return folder / MODEL_FILE


def read_model_meta(path, cls: type | None = None) -> tuple[Path, dict]:
    """``(path/model.json, its content)`` of a folder written by a model's ``save()``, checked:
    errors (``ValueError``, one line) name the file and the key that is missing, unknown, of
    another format version or inconsistent (``n_items`` vs the item ids). With ``cls``, the
    class and its hyperparameter names are checked too."""
    meta_file = Path(path) / MODEL_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"path: no {MODEL_FILE} in {path}; expected a folder written by a model's save()")
    meta = read_json(meta_file)
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise InputError(meta_file, f"format_version {version!r}, expected {FORMAT_VERSION}")
    required = [k for k in _META_KEYS if k != "files" or version >= 2]
    if cls is not None:
        if meta.get("class") != cls.__name__:
            raise InputError(meta_file, f"holds a {meta.get('class')}, not a {cls.__name__}")
        required += list(cls._meta_keys)
    missing = [k for k in required if k not in meta]
    if missing:
        raise InputError(meta_file, f"missing key(s) {', '.join(map(repr, missing))}")
    if cls is not None:
        unknown = sorted(set(meta) - set(required))
        if unknown:
            raise InputError(meta_file, f"unknown key(s) {', '.join(map(repr, unknown))}")
        if not isinstance(meta["params"], dict):
            raise InputError(meta_file, f"params: expected an object, got {type(meta['params']).__name__}")
        meta["params"] = {k: v for k, v in meta["params"].items() if k not in _RETIRED_PARAMS}
        unknown = sorted(set(meta["params"]) - set(cls._param_names()))
        if unknown:
            raise InputError(meta_file, f"params: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}")
    n_items, item_ids = meta["n_items"], meta["item_ids"]
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise InputError(meta_file, f"n_items: expected a positive integer, got {n_items!r}")
    if item_ids is not None:
        if not isinstance(item_ids, list) or len(item_ids) != n_items:
            got = f"{len(item_ids)} ids" if isinstance(item_ids, list) else type(item_ids).__name__
            raise InputError(meta_file, f"item_ids: expected a list of n_items = {n_items} ids, got {got}")
        if len(set(map(repr, item_ids))) != n_items:
            raise InputError(meta_file, "item_ids: the ids are not unique")
    files = meta.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(isinstance(v, str) and len(v) == 64 for v in files.values())
    ):
        raise InputError(meta_file, "files: expected an object of file name -> SHA-256 (64 hex digits)")
    return meta_file, meta


def verified_file(meta_file: Path, meta: dict, name: str) -> Path:
    """The path of the model file ``name`` beside ``meta_file`` once its SHA-256 equals the one
    ``model.json`` records; ``ValueError`` naming the file when it differs (damaged or replaced).
    Folders of format version 1 record no digests: loaded unverified, with a warning."""
    path = meta_file.parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (part of the model described by {meta_file})")
    digests = meta.get("files")
    if digests is None:
        logger.warning(
            "%s: saved by an older recvae (format_version 1) without file digests: %s is not verified; "
            "save the model again to record them", meta_file, name,
        )
        return path
    if name not in digests:
        raise InputError(meta_file, f"files: no SHA-256 recorded for {name}")
    actual = sha256_file(path)
    if actual != digests[name]:
        raise InputError(
            path, f"damaged or replaced: its SHA-256 {actual[:16]}... differs from the "
            f"{digests[name][:16]}... recorded in {meta_file}"
        )
    return path


def check_finite(path: Path, arrays: dict) -> None:
    """``ValueError`` naming the file and the first array (tensor) of ``arrays`` that holds NaN
    or infinity: such a model would rank items arbitrarily."""
    for name, values in arrays.items():
        values = np.asarray(values)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise InputError(path, f"{name!r} holds {bad} non-finite value(s) (NaN or infinity); the model is unusable")


def check_shapes(path: Path, arrays: dict, expected: dict) -> None:
    """``ValueError`` naming the file when ``arrays`` lacks, adds or misshapes one of ``expected``
    (name -> shape), e.g. weights that do not fit the stored number of items."""
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unknown}"] if unknown else [])
        raise InputError(path, f"arrays do not match the model: {', '.join(parts)}")
    for name, shape in expected.items():
        got = tuple(np.shape(arrays[name]))
        if got != tuple(shape):
            raise InputError(path, f"{name!r} has shape {got}, expected {tuple(shape)} from model.json (n_items, "
                                   "params)")


class Recommender(Habits):
    """Base class: subclasses implement ``fit`` and ``_score_batch``; scikit-learn's and implicit's
    habits (``similar_items``, factors, tags) come from :class:`~recvae.models.habits.Habits`.

    ``fit`` must set ``n_items_``. Scores are for items in the training item index space.
    """

    #: rows scored at once by ``score``/``recommend``; bounds dense memory to batch x items
    batch_size_predict: int = 1000
    #: keys of this class's model.json beyond the common ones
    _meta_keys: tuple[str, ...] = ()
    #: the precision scoring runs in (:meth:`set_scoring_precision`): how to serve, not a
    #: hyperparameter, so neither saved nor cloned
    scoring_precision: str = "fp32"
    #: the scoring precisions this class supports
    _scoring_precisions: tuple[str, ...] = ("fp32",)

    #: the hyperparameters, declared once (:mod:`recvae.models.params`): a class that declares
    #: them and no ``__init__`` gets one that stores them, and a Parameters section in its docstring
    PARAMETERS: tuple[Param, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "PARAMETERS" not in cls.__dict__:
            return
        check_table(cls.PARAMETERS, cls.__name__)
        if "__init__" not in cls.__dict__:
            cls.__init__ = make_init(cls.PARAMETERS, cls.__qualname__)
        if cls.__doc__ and "\nParameters\n" not in cls.__doc__ and cls.PARAMETERS:
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n" + parameters_doc(cls.PARAMETERS) + "\n"

    @classmethod
    def _param_names(cls) -> list[str]:
        """The hyperparameters: the table's names (a class without a table: ``__init__``'s keywords)."""
        if cls.PARAMETERS:
            return [p.name for p in cls.PARAMETERS]
        if cls.__init__ is object.__init__:
            return []
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    # -- scikit-learn style parameters: __init__ stores them, these read and set them ----------
    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ParameterError(k, f"not a parameter of {type(self).__name__}; expected one of {sorted(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def fit(self, train, validation=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def set_scoring_precision(self, precision: str):
        """Score (``score``, ``recommend``, evaluation) in ``precision``; returns ``self``.

        ``"fp32"`` (the default): float32 throughout. ``"bf16"`` (the autoencoders): the output
        layer's product, which reads the whole I x H weight for every batch and is nearly all of
        a request's cost, runs in bfloat16 on a bf16 copy of that weight kept beside it: half the
        bytes read, and native bf16 products where the hardware has them. Scores then differ from
        float32's in about the third significant digit, so items with nearly equal scores may swap
        places; ``benchmarks/serving.py`` measures how often a top-10 list changes. Training is
        not affected (see ``precision``)."""
        Choice(SCORING_PRECISIONS).check("precision", precision)
        if precision not in self._scoring_precisions:
            raise ParameterError("precision", f"{type(self).__name__} scores in float32 only "
                                              f"(expected one of {list(self._scoring_precisions)}, got {precision!r})")
        self.scoring_precision = precision
        return self

    def save(self, path) -> Path:  # pragma: no cover - abstract
        """Write the fitted model into the folder ``path`` (``model.json`` and its files)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path, device=None):  # pragma: no cover - abstract
        """A fitted model from a folder written by :meth:`save`; ``device`` matters to torch models."""
        raise NotImplementedError

    def _check_params(self) -> None:
        """Raise :class:`ParameterError` naming a bad hyperparameter: each value against its row of
        the table; a class adds its rules across parameters. ``fit`` calls it, and so does
        :func:`recvae.models.make_model`, before any data is read or anything written."""
        for p in self.PARAMETERS:
            p.check(getattr(self, p.name))

    def _check_catalogue(self, n_items: int) -> None:
        """:class:`ParameterError` when this model cannot be fitted on ``n_items`` items (its
        memory bound); the command line asks before it writes anything. Nothing here."""

    def _json_params(self) -> dict:
        """Every hyperparameter as ``model.json`` and ``run.json`` store it."""
        if not self.PARAMETERS:
            return self.get_params()
        return json_params(self.PARAMETERS, self.get_params())

    @classmethod
    def _params_from_json(cls, params: dict) -> dict:
        """``model.json``'s params as ``__init__`` takes them (lists back to tuples)."""
        rows = {p.name: p for p in cls.PARAMETERS}
        return {k: rows[k].from_json(v) if k in rows else v for k, v in params.items()}

    def _score_batch(self, user_items: sp.csr_matrix) -> np.ndarray:  # pragma: no cover - abstract
        """Dense float32 scores (batch, n_items) for a CSR batch of user histories."""
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_items_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit() first")

    def score(self, user_items) -> np.ndarray:
        """Dense float32 scores (users, n_items) for the given histories (a CSR batch).

        Only call on batches: the result is dense. ``recommend`` and
        :func:`recvae.evaluation.evaluate` batch for you.
        """
        self._check_fitted()
        user_items = as_csr(user_items, "user_items", self.n_items_)
        return np.asarray(self._score_batch(user_items), dtype=np.float32)

    def recommend(
        self,
        userid=None,
        user_items=None,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items=None,
        batch_size: int | None = None,
        exclude=None,
        recalculate_user: bool = True,
        items=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-N items for each row of ``user_items`` (users x items CSR of histories).

        Two call forms: ``recommend(user_items, N=10)`` (every row a user), and implicit's
        ``recommend(userid, user_items[userid], N=10)``: ``userid`` one id (then the answer is
        1-d) or an array of ids, ``user_items`` their rows (the ids only label the rows: an
        autoencoder folds each history in, so any user, seen in training or not, works).

        Returns ``(ids, scores)``, each of shape (users, min(N, n_items)), best first: an N
        beyond the catalogue returns the whole catalogue, and memory never grows with N past
        it. Items in a user's history are excluded when ``filter_already_liked_items``; item
        indices in ``filter_items`` are excluded for everyone; the stored entries of row ``u``
        of ``exclude`` (a CSR of the same shape, e.g. items rated below a threshold) are
        excluded for user ``u``. ``items`` (implicit's keyword): item indices to rank, the only
        ones that can come back (the others are excluded for everyone, as ``filter_items``
        excludes its own; the two combine); N is then at most ``len(items)``. Where fewer items
        are left, the remaining slots hold id -1 and score -inf.

        ``recalculate_user`` (implicit's keyword) is accepted for code written for implicit,
        and changes nothing: every user is computed from their row of ``user_items`` (the
        autoencoders fold it in, EASE multiplies it by ``B_``), which is implicit's
        ``recalculate_user=True``. implicit's default, False, reads user factors stored at
        training; these models store none, so False gives the same answer as True: the one
        computed from the row passed, whatever it holds.
        """
        self._check_fitted()
        single = False
        if user_items is None:  # recommend(user_items, ...)
            user_items = userid
        elif userid is not None:  # implicit's recommend(userid, user_items, ...)
            single = np.ndim(userid) == 0
            expected = 1 if single else len(np.atleast_1d(userid))
            rows = getattr(getattr(user_items, "matrix", user_items), "shape", (None,))[0]
            if rows != expected:
                raise ParameterError("user_items", f"expected the {expected} row(s) of userid (implicit's call: "
                                                   f"recommend(userid, user_items[userid])), got {rows} rows")
        user_items = as_csr(user_items, "user_items", self.n_items_)
        if not isinstance(N, (int, np.integer)) or isinstance(N, bool) or N < 1:
            raise ParameterError("N", f"expected a positive integer, got {N!r}")
        n_users, n_items = user_items.shape
        if exclude is not None:
            exclude = as_csr(exclude, "exclude", n_items)
            if exclude.shape[0] != n_users:
                raise ParameterError("exclude", f"expected {n_users} rows (one per user), got {exclude.shape[0]}")
        if not isinstance(recalculate_user, (bool, np.bool_)):
            raise ParameterError("recalculate_user", f"expected True or False, got {recalculate_user!r}")
        ranked = None
        if items is not None:
            ranked = np.unique(check_indices("items", items, n_items, "item"))
            if not ranked.size:
                raise ParameterError("items", "expected at least one item index to rank, got none")
        k = min(int(N), n_items if ranked is None else ranked.size)
        ids = np.full((n_users, k), -1, dtype=np.int64)
        out = np.full((n_users, k), -np.inf, dtype=np.float32)
        blocked = None
        if filter_items is not None:
            blocked = np.unique(np.asarray(filter_items, dtype=np.int64))
            if blocked.size and (blocked.min() < 0 or blocked.max() >= n_items):
                raise ParameterError("filter_items", f"item indices must lie in [0, {n_items}), got "
                                                     f"{blocked.min()}..{blocked.max()}")
        bs = batch_size or self.batch_size_predict
        for start in range(0, n_users, bs):
            batch = user_items[start : start + bs]
            scores = self.score(batch)
            if filter_already_liked_items:
                mask_rows(scores, batch)
            if exclude is not None:
                mask_rows(scores, exclude[start : start + bs])
            if blocked is not None and blocked.size:
                scores[:, blocked] = -np.inf
            if ranked is None:
                ids[start : start + bs], out[start : start + bs] = top_k_with_scores(scores, k)
            else:  # the top among the columns of ``items``, as indices of the whole catalogue
                local, out[start : start + bs] = top_k_with_scores(scores[:, ranked], k)
                ids[start : start + bs] = np.where(local >= 0, ranked[local], -1)
        return (ids[0], out[0]) if single else (ids, out)
