"""``recvae prepare``: preprocess interactions once into a directory training memory-maps."""

from __future__ import annotations

from recvae.cli.common import add_data_options, data_spec_from_args


def add_parser(sub, common) -> None:
    p = sub.add_parser("prepare", parents=[common], help="preprocess interactions once into a directory that training processes memory-map")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    add_data_options(p)
    p.add_argument("--out", metavar="DIR", required=True, help="the prepared directory to write (replaced if it is one)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from recvae.data.prepared import write_prepared

    spec = data_spec_from_args(args)
    interactions = spec.load(show_progress=not args.quiet)
    write_prepared(interactions, args.out, preprocessing=asdict(spec))
    print(f"prepared {interactions.n_users} users x {interactions.n_items} items ({interactions.nnz} interactions) "
          f"in {args.out}")
    return 0
