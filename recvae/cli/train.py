"""``recvae train``: one run with the paper's protocol; its stop messages say what is on disk."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys

from recvae.cli.common import (
    CLIError, add_data_options, add_model_options, add_source_options, data_spec_from_args, flag_of, format_table,
    print_examples,
)
from recvae.cli.hyperparameters import model_name, model_params_from_args
from recvae.optional import MissingDependencyError
from recvae.signals import Terminated, sigterm_raises, stopped_by


HYPERPARAMETERS = True  # the models' hyperparameter flags (recvae.cli.hyperparameters)


def add_parser(sub, common) -> None:
    t = sub.add_parser("train", parents=[common], help="train a model with the paper's protocol and print its test metrics")
    add_source_options(t)
    add_data_options(t)
    add_model_options(t)
    t.add_argument("--holdout", choices=("users", "none"), default="users",
                   help="users (default): the paper's held-out validation and test users; none: every user trains "
                        "for --epochs (no validation, early stopping or test), e.g. the model to deploy")
    t.add_argument("--out", metavar="RUN_DIR",
                   help="write the run directory here (a new or empty directory; default: a new runs/<data>-<model>-<time>)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="empty the run directory --out first")
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoint (same options; --epochs, --patience, "
                           "--lr, --device, --precision may change; without --patience, the run's own)")
    t.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt when training finishes (to --resume with more --epochs later)")
    t.add_argument("--show", type=int, default=3, metavar="N", help="print top-10 lists for N test users (default 3)")
    t.set_defaults(func=run)


def run(args) -> int:
    from recvae.experiment import ResumeMismatch, RunConfig, RunFinished, run
    from recvae.models.training_loop import NonFiniteLossError
    from recvae.settings import check_run_options

    check_run_options(args.out, args.resume, args.overwrite, args.keep_checkpoint)  # before a default --out is made
    spec = data_spec_from_args(args)
    params = model_params_from_args(args)
    name = model_name(args)
    config = RunConfig(
        data=spec, model=name, params=params, split_seed=args.split_seed, n_heldout_users=args.n_heldout_users,
        holdout=args.holdout, cutoff=args.cutoff, leave_last=args.leave_last,
    )
    made = None  # the default --out this command made (removed again when a failure leaves it empty)
    try:
        with sigterm_raises(), distributed_training(name, params) as main:
            if args.out is None and main:
                made = default_out(args, config)
            result = run(config, out=args.out, show_progress=not args.quiet and main, resume=args.resume,
                         overwrite=args.overwrite, keep_checkpoint=args.keep_checkpoint)
    except (KeyboardInterrupt, Terminated) as e:
        signame, code = stopped_by(e)
        print(f"recvae: stopped by {signame} {train_stop_line(args)}", file=sys.stderr)
        return code
    except NonFiniteLossError as e:
        print(f"recvae: error: {non_finite_message(e, args, params.get('lr') or model_lr(name))}", file=sys.stderr)
        return 2
    except RunFinished as e:
        print(f"recvae: {e.text(lambda name: args.flags.get(name, name))}", file=sys.stderr)
        return 0
    except ResumeMismatch as e:
        from recvae.rundir import RUN_JSON, RunDir

        flags = args.flags
        detail = "; ".join(f"{flag_of(k, flags)}: {a!r} in the run, now {b!r}" for k, a, b in e.differences)
        raise CLIError(f"--resume: {RunDir(args.out).file(RUN_JSON)} was made with other settings ({detail}); "
                       "use the options of the interrupted run") from None
    except MissingDependencyError as e:
        raise CLIError(str(e)) from None
    finally:
        if made:
            made[0].remove_if_empty(parent=made[1])
    if not main:
        return 0
    if config.holdout == "none":
        train = result.split.train
        print(f"\n{config.model} on {spec.name}: trained on all {train.n_users:,} users ({train.nnz:,} interactions) "
              f"in {result.train_seconds:.1f} s; no held-out users, so no metrics")
    else:
        print(f"\n{config.model} on {spec.name}: trained in {result.train_seconds:.1f} s")
        print(format_table({"validation": result.validation, "test": result.test}))
    if args.out:
        print(f"\nrun directory: {args.out}")
    if args.show > 0 and config.holdout != "none":
        print_examples(result, spec, args.show)
    return 0


def default_out(args, config):
    """Without --out: a new run directory under runs/ (named after the data, the model and the
    time), made now and printed first; ``args`` then carry it, so stop messages and resume
    commands name it. Returns the :class:`~recvae.rundir.RunDir` and whether runs/ was made too
    (the options are checked first: a bad one makes no directory)."""
    from recvae.cli.common import logger
    from recvae.settings import check as check_config
    from recvae.models.base import Recommender
    from recvae.rundir import RunDir, new_run_dir

    if type(check_config(config)).save is Recommender.save:  # a registered model without save(): nothing to keep
        logger.info("%s has no save(): no run directory is written (the model is not kept)", config.model)
        return None
    new_parent = not os.path.isdir("runs")
    path = new_run_dir("runs", "-".join("_".join(part.split()) for part in (config.data.name, config.model)))
    args.out = str(path)
    args.argv = [*args.argv, "--out", args.out]
    print(f"run directory: {args.out}", flush=True)
    return RunDir(path), new_parent


def model_lr(name: str) -> float:
    from recvae.models.registry import default_params

    return default_params(name)["lr"]


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


@contextlib.contextmanager
def distributed_training(name: str, params: dict):
    """Under torchrun: join the process group for the block (yields whether this is rank 0,
    which alone prints and writes); otherwise a single process, rank 0."""
    from recvae import distributed
    from recvae.models.registry import default_params

    defaults = default_params(name)
    with distributed.process_group_from_env() as group:
        # before any data is read or folder made; parallel="items" gives every process every batch
        if "batch_size" in defaults and params.get("parallel", defaults.get("parallel")) != "items":
            distributed.check_batch_split(params.get("batch_size", defaults["batch_size"]), group)
        yield group.is_main
