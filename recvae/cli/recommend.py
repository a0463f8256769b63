"""``recvae recommend``: top-K tables for a run's users, a user list or a history file."""

from __future__ import annotations


from recvae.cli.common import DEVICE_HELP, PRECISION_HELP, PRECISIONS, CLIError, logger


def add_parser(sub, common) -> None:
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
    r.add_argument("--output", default="-", help="a .csv, .tsv or .parquet file (by its extension); '-' for CSV on stdout (default)")
    r.add_argument("--include-seen", action="store_true", help="do not exclude items the user already has (at any rating)")
    r.add_argument("--strict", action="store_true", help="fail on item ids unknown to the model instead of dropping them")
    r.add_argument("--batch-size", type=int, default=1000, help="users scored at once (default 1000); bounds memory")
    r.add_argument("--device", help=f"{DEVICE_HELP} (default: the device saved with the model)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32", help="scoring precision: " + PRECISION_HELP)
    r.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from recvae.progress import bar, interactive

    from recvae.recommend import RunRecommender, note_large_k
    from recvae.recommend_files import check_output, read_histories, table_writer

    if args.k < 1:
        raise CLIError(f"--k: expected a positive integer, got {args.k}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    check_output(args.output, (("input", args.input), ("users", args.users)))
    run = RunRecommender(args.run_dir, device=args.device, precision=args.precision)
    note_large_k(args.k, run.n_items)
    if args.all_users:
        batches = (run.known_histories(np.arange(s, min(s + args.batch_size, len(run.user_ids))))
                   for s in range(0, len(run.user_ids), args.batch_size))
        n_users = len(run.user_ids)
    else:
        kind = "input" if args.input is not None else "users"
        hist = read_histories(run, getattr(args, kind), kind, user_col=args.user_col, item_col=args.item_col,
                              rating_col=args.rating_col, rating_threshold=args.rating_threshold, sep=args.sep,
                              strict=args.strict)
        batches = (hist.slice(s, s + args.batch_size) for s in range(0, len(hist), args.batch_size))
        n_users = len(hist)
    plain = not args.quiet and not interactive()  # a log file: a few plain lines, no bar
    done, every = 0, max(1, n_users // 10)
    with table_writer(args.output) as write, bar(total=n_users, show=not args.quiet, unit="user") as progress:
        for batch in batches:
            write(run.recommend(batch, args.k, include_seen=args.include_seen))
            progress.update(len(batch))
            if plain and (done + len(batch)) // every > done // every:
                logger.info("recommended for %d of %d users", done + len(batch), n_users)
            done += len(batch)
    if args.output != "-":  # where the table went: stdout needs no saying
        logger.info("wrote %d users' top-%d to %s", n_users, args.k, args.output)
    return 0
