"""Full vs sampled softmax: the training step's time and memory at ML-20M's and a 1M-item
catalogue's size, and what the sampled softmax costs in accuracy on MovieLens.

Speed (each configuration in a fresh process, so each peak RSS is its own): the library's training
step (``training_step``: sparse batch -> Mult-DAE, the notebook's I-200-I -> output layer -> fused
Adam; precision ``auto``) on batches of 500 users of synthetic data (log-normal user lengths,
Zipf-like items: ``train_speed.synthetic_ml20m``) with

* ``full``: the fused softmax over every item (``output_layer_nll``);
* ``sampled-1k`` / ``sampled-8k``: ``softmax="sampled"`` with 1,000 / 8,000 uniform negatives
  (``sampled-8k-popularity``: the popularity proposal, alpha 0.75);

on the ML-20M shape (20,108 items), the Million Song Dataset's (41,140) and on 1,000,000 items (Mult-DAE: I x 200 weights in and out,
400M parameters, 6.4 GB with their gradients and Adam's states: a Mult-VAE I-600-200-600-I would
be 19 GB). The full softmax at 1M items runs only when the machine's available memory holds its
estimate (the B x I logits and softmax buffers on top of the sampled step's peak); otherwise its
time and memory are projected from the ML-20M full step (time x I ratio) and stated as such.
Reported: median ms per batch over the timed batches after warm-up, peak RSS during the steps,
and M, the distinct items a sampled step touches (the batch's items and the negatives).

Accuracy: Mult-DAE (defaults, early stopping on validation NDCG@100) on ML-100K (``--data`` another
file: the record is on ML-1M, ``--data ../shared/data/ml-1m-reindexed/ratings.csv``), split seeds 0-4
(the paper's strong generalisation split), full vs sampled softmax (uniform 100 and 400,
popularity 400; ML-100K has 1,447 items, ML-1M 3,533): the paired difference of test NDCG@100 per user, pooled over the
seeds (``recvae.evaluation.paired_difference``: mean, 95% bootstrap interval, seeds won).

    python benchmarks/sampled_softmax.py               # ~6-10 min on 2 cores; writes benchmarks/results/sampled_softmax.*
    python benchmarks/sampled_softmax.py --tiny        # seconds: small shapes, one seed, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from recvae.models.device import resolve_precision  # noqa: E402
from recvae.models.networks import MultDAENetwork, NetworkConfig  # noqa: E402
from recvae.models.sampled_softmax import NegativeSampler  # noqa: E402
from recvae.models.sparse_layers import SparseBatch  # noqa: E402
from recvae.models.training_loop import make_optimizer, training_step  # noqa: E402
from train_speed import machine, synthetic_ml20m  # noqa: E402

BATCH = 500
SHAPES = {  # name: (items, interactions per user on average: ML-20M's 10M / 136,677)
    "ml20m": (20_108, 73),
    "msd": (41_140, 59),  # the Million Song Dataset's shape in the paper: 33.6M / 571,355 users
    "1m": (1_000_000, 73),
}
CONFIGS = {
    "full": None,
    "sampled-1k": (1000, "uniform"),
    "sampled-8k": (8000, "uniform"),
    "sampled-8k-popularity": (8000, "popularity"),
}
ACCURACY = {"full": None, "sampled-100": (100, "uniform"), "sampled-400": (400, "uniform"),
            "sampled-400-popularity": (400, "popularity")}


def _status_gb(field: str) -> float | None:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 1024**2 if m else None


def available_gb() -> float:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) / 1024**2


# -- one configuration, in its own process ------------------------------------------------------------

def child(shape: str, config: str, batches: int, warmup: int, n_items: int | None) -> dict:
    items = n_items or SHAPES[shape][0]
    per_user = SHAPES[shape][1]
    n_users = (batches + warmup) * BATCH
    X = synthetic_ml20m(n_users, items, n_users * per_user, seed=0)
    net = MultDAENetwork(NetworkConfig(items, hidden_dims=(), latent_dim=200, variational=False),
                         torch.Generator().manual_seed(0)).train()
    spec = CONFIGS[config]
    net.sampler = None if spec is None else NegativeSampler.from_matrix(X, spec[0], spec[1], 0.75)
    opt = make_optimizer(net, lr=1e-3, lam=2e-5)
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    gen = torch.Generator().manual_seed(0)
    base = _status_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the steps below
    times, touched = [], []
    for b in range(batches + warmup):
        rows = np.arange(b * BATCH, (b + 1) * BATCH)
        t = time.perf_counter()
        values = training_step(net, opt, SparseBatch.from_csr(X[rows]), 0.0, gen, bf16)
        if b >= warmup:
            times.append(time.perf_counter() - t)
        assert np.isfinite(values).all(), values
        if spec is not None:  # M of a step like this one (a draw of its own, from another generator)
            neg = net.sampler.draw(torch.Generator().manual_seed(b))
            touched.append(len(np.union1d(X[rows].indices, neg.items.numpy())))
    params = sum(p.numel() for p in net.parameters())
    return {"shape": shape, "config": config, "n_items": items, "batch": BATCH, "bf16": bf16,
            "ms_per_batch": 1000 * statistics.median(times), "ms_all": [1000 * t for t in times],
            "rss_before_steps_gb": base, "peak_rss_steps_gb": _status_gb("VmHWM"),
            "parameters": params, "touched_items": int(np.mean(touched)) if touched else items}


def launch(shape: str, config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", shape, config, "--batches", str(args.batches),
           "--warmup", str(args.warmup)] + (["--n-items", str(args.n_items[shape])] if args.n_items else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise RuntimeError(f"{shape} {config}: exit {out.returncode}\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {shape:6s} {config:22s} {result['ms_per_batch']:9.1f} ms/batch, peak RSS "
          f"{result['peak_rss_steps_gb']:.2f} GB, M = {result['touched_items']:,}", flush=True)
    return result


def full_estimate_gb(sampled: dict) -> float:
    """The full step's peak: the sampled one's plus the B x I logits and softmax buffers (fp32
    bound) and the output weight's low-precision copy and gradient (bf16: I x 208 x 2 x 2)."""
    items = sampled["n_items"]
    return sampled["peak_rss_steps_gb"] + (2 * BATCH * items * 4 + items * 208 * 4) / 1024**3


def speed(args) -> list[dict]:
    rows = []
    for shape in args.shapes:
        print(f"{shape}: {args.n_items.get(shape, SHAPES[shape][0]) if args.n_items else SHAPES[shape][0]:,} items",
              flush=True)
        done = {}
        for config in ["sampled-1k", "sampled-8k", "sampled-8k-popularity", "full"]:
            if config == "full" and shape != "ml20m":
                need, avail = full_estimate_gb(done["sampled-8k"]), available_gb()
                if need > 0.8 * avail:
                    ref = next((r for r in rows if r["shape"] == "ml20m" and r["config"] == "full"), None)
                    proj = {"shape": shape, "config": "full", "n_items": done["sampled-8k"]["n_items"],
                            "projected": True, "peak_rss_steps_gb": need, "available_gb": avail,
                            "ms_per_batch": None if ref is None else ref["ms_per_batch"] * done["sampled-8k"]["n_items"]
                            / ref["n_items"]}
                    print(f"  {shape:6s} full: not run (needs ~{need:.1f} GB, {avail:.1f} GB available); projected",
                          flush=True)
                    rows.append(proj)
                    continue
            done[config] = launch(shape, config, args)
            rows.append(done[config])
    return rows


# -- accuracy --------------------------------------------------------------------------------------

def accuracy(args) -> dict:
    from recvae.data.source import DataSpec
    from recvae.data.time_splits import make_split
    from recvae.evaluation import evaluate, paired_difference
    from recvae.models.vae import MultDAE

    if args.data:  # a file such as ../shared/data/ml-1m-reindexed/ratings.csv (columns user,item,rating)
        data = DataSpec(path=args.data).load(show_progress=False)
    else:
        data = DataSpec(dataset=args.dataset).load(show_progress=False)
    per_config = {name: [] for name in ACCURACY}
    seconds = {name: 0.0 for name in ACCURACY}
    for seed in args.seeds:
        split = make_split(data, seed=seed)
        for name, spec in ACCURACY.items():
            params = dict(random_state=seed, device="cpu")
            if spec is not None:
                params.update(softmax="sampled", n_negatives=spec[0], proposal=spec[1])
            if args.epochs:
                params["epochs"] = args.epochs
            t = time.perf_counter()
            model = MultDAE(**params).fit(split.train, split.validation, show_progress=False)
            seconds[name] += time.perf_counter() - t
            values = evaluate(model, split.test, ks=(100,), metrics=("ndcg",)).per_user["ndcg@100"]
            per_config[name].append(values)
            print(f"  {args.name} seed {seed} {name:24s} test NDCG@100 {values.mean():.4f} (best epoch "
                  f"{model.best_epoch_})", flush=True)
    out = {"dataset": args.name, "n_items": int(data.n_items), "seeds": list(args.seeds), "model": "multdae",
           "epochs": args.epochs, "configs": {}}
    for name in ACCURACY:
        entry = {"ndcg@100": float(np.mean(np.concatenate(per_config[name]))),
                 "train_seconds_per_seed": seconds[name] / len(args.seeds)}
        if name != "full":
            entry["vs_full"] = paired_difference(per_config[name], per_config["full"])
        out["configs"][name] = entry
    return out


# -- report ----------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Full vs sampled softmax (Mult-DAE I-200-I, batches of 500 users)", "",
             f"Machine: {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads, AVX-512 BF16 "
             f"{'yes' if m['avx512_bf16'] else 'no'}, AMX {'yes' if m['amx_bf16'] else 'no'}); torch {m['torch']}; "
             f"load average {report['load_average_before']} before, {report['load_average_after']} after "
             f"(on {m['cores']} cores, a load above ~{m['cores']} means other work ran beside it and the times read "
             "slower).", "",
             ]
    if report["speed"]:
        lines += ["| catalogue | softmax | ms / batch | peak RSS during the steps (GB) | items touched (M) |",
                  "|---|---|---:|---:|---:|"]
    for r in report["speed"]:
        ms = "n/a" if r["ms_per_batch"] is None else f"{r['ms_per_batch']:.1f}"
        if r.get("projected"):
            lines.append(f"| {r['n_items']:,} | {r['config']} (projected: not run, ~{r['peak_rss_steps_gb']:.1f} GB "
                         f"needed, {r['available_gb']:.1f} available) | ~{ms} | ~{r['peak_rss_steps_gb']:.1f} | "
                         f"{r['n_items']:,} |")
        else:
            lines.append(f"| {r['n_items']:,} | {r['config']} | {ms} | {r['peak_rss_steps_gb']:.2f} | "
                         f"{r['touched_items']:,} |")
    acc = report.get("accuracy")
    if acc:
        schedule = f"{acc['epochs']} epochs" if acc.get("epochs") else "defaults"
        lines += ["", f"Accuracy on {acc['dataset']} ({acc['n_items']:,} items), Mult-DAE ({schedule}), split seeds "
                  f"{acc['seeds']}: test NDCG@100 pooled over the seeds' test users; the difference to the full "
                  "softmax paired by user, 95% bootstrap interval, seeds won.", "",
                  "| softmax | NDCG@100 | − full [95% CI] (wins) | train s / seed |", "|---|---:|---:|---:|"]
        for name, e in acc["configs"].items():
            d = e.get("vs_full")
            diff = "" if d is None else (f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] "
                                         f"({d['wins']}/{d['n_splits']})")
            lines.append(f"| {name} | {e['ndcg@100']:.4f} | {diff} | {e['train_seconds_per_seed']:.1f} |")
    lines += ["", f"Command: `{report['command']}`; {report['minutes']:.1f} min.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--shapes", default="ml20m,msd,1m", help="catalogues to time: ml20m, msd, 1m")
    p.add_argument("--batches", type=int, default=3, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n-items", type=int, default=None, help=argparse.SUPPRESS)  # --tiny's children
    p.add_argument("--dataset", default="ml-100k", help="MovieLens data set of the accuracy part")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="an interaction file (user,item,rating) for the accuracy part instead of --dataset")
    p.add_argument("--name", default=None, help="the accuracy data's name in the report (default: the dataset, or "
                                                "the file's folder)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of the accuracy part (default: the model's)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--tiny", action="store_true", help="2,000 / 4,000 / 20,000 items, one seed, 5 epochs: a check in seconds")
    p.add_argument("--out", default=None, help="results prefix (default benchmarks/results/sampled_softmax; "
                                               "--tiny: print only)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.batches, args.warmup, args.n_items)))
        return {}
    t0 = time.perf_counter()
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.name = args.name or (Path(args.data).resolve().parent.name if args.data else args.dataset)
    args.n_items = {}
    if args.tiny:
        args.n_items = {"ml20m": 2000, "msd": 4000, "1m": 20000}
        args.seeds, args.epochs, args.batches = args.seeds[:1], args.epochs or 5, min(args.batches, 2)
    words = sys.argv[1:] if argv is None else argv
    # a recorded command runs on any machine: paths from the repository (../shared/...), not from /
    words = [os.path.relpath(w, REPO) if os.path.isabs(w) else w for w in words]
    report = {"machine": machine(), "load_average_before": [round(v, 2) for v in os.getloadavg()],
              "command": " ".join(["python benchmarks/sampled_softmax.py", *words])}
    report["speed"] = []
    if not args.skip_speed:
        print(f"speed (ms per training step of {BATCH} users; load average {report['load_average_before']})",
              flush=True)
        report["speed"] = speed(args)
    if not args.skip_accuracy:
        print(f"accuracy on {args.name}", flush=True)
        report["accuracy"] = accuracy(args)
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    report["minutes"] = (time.perf_counter() - t0) / 60
    md = markdown(report)
    print(md)
    out = args.out or (None if args.tiny else str(REPO / "benchmarks" / "results" / "sampled_softmax"))
    if out:
        from recvae.fileio import write_bytes, write_json

        write_json(Path(out + ".json"), report, indent=1)
        write_bytes(Path(out + ".md"), md.encode())
        print(f"wrote {out}.json and {out}.md")
    return report


if __name__ == "__main__":
    main()
