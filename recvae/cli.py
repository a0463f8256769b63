"""The ``recvae`` command line: datasets, train, tune, prepare, evaluate, recommend, serve."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from recvae import __version__
from recvae.errors import ParameterError
from recvae.optional import MissingDependencyError
from recvae.signals import EXIT_SIGINT, EXIT_SIGTERM, Terminated, sigterm_raises, stopped_by  # noqa: F401

logger = logging.getLogger("recvae")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


#: what a user gets wrong: bad input files, arguments, missing optional packages. Printed as one
#: line (the traceback only with --debug); any other exception is a bug and shows its traceback.
USER_ERRORS = (CLIError, ValueError, OSError, KeyError, MissingDependencyError)
#: library parameter names whose flag is not the option of the same dest; None: never rewritten
#: (``data: ...`` is a word of the library's messages, not the --data flag)
PARAM_FLAGS = {"random_state": "--seed", "data": None}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command it prints
    args.prog = sys.argv[0] if argv is None and Path(sys.argv[0]).name == "recvae" else "recvae"
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"recvae: error: {user_message(e, parser, args.command)}", file=sys.stderr)
        return 2


def user_message(error: BaseException, parser: argparse.ArgumentParser, command: str) -> str:
    """The one line a user error prints. A :class:`~recvae.errors.ParameterError` names its
    parameter as data: it becomes the flag the user typed (``latent_dim`` -> ``--latent-dim``),
    found through the parser. Older messages that start with a parameter name
    (``item_col: ...``) are mapped the same way."""
    flags = command_flags(parser, command)
    if isinstance(error, ParameterError):
        flag = flags.get(error.param)
        return " ".join(f"{flag or error.param}: {error.message}".split())
    msg = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    msg = " ".join(str(msg).split())  # one line, whatever the parser (pandas, torch) put in it
    pattern = r"(?<![\w./-])(" + "|".join(map(re.escape, sorted(flags, key=len, reverse=True))) + r")(?=:)"
    return re.sub(pattern, lambda m: flags[m.group(1)], msg) if flags else msg


def command_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Parameter name -> flag of ``command``'s options, e.g. ``item_col`` -> ``--item-col``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {}
    for action in sub._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest not in PARAM_FLAGS:
            flags[action.dest] = long[0]
    flags.update({k: v for k, v in PARAM_FLAGS.items() if v is not None and v in flags.values()})
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recvae",
        description="Mult-VAE / Mult-DAE collaborative filtering (Liang et al., WWW 2018) with the paper's protocol.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # also accepted after the command; SUPPRESS keeps the global value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("datasets", parents=[common], help="list the MovieLens datasets, where they are looked for, which are present")
    d.add_argument("--data-dir", help="data directory (default: $RECVAE_DATA, else ./data)")
    d.set_defaults(func=cmd_datasets)

    t = sub.add_parser("train", parents=[common], help="train a model with the paper's protocol and print its test metrics")
    add_source_options(t)
    add_data_options(t)
    add_model_options(t)
    t.add_argument("--out", metavar="RUN_DIR", help="write the run directory here (a new or empty directory)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoint (same options; --epochs, --patience, "
                           "--lr, --device, --precision may change)")
    t.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt when training finishes (to --resume with more --epochs later)")
    t.add_argument("--show", type=int, default=3, metavar="N", help="print top-10 lists for N test users (default 3)")
    t.set_defaults(func=cmd_train)

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
    u.set_defaults(func=cmd_tune)

    add_prepare_parser(sub)

    e = sub.add_parser("evaluate", parents=[common], help="re-evaluate a saved run on its test (or validation) users")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", choices=("test", "validation"), default="test")
    e.add_argument("--device", help="cpu or cuda (default: the device saved with the run, CPU where it has no CUDA)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("recommend", parents=[common], help="top-K items for every user of a run, a list of users, or the users of a history file")
    r.add_argument("run_dir", metavar="RUN_DIR")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--input", metavar="FILE", help="history file (CSV, TSV, Parquet): user and item columns (rating optional; items optional for known users)")
    who.add_argument("--users", metavar="FILE", help="file listing user ids of the run (column --user-col)")
    who.add_argument("--all-users", action="store_true", help="every user of the run: training and held-out users")
    r.add_argument("--user-col", help="user column (default: the run's)")
    r.add_argument("--item-col", help="item column (default: the run's)")
    r.add_argument("--rating-col", help="rating column (default: the run's); rows at or below the threshold count as seen, not as history; 'none' for none")
    r.add_argument("--rating-threshold", type=float, help="positive when rating > this (default: the run's)")
    r.add_argument("--sep", help="separator of --input/--users (default: the run's, else from the extension)")
    r.add_argument("--k", type=int, default=10, help="items per user (default 10); above the catalogue: all items")
    r.add_argument("--output", default="-", help="CSV, TSV or Parquet by extension; '-' for stdout (default)")
    r.add_argument("--include-seen", action="store_true", help="do not exclude items the user already has (at any rating)")
    r.add_argument("--strict", action="store_true", help="fail on item ids unknown to the model instead of dropping them")
    r.add_argument("--batch-size", type=int, default=1000, help="users scored at once (default 1000); bounds memory")
    r.add_argument("--device", help="cpu, cuda or auto (default: the device saved with the model)")
    r.set_defaults(func=cmd_recommend)

    v = sub.add_parser("serve", parents=[common], help="an HTTP service answering top-K requests from a run (needs recvae[serve])")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--workers", type=int, default=1, help="worker processes, each loading the model once (default 1)")
    v.add_argument("--device", help="cpu, cuda or auto (default: the device saved with the model)")
    v.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help="largest request body accepted (default 1 MiB; 413 beyond)")
    v.add_argument("--max-batch", type=int, default=64, help="concurrent requests scored in one forward pass (default 64; 1 = no batching)")
    v.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / --workers); "
                   "1 where the server shares its cores with other work")
    v.add_argument("--body-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time for a request body to arrive after its headers (default 5; 408 and the connection closed beyond)")
    v.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="an idle keep-alive connection is closed after this (default 5)")
    v.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, time running requests get to finish before they are answered 503 and the server exits (default 10)")
    v.set_defaults(func=cmd_serve)
    return p


def add_source_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    src.add_argument("--prepared", metavar="DIR", help="a directory written by `recvae prepare` (memory-mapped)")


def add_model_options(p: argparse.ArgumentParser, models: str | None = None) -> None:
    """The model and its hyperparameters, split and device: the options `train` and `tune` share."""
    from recvae.models import model_names

    p.add_argument("--model", default="multvae", help=models or f"one of {', '.join(model_names())} (default multvae)")
    p.add_argument("--latent", choices=("gaussian", "bernoulli"),
                   help="multvae's latent: gaussian (paper) or bernoulli (binary codes; the binary-multvae model)")
    p.add_argument("--temperature", type=float,
                   help="binary latent: relaxed Gumbel-sigmoid sample at this temperature (default: straight-through bits)")
    p.add_argument("--epochs", type=int, help="training epochs (paper: 200)")
    p.add_argument("--batch-size", type=int, help="users per gradient update (paper: 500)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--dropout", type=float, help="input dropout (paper: 0.5)")
    p.add_argument("--anneal-cap", type=float, help="largest KL weight beta (paper: 0.2)")
    p.add_argument("--total-anneal-steps", type=int, help="updates to reach beta=1 before capping (paper: 200000)")
    p.add_argument("--beta", type=float, help="a constant KL weight instead of annealing")
    p.add_argument("--kl-weighting", choices=("uniform", "activity"),
                   help="each user's KL weight: uniform (paper) or n_u / mean n (activity)")
    p.add_argument("--lam", type=float, help="L2 weight on the weight matrices (paper: 0 VAE, 0.01/500 DAE)")
    p.add_argument("--hidden-dims", help="comma-separated hidden layer sizes (paper: 600 VAE, none DAE)")
    p.add_argument("--latent-dim", type=int, help="latent size (paper: 200)")
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation NDCG@100 gain")
    p.add_argument("--gamma", type=float, help="RecVAE: KL weight per interaction, beta_u = gamma * n_u (default 0.005)")
    p.add_argument("--encoder-epochs", type=int, help="RecVAE: encoder passes per epoch (default 3)")
    p.add_argument("--decoder-epochs", type=int, help="RecVAE: decoder passes per epoch (default 1)")
    p.add_argument("--mixture-weights", help="RecVAE: prior weights of N(0,1), q_old, N(0,e^10) (default 0.15,0.75,0.1)")
    p.add_argument("--l2", type=float, help="EASE's L2 weight lambda (default 500)")
    p.add_argument("--seed", type=int, default=0, help="model seed (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the user split (default 0)")
    p.add_argument("--n-heldout-users", type=int, help="validation and test users each (default: the library's rule)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="training matmul precision of neural models; auto: bf16 where it is fast")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data directory for MovieLens (default: $RECVAE_DATA, else ./data)")
    p.add_argument("--user-col", default="user", help="user column of --data (default 'user')")
    p.add_argument("--item-col", default="item", help="item column of --data (default 'item')")
    p.add_argument("--rating-col", default="rating", help="rating column of --data; 'none' for none")
    p.add_argument("--sep", help="separator of --data (default: from the extension)")
    p.add_argument("--rating-threshold", type=float, default=3.5, help="keep ratings > this (paper: 3.5)")
    p.add_argument("--min-user-interactions", type=int, default=5, help="drop users with fewer (paper: 5)")
    p.add_argument("--min-item-interactions", type=int, default=0, help="drop items with fewer (paper: none)")


def data_spec_from_args(args):
    from recvae.experiment import DataSpec

    rating_col = None if str(args.rating_col).lower() == "none" else args.rating_col
    if args.data is not None and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data}: no such file")
    prepared = getattr(args, "prepared", None)
    if prepared is not None:
        check_prepared_args(args)
        return DataSpec.of_prepared(prepared)
    return DataSpec(
        dataset=args.dataset,
        path=args.data,
        data_dir=args.data_dir,
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=rating_col,
        sep=args.sep,
        rating_threshold=args.rating_threshold if rating_col else None,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
    )


def model_params_from_args(args) -> dict:
    """Hyperparameters for ``args.model`` from the options given; an option the model does not
    take is an error rather than silently ignored."""
    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "dropout": args.dropout,
        "patience": args.patience,
        "precision": args.precision,
        "lam": args.lam,
        "latent_dim": args.latent_dim,
        "hidden_dims": parse_dims(args.hidden_dims),
        "anneal_cap": args.anneal_cap,
        "total_anneal_steps": args.total_anneal_steps,
        "beta": args.beta,
        "kl_weighting": args.kl_weighting,
        "temperature": args.temperature,
        "gamma": args.gamma,
        "encoder_epochs": args.encoder_epochs,
        "decoder_epochs": args.decoder_epochs,
        "mixture_weights": parse_floats(args.mixture_weights, "--mixture-weights"),
        "l2": args.l2,
    }
    from recvae.models import model_class

    accepted = set(model_class(model_name(args))._param_names())  # the registry says what a model takes
    unused = [k for k, v in given.items() if v is not None and k not in accepted]
    if unused:
        raise CLIError(f"--model {args.model}{latent_note(args)}: does not take {', '.join('--' + u.replace('_', '-') for u in unused)}")
    params = {k: v for k, v in given.items() if v is not None}
    extra = {"random_state": args.seed, "device": args.device, "show_progress": not args.quiet}
    params.update({k: v for k, v in extra.items() if k in accepted})
    return params


def model_name(args) -> str:
    """The model ``--model`` and ``--latent`` name together: ``--model multvae --latent bernoulli``
    is ``binary-multvae``; another model with ``--latent`` is an error."""
    latent = getattr(args, "latent", None)
    if latent is None or (latent == "gaussian" and args.model == "multvae"):
        return args.model
    if args.model == "multvae":
        return "binary-multvae"
    raise CLIError(f"--model {args.model}: does not take --latent (only multvae has a choice of latent)")


def latent_note(args) -> str:
    return " --latent bernoulli" if model_name(args) == "binary-multvae" and args.model == "multvae" else ""


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated numbers such as 0.15,0.75,0.1, got {text!r}") from None


def parse_dims(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"--hidden-dims: expected comma-separated integers such as 600 or 600,300, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise CLIError(f"--hidden-dims: sizes must be positive, got {text!r}")
    return dims


def cmd_datasets(args) -> int:
    from recvae.data import resolve_data_dir
    from recvae.data.movielens import DATASETS, dataset_status

    data_dir = resolve_data_dir(args.data_dir)
    print(f"data directory: {data_dir.resolve()} (argument --data-dir, else $RECVAE_DATA, else ./data)")
    rows = [(name, dataset_status(name, data_dir)) for name in DATASETS]
    width = max(len(n) for n, _ in rows)
    for name, status in rows:
        print(f"  {name:<{width}}  {status}")
    return 0


def cmd_train(args) -> int:
    from recvae.experiment import ResumeMismatch, RunConfig, RunFinished, run
    from recvae.models.training_loop import NonFiniteLossError

    if (args.resume or args.overwrite or args.keep_checkpoint) and not args.out:
        flag = "--resume" if args.resume else "--overwrite" if args.overwrite else "--keep-checkpoint"
        raise CLIError(f"{flag}: needs --out, the run directory")
    spec = data_spec_from_args(args)
    params = model_params_from_args(args)
    name = model_name(args)
    config = RunConfig(
        data=spec, model=name, params=params, split_seed=args.split_seed, n_heldout_users=args.n_heldout_users
    )
    try:
        with sigterm_raises(), distributed_training(name, params) as main:
            result = run(config, out=args.out, show_progress=not args.quiet and main, resume=args.resume,
                         overwrite=args.overwrite, keep_checkpoint=args.keep_checkpoint)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        print(f"recvae: stopped by {signame} {train_stop_line(args)}", file=sys.stderr)
        return code
    except NonFiniteLossError as e:
        print(f"recvae: error: {non_finite_message(e, args, params.get('lr', model_lr(name)))}", file=sys.stderr)
        return 2
    except RunFinished as e:
        print(f"recvae: {e}", file=sys.stderr)
        return 0
    except ResumeMismatch as e:
        flags = command_flags(build_parser(), "train")
        detail = "; ".join(f"{flag_of(k, flags)}: {a!r} in the run, now {b!r}" for k, a, b in e.differences)
        raise CLIError(f"--resume: {Path(args.out) / 'run.json'} was made with other settings ({detail}); "
                       "use the options of the interrupted run") from None
    except MissingDependencyError as e:
        raise CLIError(str(e)) from None
    if not main:
        return 0
    print(f"\n{config.model} on {spec.name}: trained in {result.train_seconds:.1f} s")
    print(format_table({"validation": result.validation, "test": result.test}))
    if args.out:
        print(f"\nrun directory: {args.out}")
    if args.show > 0:
        print_examples(result, spec, args.show)
    return 0


def model_lr(name: str) -> float:
    import inspect

    from recvae.models import model_class

    return inspect.signature(model_class(name).__init__).parameters["lr"].default


def train_stop_line(args) -> str:
    """What a stopped ``train`` left on disk, read from the run directory itself, and a command
    that works from there."""
    from recvae.rundir import CURVE_FILE, RunDir

    if not args.out:
        return "during training; no --out was given, so nothing was kept"
    run = RunDir(args.out)
    state = run.state()
    if state in ("absent", "empty"):
        return f"before anything was written to {args.out}; start again with: {restart_command(args)}"
    if state == "partial":
        return (f"while {args.out} was being set up (no run.json yet, nothing trained); start again with: "
                f"{restart_command(args, overwrite=True)}")
    if state == "described":
        return f"before the first epoch finished (nothing trained yet); resume with: {resume_command(args)}"
    if state == "training":
        return f"after epoch {run.checkpoint_epoch()} (checkpoint in {args.out}); resume with: {resume_command(args)}"
    if state == "trained":
        return f"after training, before the metrics were written; finish with: {resume_command(args)}"
    if not run.file(CURVE_FILE).is_file():
        return (f"after the metrics were written ({args.out} holds the finished run), before the learning curve "
                f"was drawn; draw it with: {resume_command(args)}")
    return f"after the run finished ({args.out} holds it whole)"


def cmd_tune(args) -> int:
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
                                show_progress=not args.quiet)
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


def resume_command(args, lr: float | None = None) -> str:
    """The user's command with --resume added and --overwrite removed (and --lr set to ``lr``)."""
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        if a == "--overwrite" or (lr is not None and a.startswith("--lr=")):
            continue
        if lr is not None and a == "--lr":
            skip = True
            continue
        argv.append(a)
    if "--resume" not in argv:
        argv.append("--resume")
    if lr is not None:
        argv += ["--lr", f"{lr:g}"]
    return shlex.join([args.prog, *argv])


def restart_command(args, overwrite: bool = False) -> str:
    """The user's command without --resume (with --overwrite when ``overwrite``)."""
    argv = [a for a in args.argv if a != "--resume" and (not overwrite or a != "--overwrite")]
    return shlex.join([args.prog, *argv, *(["--overwrite"] if overwrite else [])])


def non_finite_message(e, args, lr: float) -> str:
    """One line: where the loss diverged, what was kept, how to go on."""
    head = f"non-finite training loss at epoch {e.epoch}, update {e.update} with --lr {lr:g}"
    if e.kept_epoch is None:
        left = f", nothing written to --out {args.out}" if args.out else ""
        return (f"{head}: no epoch had finished, nothing was learnt{left}; lower --lr (e.g. --lr {lr / 10:g}) "
                "or try --precision fp32")
    if not args.out:
        return f"{head}; training ended with the weights of epoch {e.kept_epoch}; lower --lr or try --precision fp32"
    from recvae.rundir import RunDir

    return (f"{head}; {args.out} holds the model of epoch {e.kept_epoch} (evaluate and recommend work on it); "
            f"to go on from the checkpoint of epoch {RunDir(args.out).checkpoint_epoch()} with half the learning rate: "
            f"{resume_command(args, lr=lr / 2)}")


def flag_of(setting: str, flags: dict[str, str]) -> str:
    """The flag of a RunConfig setting (``params.dropout`` -> ``--dropout``, ``data.path`` ->
    ``--data``), from ``flags``, :func:`command_flags`'s mapping, the one that also rewrites
    error messages; a setting without a flag keeps its name (``ks``)."""
    name = setting.split(".")[-1]
    return "--data" if name == "path" else flags.get(name, name)


@contextlib.contextmanager
def distributed_training(name: str, params: dict):
    """Under torchrun: join the process group for the block (yields whether this is rank 0,
    which alone prints and writes); otherwise a single process, rank 0."""
    import inspect

    from recvae import distributed
    from recvae.models import model_class

    defaults = inspect.signature(model_class(name).__init__).parameters
    with distributed.process_group_from_env() as group:
        if "batch_size" in defaults:  # before any data is read or folder made
            distributed.check_batch_split(params.get("batch_size", defaults["batch_size"].default), group)
        if not group.is_main:
            params["show_progress"] = False
        yield group.is_main


def add_prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="preprocess interactions once into a directory that training processes memory-map")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    add_data_options(p)
    p.add_argument("--out", metavar="DIR", required=True, help="the prepared directory to write (replaced if it is one)")
    p.set_defaults(func=cmd_prepare)


def check_prepared_args(args) -> None:
    """--prepared fixes the preprocessing: a data option besides it would be silently ignored."""
    from recvae.data.prepared import is_prepared

    if not is_prepared(args.prepared):
        raise CLIError(f"--prepared {args.prepared}: not a prepared dataset (no prepared.json); "
                       f"write one with `recvae prepare --data FILE --out {args.prepared}`")
    defaults = argparse.ArgumentParser()
    add_data_options(defaults)
    given = [a.option_strings[0] for a in defaults._actions if a.dest != "help" and getattr(args, a.dest) != a.default]
    if given:
        raise CLIError(f"--prepared: the preprocessing was fixed by `recvae prepare`; drop {', '.join(given)}")


def cmd_prepare(args) -> int:
    from dataclasses import asdict

    from recvae.data.prepared import write_prepared

    spec = data_spec_from_args(args)
    interactions = spec.load(show_progress=not args.quiet)
    write_prepared(interactions, args.out, preprocessing=asdict(spec))
    print(f"prepared {interactions.n_users} users x {interactions.n_items} items ({interactions.nnz} interactions) "
          f"in {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from recvae.evaluation import evaluate
    from recvae.rundir import RunDir

    run = RunDir(args.run_dir)
    model, description = run.load_finished(device=args.device)
    users = run.load_users(args.split, model)
    result = evaluate(model, users.fold_in, users.heldout, ks=tuple(description.get("ks", (20, 50, 100))))
    print(f"{description['model']} on {description['data'].get('dataset') or description['data'].get('path')}")
    print(format_table({args.split: result}))
    return 0


def cmd_recommend(args) -> int:
    from recvae.recommend import RunRecommender, note_large_k

    if args.k < 1:
        raise CLIError(f"--k: expected a positive integer, got {args.k}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    for flag, given in (("--input", args.input), ("--users", args.users)):
        if given is not None and args.output != "-" and _same_file(given, args.output):
            raise CLIError(f"--output {args.output}: is the {flag} file; choose another")
    check_output(args.output)
    if args.output != "-":
        from recvae.rundir import check_not_in_run

        check_not_in_run(args.output, "--output")
    run = RunRecommender(args.run_dir, device=args.device)
    note_large_k(args.k, run.n_items)
    if args.all_users:
        batches = (run.known_histories(np.arange(s, min(s + args.batch_size, len(run.user_ids))))
                   for s in range(0, len(run.user_ids), args.batch_size))
        n_users = len(run.user_ids)
    else:
        hist = histories_from_file(run, args)
        batches = (hist.slice(s, s + args.batch_size) for s in range(0, len(hist), args.batch_size))
        n_users = len(hist)
    from tqdm.auto import tqdm

    with table_writer(args.output) as write, tqdm(total=n_users, unit="user", disable=args.quiet, file=sys.stderr) as bar:
        for batch in batches:
            write(run.recommend(batch, args.k, include_seen=args.include_seen))
            bar.update(len(batch))
    return 0


def histories_from_file(run, args):
    """The users of ``--input``/``--users`` with their histories: the file's rows (rating above the
    threshold: history; at or below: seen only) joined with what the run knows of each user."""
    from recvae.recommend import IdError, log_unknown

    flag = "--input" if args.input is not None else "--users"
    path = args.input if args.input is not None else args.users
    data = run.data
    user_col = args.user_col or data.get("user_col") or "user"
    item_col = args.item_col or data.get("item_col") or "item"
    rating_col = args.rating_col if args.rating_col is not None else data.get("rating_col")
    rating_col = None if rating_col is None or str(rating_col).lower() == "none" else rating_col
    threshold = args.rating_threshold if args.rating_threshold is not None else data.get("rating_threshold")
    frame, locate = read_table(path, flag, sep=args.sep or data.get("sep"), id_cols=(user_col, item_col))
    columns = list(map(str, frame.columns))
    if user_col not in frame.columns:
        raise CLIError(f"{flag} {path}: no user column {user_col!r} (--user-col); found {columns}")
    users_only = args.users is not None or item_col not in frame.columns
    if args.input is not None and users_only and args.item_col is not None:
        raise CLIError(f"{flag} {path}: no item column {item_col!r} (--item-col); found {columns}")
    if args.input is not None and args.rating_col is not None and rating_col and rating_col not in frame.columns:
        raise CLIError(f"{flag} {path}: no rating column {rating_col!r} (--rating-col); found {columns}")
    missing = frame[user_col].isna().to_numpy()
    if missing.any():
        raise CLIError(f"{flag} {path}: {locate(int(np.argmax(missing)))}, column {user_col!r} (--user-col): user id missing")
    rows, ids = run.user_rows(frame[user_col])
    position, users = pd.factorize(pd.Series(ids, dtype=object), sort=False)
    user_rows = np.full(len(users), -1, dtype=np.int64)
    user_rows[position] = rows
    empty = np.zeros((0, 2), dtype=np.int64)
    if users_only:
        log_unknown("user ids", np.asarray(users)[user_rows < 0], len(users))
        return run.histories(np.asarray(users), user_rows, empty, empty)
    try:
        codes = run.item_codes(frame[item_col], lambda j: f"{flag} {path}: {locate(j)}, column {item_col!r} (--item-col)")
    except IdError as e:
        raise CLIError(str(e)) from None
    unknown = codes < 0
    if unknown.any() and args.strict:
        examples = pd.unique(frame[item_col][unknown])[:5].tolist()
        raise CLIError(f"{flag} {path}: {int(unknown.sum())} row(s) name item ids unknown to the model (e.g. {examples}); "
                       "drop --strict to skip them")
    log_unknown("item ids", frame[item_col].to_numpy()[unknown], frame[item_col].nunique())
    positive = ~unknown
    if rating_col is not None and rating_col in frame.columns and threshold is not None:
        ratings = pd.to_numeric(frame[rating_col], errors="coerce").to_numpy(np.float64)
        bad = np.isnan(ratings) & frame[rating_col].notna().to_numpy()
        if bad.any():
            j = int(np.argmax(bad))
            raise CLIError(f"{flag} {path}: {locate(j)}, column {rating_col!r} (--rating-col): "
                           f"expected a number, got {frame[rating_col].iloc[j]!r}")
        positive &= ratings > float(threshold)  # a missing rating is not a positive
    pairs = np.column_stack([position, codes])
    new = int((user_rows < 0).sum())
    if new:
        logger.info("%d user(s) not in the run: recommended from the file's rows alone", new)
    return run.histories(np.asarray(users), user_rows, pairs[positive], pairs[~unknown & ~positive])


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def cmd_serve(args) -> int:
    from recvae.optional import MissingDependencyError
    from recvae.serve import WorkerStartupError, run_server

    if not 0 < args.port < 65536:
        raise CLIError(f"--port: expected 1..65535, got {args.port}")
    for flag, value in (("--workers", args.workers), ("--max-body", args.max_body), ("--max-batch", args.max_batch),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CLIError(f"{flag}: expected a positive integer, got {value}")
    for flag, value in (("--body-timeout", args.body_timeout), ("--keep-alive", args.keep_alive), ("--grace", args.grace)):
        if not 0 < value < float("inf"):
            raise CLIError(f"{flag}: expected a positive number of seconds, got {value:g}")
    if not (Path(args.run_dir) / "run.json").is_file():
        raise CLIError(f"RUN_DIR {args.run_dir}: not a run directory (no run.json)")
    try:
        run_server(args.run_dir, host=args.host, port=args.port, workers=args.workers, device=args.device,
                   max_body=args.max_body, max_batch=args.max_batch, threads=args.threads,
                   log_level="warning" if args.quiet else "info", body_timeout=args.body_timeout,
                   keep_alive=args.keep_alive, grace=args.grace)
    except (MissingDependencyError, WorkerStartupError) as e:
        raise CLIError(str(e)) from e
    return 0


def read_table(path: str, flag: str = "--input", sep: str | None = None, id_cols=()) -> tuple[pd.DataFrame, callable]:
    """``(frame, locate)``: a CSV/TSV/Parquet file with the columns ``id_cols`` read as text (ids
    are converted to the run's types later, one by one), and ``locate(j)`` naming row ``j`` as the
    user sees it: ``line N`` of a text file (header = line 1), ``row N`` of a Parquet file."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            from recvae.optional import require

            require("pyarrow", f"{flag} as Parquet")
            return pd.read_parquet(p), lambda j: f"row {j + 1}"
        if sep is None:
            sep = "\t" if suffix in (".tsv", ".tab", ".data") else ("::" if suffix == ".dat" else ",")
        frame = pd.read_csv(p, sep=sep, dtype={c: str for c in id_cols}, engine="python" if len(sep) > 1 else "c")
        return frame, lambda j: f"line {j + 2}"
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise CLIError(f"{flag} {path}: cannot parse: {str(e).strip().splitlines()[0]}") from e


def check_output(output: str) -> None:
    if output == "-":
        return
    parent = Path(output).parent
    if not parent.is_dir():
        raise CLIError(f"--output {output}: folder {parent} does not exist")


@contextmanager
def table_writer(output: str):
    """Yield ``write(frame)`` appending DataFrames to ``output``: CSV (or TSV by extension) appended
    batch by batch, Parquet as one row group per batch, ``-`` CSV on stdout. A file is written
    under a temporary name and renamed at the end (recvae.fileio.atomic_path): a failure leaves
    nothing half-written, and only one batch is ever in memory."""
    from recvae.fileio import atomic_path
    from recvae.recommend import COLUMNS

    state = {"header": True}
    if output == "-":
        def write(frame):
            frame.to_csv(sys.stdout, index=False, header=state["header"])
            state["header"] = False

        yield write
        if state["header"]:
            pd.DataFrame(columns=COLUMNS).to_csv(sys.stdout, index=False)
        return
    out = Path(output)
    try:
        with atomic_path(out) as tmp:
            if out.suffix.lower() in (".parquet", ".pq"):
                with _parquet_writer(tmp) as write:
                    yield write
            else:
                sep = "\t" if out.suffix.lower() in (".tsv", ".tab") else ","
                with open(tmp, "w", newline="") as f:
                    def write(frame):
                        frame.to_csv(f, index=False, header=state["header"], sep=sep)
                        state["header"] = False

                    yield write
                    if state["header"]:
                        pd.DataFrame(columns=COLUMNS).to_csv(f, index=False, sep=sep)
    except PermissionError as e:
        raise CLIError(f"--output {output}: {e}") from e


@contextmanager
def _parquet_writer(path: Path):
    from recvae.optional import require
    from recvae.recommend import COLUMNS

    pa = require("pyarrow", "--output as Parquet")
    import pyarrow.parquet as pq

    writer = None

    def write(frame):
        nonlocal writer
        if len(frame) == 0:
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table.cast(writer.schema))

    try:
        yield write
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        pd.DataFrame(columns=COLUMNS).to_parquet(path, index=False)


def format_table(results: dict) -> str:
    """Markdown table: one row per split, Recall@20, Recall@50, NDCG@100 as mean ± stderr."""
    from recvae.experiment import REPORT_METRICS

    header = "| split | users | " + " | ".join(m.replace("recall", "Recall").replace("ndcg", "NDCG") for m in REPORT_METRICS) + " |"
    lines = [header, "|" + "---|" * (len(REPORT_METRICS) + 2)]
    for name, res in results.items():
        if res is None:
            continue
        cells = [f"{res[m].mean:.4f} ± {res[m].stderr:.4f}" for m in REPORT_METRICS]
        lines.append(f"| {name} | {res[REPORT_METRICS[0]].n_users} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_examples(result, spec, n_users: int) -> None:
    """Top-10 lists for a few test users, with titles when the dataset has them."""
    titles = {}
    if spec.dataset:
        try:
            from recvae.data.movielens import load_movielens_titles

            titles = load_movielens_titles(spec.dataset, data_dir=spec.data_dir)
        except (OSError, ValueError, KeyError):
            titles = {}
    model = result.model
    test = result.split.test
    item_ids = np.asarray(result.split.train.item_ids)
    rows = test.fold_in[:n_users]
    ids, _ = model.recommend(rows, N=10)
    for r in range(rows.shape[0]):
        heldout = set(test.heldout[r].indices.tolist())
        print(f"\ntop-10 for test user {test.user_ids[r]} ({rows[r].nnz} fold-in items; * = held out, i.e. a hit):")
        for rank, i in enumerate(ids[r], start=1):
            if i < 0:
                break
            item = item_ids[i]
            mark = "*" if i in heldout else " "
            print(f"  {rank:2d}.{mark} {item}  {titles.get(item, '')}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
