"""Item-parallel training (``parallel="items"``) on CPU (gloo): 1 process against 2, per process.

A synthetic catalogue (default 1,000,000 items) with Mult-VAE's default network widths
(``--hidden`` 600, latent 200) and random users of ``--per-user`` items each. Each world size
runs under ``torchrun --standalone``; every process builds its shard of the network
(:mod:`recvae.models.item_parallel`; the whole network for 1 process), then times ``--steps``
updates of ``--batch`` users (after ``--warmup``) with the library's ``training_step``:

* seconds per update (median; the slowest process's) and the part spent in the collectives
  (the all-reduces of the input layer, the softmax's maxima and sums and ``grad_h``);
* the bytes of the item-indexed state per process: the three item-indexed parameters, their
  gradients and Adam's two moments (4 x the parameters' bytes), and the B x I_r softmax buffer;
* peak RSS per process, and the seconds the initialisation took (a shard runs through the full
  tensors' random stream).

Results: ``benchmarks/results/item_parallel.{json,md}`` (not with ``--quick``).

    flock /tmp/recvae-bench.lock python benchmarks/item_parallel.py
    python benchmarks/item_parallel.py --quick     # tiny sizes, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

WORLDS = (1, 2)


def synthetic(n_users: int, n_items: int, per_user: int, seed: int = 0):
    """A users x items CSR of ``per_user`` random draws per user (item popularity ~ 1/rank^0.8;
    repeats counted once), the same on every process."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    cols = rng.choice(n_items, size=(n_users, per_user), p=p / p.sum())
    X = sp.csr_matrix((np.ones(cols.size, np.float32), (np.repeat(np.arange(n_users), per_user), cols.ravel())),
                      shape=(n_users, n_items))
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


# -- worker (one process) -----------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from recvae import distributed
    from recvae.models import item_parallel
    from recvae.models.networks import MultVAENetwork, NetworkConfig
    from recvae.models.training_loop import batch_of, make_optimizer, training_step

    group = distributed.init_from_env()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n_steps = args.warmup + args.steps
    X = synthetic(args.batch * n_steps, args.items, args.per_user)
    shard = item_parallel.ItemShard.of(args.items, group) if group.parallel else None
    t = time.perf_counter()
    net = MultVAENetwork(NetworkConfig(args.items, hidden_dims=(args.hidden,), latent_dim=args.latent),
                         torch.Generator().manual_seed(0), shard).train()
    init_s = time.perf_counter() - t
    opt = make_optimizer(net, lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    comm = [0.0]
    allreduce = distributed.allreduce_

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = allreduce(*a, **k)
        comm[0] += time.perf_counter() - t0
        return out

    distributed.allreduce_ = timed
    steps = []
    for b in range(n_steps):
        if b == args.warmup:
            comm[0] = 0.0
        rows = np.arange(b * args.batch, (b + 1) * args.batch)
        t0 = time.perf_counter()
        values = training_step(net, opt, batch_of(X, rows, "cpu", distributed.Group()), 0.1, gen,
                               args.precision == "bf16")
        if b >= args.warmup:
            steps.append(time.perf_counter() - t0)
        assert np.isfinite(values).all()
    rows_held = args.items if shard is None else shard.size
    item_params = sum(getattr(net, n).numel() * 4 for n in item_parallel.SHARDED)
    mine = {"rank": group.rank, "items_held": rows_held, "init_s": init_s,
            "update_median_s": float(np.median(steps)), "comm_s": comm[0] / len(steps),
            "item_param_bytes": item_params, "item_state_bytes": 4 * item_params,  # + grads + Adam's 2 moments
            "softmax_buffer_bytes": args.batch * rows_held * (2 if args.precision == "bf16" else 4),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "threads": torch.get_num_threads(), "loss": float(values[0])}
    from distributed import gather_to_main  # the benchmarks' one gathering of the ranks' figures

    gather_to_main(group, mine, args.worker_out)


# -- driver ---------------------------------------------------------------------------------------
def launch(args, procs: int, out: Path) -> dict:
    from distributed import torchrun  # the benchmarks' one torchrun launcher

    return torchrun(Path(__file__), procs, args.threads, [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("items", "hidden", "latent", "batch", "per_user", "steps", "warmup", "precision")],
        out, args.timeout, f"{procs} process(es)")


def summarise(res: dict) -> dict:
    ranks = res["ranks"]
    update = max(r["update_median_s"] for r in ranks)
    return {"processes": res["world_size"], "threads": ranks[0]["threads"], "update_ms": 1e3 * update,
            "comm_ms": 1e3 * float(np.mean([r["comm_s"] for r in ranks])),
            "init_s": max(r["init_s"] for r in ranks),
            "items_per_process": [r["items_held"] for r in ranks],
            "item_state_gb_per_process": [r["item_state_bytes"] / 1e9 for r in ranks],
            "softmax_buffer_gb_per_process": [r["softmax_buffer_bytes"] / 1e9 for r in ranks],
            "peak_rss_gb_per_process": [round(r["peak_rss_gb"], 3) for r in ranks],
            "loss": ranks[0]["loss"]}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Item-parallel training (parallel=\"items\", gloo on CPU)", "",
        f"Synthetic catalogue of {meta['items']:,} items, Mult-VAE {meta['items']:,}-{meta['hidden']}-"
        f"{meta['latent']}-{meta['hidden']}-{meta['items']:,}, batches of {meta['batch']} users with "
        f"{meta['per_user']} draws each; median of {meta['steps']} updates after {meta['warmup']} warm-up (the "
        f"slowest process's); {meta['precision']}; {meta['threads']} thread(s) per process; torch {meta['torch']}, "
        f"{meta.get('cpu', 'CPU')}, {meta['cpus']} cores; load average before/after: {meta['load_before']} / {meta['load_after']}. "
        "Item-indexed state = the three item-indexed parameters + their gradients + Adam's two moments. "
        "Produced by `benchmarks/item_parallel.py`.", "",
        "| processes | items per process | item-indexed state GB / process | softmax buffer GB / process "
        "| peak RSS GB / process | ms / update | collectives ms | init s |",
        "|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        def gb(xs):
            return ", ".join(f"{x:.2f}" for x in xs)
        lines.append(f"| {r['processes']} | {', '.join(f'{n:,}' for n in r['items_per_process'])} | "
                     f"{gb(r['item_state_gb_per_process'])} | {gb(r['softmax_buffer_gb_per_process'])} | "
                     f"{gb(r['peak_rss_gb_per_process'])} | {r['update_ms']:.0f} | {r['comm_ms']:.1f} | "
                     f"{r['init_s']:.1f} |")
    lines += projection_lines(meta, rows)
    if len(rows) == 2:
        a, b = rows
        lines += ["", f"Reading: with 2 processes each holds {max(b['item_state_gb_per_process']) / a['item_state_gb_per_process'][0]:.2f}x "
                  f"the item-indexed state of one process and peaks at {max(b['peak_rss_gb_per_process']) / a['peak_rss_gb_per_process'][0]:.2f}x "
                  f"its RSS; an update takes {b['update_ms'] / a['update_ms']:.2f}x the time of one process's "
                  f"({100 * b['comm_ms'] / b['update_ms']:.0f}% in the collectives, which move batch-sized tensors only).", ""]
    return "\n".join(lines)


PROJECTED = ((1_000_000, 8), (10_000_000, 2), (10_000_000, 8))


def projection(meta: dict, rows: list[dict]) -> list[dict]:
    """Memory per process at other catalogues and process counts, from this run's measurements:
    the item-indexed state and the softmax buffer are per-item costs (bytes / items held, measured
    at the largest world size), the rest of the peak (replicated layers, the batch, the
    interpreter) is the measured peak less those two. A projection, not a measurement: it assumes
    the per-item costs stay linear, which the layers' shapes make them."""
    r = rows[-1]
    held = max(r["items_per_process"])
    i = r["items_per_process"].index(held)
    state_per_item = r["item_state_gb_per_process"][i] / held
    buffer_per_item = r["softmax_buffer_gb_per_process"][i] / held
    rest = r["peak_rss_gb_per_process"][i] * 1024**3 / 1e9 - (state_per_item + buffer_per_item) * held
    out = []
    for items, procs in PROJECTED:
        per = -(-items // procs)
        out.append({"items": items, "processes": procs, "items_per_process": per,
                    "item_state_gb": state_per_item * per, "softmax_buffer_gb": buffer_per_item * per,
                    "total_gb": (state_per_item + buffer_per_item) * per + max(rest, 0.0)})
    return out


def projection_lines(meta: dict, rows: list[dict]) -> list[str]:
    lines = ["", "Projection (not measured): memory per process from the per-item costs measured above, for a "
             f"Mult-VAE of the same widths ({meta['hidden']}, {meta['latent']}), batches of {meta['batch']}, "
             f"{meta['precision']}; on GPUs the same bytes sit in device memory (with Adam's states there too).", "",
             "| items | processes (GPUs) | items per process | item-indexed state GB | softmax buffer GB | "
             "total GB / process |", "|---:|---:|---:|---:|---:|---:|"]
    for p in projection(meta, rows):
        lines.append(f"| {p['items']:,} | {p['processes']} | {p['items_per_process']:,} | {p['item_state_gb']:.1f} | "
                     f"{p['softmax_buffer_gb']:.1f} | {p['total_gb']:.1f} |")
    lines.append("")
    lines.append("The collectives move batch-sized tensors only (B x hidden, three B-vectors, B x hidden in the "
                 "backward pass), whatever the catalogue; the per-process compute falls as 1/N with the items held. "
                 "Update times on GPUs are not projected from CPU timings.")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--hidden", type=int, default=600)
    p.add_argument("--latent", type=int, default=200)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--per-user", type=int, default=50, help="random draws per user (items with repeats removed)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per world size")
    p.add_argument("--quick", action="store_true", help="tiny sizes (20,000 items, 64 hidden, batches of 64); prints only")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results unless --quick)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.items, args.hidden, args.latent, args.batch, args.steps = 20_000, 64, 16, 64, 2

    import torch

    from recvae.fileio import write_bytes, write_json

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in WORLDS:
            row = summarise(launch(args, procs, Path(tmp) / f"{procs}.json"))
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {k: getattr(args, k) for k in ("items", "hidden", "latent", "batch", "per_user", "steps", "warmup",
                                          "threads", "precision")}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_speed import machine

    meta.update(torch=torch.__version__, cpus=os.cpu_count(), platform=platform.platform(), cpu=machine()["cpu"],
                load_before=" ".join(f"{x:.2f}" for x in load_before),
                load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                command="python benchmarks/item_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv))
    text = markdown(meta, rows)
    print(text)
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results")
    if out is not None:
        write_json(Path(out) / "item_parallel.json", {"meta": meta, "worlds": rows,
                                                      "projection": projection(meta, rows)})
        write_bytes(Path(out) / "item_parallel.md", text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
