"""``recvae refit``: a finished run's settings (data, preprocessing, model, hyperparameters and
best epoch count) retrained on every user, into a new run directory with no held-out users."""

from __future__ import annotations

import shlex
import sys

from recvae.cli.common import DEVICE_HELP
from recvae.signals import Terminated, sigterm_raises, stopped_by


def add_parser(sub, common) -> None:
    r = sub.add_parser("refit", parents=[common], help="retrain a finished run's model on every user "
                       "(its settings and best epoch count; no held-out users) for deployment")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a finished run with held-out users (`recvae train` or `recvae tune`)")
    r.add_argument("--out", required=True, metavar="FINAL", help="the refit's run directory (a new or empty directory)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted refit in --out from its checkpoint")
    r.add_argument("--device", help=f"{DEVICE_HELP} (default: the run's)")
    r.set_defaults(func=run)


def run(args) -> int:
    from recvae.refit import refit
    from recvae.rundir import RunFinished

    try:
        with sigterm_raises():
            result = refit(args.run_dir, args.out, show_progress=not args.quiet, overwrite=args.overwrite,
                           resume=args.resume, device=args.device)
    except (KeyboardInterrupt, Terminated) as e:
        from recvae.rundir import RunDir

        name, code = stopped_by(e)
        again = [a for a in args.argv if a not in ("--overwrite", "--resume")]
        state = RunDir(args.out).state()
        if state == "training":
            left = (f"after epoch {RunDir(args.out).checkpoint_epoch()} (checkpoint in {args.out}); resume with: "
                    f"{shlex.join([args.prog, *again, '--resume'])}")
        elif state in ("absent", "empty"):
            left = f"before anything was written to {args.out}; start again with: {shlex.join([args.prog, *again])}"
        else:
            left = f"({args.out} holds part of the refit); start again with: {shlex.join([args.prog, *again, '--overwrite'])}"
        print(f"recvae: stopped by {name} {left}", file=sys.stderr)
        return code
    except RunFinished as e:
        print(f"recvae: {e.text(lambda name: args.flags.get(name, name))}", file=sys.stderr)
        return 0
    report(args.run_dir, args.out, result)
    return 0


def report(run_dir, out, result) -> None:
    """What a refit of ``run_dir`` into ``out`` trained (also after ``recvae tune --refit``)."""
    from recvae.rundir import RunDir

    description = RunDir(out).read_description()
    best = description["refit_of"]["best_epoch"]
    epochs = f" for {best} epochs (the best epoch of {run_dir})" if best else ""
    train = result.split.train
    print(f"{description['model']} refit on all {train.n_users:,} users ({train.nnz:,} interactions){epochs} in "
          f"{result.train_seconds:.1f} s; no held-out users, so no metrics")
    print(f"run directory: {out}")
