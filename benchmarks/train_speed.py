"""Training speed of Mult-VAE on data shaped like preprocessed ML-20M, against its cost floor and a
straightforward implementation.

Measures, in one process and on one synthetic data set (20,108 items, ~136k users, ~10M
interactions, long-tailed item popularity; seeded):

* ``ours``: the library's training step (``recvae.models.vae.training_step``: sparse batch ->
  sparse first layer -> ... -> fused softmax/NLL output layer -> fused Adam), batches of 500
  users, fp32 and bf16 (autocast). Includes building the batch from the CSR matrix.
* ``floor``: the output layer's three matmuls alone (forward logits, input gradient, weight
  gradient) at the same precision, into preallocated outputs: no implementation of the
  architecture can do less work per step.
* ``straightforward``: what peer libraries do: dense input batch, fp32, ``nn.Linear`` stack,
  dense ``log_softmax`` loss, ``torch.optim.Adam`` (default settings).

The variants run round-robin (one batch each per round; the slow straightforward step every
4th round), so load from other processes affects them alike. Reports ms per batch (median over
the timed batches after warm-up), projected seconds per epoch, ratio to the floor, speed-up over the straightforward step and peak RSS, printed and
written as JSON and a markdown table. Targets: bf16 step <= 1.5x the bf16 floor, >= 4x faster
than the straightforward fp32 step, peak RSS < 4 GB. When a target is missed, a profile of the
bf16 step is added.

    python benchmarks/train_speed.py            # full size, writes benchmarks/results/train_speed.*
    python benchmarks/train_speed.py --quick    # small run, prints only (unless --out is given)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recvae.models.networks import MultVAENetwork, NetworkConfig  # noqa: E402
from recvae.models.sparse_layers import SparseBatch  # noqa: E402
from recvae.models.training_loop import make_optimizer, training_step  # noqa: E402

N_ITEMS = 20_108  # ML-20M after the paper's preprocessing
N_USERS = 136_677
N_INTERACTIONS = 10_000_000
BATCH = 500
TARGETS = {"ratio_to_floor_bf16": 1.5, "speedup_over_straightforward": 4.0, "peak_rss_gb": 4.0}


def synthetic_ml20m(n_users: int, n_items: int, n_interactions: int, seed: int = 0) -> sp.csr_matrix:
    """Binary users x items CSR with lognormal user activity (>= 5) and Zipf-like item popularity.

    Built as CSR directly: draw every user's items at once (with replacement), then drop
    repeats within a user; a first draw measures the share of repeats, a second one asks for
    that many more so about ``n_interactions`` remain.
    """
    first = _draw(n_users, n_items, n_interactions, seed)
    return _draw(n_users, n_items, int(n_interactions * n_interactions / first.nnz), seed)


def _draw(n_users: int, n_items: int, n_interactions: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(5, rng.lognormal(mean=0.0, sigma=1.1, size=n_users))
    lengths = np.maximum(5, np.round(lengths * n_interactions / lengths.sum())).astype(np.int64)
    lengths = np.minimum(lengths, n_items // 2)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    items = rng.choice(n_items, size=int(lengths.sum()), p=popularity).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    X = sp.csr_matrix((np.ones(len(items), np.float32), items, indptr), shape=(n_users, n_items))
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def interleaved(steps: dict, batches: list, warmup: int, every: dict) -> dict[str, list[float]]:
    """Run the variants round-robin, one batch each per round, so that load from other
    processes hits all of them alike; ``every[name] = k`` runs that variant every k-th round."""
    times = {name: [] for name in steps}
    for r, rows in enumerate(batches):
        for name, step in steps.items():
            if r % every.get(name, 1):
                continue
            t = time.perf_counter()
            step(rows)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def ours_step(X, bf16: bool):
    net = MultVAENetwork(NetworkConfig(X.shape[1]), torch.Generator().manual_seed(0)).train()
    opt = make_optimizer(net, lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step(rows):
        batch = SparseBatch.from_csr(X[rows])
        values = training_step(net, opt, batch, beta=0.1, generator=gen, bf16=bf16)
        assert np.isfinite(values).all()

    return step, (net, opt, gen)


def floor_step(n_items, hidden, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(BATCH, hidden, generator=g).to(dtype)
    W = torch.randn(n_items, hidden, generator=g).mul_(0.05).to(dtype)
    G = torch.randn(BATCH, n_items, generator=g).to(dtype)
    logits = torch.empty(BATCH, n_items, dtype=dtype)
    gh = torch.empty(BATCH, hidden, dtype=dtype)
    gw = torch.empty(n_items, hidden, dtype=dtype)

    def step(_):
        torch.mm(h, W.t(), out=logits)  # forward
        torch.mm(G, W, out=gh)  # grad wrt the hidden layer
        torch.mm(G.t(), h, out=gw)  # grad wrt the weight

    return step


class StraightforwardVAE(nn.Module):
    """The usual PyTorch Mult-VAE: dense input, nn.Linear layers, dense log-softmax loss."""

    def __init__(self, n_items, hidden=600, latent=200):
        super().__init__()
        self.latent = latent
        self.enc = nn.Linear(n_items, hidden)
        self.mu_logvar = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Linear(latent, hidden)
        self.out = nn.Linear(hidden, n_items)
        self.drop = nn.Dropout(0.5)

    def loss(self, x, beta):
        h = self.drop(F.normalize(x, dim=1))
        h = self.mu_logvar(torch.tanh(self.enc(h)))
        mu, logvar = h[:, : self.latent], h[:, self.latent:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.out(torch.tanh(self.dec(z)))
        nll = -(F.log_softmax(logits, 1) * x).sum(1).mean()
        kl = (0.5 * (-logvar + logvar.exp() + mu**2 - 1)).sum(1).mean()
        return nll + beta * kl


def straightforward_step(X):
    torch.manual_seed(0)
    net = StraightforwardVAE(X.shape[1]).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(rows):
        x = torch.from_numpy(X[rows].toarray())
        opt.zero_grad()
        loss = net.loss(x, 0.1)
        loss.backward()
        opt.step()

    return step


def profile_table(state, X, batches, bf16: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    net, opt, gen = state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for rows in batches:
            training_step(net, opt, SparseBatch.from_csr(X[rows]), 0.1, gen, bf16)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def summarise(times):
    ms = [t * 1000 for t in times]
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "n": len(ms)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data and few batches (a smoke run)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per variant (default 20; quick 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="output path without extension (default "
                    "benchmarks/results/train_speed; --quick writes nothing unless given)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_users, n_int = (N_USERS, N_INTERACTIONS) if not args.quick else (20_000, 1_470_000)
    n_timed = args.batches or (5 if args.quick else 20)
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "results" / "train_speed"))

    t0 = time.perf_counter()
    X = synthetic_ml20m(n_users, N_ITEMS, n_int, seed=0)
    gen_s = time.perf_counter() - t0
    print(f"data: {X.shape[0]} users x {X.shape[1]} items, {X.nnz} interactions "
          f"({X.nnz / X.shape[0]:.1f}/user), generated in {gen_s:.1f}s")
    rng = np.random.default_rng(1)
    order = rng.permutation(X.shape[0])
    n = max(n_timed + args.warmup, 4 * (args.warmup + 3))  # the straightforward step gets a quarter
    batches = [order[i * BATCH:(i + 1) * BATCH] for i in range(n)]
    n_batches_epoch = int(np.ceil(X.shape[0] / BATCH))

    steps, state = {}, {}
    for prec, bf16 in (("fp32", False), ("bf16", True)):
        steps[f"ours_{prec}"], kept = ours_step(X, bf16)
        if bf16:
            state[prec] = kept  # only the bf16 step may be profiled
        steps[f"floor_{prec}"] = floor_step(N_ITEMS, 600, torch.bfloat16 if bf16 else torch.float32)
    steps["straightforward_fp32"] = straightforward_step(X)
    every = {"straightforward_fp32": 4}  # slow: a quarter of the rounds
    raw = interleaved(steps, batches, args.warmup, every)
    results = {name: summarise(t) for name, t in raw.items()}
    for name, r in results.items():
        print(f"{name}: {r['median_ms']:.1f} ms/batch (median of {r['n']})")

    sf = results["straightforward_fp32"]["median_ms"]
    rows = []
    for name, r in results.items():
        r["seconds_per_epoch"] = r["median_ms"] * n_batches_epoch / 1000
        prec = name.rsplit("_", 1)[1]
        r["ratio_to_floor"] = r["median_ms"] / results[f"floor_{prec}"]["median_ms"]
        r["speedup_over_straightforward_fp32"] = sf / r["median_ms"]
        rows.append((name, r))
    summary = {
        "ratio_to_floor_bf16": results["ours_bf16"]["ratio_to_floor"],
        "speedup_over_straightforward": results["ours_bf16"]["speedup_over_straightforward_fp32"],
        "speedup_over_straightforward_fp32_ours": results["ours_fp32"]["speedup_over_straightforward_fp32"],
        "peak_rss_gb": peak_rss_gb(),
    }
    met = {
        "ratio_to_floor_bf16": summary["ratio_to_floor_bf16"] <= TARGETS["ratio_to_floor_bf16"],
        "speedup_over_straightforward": summary["speedup_over_straightforward"] >= TARGETS["speedup_over_straightforward"],
        "peak_rss_gb": summary["peak_rss_gb"] < TARGETS["peak_rss_gb"],
    }
    report = {
        "data": {"n_users": X.shape[0], "n_items": X.shape[1], "nnz": int(X.nnz), "batch_size": BATCH,
                 "batches_per_epoch": n_batches_epoch, "quick": args.quick},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "timed_batches": n_timed, "warmup": args.warmup,
        "results": results, "summary": summary, "targets": TARGETS, "targets_met": met,
    }
    if not all(met.values()):
        report["profile_bf16"] = profile_table(state["bf16"], X, batches[:3], True)

    lines = [
        "# Mult-VAE training speed (CPU)",
        "",
        f"Synthetic ML-20M-shaped data: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions; "
        f"batches of {BATCH}; variants interleaved, median of {results['ours_bf16']['n']} batches after "
        f"{args.warmup} warm-up rounds (straightforward: {results['straightforward_fp32']['n']}); peak RSS is the "
        f"whole benchmark process (all variants' models alive); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Produced by `benchmarks/train_speed.py`.",
        "",
        "| variant | ms / batch | s / epoch | x floor (same precision) | speed-up vs straightforward fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['seconds_per_epoch']:.1f} | {r['ratio_to_floor']:.2f} | "
                     f"{r['speedup_over_straightforward_fp32']:.1f} |")
    lines += [
        "",
        f"Peak RSS: {summary['peak_rss_gb']:.2f} GB.",
        "",
        "| target | value | met |",
        "|---|---:|:---:|",
        f"| bf16 step <= {TARGETS['ratio_to_floor_bf16']}x bf16 floor | {summary['ratio_to_floor_bf16']:.2f} | "
        f"{'yes' if met['ratio_to_floor_bf16'] else 'no'} |",
        f"| >= {TARGETS['speedup_over_straightforward']}x faster than straightforward fp32 (bf16 step) | "
        f"{summary['speedup_over_straightforward']:.1f} | {'yes' if met['speedup_over_straightforward'] else 'no'} |",
        f"| peak RSS < {TARGETS['peak_rss_gb']} GB | {summary['peak_rss_gb']:.2f} | {'yes' if met['peak_rss_gb'] else 'no'} |",
    ]
    if "profile_bf16" in report:
        lines += ["", "Profile of the bf16 step (3 batches):", "", "```", report["profile_bf16"], "```"]
    md = "\n".join(lines) + "\n"
    print(md)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
