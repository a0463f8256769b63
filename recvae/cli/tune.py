"""``recvae tune``: choose hyperparameters on validation users and keep the chosen model as a run.

One engine (recvae.tuning) for a plain grid (``--grid``, or each model's default grid) and an
Optuna study (``--trials``, ``--space``, several ``--model``, ``--storage``); either keeps its
trials in a database (``--out``'s study.db), so ``--resume`` continues a stopped search without
running a finished trial again, and several processes can share a study (``--storage``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recvae.errors import ParameterError
from recvae.cli.common import (
    CLIError, LazyHelp, add_data_options, add_model_options, add_source_options, data_spec_from_args, format_table,
)
from recvae.cli.hyperparameters import latent_note, model_name, model_params_from_args
from recvae.signals import Terminated, sigterm_raises, stopped_by


HYPERPARAMETERS = True  # the models' hyperparameter flags (recvae.cli.hyperparameters)


class _GridHelp(LazyHelp, argparse._AppendAction):
    """``--grid``: its help lists what each model tunes and its default grid, from the models' tables."""

    def make_help(self, text):
        from recvae.tuning import spaces

        def grid(model):
            return " ".join(f"{n}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
                            for n, vs in spaces.default_grid(model).items())

        models = spaces.tunable_models()
        return (f"{text}. Tunable: " + "; ".join(f"{m} {', '.join(spaces.tunable(m))}" for m in models)
                + ". Default grid: " + "; ".join(f"{m} {grid(m)}" for m in models if grid(m))).replace("%", "%%")


def add_parser(sub, common) -> None:
    u = sub.add_parser("tune", parents=[common], help="choose a model's hyperparameters on validation users, then keep the best as a run")
    add_source_options(u)
    add_data_options(u)
    add_model_options(u, models="multvae (default), or any model with something to tune; several separated by "
                                 "commas (a study, which chooses the model too), e.g. multvae,recvae,ease")
    u.add_argument("--grid", action=_GridHelp, metavar="NAME=V1,V2",
                   help="values to try for one hyperparameter (repeat for more; every combination is tried)")
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
                      help="continue the search in --out (a grid's or a study's): finished trials are kept, one cut "
                           "short runs again with its values")
    mode.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    u.add_argument("--out", metavar="RUN_DIR", required=True,
                   help="the chosen model's run directory, with tuning.csv (a new or empty directory)")
    u.add_argument("--refit", metavar="FINAL",
                   help="then retrain the chosen model on every user into FINAL (a new or empty directory), "
                        "as `recvae refit RUN_DIR --out FINAL` does: the model to deploy")
    u.set_defaults(func=run)


def run(args) -> int:
    from recvae import tuning
    from recvae.rundir import RunDir, RunFinished

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("tune runs in one process; start it without torchrun (train takes several; a study "
                       "takes several processes through --storage)")
    check_refit_out(args)
    names = [n.strip() for n in str(args.model).split(",") if n.strip()]
    try:
        models = tuning.parse_models(names if len(names) > 1 else [model_name(args)])
    except ParameterError:
        raise CLIError(f"--model {args.model}{latent_note(args)}: tune takes {', '.join(tuning.tunable_models())} "
                       "(one, or several separated by commas)") from None
    spec = data_spec_from_args(args)
    params = model_params(args, models)
    # a study: numbered trials over ranges (or a grid's first --trials points); else a plain grid.
    # --resume without --grid, --trials or --space: the search --out holds decides which
    study = (args.trials is not None or bool(args.space) or args.storage is not None or args.study_name is not None
             or len(models) > 1)
    either = args.resume and not study and not args.grid
    if args.grid and (len(models) > 1 or args.space):  # the library's rule, before the grid is parsed
        tuning.check_search(models, grid=args.grid, space=args.space)
    grid = tuning.parse_grid(args.grid, models[0]) if args.grid or not (study or either) else None
    space = tuning.parse_space(args.space, models, params) if study and grid is None else None
    if not either:
        tuning.check_study(models, space, grid, params)
    had_run = RunDir(args.out).state() not in ("absent", "empty")
    try:
        with sigterm_raises():
            tuned = tuning.tune(spec, models, grid=grid, params=params, out=args.out, n_trials=args.trials,
                                space=space, storage=args.storage, study_name=args.study_name or tuning.STUDY_NAME,
                                resume=args.resume, study=None if either else study, split_seed=args.split_seed,
                                n_heldout_users=args.n_heldout_users, overwrite=args.overwrite,
                                show_progress=not args.quiet, seed=getattr(args, "seed", 0), cutoff=args.cutoff,
                                leave_last=args.leave_last)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        print(f"recvae: stopped by {signame} during the trials; {stop_line(args, had_run)}", file=sys.stderr)
        return code
    except RunFinished as e:
        print(f"recvae: {e.text(lambda name: args.flags.get(name, name))}", file=sys.stderr)
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


def model_params(args, models) -> dict:
    """Each model's fixed settings from the options given. With several models an option goes to
    those that take it; one that none takes is an error."""
    from recvae.models import model_class

    if len(models) == 1:
        return {models[0]: model_params_from_args(args)}
    if args.latent is not None:
        raise CLIError(f"--latent: takes one model (multvae), not --model {args.model}")
    dests = args.hyperparameter_dests
    given = [name for name, dest in dests.items() if hasattr(args, dest) and name != "device"]
    untaken = [n for n in given if not any(n in model_class(m)._param_names() for m in models)]
    if untaken:
        raise CLIError(f"--model {args.model}: none of them takes {', '.join('--' + dests[n].replace('_', '-') for n in untaken)}")
    params = {}
    for m in models:
        ns = argparse.Namespace(**vars(args))
        ns.model = m
        for name in given:
            if name not in model_class(m)._param_names():
                delattr(ns, dests[name])
        params[m] = model_params_from_args(ns)
    return params


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
    from recvae.refit import refit

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


def stop_line(args, had_run: bool) -> str:
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
    if run_dir.has_study():
        n = tuning.count_finished(run_dir.study_url(), name)
        kept = "its finished trials" if n is None else f"{n} finished trial(s)"
        return f"--out {args.out} holds the study with {kept}; continue with: {resume_command(args)}"
    if run_dir.state() in ("absent", "empty"):
        return (f"--out {args.out} is empty: its previous run was removed before the stop" if had_run
                else f"nothing was written to --out {args.out}")
    return f"--out {args.out} holds its previous run, unchanged"


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
