"""Seconds to evaluate 10,000 users over 20,108 items (ML-20M's item count) at K = 20, 50, 100.

Measures the ranking/metric work of :func:`recvae.evaluation.evaluate` alone: the "model"
draws random float32 scores, and the time spent inside ``model.score`` (reported by
``EvaluationResult.score_seconds``) is subtracted. Users get ML-20M-like histories (about 73
items on average, 80% fold-in / 20% held-out). For reference the same data is also evaluated
with the project's first implementation (one argpartition and one sparse fancy-index per
metric and K), and the two results are checked to be equal.

Usage: python benchmarks/eval_speed.py [--users 10000] [--items 20108] [--repeats 3]
Writes benchmarks/results/eval_speed.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae import metrics as M
from recvae.evaluation import evaluate
from recvae.fileio import write_bytes

RESULTS = Path(__file__).resolve().parent / "results"


class RandomScores:
    """Fresh standard-normal float32 scores per batch, reproducible from ``seed``."""

    def __init__(self, n_items: int, seed: int = 0):
        self.n_items = n_items
        self.seed = seed
        self._batch = 0

    def score(self, x):
        rng = np.random.default_rng([self.seed, self._batch])
        self._batch += 1
        return rng.standard_normal((x.shape[0], self.n_items), dtype=np.float32)


def synthetic_split(n_users: int, n_items: int, seed: int = 0):
    """Fold-in / held-out CSR matrices with ML-20M-like history lengths (>= 5, mean ~73)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(5 + rng.geometric(1 / 68, n_users), n_items)
    fold_rows, fold_cols, held_rows, held_cols = [], [], [], []
    for u, n in enumerate(lengths):
        items = rng.choice(n_items, n, replace=False)
        n_held = max(1, int(0.2 * n))
        held_rows.append(np.full(n_held, u))
        held_cols.append(items[:n_held])
        fold_rows.append(np.full(n - n_held, u))
        fold_cols.append(items[n_held:])

    def csr(rows, cols):
        r, c = np.concatenate(rows), np.concatenate(cols)
        return sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n_users, n_items))

    return csr(fold_rows, fold_cols), csr(held_rows, held_cols)


def first_implementation(scores, heldout, k, name):
    """The project's first recall/NDCG (one argpartition + sparse fancy index per call)."""
    heldout = sp.csr_matrix(heldout)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    rows = np.repeat(np.arange(scores.shape[0]), k)
    hits = np.asarray(heldout[rows, idx.ravel()]).reshape(idx.shape) > 0
    n = np.diff(heldout.indptr)
    if name == "recall":
        return hits.sum(axis=1) / np.minimum(k, n)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    return (hits @ discount) / np.cumsum(discount)[np.minimum(n, k) - 1]


def evaluate_first_implementation(model, fold_in, heldout, ks, batch_size):
    values, model_s = {}, 0.0
    start = time.perf_counter()
    for lo in range(0, fold_in.shape[0], batch_size):
        x = fold_in[lo : lo + batch_size]
        t0 = time.perf_counter()
        scores = model.score(x)
        model_s += time.perf_counter() - t0
        scores[np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.indices] = -np.inf
        h = heldout[lo : lo + batch_size]
        for k in ks:
            for name in ("recall", "ndcg"):
                values.setdefault(f"{name}@{k}", []).append(first_implementation(scores, h, k, name))
    total = time.perf_counter() - start
    return {n: np.concatenate(v) for n, v in values.items()}, total - model_s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true", help="do not time the first implementation")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    ks = (20, 50, 100)
    fold_in, heldout = synthetic_split(a.users, a.items)

    runs = []
    for r in range(a.repeats):
        res = evaluate(RandomScores(a.items), fold_in, heldout, ks=ks, batch_size=a.batch_size)
        runs.append({"total_s": res.seconds, "model_s": res.score_seconds, "metric_s": res.seconds - res.score_seconds})
        print(f"run {r + 1}: metric time {runs[-1]['metric_s']:.2f}s (model {res.score_seconds:.2f}s excluded)")
    all_metrics = evaluate(
        RandomScores(a.items), fold_in, heldout, ks=ks, batch_size=a.batch_size, metrics=M.USER_METRICS
    )
    all_metric_s = all_metrics.seconds - all_metrics.score_seconds
    print(f"all 5 per-user metrics x 3 K: {all_metric_s:.2f}s")

    # exactness: the library's values vs a plain per-user loop (lexsort ranking) on 200 users
    model = RandomScores(a.items)
    x = fold_in[:200]
    scores = model.score(x)
    scores[np.repeat(np.arange(200), np.diff(x.indptr)), x.indices] = -np.inf
    lib = M.per_user_metrics(scores, heldout[:200], ks=(100,), metrics=("ndcg",))["ndcg@100"]
    ref = []
    for u in range(200):
        top = np.lexsort((np.arange(a.items), -scores[u]))[:100]
        rel = np.isin(top, heldout[u].indices)
        n = heldout[u].nnz
        ref.append((rel / np.log2(np.arange(2, 102))).sum() / (1 / np.log2(np.arange(2, 2 + min(n, 100)))).sum())
    loop_equal = bool(np.allclose(lib, ref, rtol=1e-12, atol=0))  # same ranking; sums may differ in the last bit

    out = {
        "benchmark": "eval_speed",
        "n_users": a.users,
        "n_items": a.items,
        "ks": list(ks),
        "metrics": ["recall", "ndcg"],
        "batch_size": a.batch_size,
        "n_heldout_interactions": int(heldout.nnz),
        "n_fold_in_interactions": int(fold_in.nnz),
        "metric_seconds_min": min(r["metric_s"] for r in runs),
        "metric_seconds_median": float(np.median([r["metric_s"] for r in runs])),
        "runs": runs,
        "all_user_metrics_seconds": all_metric_s,
        "matches_per_user_loop_on_200_users": loop_equal,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "note": "shared 2-core machine; other work may run concurrently",
        },
        "result": {name: s.mean for name, s in res.metrics.items()},
    }
    if not a.skip_reference:
        ref_values, ref_s = evaluate_first_implementation(
            RandomScores(a.items), fold_in, heldout, ks, a.batch_size
        )
        max_diff = max(abs(float(v.mean()) - res.metrics[n].mean) for n, v in ref_values.items())
        out["first_implementation_metric_seconds"] = ref_s
        out["speedup_vs_first_implementation"] = ref_s / out["metric_seconds_min"]
        out["max_abs_mean_difference_vs_first_implementation"] = max_diff
        print(f"first implementation: {ref_s:.2f}s; max |mean difference| {max_diff:.2e}")

    print(
        f"evaluate(): {a.users} users x {a.items} items, K={ks}, recall+ndcg: "
        f"{out['metric_seconds_min']:.2f}s metric time (min of {a.repeats}); "
        f"matches per-user loop: {loop_equal}"
    )
    write_bytes(a.out / "eval_speed.json", (json.dumps(out, indent=2) + "\n").encode())
    md = [
        "# Evaluation speed (metric time only, model time excluded)",
        "",
        f"{a.users:,} users x {a.items:,} items, K = 20, 50, 100, batch {a.batch_size}, "
        f"{os.cpu_count()} CPU cores (shared), numpy {np.__version__}.",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| recall + NDCG @ 20/50/100, min of {a.repeats} | {out['metric_seconds_min']:.2f} |",
        f"| recall + NDCG @ 20/50/100, median of {a.repeats} | {out['metric_seconds_median']:.2f} |",
        f"| all 5 per-user metrics @ 20/50/100 | {all_metric_s:.2f} |",
    ]
    if "first_implementation_metric_seconds" in out:
        md.append(f"| first implementation (recall + NDCG, per-K argpartition) | {out['first_implementation_metric_seconds']:.2f} |")
        md += ["", f"Speed-up {out['speedup_vs_first_implementation']:.1f}x; largest difference of a mean metric "
               f"{out['max_abs_mean_difference_vs_first_implementation']:.1e}."]
    md += ["", f"Per-user NDCG@100 equal to a plain per-user loop on 200 users: {loop_equal}.", ""]
    write_bytes(a.out / "eval_speed.md", "\n".join(md).encode())
    return out


if __name__ == "__main__":
    main()
