"""``recvae similar``: the items most like given items, by the run's model (item vectors)."""

from __future__ import annotations

from recvae.cli.common import DEVICE_HELP, CLIError, logger


def add_parser(sub, common) -> None:
    s = sub.add_parser("similar", parents=[common], help="the items most similar to given items of a run "
                       "(models with item vectors: multvae, multdae, recvae, binary-multvae, ease, edlae)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `recvae train` or `recvae tune`")
    s.add_argument("--items", nargs="+", required=True, metavar="ID", help="item ids of the run")
    s.add_argument("--k", type=int, default=10, help="similar items per item (default 10)")
    s.add_argument("--output", default="-", help="a .csv, .tsv or .parquet file (by its extension); '-' for CSV on stdout (default)")
    s.add_argument("--device", help=f"{DEVICE_HELP} (default: the device saved with the model)")
    s.set_defaults(func=run)


def run(args) -> int:
    from recvae.recommend import RunRecommender
    from recvae.recommend_files import check_output, table_writer

    if args.k < 1:
        raise CLIError(f"--k: expected a positive integer, got {args.k}")
    check_output(args.output)
    recommender = RunRecommender(args.run_dir, device=args.device)
    table = recommender.similar(args.items, args.k, locate=lambda j: f"--items value {j + 1}")
    with table_writer(args.output) as write:
        write(table)
    if args.output != "-":  # where the table went: stdout needs no saying
        logger.info("wrote the top-%d similar items of %d item(s) to %s", args.k, len(args.items), args.output)
    return 0
