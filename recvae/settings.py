"""A run's settings, owned in one place: data source and preprocessing, split, model and its
hyperparameters (:class:`RunConfig`).

This module checks every rule that ties settings together (a split in time and its timestamps,
a holdout of no users and early stopping, ...) once, for the library and the command line alike;
it writes what ``run.json`` records of them (:func:`describe`) and answers "what differs" for a
resumed run (:func:`resume_differences`) and a joined study (:func:`differences`) with one
comparison. What a resume may change comes from the model's parameter table (its ``training``
and ``runtime`` roles, :mod:`recvae.models.params`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from recvae import __version__
from recvae.data.source import DataSpec
from recvae.data.time_splits import check_time_split
from recvae.errors import ParameterError
from recvae.fileio import jsonable
from recvae.models import make_model, model_class
from recvae.models.params import forced

#: ``RunConfig.holdout``: the paper's held-out validation and test users, or none (every user trains)
HOLDOUTS = ("users", "none")

#: hyperparameters a resumed run takes from its ``run.json`` when they are not given again:
#: ``patience``, whose default changed from None (every epoch) to early stopping, so that a run
#: written before goes on as it started (``run.json`` recorded ``patience: null``, or nothing)
KEPT_ON_RESUME = ("patience",)


@dataclass
class RunConfig:
    """One run's settings. ``params``: the hyperparameters given (the model's defaults fill the
    rest); ``holdout``: ``"users"``, the paper's held-out validation and test users, or ``"none"``,
    every user trains for the model's fixed number of epochs (no validation, early stopping or
    test); a split in time instead of the paper's random fold-in: ``cutoff`` (one global time:
    an ISO date/datetime, UTC without a zone, or Unix seconds) or ``leave_last`` (each held-out
    user's last N interactions are the targets); ``refit_of``: a refit's origin (the run, its
    best epoch)."""

    data: DataSpec
    model: str = "multvae"
    params: dict = field(default_factory=dict)
    split_seed: int = 0
    n_heldout_users: int | None = None
    ks: tuple = (20, 50, 100)
    holdout: str = "users"
    refit_of: dict | None = None
    cutoff: str | float | None = None
    leave_last: int | None = None

    @property
    def time_split(self) -> bool:
        return self.cutoff is not None or self.leave_last is not None


def check(config: RunConfig):
    """Every rule of ``config``, before anything is read or written: the model's hyperparameters
    (returns the unfitted model), the split's settings and the rules across settings."""
    estimator = make_model(config.model, **run_params(config))
    config.data.check_optional()
    check_split(config)
    return estimator


def check_split(config: RunConfig) -> None:
    """The rules of the split's settings (:func:`check` without the model's)."""
    if config.holdout not in HOLDOUTS:
        raise ParameterError("holdout", f"expected one of {', '.join(HOLDOUTS)}, got {config.holdout!r}")
    check_time_split(config.cutoff, config.leave_last)
    if config.data.timestamp_col is not None and not config.time_split:
        raise ParameterError("timestamp_col", f"{config.data.timestamp_col!r} given without a split in time "
                                              "({cutoff} or {leave_last}), the one use of timestamps",
                             names=("cutoff", "leave_last"))
    if config.time_split:
        config.data.check_timestamps()
    if config.holdout == "none":
        if config.n_heldout_users is not None:
            raise ParameterError("n_heldout_users", "{holdout} 'none' holds out no user; give one or the other",
                                 names=("holdout",))
        if config.params.get("patience") is not None:
            raise ParameterError("patience", "early stopping needs validation users, and {holdout} 'none' holds "
                                             "out none: every user trains for the fixed number of epochs",
                                 names=("holdout",))
        if config.time_split:
            raise ParameterError("cutoff" if config.cutoff is not None else "leave_last",
                                 "a split in time chooses held-out users, and {holdout} 'none' holds out none; "
                                 "give one or the other", names=("holdout",))


def check_run_options(out, resume: bool = False, overwrite: bool = False, keep_checkpoint: bool = False) -> None:
    """The options of where a run is kept: each but ``out`` needs ``out``; resume and overwrite
    exclude each other."""
    for name, given in (("resume", resume), ("overwrite", overwrite), ("keep_checkpoint", keep_checkpoint)):
        if given and out is None:
            raise ParameterError(name, "needs {out}, the run directory", names=("out",))
    if resume and overwrite:
        raise ParameterError("overwrite", "cannot be combined with {resume}: continue the run, or replace it",
                             names=("resume",))


def split_settings(config: RunConfig) -> dict:
    """The split's settings as run.json records them (a split in time's only when it is one)."""
    settings = {"split_seed": config.split_seed, "n_heldout_users": config.n_heldout_users, "holdout": config.holdout}
    settings.update({k: v for k, v in (("cutoff", config.cutoff), ("leave_last", config.leave_last)) if v is not None})
    return settings


def run_params(config: RunConfig) -> dict:
    """The hyperparameters the run's model is made with: those given; without held-out users
    (``holdout="none"``) no early stopping either, so the ``patience`` default, which needs
    validation, does not apply (and ``run.json`` says so: ``patience: null``). A ``patience``
    given there is refused by :func:`check_split`."""
    params = dict(config.params)
    if config.holdout == "none" and "patience" in model_class(config.model)._param_names():
        params.setdefault("patience", None)
    return params


def resumed(config: RunConfig, saved: dict) -> RunConfig:
    """``config`` resuming the run ``saved`` (its ``run.json``): each of :data:`KEPT_ON_RESUME`
    not given takes the run's value (:func:`read_record`)."""
    if saved.get("model") != config.model:
        return config  # refused by resume_differences
    recorded = read_record(config.model, model_class(config.model)._params_from_json(saved.get("params") or {}))
    kept = {k: recorded[k] for k in KEPT_ON_RESUME if k in recorded and k not in config.params}
    return replace(config, params={**kept, **config.params}) if kept else config


def to_record(model: str, params: dict) -> dict:
    """``params`` (those given) as a record that is read again later holds them (a ``tune``
    trial's): with each of :data:`KEPT_ON_RESUME` that ``model`` takes, given or its default,
    so a version with another default makes the same model of it."""
    defaults = model_class(model)().get_params()
    return {**{k: defaults[k] for k in KEPT_ON_RESUME if k in defaults}, **params}


def read_record(model: str, params: dict) -> dict:
    """A record's ``params`` read again: one of :data:`KEPT_ON_RESUME` it lacks was written
    before it was recorded, when its default was None."""
    names = model_class(model)._param_names()
    return {**{k: None for k in KEPT_ON_RESUME if k in names}, **params}


def model_params(model: str, params: dict) -> dict:
    """Every hyperparameter of ``model``: ``params`` over its defaults, as JSON stores them."""
    estimator = make_model(model, **params)
    return jsonable(estimator._json_params())


def describe(config: RunConfig, split=None, kept: dict | None = None) -> dict:
    """What ``run.json`` records of ``config`` (every hyperparameter, defaults included), with
    what preprocessing ``kept`` and the ``split``'s description when given."""
    description = {
        "recvae_version": __version__,
        "data": asdict(config.data),
        "split_settings": split_settings(config),
        "model": config.model,
        "params": model_params(config.model, run_params(config)),
        "ks": list(config.ks),
    }
    if config.refit_of is not None:
        description["refit_of"] = config.refit_of
    if kept is not None:
        description["kept"] = kept  # what preprocessing kept and each rule dropped
    if split is not None:
        description["split"] = split.describe()
    return jsonable(description)


def differences(saved: dict, now: dict, nested=("data", "params"), prefix: str = "") -> list[tuple[str, object, object]]:
    """``(setting, saved, now)`` for each setting that differs, settings in ``nested`` compared
    key by key (``params.dropout``)."""
    out = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key in nested:
            out += differences(a, b, nested, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


def resumable(model: str) -> tuple[str, ...]:
    """The hyperparameters a resumed run may change: those outside the ``architecture`` role."""
    keep = set(forced(model_class(model).PARAMETERS))
    return tuple(n for n in model_class(model)._param_names() if n not in keep)


def resume_differences(config: RunConfig, saved: dict) -> list[tuple[str, object, object]]:
    """``(setting, in run.json, now)`` for each setting of ``config`` a resume may not change:
    the data, the split, the model, its ``architecture`` hyperparameters and the metrics' ks."""
    now = describe(config)
    split_saved = {"holdout": "users", **saved.get("split_settings", {})}  # runs from before holdout: users
    old = {"data": saved.get("data", {}), "split_settings": split_saved, "model": saved.get("model"),
           "ks": saved.get("ks")}
    new = {k: now[k] for k in old}
    diff = differences(old, new, nested=("data", "split_settings"))
    diff = [(k.removeprefix("split_settings."), a, b) for k, a, b in diff]
    if saved.get("model") != config.model:
        return diff
    may_change = set(resumable(config.model))
    a = {**now["params"], **_completed(config.model, saved.get("params", {}))}
    diff += [(f"params.{k}", a.get(k), v) for k, v in now["params"].items() if k not in may_change and a.get(k) != v]
    return diff


def _completed(model: str, params: dict) -> dict:
    """run.json's params over the model's defaults (runs written before every default was
    recorded); names the model no longer takes (``show_progress``) are dropped."""
    cls = model_class(model)
    known = set(cls._param_names())
    return model_params(model, {k: v for k, v in cls._params_from_json(params).items() if k in known})


def holdout_of(description: dict) -> str:
    """A run's holdout (``run.json``): ``users`` or ``none``; runs from before the setting held users out."""
    return description.get("split_settings", {}).get("holdout", "users")
