"""``recvae evaluate``: a saved run's metrics on its test (or validation) users, again."""

from __future__ import annotations

import shlex

from recvae.cli.common import DEVICE_HELP, CLIError, format_table


def add_parser(sub, common) -> None:
    e = sub.add_parser("evaluate", parents=[common], help="re-evaluate a saved run on its test (or validation) users")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `recvae train` or `recvae tune`")
    e.add_argument("--split", choices=("test", "validation"), default="test",
                   help="the held-out users to evaluate: test (default) or validation")
    e.add_argument("--device", help=f"{DEVICE_HELP} (default: the device saved with the run, CPU where it has no CUDA)")
    e.set_defaults(func=run)


def run(args) -> int:
    from recvae.evaluation import evaluate
    from recvae.settings import holdout_of
    from recvae.rundir import RunDir

    run = RunDir(args.run_dir)
    description = run.read_description()
    if holdout_of(description) == "none":
        origin = (description.get("refit_of") or {}).get("run")
        where = (f"; its settings were chosen on the held-out users of {origin}: "
                 f"{shlex.join(['recvae', 'evaluate', origin])}" if origin else "")
        raise CLIError(f"RUN_DIR {args.run_dir}: the run has no held-out users (it trained on every user), so there "
                       f"is nothing to evaluate{where}")
    model, description = run.load_finished(device=args.device)
    users = run.load_users(args.split, model)
    result = evaluate(model, users.fold_in, users.heldout, ks=tuple(description.get("ks", (20, 50, 100))))
    print(f"{description['model']} on {description['data'].get('dataset') or description['data'].get('path')}")
    print(format_table({args.split: result}))
    return 0
