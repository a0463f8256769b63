"""``recvae datasets``: the MovieLens names, where they are looked for, which are present."""

from __future__ import annotations



def add_parser(sub, common) -> None:
    d = sub.add_parser("datasets", parents=[common], help="list the MovieLens datasets, where they are looked for, which are present")
    d.add_argument("--data-dir", help="data directory (default: $RECVAE_DATA, else ./data)")
    d.set_defaults(func=run)


def run(args) -> int:
    from recvae.data import resolve_data_dir
    from recvae.data.paths import resolve_cache_dir
    from recvae.data.movielens import DATASETS, dataset_status

    data_dir = resolve_data_dir(args.data_dir)
    print(f"data directory: {data_dir.resolve()} (argument --data-dir, else $RECVAE_DATA, else ./data)")
    print(f"cache of preprocessed data: {resolve_cache_dir(None, data_dir).resolve()} ($RECVAE_CACHE, else "
          "beside the data)")
    rows = [(name, dataset_status(name, data_dir)) for name in DATASETS]
    width = max(len(n) for n, _ in rows)
    for name, status in rows:
        print(f"  {name:<{width}}  {status}")
    return 0
