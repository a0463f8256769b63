"""Refit: a finished run's chosen settings retrained on every user of its data, the model to deploy."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from recvae.data.source import DataSpec
from recvae.errors import InputError, ParameterError
from recvae.experiment import RunResult, run
from recvae.fileio import read_json
from recvae.models.registry import default_params, is_neural
from recvae.rundir import METRICS_FILE, RUN_JSON, RunDir
from recvae.settings import RunConfig, holdout_of

logger = logging.getLogger(__name__)


def refit_config(run_dir: str | os.PathLike, device: str | None = None) -> RunConfig:
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
        raise ParameterError("run_dir", f"the run has no held-out users already{note}: it trained on every user, "
                             "so there is nothing to refit", given=run_dir)
    if not source.completed():
        raise ParameterError("run_dir", f"the run has not finished (no model or no {METRICS_FILE}); finish it with "
                             "the `recvae train` command that started it plus {resume}, then refit", given=run_dir,
                             names=("resume",))
    ended = read_json(source.file(METRICS_FILE)).get("ended", "completed")
    if ended != "completed":
        raise ParameterError("run_dir", f"its training did not complete ({ended}), so it has no best epoch to "
                             "refit with; resume it with a lower {lr} first", given=run_dir, names=("lr",))
    model = source.load_model(device="cpu")  # a damaged or replaced model is refused by name
    name = description["model"]
    params = dict(description.get("params") or {})
    best_epoch = None
    if is_neural(name):
        best_epoch = int(model.best_epoch_)
        params["epochs"] = best_epoch
        params.pop("patience", None)
    params.pop("show_progress", None)  # recorded as a hyperparameter by earlier versions
    if device is not None and "device" in default_params(name):
        params["device"] = device
    try:
        # every interaction, whatever its time: a split in time chose the settings, the deployed
        # model learns from all that is known
        data = DataSpec(**{**description["data"], "timestamp_col": None})
    except (TypeError, ValueError) as e:
        raise InputError(source.file(RUN_JSON), f"data: not a data description this recvae reads ({e})") from None
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
    config = refit_config(run_dir, device=device)
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
