"""What the per-epoch checkpoint costs: the share of an epoch spent writing ``checkpoint.pt``.

Trains Mult-VAE (the paper's I-600-200-600-I, batches of 500, validation NDCG@100 after every
epoch, as ``recvae train`` does) on ML-20M-shaped synthetic data (train_speed.py's generator:
20,108 items, ~136k users, ~10M interactions) with a run directory, and times every
``_write_checkpoint`` call against the wall time of its epoch (training + validation + history
+ checkpoint). In the same process it then writes the last checkpoint's payload the way the
library did before (``torch.save`` into a ``BytesIO``, then an atomic write of the bytes, with
the best epoch's weights stored a second time), so the two are compared on the same disk and
load. Target: the checkpoint under 5% of the epoch.

    flock /tmp/recvae-bench.lock python benchmarks/checkpoint_cost.py              # full size, 2 epochs
    python benchmarks/checkpoint_cost.py --users 20000 --epochs 1 --out ""  # quick look, prints only
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from recvae.data import Interactions  # noqa: E402
from recvae.data.splits import strong_generalization_split  # noqa: E402
from recvae.fileio import write_bytes, write_json  # noqa: E402
from recvae.models.device import resolve_precision  # noqa: E402
from recvae.models.vae import MultVAE  # noqa: E402
from recvae.rundir import CHECKPOINT_FILE, RunDir  # noqa: E402
from train_speed import N_INTERACTIONS, N_ITEMS, N_USERS, peak_rss_gb, synthetic_ml20m  # noqa: E402

TARGET_SHARE = 0.05


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=N_USERS, help=f"users (default {N_USERS:,}, ML-20M's)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--heldout", type=int, default=10_000, help="validation and test users each (paper: 10,000)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checkpoint_cost"),
                   help="results path without extension ('' prints only)")
    args = p.parse_args(argv)
    load_start = os.getloadavg()

    n_int = int(N_INTERACTIONS * args.users / N_USERS)
    X = synthetic_ml20m(args.users, N_ITEMS, n_int, seed=0)
    data = Interactions(X, np.arange(X.shape[0]), np.arange(X.shape[1]))
    split = strong_generalization_split(data, n_heldout_users=args.heldout, seed=0)
    print(f"data: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions; "
          f"{split.train.n_users:,} training users")

    writes, marks = [], []  # seconds per checkpoint write; perf_counter at each epoch's end
    original = RunDir.write_epoch

    def timed(self, *a, **k):
        t = time.perf_counter()
        original(self, *a, **k)
        end = time.perf_counter()
        writes.append(end - t)
        marks.append(end)

    with tempfile.TemporaryDirectory(dir=REPO) as run_dir:  # the disk runs are written to, not a tmpfs
        model = MultVAE(epochs=args.epochs, random_state=0, precision=args.precision)
        RunDir.write_epoch = timed  # the checkpoint and the history it lists, as `recvae train` writes them
        try:
            start = time.perf_counter()
            model.fit(split.train, validation=split.validation, callbacks=[RunDir(run_dir).checkpoints()])
        finally:
            RunDir.write_epoch = original
        path = Path(run_dir) / CHECKPOINT_FILE
        size_mb = path.stat().st_size / 1e6
        payload = torch.load(path, weights_only=True)
        if payload["best_state"] is None:  # the former layout stored the best weights twice
            payload["best_state"] = {k: v.clone() for k, v in payload["model"].items()}
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save(payload, buf)
        write_bytes(Path(run_dir) / "former.pt", buf.getvalue())
        former_s = time.perf_counter() - t
        former_mb = (Path(run_dir) / "former.pt").stat().st_size / 1e6

    epoch_s = np.diff([start, *marks])
    shares = np.asarray(writes) / epoch_s
    report = {
        "benchmark": "checkpoint_cost",
        "data": {"n_users": int(X.shape[0]), "n_items": int(X.shape[1]), "nnz": int(X.nnz),
                 "training_users": int(split.train.n_users), "validation_users": args.heldout},
        "model": "MultVAE I-600-200-600-I, batch 500, validation NDCG@100 every epoch",
        "precision": resolve_precision(args.precision, torch.device("cpu")),
        "epochs": [{"epoch": i + 1, "epoch_seconds": float(e), "checkpoint_seconds": float(w), "share": float(s)}
                   for i, (e, w, s) in enumerate(zip(epoch_s, writes, shares))],
        "checkpoint_mb": size_mb,
        "max_share": float(shares.max()),
        "target_share": TARGET_SHARE,
        "target_met": bool(shares.max() < TARGET_SHARE),
        "former_write_seconds": former_s,
        "former_checkpoint_mb": former_mb,
        "former_share_of_mean_epoch": float(former_s / epoch_s.mean()),
        "peak_rss_gb": peak_rss_gb(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "command": " ".join(["python", "benchmarks/checkpoint_cost.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    md = markdown(report)
    print(md)
    if args.out:
        out = Path(args.out)
        write_json(out.with_suffix(".json"), report)
        write_bytes(out.with_suffix(".md"), md.encode())
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


def markdown(r: dict) -> str:
    d = r["data"]
    lines = [
        "# Cost of the per-epoch checkpoint",
        "",
        f"Mult-VAE ({r['model']}, {r['precision']}) on synthetic ML-20M-shaped data: {d['n_users']:,} users x "
        f"{d['n_items']:,} items, {d['nnz']:,} interactions, {d['training_users']:,} training users. Epoch = wall "
        "time from one checkpoint's end to the next (training, validation, history, checkpoint). "
        f"Load average {r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end "
        f"({r['machine']['cpus']} CPUs). Produced by `{r['command']}`.",
        "",
        "| epoch | epoch s | checkpoint s | share |",
        "|---:|---:|---:|---:|",
    ]
    for e in r["epochs"]:
        lines.append(f"| {e['epoch']} | {e['epoch_seconds']:.1f} | {e['checkpoint_seconds']:.2f} | {100 * e['share']:.1f}% |")
    lines += [
        "",
        f"Checkpoint {r['checkpoint_mb']:.0f} MB; largest share {100 * r['max_share']:.1f}% "
        f"(target < {100 * r['target_share']:.0f}%: {'met' if r['target_met'] else 'MISSED'}). The former write "
        f"(BytesIO, then the bytes; best weights stored twice: {r['former_checkpoint_mb']:.0f} MB) of the same "
        f"payload took {r['former_write_seconds']:.2f} s, {100 * r['former_share_of_mean_epoch']:.1f}% of the mean "
        f"epoch. Peak RSS {r['peak_rss_gb']:.2f} GB.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
