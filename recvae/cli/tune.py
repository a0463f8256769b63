"""``recvae tune``: choose hyperparameters on validation users and keep the chosen model as a run.

Two ways: a grid run in this process as before (``--grid``, or each model's default grid), or an
Optuna study (``--trials``, ``--space``, several ``--model``, ``--storage``, ``--resume``) kept
in a database, so a stopped search keeps its finished trials and several processes can share it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recvae.errors import ParameterError
from recvae.cli.common import (
    CLIError, add_data_options, add_model_options, add_source_options, data_spec_from_args, format_table,
    latent_note, logger, model_name, model_params_from_args,
)
from recvae.signals import Terminated, sigterm_raises, stopped_by


def add_parser(sub, common) -> None:
    u = sub.add_parser("tune", parents=[common], help="choose a model's hyperparameters on validation users, then keep the best as a run")
    add_source_options(u)
    add_data_options(u)
    add_model_options(u, models="multvae (default), recvae or ease; several separated by commas (a study, "
                                 "which chooses the model too), e.g. multvae,recvae,ease")
    u.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="values to try for one hyperparameter (repeat for more; every combination is tried); "
                        "default per model: multvae latent_dim=50,200, recvae gamma=0.0025,0.005,0.01, "
                        "ease l2=50,...,5000. Tunable: multvae latent_dim, hidden_dim, dropout, lr, kl_weighting; "
                        "recvae gamma, latent_dim, dropout, lr; ease l2")
    u.add_argument("--trials", type=int, metavar="N",
                   help="search with an Optuna study of N trials (TPE seeded by --seed) over --space ranges, "
                        "each model's default ranges without one; with --grid: its first N points. The study "
                        "is kept in --out (study.db), so --resume continues it")
    u.add_argument("--space", action="append", metavar="NAME=KIND:...",
                   help="a study's range for one hyperparameter (repeat for more): NAME=int:LOW:HIGH, "
                        "NAME=float:LOW:HIGH, NAME=log:LOW:HIGH (log-uniform) or NAME=cat:V1,V2,...; e.g. "
                        "latent_dim=int:50:400, lr=log:1e-4:1e-2")
    u.add_argument("--storage", metavar="URL",
                   help="keep the study in this database (SQLAlchemy URL, e.g. sqlite:///study.db or "
                        "postgresql://host/db) instead of --out, so that several processes or machines share it: "
                        "each runs the same command (its own --out) and joins the study")
    u.add_argument("--study-name", metavar="NAME", help="the study's name in --storage (default recvae-tune)")
    mode = u.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the study in --out: finished trials are kept, one cut short runs again")
    mode.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    u.add_argument("--out", metavar="RUN_DIR", required=True,
                   help="the chosen model's run directory, with tuning.csv (a new or empty directory)")
    u.add_argument("--refit", metavar="FINAL",
                   help="then retrain the chosen model on every user into FINAL (a new or empty directory), "
                        "as `recvae refit RUN_DIR --out FINAL` does: the model to deploy")
    u.set_defaults(func=run)


def run(args) -> int:
    from recvae import tuning

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("tune runs in one process; start it without torchrun (train takes several; a study "
                       "takes several processes through --storage)")
    check_refit_out(args)
    names = [n.strip() for n in str(args.model).split(",") if n.strip()]
    if (args.trials is not None or args.space or args.storage or args.resume or args.study_name is not None
            or len(names) > 1):
        return run_study(args, names)
    name = model_name(args)
    if name not in tuning.TUNABLE:
        raise CLIError(f"--model {args.model}{latent_note(args)}: tune takes {', '.join(tuning.TUNABLE)}")
    try:
        grid = tuning.parse_grid(args.grid, name)
    except ValueError as e:
        raise CLIError(f"--{e}") from None  # "grid latent_dim=x: ..." names the option
    spec = data_spec_from_args(args)
    params = model_params_from_args(args)
    try:
        points = tuning.check_grid(name, grid, params)
    except ParameterError:
        raise  # main() names its flag
    except ValueError as e:
        raise CLIError(f"--{e}" if str(e).startswith("grid ") else str(e)) from None
    from recvae.rundir import RunDir

    had_run = RunDir(args.out).state() not in ("absent", "empty")
    n_trials = len(points) * (2 if name == "multvae" else 1) + (name == "multvae")
    logger.info("tune %s on %s: %d trial(s) of %s", name, spec.name, n_trials, tuning.describe_grid(grid))
    try:
        with sigterm_raises():
            tuned = tuning.tune(spec, name, grid, params, out=args.out, split_seed=args.split_seed,
                                n_heldout_users=args.n_heldout_users, overwrite=args.overwrite,
                                show_progress=not args.quiet, cutoff=args.cutoff, leave_last=args.leave_last)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        state = RunDir(args.out).state()
        if state in ("absent", "empty") and not had_run:
            where = f"nothing was written to --out {args.out}"
        elif state in ("absent", "empty"):
            where = f"--out {args.out} is empty: its previous run was removed before the stop"
        else:
            where = f"--out {args.out} holds its previous run, unchanged"
        print(f"recvae: stopped by {signame} during the trials; {where}", file=sys.stderr)
        return code
    report(args, tuned, name, spec)
    return refit_chosen(args)


def format_trials(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "selected" and any(r[c] is not None for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [("* " if r["selected"] and c == "trial" else "") + ("" if r[c] is None else
                 f"{r[c]:.4f}" if c.startswith("validation") else f"{r[c]:.1f}" if c == "seconds"
                 else f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _option_error(e: ValueError) -> Exception:
    """A grid's or a space's error names its entry (``grid l2=abc: ...``): it becomes the flag."""
    if isinstance(e, ParameterError):
        return e  # main() names its flag
    text = str(e)
    return CLIError(f"--{text}" if text.startswith(("grid ", "space ")) else text)


def model_params(args, models) -> dict:
    """Each model's fixed settings from the options given. With several models an option goes to
    those that take it; one that none takes is an error."""
    from recvae.models import model_class, model_names

    if len(models) == 1:
        return {models[0]: model_params_from_args(args)}
    if args.latent is not None:
        raise CLIError(f"--latent: takes one model (multvae), not --model {args.model}")
    known = set().union(*(model_class(n)._param_names() for n in model_names()))
    given = [d for d, v in vars(args).items() if d in known and v is not None and d != "device"]
    untaken = [d for d in given if not any(d in model_class(m)._param_names() for m in models)]
    if untaken:
        raise CLIError(f"--model {args.model}: none of them takes {', '.join('--' + d.replace('_', '-') for d in untaken)}")
    params = {}
    for m in models:
        ns = argparse.Namespace(**vars(args))
        ns.model = m
        for d in given:
            if d not in model_class(m)._param_names():
                setattr(ns, d, None)
        params[m] = model_params_from_args(ns)
    return params


def run_study(args, names: list[str]) -> int:
    from recvae import tuning
    from recvae.progress import interactive
    from recvae.rundir import RunFinished

    try:
        models = tuning.parse_models(names if len(names) > 1 else [model_name(args)])
    except ParameterError:
        raise CLIError(f"--model {args.model}{latent_note(args)}: tune takes {', '.join(tuning.TUNABLE)} "
                       "(one, or several separated by commas)") from None
    if args.grid and len(models) > 1:
        raise CLIError(f"--grid: a grid tunes one model; with --model {args.model} give ranges (--space)")
    if args.grid and args.space:
        raise CLIError("--grid, --space: a study searches a grid or ranges, not both")
    spec = data_spec_from_args(args)
    params = model_params(args, models)
    for m in models:  # a log file gets one line per trial, not one per epoch of every trial
        if "show_progress" in params[m]:
            params[m]["show_progress"] = not args.quiet and interactive()
    try:
        grid = tuning.parse_grid(args.grid, models[0]) if args.grid else None
        space = tuning.parse_space(args.space, models, params) if grid is None else None
        tuning.check_study(models, space, grid, params)
    except ValueError as e:
        raise _option_error(e) from None
    try:
        with sigterm_raises():
            tuned = tuning.tune_study(spec, models, n_trials=args.trials, space=space, grid=grid, params=params,
                                      out=args.out, storage=args.storage, study_name=args.study_name or tuning.STUDY_NAME,
                                      resume=args.resume, split_seed=args.split_seed,
                                      n_heldout_users=args.n_heldout_users, overwrite=args.overwrite,
                                      show_progress=not args.quiet, seed=args.seed, cutoff=args.cutoff,
                                      leave_last=args.leave_last)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        print(f"recvae: stopped by {signame} during the trials; {study_stop_line(args)}", file=sys.stderr)
        return code
    except RunFinished as e:
        print(f"recvae: {e}", file=sys.stderr)
        return 0
    except Exception as e:  # SQLite's full disk, deep in Optuna and SQLAlchemy: one line, exit 2
        from recvae.dbcheck import study_write_error

        where = args.storage or (str(Path(args.out) / "study.db") if args.out else "the study")
        error = study_write_error(e, where)
        if error is None:
            raise
        raise error from None
    report(args, tuned, ",".join(models), spec)
    return refit_chosen(args)


def check_refit_out(args) -> None:
    """``--refit FINAL`` must be able to take the refit before hours of trials are spent."""
    if args.refit is None:
        return
    from recvae.rundir import RunDir

    if Path(args.refit).resolve() == Path(args.out).resolve():
        raise CLIError(f"--refit {args.refit}: is --out itself; the refit needs a directory of its own")
    final = RunDir(args.refit)
    if final.path.exists() and (not final.path.is_dir() or final.entries()):
        raise CLIError(f"--refit {args.refit}: exists and is not an empty directory; choose a new or empty one")


def refit_chosen(args) -> int:
    """``--refit FINAL``: the tuned run in ``--out`` retrained on every user (``recvae refit``)."""
    if args.refit is None:
        return 0
    from recvae.cli import refit as refit_cli
    from recvae.experiment import refit

    print(f"\nrefit of the chosen model on every user into {args.refit}:")
    try:
        with sigterm_raises():
            result = refit(args.out, args.refit, show_progress=not args.quiet)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        print(f"recvae: stopped by {signame} during the refit; the tuned run in --out {args.out} is complete; "
              f"refit it with: recvae refit {args.out} --out {args.refit} --overwrite", file=sys.stderr)
        return code
    refit_cli.report(args.out, args.refit, result)
    return 0


def study_stop_line(args) -> str:
    """Where the finished trials are after a stop, and how to go on."""
    from recvae import tuning
    from recvae.cli.train import resume_command
    from recvae.rundir import RunDir

    name = args.study_name or tuning.STUDY_NAME
    if args.storage:
        n = tuning.count_finished(args.storage, name)
        kept = "its finished trials" if n is None else f"its {n} finished trial(s)"
        return f"the study {name!r} at --storage keeps {kept}; run the same command to continue it"
    run_dir = RunDir(args.out)
    if not run_dir.has_study():
        return f"nothing was written to --out {args.out}"
    n = tuning.count_finished(run_dir.study_url(), name)
    kept = "its finished trials" if n is None else f"{n} finished trial(s)"
    return f"--out {args.out} holds the study with {kept}; continue with: {resume_command(args)}"


def report(args, tuned, models: str, spec) -> None:
    rows = tuned.table()
    print(f"\n{models} on {spec.name}: {len(rows)} trial(s) on {tuned.run.validation.n_users} validation users "
          f"(* = chosen, by validation NDCG@100)")
    print(format_trials(rows))
    chosen = f"trial {tuned.best.name} ({tuned.best.model})" if tuned.study else tuned.best.name
    print(f"\nchosen: {chosen}; its model on the held-out users:")
    print(format_table({"validation": tuned.run.validation, "test": tuned.run.test}))
    from recvae.rundir import TUNING_FILE

    print(f"\nrun directory: {args.out} (trial table: {Path(args.out) / TUNING_FILE})")
