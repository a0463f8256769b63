"""``recvae tune``: choose hyperparameters on validation users and keep the chosen model as a run."""

from __future__ import annotations

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
    add_model_options(u, models="multvae (default), recvae or ease")
    u.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                   help="values to try for one hyperparameter (repeat for more; every combination is tried); "
                        "default per model: multvae latent_dim=50,200, recvae gamma=0.0025,0.005,0.01, "
                        "ease l2=50,...,5000. Tunable: multvae latent_dim, hidden_dim, dropout, lr, kl_weighting; "
                        "recvae gamma, latent_dim, dropout, lr; ease l2")
    u.add_argument("--out", metavar="RUN_DIR", required=True,
                   help="the chosen model's run directory, with tuning.csv (a new or empty directory)")
    u.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    u.set_defaults(func=run)


def run(args) -> int:
    from recvae import tuning

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("tune runs in one process; start it without torchrun (train takes several)")
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
    rows = tuned.table()
    print(f"\n{name} on {spec.name}: {len(rows)} trial(s) on {tuned.run.validation.n_users} validation users "
          f"(* = chosen, by validation NDCG@100)")
    print(format_trials(rows))
    print(f"\nchosen: {tuned.best.name}; its model on the held-out users:")
    print(format_table({"validation": tuned.run.validation, "test": tuned.run.test}))
    from recvae.rundir import TUNING_FILE

    print(f"\nrun directory: {args.out} (trial table: {Path(args.out) / TUNING_FILE})")
    return 0


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
