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
    r.add_argument("--output", default="-", help="a .csv, .tsv or .parquet file (by its extension); '-' for CSV on stdout "
                   "(default); with --all-users, a directory (ending in '/', or one that exists): a partitioned Parquet "
                   "dataset, one part per --shard (under torchrun, one per process) and _manifest.json")
    r.add_argument("--shard", metavar="K/N", help="with --all-users and a directory --output: score only the K-th of N "
                   "shares of the run's users (K counts from 1: 1/N to N/N) into its part, e.g. a job array's task; "
                   "a part written already is left as it is")
    r.add_argument("--overwrite", action="store_true", help="with a directory --output: rewrite this shard's part even "
                   "when it is written already, and remove the parts of another run, --k or number of shards")
    r.add_argument("--include-seen", action="store_true", help="do not exclude items the user already has (at any rating)")
    r.add_argument("--strict", action="store_true", help="fail on item ids unknown to the model instead of dropping them")
    r.add_argument("--batch-size", type=int, default=1000, help="users scored at once (default 1000); bounds memory")
    r.add_argument("--device", help=f"{DEVICE_HELP} (default: the device saved with the model)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32", help="scoring precision: " + PRECISION_HELP)
    r.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from recvae.recommend import RunRecommender, note_large_k
    from recvae.recommend_files import check_output, read_histories, table_writer

    if args.k < 1:
        raise CLIError(f"--k: expected a positive integer, got {args.k}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    shard = _shard(args)
    if shard is None:
        check_output(args.output, (("input", args.input), ("users", args.users)))
    elif shard.torchrun:
        from recvae import distributed

        if distributed.started_by_torchrun_agent():
            distributed.watch_parent()  # the agent killed: stop, as the other commands under torchrun do
        if args.device != "cpu":
            distributed.use_local_gpu()  # one GPU per process, as training takes them
    run = RunRecommender(args.run_dir, device=args.device, precision=args.precision)
    note_large_k(args.k, run.n_items)
    if shard is not None:
        return _write_part(args, run, shard)
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
    with table_writer(args.output) as write:
        _score(run, batches, n_users, write, args, show=not args.quiet)
    if args.output != "-":  # where the table went: stdout needs no saying
        logger.info("wrote %d users' top-%d to %s", n_users, args.k, args.output)
    return 0


def _score(run, batches, n_users: int, write, args, show: bool) -> None:
    """Recommend for each batch and ``write`` its table, with a progress bar (a few plain lines
    in a log file) when ``show``."""
    from recvae.progress import bar, interactive

    plain = show and not interactive()  # a log file: a few plain lines, no bar
    done, every = 0, max(1, n_users // 10)
    with bar(total=n_users, show=show, unit="user") as progress:
        for batch in batches:
            write(run.recommend(batch, args.k, include_seen=args.include_seen))
            progress.update(len(batch))
            if plain and (done + len(batch)) // every > done // every:
                logger.info("recommended for %d of %d users", done + len(batch), n_users)
            done += len(batch)


def _shard(args):
    """This process's shard of a partitioned output (a directory ``--output``; ``--shard K/N``;
    under torchrun, RANK + 1 of WORLD_SIZE), checked before any work; None for one file."""
    from pathlib import Path

    from recvae.errors import ParameterError
    from recvae.recommend_parts import Shard, check_dataset_output, is_dataset_output

    torchrun = Shard.from_torchrun()
    if torchrun is not None and args.shard is not None:
        raise ParameterError("shard", "under torchrun each process is one shard (RANK + 1 of WORLD_SIZE): drop "
                             "{shard}, or start the shards without torchrun", given=args.shard, names=("shard",))
    if torchrun is not None and not args.all_users:
        raise CLIError(f"recommend {'--users' if args.users is not None else '--input'} runs in one process; start "
                       "it without torchrun (--all-users splits the run's users over torchrun's processes)")
    if args.shard is not None and not args.all_users:
        raise ParameterError("shard", "splits the users of the run: it goes with {all_users}", given=args.shard,
                             names=("all_users",))
    shard = Shard.parse(args.shard) if args.shard is not None else torchrun
    dataset = is_dataset_output(args.output)
    if dataset and not args.all_users:
        raise ParameterError("output", "a directory (a partitioned Parquet dataset) is written for {all_users}; give "
                             "a file (.csv, .tsv, .parquet) for {users} or {input}", given=args.output,
                             names=("all_users", "users", "input"))
    if shard is not None and not dataset:
        folder = "recommendations/" if args.output == "-" else f"{Path(args.output).with_suffix('')}/"
        if shard.torchrun:
            raise ParameterError("output", f"under torchrun ({shard.count} processes) every process would write this "
                                 f"one table; give a directory ending in '/' (e.g. {folder}), into which each "
                                 "process writes its part of a partitioned Parquet dataset", given=args.output)
        raise ParameterError("output", "{shard} writes one part of a partitioned Parquet dataset: give a directory "
                             f"ending in '/' (e.g. {folder})", given=args.output, names=("shard",))
    if dataset:
        check_dataset_output(args.output)  # before any work; its parts are checked once the run is read
    return shard if shard is not None else Shard() if dataset else None


def _write_part(args, run, shard) -> int:
    """Score ``shard``'s users into its part of the directory ``--output``, unless it is there
    already, then write the manifest if every part is there (:mod:`recvae.recommend_parts`)."""
    import numpy as np

    from recvae.recommend_parts import MANIFEST_FILE, PartitionedOutput, identity

    ident = identity(run, shard, args.k, args.include_seen, args.precision, args.batch_size)
    out = PartitionedOutput(args.output, shard, ident, run.run_dir, overwrite=args.overwrite)
    (start, stop), size = out.user_range, args.batch_size
    rows = out.prepare()
    if rows is None:
        batches = (run.known_histories(np.arange(s, min(s + size, stop))) for s in range(start, stop, size))
        like = run.recommend(run.known_histories(np.arange(1)), 1, include_seen=True)  # the columns' types
        with out.writer(like=like) as write:
            _score(run, batches, stop - start, write, args, show=not args.quiet and (not shard.torchrun or shard.index == 1))
        logger.info("%s: wrote the top-%d of users %d to %d of %d to %s", shard, args.k, start + 1, stop, ident["users"],
                    out.part)
    manifest, missing, written = out.finish()
    done = (f"all {shard.count} parts are in {out.folder} ({ident['users']} users, {manifest['rows']} rows): "
            f"{MANIFEST_FILE} lists them") if manifest is not None else ""
    if rows is not None:  # one line: nothing done, but a manifest that was missing
        logger.info("%s: %s is written already (users %d to %d, %d rows, from this run with the same options); nothing "
                    "to do (--overwrite rewrites it)%s", shard, out.part, start + 1, stop, rows,
                    f"; {done}" if written else "")
    elif manifest is not None:
        logger.info("%s", done)
    else:
        logger.info("%d of %d parts are in %s; the shard that writes the last one writes %s (missing: %s)",
                    shard.count - len(missing), shard.count, out.folder, MANIFEST_FILE, ", ".join(missing[:5])
                    + (", ..." if len(missing) > 5 else ""))
    return 0
