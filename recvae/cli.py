"""The ``recvae`` command line: datasets, train, evaluate, recommend."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger("recvae")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    try:
        return args.func(args) or 0
    except (CLIError, ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"recvae: error: {msg}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recvae",
        description="Mult-VAE / Mult-DAE collaborative filtering (Liang et al., WWW 2018) with the paper's protocol.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("datasets", help="list the MovieLens datasets, where they are looked for, which are present")
    d.add_argument("--data-dir", help="data directory (default: $RECVAE_DATA, else ./data)")
    d.set_defaults(func=cmd_datasets)

    t = sub.add_parser("train", help="train a model with the paper's protocol and print its test metrics")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    src.add_argument("--prepared", metavar="DIR", help="a directory written by `recvae prepare` (memory-mapped)")
    add_data_options(t)
    t.add_argument("--model", default="multvae", help="multvae (default), multdae, ease or popularity")
    t.add_argument("--epochs", type=int, help="training epochs (paper: 200)")
    t.add_argument("--batch-size", type=int, help="users per gradient update (paper: 500)")
    t.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-3)")
    t.add_argument("--dropout", type=float, help="input dropout (paper: 0.5)")
    t.add_argument("--anneal-cap", type=float, help="largest KL weight beta (paper: 0.2)")
    t.add_argument("--total-anneal-steps", type=int, help="updates to reach beta=1 before capping (paper: 200000)")
    t.add_argument("--beta", type=float, help="a constant KL weight instead of annealing")
    t.add_argument("--kl-weighting", choices=("uniform", "activity"),
                   help="each user's KL weight: uniform (paper) or n_u / mean n (activity)")
    t.add_argument("--lam", type=float, help="L2 weight on the weight matrices (paper: 0 VAE, 0.01/500 DAE)")
    t.add_argument("--hidden-dims", help="comma-separated hidden layer sizes (paper: 600 VAE, none DAE)")
    t.add_argument("--latent-dim", type=int, help="latent size (paper: 200)")
    t.add_argument("--patience", type=int, help="early stopping: epochs without validation NDCG@100 gain")
    t.add_argument("--l2", type=float, help="EASE's L2 weight lambda (default 500)")
    t.add_argument("--seed", type=int, default=0, help="model seed (default 0)")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the user split (default 0)")
    t.add_argument("--n-heldout-users", type=int, help="validation and test users each (default: the library's rule)")
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="training matmul precision of neural models; auto: bf16 where it is fast")
    t.add_argument("--out", metavar="RUN_DIR", help="write the run directory here")
    t.add_argument("--show", type=int, default=3, metavar="N", help="print top-10 lists for N test users (default 3)")
    t.set_defaults(func=cmd_train)

    add_prepare_parser(sub)

    e = sub.add_parser("evaluate", help="re-evaluate a saved run on its test (or validation) users")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", choices=("test", "validation"), default="test")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("recommend", help="top-K items for the users of a history file, known or new")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--input", required=True, help="history file (CSV, TSV, Parquet) with user and item columns")
    r.add_argument("--user-col", default="user")
    r.add_argument("--item-col", default="item")
    r.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    r.add_argument("--output", default="-", help="CSV or Parquet by extension; '-' for stdout (default)")
    r.add_argument("--strict", action="store_true", help="fail on item ids unknown to the model instead of dropping them")
    r.set_defaults(func=cmd_recommend)
    return p


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
        "l2": args.l2,
    }
    accepted = {
        "multvae": set(given) - {"l2"},
        "multdae": set(given) - {"l2", "anneal_cap", "total_anneal_steps", "beta", "kl_weighting"},
        "ease": {"l2"},
        "popularity": set(),
    }.get(args.model, set(given))
    unused = [k for k, v in given.items() if v is not None and k not in accepted]
    if unused:
        raise CLIError(f"--model {args.model}: does not take {', '.join('--' + u.replace('_', '-') for u in unused)}")
    params = {k: v for k, v in given.items() if v is not None}
    if args.model in ("multvae", "multdae"):
        params.update(random_state=args.seed, device=args.device, show_progress=not args.quiet)
    return params


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
    from recvae.experiment import RunConfig, make_model, run

    spec = data_spec_from_args(args)
    params = model_params_from_args(args)
    model = make_model(args.model, **params)  # fail on a bad model name or parameter before loading data
    config = RunConfig(
        data=spec, model=args.model, params=params, split_seed=args.split_seed, n_heldout_users=args.n_heldout_users
    )
    with distributed_training(model, params) as main:
        result = run(config, out=args.out, show_progress=not args.quiet and main)
    if not main:
        return 0
    print(f"\n{args.model} on {spec.name}: trained in {result.train_seconds:.1f} s")
    print(format_table({"validation": result.validation, "test": result.test}))
    if args.out:
        print(f"\nrun directory: {args.out}")
    if args.show > 0:
        print_examples(result, spec, args.show)
    return 0


@contextlib.contextmanager
def distributed_training(model, params: dict):
    """Under torchrun: join the process group for the block (yields whether this is rank 0,
    which alone prints and writes); otherwise a single process, rank 0."""
    from recvae import distributed

    with distributed.process_group_from_env() as group:
        if hasattr(model, "batch_size"):  # before any data is read or folder made
            distributed.check_batch_split(model.batch_size, group)
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
    from recvae.experiment import load_heldout, load_run

    model, description = load_run(args.run_dir)
    users = load_heldout(Path(args.run_dir) / f"{args.split}.npz")
    result = evaluate(model, users.fold_in, users.heldout, ks=tuple(description.get("ks", (20, 50, 100))))
    print(f"{description['model']} on {description['data'].get('dataset') or description['data'].get('path')}")
    print(format_table({args.split: result}))
    return 0


def cmd_recommend(args) -> int:
    from recvae.data import Interactions
    from recvae.experiment import load_run
    from recvae.recommend import histories_to_csr, recommend_frame

    if args.k < 1:
        raise CLIError(f"--k: expected a positive integer, got {args.k}")
    model, _ = load_run(args.run_dir)
    histories = read_table(args.input)
    train = Interactions.load(Path(args.run_dir) / "train.npz")
    matrix, users = histories_to_csr(histories, train.item_ids, args.user_col, args.item_col, strict=args.strict)
    # Known users: their training history joins the rows given in the file.
    rows = train.user_index(users)
    known = rows >= 0
    if known.any():
        extra = sp.diags(known.astype(np.float32)) @ train.matrix[np.where(known, rows, 0)]
        matrix = ((matrix + extra) > 0).astype(np.float32).tocsr()
    popularity = np.asarray(train.matrix.sum(axis=0)).ravel()
    frame = recommend_frame(model, matrix, users, train.item_ids, N=args.k, fallback_scores=popularity)
    write_table(frame, args.output)
    return 0


def read_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--input {path}: no such file")
    try:
        if p.suffix.lower() == ".parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p, sep="\t" if p.suffix.lower() in (".tsv", ".tab") else ",")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CLIError(f"--input {path}: cannot parse: {e}") from e


def write_table(frame: pd.DataFrame, output: str) -> None:
    if output == "-":
        frame.to_csv(sys.stdout, index=False)
        return
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"--output {output}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=out.name, suffix=".tmp")
    except OSError as e:
        raise CLIError(f"--output {output}: cannot write there ({e.strerror})") from e
    os.close(fd)
    try:
        if out.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False, sep="\t" if out.suffix.lower() == ".tsv" else ",")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
