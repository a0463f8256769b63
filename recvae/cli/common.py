"""What the commands share: user errors, the data and model options of ``train``, ``tune`` and
``prepare`` and their translation into library settings, and the tables they print."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from recvae.errors import RecvaeError

logger = logging.getLogger("recvae")


#: --precision of recommend and serve: ``recvae.models.base.SCORING_PRECISIONS``, written out
#: because importing the models (torch) here would slow every command's start; a test checks both agree
PRECISIONS = ("fp32", "bf16")
PRECISION_HELP = ("fp32 (default) or bf16: the output layer's product in bfloat16 on a kept bf16 copy of its "
                  "weights, 1.4-1.6x as fast on a CPU with native bf16; scores differ in the third digit, so near-ties may swap places "
                  "(Mult-VAE, Mult-DAE and RecVAE runs)")

#: what every --device accepts (recvae.models.device.resolve_device), said the same way in each command's help
DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


class CLIError(RecvaeError):
    """A user error: printed as one line, exit status 2."""


def add_source_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    src.add_argument("--prepared", metavar="DIR", help="a directory written by `recvae prepare` (memory-mapped)")


class LazyHelp:
    """An option's action whose help is made only when help is shown (:meth:`make_help`): it
    reads modules (the models' registry and tables: torch; the preprocessing defaults: pandas)
    that building the parser, which every command does at start-up, must not import."""

    def make_help(self, text):
        return text

    @property
    def help(self):
        return self.make_help(self._help)

    @help.setter
    def help(self, value):
        self._help = value


class _ModelOption(LazyHelp, argparse._StoreAction):
    """``--model``: its help lists the registry."""

    def make_help(self, text):
        if text is not None:
            return text
        from recvae.models import model_names

        return f"one of {', '.join(model_names())} (default multvae)"


def add_model_options(p: argparse.ArgumentParser, models: str | None = None) -> None:
    """The model and the split: the options `train` and `tune` share besides the hyperparameters
    (:mod:`recvae.cli.hyperparameters`, added from the models' tables when the command runs)."""
    p.add_argument("--model", default="multvae", action=_ModelOption, help=models)
    p.add_argument("--latent", choices=("gaussian", "bernoulli"),
                   help="multvae's latent: gaussian (paper) or bernoulli (binary codes; the binary-multvae model)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the user split (default 0)")
    p.add_argument("--n-heldout-users", type=int, help="validation and test users each (default: the library's rule)")
    add_time_split_options(p)


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


class _PaperDefault(LazyHelp, argparse._StoreAction):
    """A preprocessing option: its default is the library's, shown in the help."""

    def make_help(self, text):
        from recvae.data.preprocessing import PAPER

        return f"{text} (default, the paper's: {getattr(PAPER, self.dest)})"


def data_spec_from_args(args):
    from recvae.data.source import DataSpec

    rating_col = None if str(args.rating_col).lower() == "none" else args.rating_col
    if args.data is not None and not Path(args.data).is_file():
        raise CLIError(f"--data {args.data}: no such file")
    prepared = getattr(args, "prepared", None)
    timestamp_col = getattr(args, "timestamp_col", None)
    # the rules across settings (a time column without a split in time, ...) are the library's
    # (recvae.settings), checked when the run starts
    time_split = getattr(args, "cutoff", None) is not None or getattr(args, "leave_last", None) is not None
    if prepared is not None:
        check_prepared_args(args)
        return dataclasses.replace(DataSpec.of_prepared(prepared), timestamp_col=timestamp_col)
    user_col, item_col = args.user_col, args.item_col
    if args.data is not None:
        user_col, item_col, rating_col = recognised_columns(args, rating_col)
        if time_split and timestamp_col is None:
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
