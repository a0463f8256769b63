"""Popularity and EASE on ML-100K under the Mult-VAE paper's protocol, over several split seeds.

Protocol: paper preprocessing (ratings > 3.5, users with >= 5), strong generalization split
with the default held-out-user rule (10% of users each for validation and test on ML-100K),
80/20 fold-in/held-out. EASE's l2 is selected on validation NDCG@100 per seed from a grid;
test NDCG@100, Recall@20 and Recall@50 are reported per seed and as mean and standard
deviation over seeds (ddof=1), next to the mean of the per-seed standard errors.

Usage: RECVAE_DATA=/path/to/data python benchmarks/baselines_ml100k.py [--seeds 0 1 2 3 4]
Writes benchmarks/results/baselines_ml100k.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from recvae.data import load_movielens, strong_generalization_split
from recvae.evaluation import evaluate
from recvae.models import EASE, Popularity, select_ease_l2

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ndcg@100", "recall@20", "recall@50")
GRID = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--data-dir", default=None, help="default: $RECVAE_DATA, else ./data")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    data = load_movielens("ml-100k", a.data_dir, download=False, show_progress=False)
    per_seed = []
    for seed in a.seeds:
        split = strong_generalization_split(data, seed=seed)
        t0 = time.perf_counter()
        l2, table = select_ease_l2(split.train, split.validation, grid=GRID)
        rows = {"seed": seed, "ease_l2": l2, "ease_validation_grid": table, "split": split.describe()}
        for name, model in (("Popularity", Popularity()), ("EASE", EASE(l2=l2))):
            model.fit(split.train)
            res = evaluate(model, split.test, ks=(20, 50, 100))
            rows[name] = {m: {"mean": res[m].mean, "stderr": res[m].stderr} for m in METRICS}
            rows[name]["n_test_users"] = res.n_users
        rows["seconds"] = time.perf_counter() - t0
        per_seed.append(rows)
        print(
            f"seed {seed}: EASE l2={l2:g} test ndcg@100={rows['EASE']['ndcg@100']['mean']:.4f}, "
            f"Popularity {rows['Popularity']['ndcg@100']['mean']:.4f} ({rows['EASE']['n_test_users']} test users)"
        )

    summary = {}
    for name in ("Popularity", "EASE"):
        summary[name] = {}
        for m in METRICS:
            v = np.array([r[name][m]["mean"] for r in per_seed])
            se = np.array([r[name][m]["stderr"] for r in per_seed])
            summary[name][m] = {
                "mean_over_seeds": float(v.mean()),
                "std_over_seeds": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
                "mean_per_seed_stderr": float(se.mean()),
            }
    out = {
        "benchmark": "baselines_ml100k",
        "dataset": "ml-100k",
        "preprocessing": "ratings > 3.5, users with >= 5 (paper defaults of load_movielens)",
        "n_users": int(data.n_users),
        "n_items": int(data.n_items),
        "n_interactions": int(data.nnz),
        "protocol": "strong generalization, default n_heldout_users rule, heldout_fraction 0.2",
        "seeds": list(a.seeds),
        "ease_l2_grid": list(GRID),
        "ease_l2_selected": [r["ease_l2"] for r in per_seed],
        "summary": summary,
        "per_seed": per_seed,
    }
    atomic_write_text(a.out / "baselines_ml100k.json", json.dumps(out, indent=2) + "\n")

    md = [
        "# Baselines on ML-100K (paper protocol, test users)",
        "",
        f"{data.n_users} users, {data.n_items} items, {data.nnz:,} interactions after the paper's "
        f"preprocessing; strong generalization split, {per_seed[0]['EASE']['n_test_users']} test users "
        f"per seed; seeds {', '.join(map(str, a.seeds))}. EASE l2 picked on validation NDCG@100 from "
        f"{list(GRID)}: selected {[r['ease_l2'] for r in per_seed]}.",
        "",
        "Mean over seeds ± standard deviation over seeds (ddof=1); in brackets the mean per-seed "
        "standard error over test users (std/sqrt(n), as the paper reports).",
        "",
        "| model | NDCG@100 | Recall@20 | Recall@50 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("Popularity", "EASE"):
        cells = [
            f"{s['mean_over_seeds']:.4f} ± {s['std_over_seeds']:.4f} [{s['mean_per_seed_stderr']:.4f}]"
            for s in (summary[name][m] for m in METRICS)
        ]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "Per seed (test NDCG@100): "
           + "; ".join(f"seed {r['seed']}: EASE {r['EASE']['ndcg@100']['mean']:.4f}, "
                       f"Popularity {r['Popularity']['ndcg@100']['mean']:.4f}" for r in per_seed), ""]
    atomic_write_text(a.out / "baselines_ml100k.md", "\n".join(md))
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
