"""What the commands share: user errors, the data and model options of ``train``, ``tune`` and
``prepare`` and their translation into library settings, and the tables they print."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("recvae")


#: --precision of recommend and serve: ``recvae.models.base.SCORING_PRECISIONS``, written out
#: because importing the models (torch) here would slow every command's start; a test checks both agree
PRECISIONS = ("fp32", "bf16")
PRECISION_HELP = ("fp32 (default) or bf16: the output layer's product in bfloat16 on a kept bf16 copy of its "
                  "weights, 1.4-1.6x as fast on a CPU with native bf16; scores differ in the third digit, so near-ties may swap places "
                  "(Mult-VAE, Mult-DAE and RecVAE runs)")

class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_source_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    src.add_argument("--prepared", metavar="DIR", help="a directory written by `recvae prepare` (memory-mapped)")


class _ModelOption(argparse._StoreAction):
    """``--model``: its help lists the registry, read only when help is shown (the registry
    imports torch, which no other command's start-up needs)."""

    @property
    def help(self):
        if self._help is not None:
            return self._help
        from recvae.models import model_names

        return f"one of {', '.join(model_names())} (default multvae)"

    @help.setter
    def help(self, value):
        self._help = value


def add_model_options(p: argparse.ArgumentParser, models: str | None = None) -> None:
    """The model and its hyperparameters, split and device: the options `train` and `tune` share."""
    p.add_argument("--model", default="multvae", action=_ModelOption, help=models)
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
    add_time_split_options(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="training matmul precision of neural models; auto: bf16 where it is fast")


def add_time_split_options(p: argparse.ArgumentParser) -> None:
    """A split in time instead of the paper's random fold-in (README: Splits)."""
    p.add_argument("--cutoff", metavar="T",
                   help="split in time at T (an ISO date or datetime, UTC without a zone, or Unix seconds): "
                        "training users' interactions before T train; held-out users fold in those before T "
                        "and are scored on those at or after T")
    p.add_argument("--leave-last", type=int, metavar="N",
                   help="split in time: each held-out user's last N interactions are the targets, the earlier "
                        "ones the fold-in")
    p.add_argument("--timestamp-col", metavar="COL",
                   help="time column of --data for --cutoff / --leave-last (default: 'timestamp' when the file "
                        "has one): Unix seconds or ISO dates")


def time_split_flag(args) -> str | None:
    """The option of the split in time asked for (``--cutoff``, ``--leave-last``), if any; two
    are refused."""
    cutoff, leave_last = getattr(args, "cutoff", None), getattr(args, "leave_last", None)
    if cutoff is not None and leave_last is not None:
        raise CLIError("--leave-last: cannot be combined with --cutoff; choose one split in time")
    return "--cutoff" if cutoff is not None else "--leave-last" if leave_last is not None else None


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data directory for MovieLens (default: $RECVAE_DATA, else ./data)")
    p.add_argument("--user-col", default="user", help="user column of --data (default 'user')")
    p.add_argument("--item-col", default="item", help="item column of --data (default 'item')")
    p.add_argument("--rating-col", default="rating", help="rating column of --data; 'none' for none")
    p.add_argument("--sep", help="separator of --data (default: from the extension)")
    # no default here: an option not given leaves the library's (recvae.data.Preprocessing)
    p.add_argument("--rating-threshold", type=float, action=_PaperDefault, help="keep ratings > this")
    p.add_argument("--min-user-interactions", type=int, action=_PaperDefault, help="drop users with fewer")
    p.add_argument("--min-item-interactions", type=int, action=_PaperDefault, help="drop items with fewer")


#: the preprocessing options, by their library names (recvae.data.Preprocessing's fields)
PREPROCESSING_OPTIONS = ("rating_threshold", "min_user_interactions", "min_item_interactions")


class _PaperDefault(argparse._StoreAction):
    """A preprocessing option: its default is the library's, shown in the help, read only when
    help is shown (recvae.data imports pandas, which building the parser must not)."""

    @property
    def help(self):
        from recvae.data.preprocessing import PAPER

        return f"{self._help} (default, the paper's: {getattr(PAPER, self.dest)})"

    @help.setter
    def help(self, value):
        self._help = value


def data_spec_from_args(args):
    from recvae.data.source import DataSpec

    rating_col = None if str(args.rating_col).lower() == "none" else args.rating_col
    if args.data is not None and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data}: no such file")
    prepared = getattr(args, "prepared", None)
    time_split, timestamp_col = time_split_flag(args), getattr(args, "timestamp_col", None)
    if timestamp_col is not None and time_split is None:
        raise CLIError("--timestamp-col: given without --cutoff or --leave-last, the splits that read it")
    if prepared is not None:
        if time_split is not None:
            raise CLIError(f"{time_split}: --prepared {prepared} holds no timestamps (recvae prepare keeps none); "
                           "split in time from --data or --dataset")
        check_prepared_args(args)
        return DataSpec.of_prepared(prepared)
    user_col, item_col = args.user_col, args.item_col
    if args.data is not None:
        user_col, item_col, rating_col = recognised_columns(args, rating_col)
        if time_split is not None and timestamp_col is None:
            timestamp_col = recognised_timestamp(args)
    rules = {k: getattr(args, k) for k in PREPROCESSING_OPTIONS if getattr(args, k) is not None}
    if not rating_col:
        rules["rating_threshold"] = None  # no ratings: every row is a positive
    return DataSpec(
        dataset=args.dataset,
        path=args.data,
        data_dir=args.data_dir,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        sep=args.sep,
        **rules,
        timestamp_col=timestamp_col,
    )


def recognised_columns(args, rating_col):
    """``--data``'s columns: the flags' when given or present in the file; else a common schema
    the header holds (GroupLens's ``userId,movieId,rating``, ``user_id,item_id``, ...), with
    one note saying which."""
    from recvae.data.readers import known_schema, read_columns

    defaults = {"user_col": "user", "item_col": "item", "rating_col": "rating"}
    chosen = {"user_col": args.user_col, "item_col": args.item_col, "rating_col": rating_col}
    if any(chosen[k] != v for k, v in defaults.items()):
        return chosen["user_col"], chosen["item_col"], chosen["rating_col"]  # the user chose
    columns = read_columns(args.data, args.sep)
    if not columns or {"user", "item"} <= set(columns):
        return chosen["user_col"], chosen["item_col"], chosen["rating_col"]
    schema = known_schema(columns)
    if schema is None:
        return chosen["user_col"], chosen["item_col"], chosen["rating_col"]
    logger.info("%s: no 'user'/'item' columns; reading %s as user, item%s (--user-col, --item-col, "
                "--rating-col choose others)", args.data, ", ".join(c for c in schema if c),
                " and rating" if schema[2] else "")
    return schema


def recognised_timestamp(args) -> str | None:
    """The time column of ``--data`` when ``--timestamp-col`` is not given: ``timestamp`` (as
    GroupLens's files name it) when the header has it, with one note; else None (reading the
    file then names its columns)."""
    from recvae.data.readers import read_columns

    if "timestamp" not in read_columns(args.data, args.sep):
        return None
    logger.info("%s: reading its 'timestamp' column as the time of each interaction (--timestamp-col chooses "
                "another)", args.data)
    return "timestamp"


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


def flag_of(setting: str, flags: dict[str, str]) -> str:
    """The flag of a RunConfig setting (``params.dropout`` -> ``--dropout``, ``data.path`` ->
    ``--data``), from ``flags``, :func:`command_flags`'s mapping, the one that also rewrites
    error messages; a setting without a flag keeps its name (``ks``)."""
    name = setting.split(".")[-1]
    return "--data" if name == "path" else flags.get(name, name)


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
    import numpy as np

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
