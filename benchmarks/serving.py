"""Serving speed on this CPU: the HTTP service under load and `recommend --all-users`.

On the ML-20M-shaped synthetic data of benchmarks/paper_table.py (136,677 users x 20,108 items,
~9.9M interactions) with the paper's Mult-VAE network (20,108-600-200-600-20,108) whose weights
come from one gradient step on 500 users (i.e. effectively untrained: speed does not depend on
the weights' values), written as a run directory:

1. ``recvae recommend RUN --all-users --k 100`` in a subprocess (Parquet output): wall seconds,
   rows per second and peak RSS of that process, beside the time of the forward passes alone
   (``model.score`` over the same 136,677 histories in batches of 1,000, no top-k, no writing),
   measured in this process in the same run.
2. ``recvae serve RUN`` in a subprocess; an async httpx load generator in this process keeps
   1, 8 and 64 clients busy with top-10 requests (``{"items": [...]}`` histories of random users
   of the data) for a fixed time each: requests per second and p50/p95/p99 latency. Run once with
   micro-batching (``--max-batch 64``, the default) and once without (``--max-batch 1``).

Writes benchmarks/results/serving.json and .md (through recvae.fileio). Run it alone, e.g.
``flock /tmp/recvae-bench.lock python benchmarks/serving.py``; about 6-10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import synthetic_ml20m  # noqa: E402

from recvae.data import Interactions  # noqa: E402
from recvae.data.splits import strong_generalization_split  # noqa: E402
from recvae.evaluation import evaluate  # noqa: E402
from recvae.experiment import DataSpec, RunConfig, RunResult, seen_interactions, write_run_dir  # noqa: E402
from recvae.fileio import write_bytes, write_json  # noqa: E402
from recvae.models import MultVAE  # noqa: E402
from recvae.recommend import RunRecommender  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"p99_ms_at_8": 50.0, "rps_at_64": 200.0, "all_users_x_matmul": 2.0, "all_users_rss_gb": 2.0}


def build_run(out: Path, seed: int = 0, shape=None) -> Interactions:
    """A run directory of the paper's Mult-VAE on the synthetic data (weights: one step on 500 users)."""
    data = synthetic_ml20m(seed=seed) if shape is None else synthetic_ml20m(seed=seed, shape=shape)
    split = strong_generalization_split(data, n_heldout_users=min(10_000, data.n_users // 10), seed=seed)
    few = Interactions(split.train.matrix[:500], split.train.user_ids[:500], split.train.item_ids)
    model = MultVAE(epochs=1, batch_size=500, random_state=seed, show_progress=False, device="cpu").fit(few)
    test = evaluate(model, split.test)
    spec = DataSpec(path="synthetic-ml20m", rating_col=None, rating_threshold=None)
    config = RunConfig(data=spec, model="multvae", params={"epochs": 1, "batch_size": 500})
    # no rating threshold: the seen items are the known histories (the data has no source file to read)
    write_run_dir(out, config, split, RunResult(model, None, test, 0.0, split), plot=False,
                  seen=seen_interactions(split, None))
    return data


def matmul_seconds(run_dir: Path, batch_size: int = 1000) -> float:
    """Forward passes alone over every user of the run (what --all-users must at least do)."""
    run = RunRecommender(run_dir)
    start = time.perf_counter()
    for s in range(0, run.known.shape[0], batch_size):
        run.model.score(run.known[s : s + batch_size])
    return time.perf_counter() - start


def all_users(run_dir: Path, out: Path, k: int) -> dict:
    """``recvae recommend --all-users`` in a child process: seconds, rows, peak RSS (GB)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "recvae.cli", "-q", "recommend", str(run_dir), "--all-users", "--k", str(k),
         "--output", str(out)],
        capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(out).metadata.num_rows
    return {"seconds": seconds, "rows": rows, "rows_per_second": rows / seconds, "peak_rss_gb": rss_gb}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``recvae serve`` as a child process, stopped in every outcome."""

    def __init__(self, run_dir: Path, max_batch: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recvae.cli", "-q", "serve", str(run_dir), "--port", str(self.port),
             "--max-batch", str(max_batch), "--threads", "1"],  # the load generator shares the 2 cores
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError("server did not come up in 180 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(base: str, histories: list[list[int]], clients: int, seconds: float, k: int = 10) -> dict:
    """``clients`` concurrent loops posting top-k requests for ``seconds``: rate and latencies."""
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: int, http):
        nonlocal errors
        n = c
        while time.perf_counter() < stop:
            body = {"items": histories[n % len(histories)], "k": k}
            t = time.perf_counter()
            r = await http.post("/recommend", json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200
            n += clients

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        for c in range(clients):  # warm the connections
            await http.get("/health")
        start = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(clients)])
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients, "requests": len(ms), "errors": errors, "seconds": elapsed,
        "requests_per_second": len(ms) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_sweep(run_dir: Path, histories, max_batch: int, levels, seconds: float) -> list[dict]:
    """Each load level against one server; with the CPU time per request of the server process
    and of this (load generator) process, to say where the time goes."""
    out = []
    with Server(run_dir, max_batch) as server:
        asyncio.run(load(server.base, histories, 8, 2.0))  # warm-up
        for c in levels:
            server_cpu, client_cpu = cpu_seconds(server.proc.pid), time.process_time()
            r = asyncio.run(load(server.base, histories, c, seconds))
            r["server_cpu_ms_per_request"] = (cpu_seconds(server.proc.pid) - server_cpu) / r["requests"] * 1e3
            r["client_cpu_ms_per_request"] = (time.process_time() - client_cpu) / r["requests"] * 1e3
            out.append({"max_batch": max_batch, **r})
    return out


def markdown(result: dict) -> str:
    a = result["all_users"]
    lines = [
        "# Serving speed (CPU)",
        "",
        f"{result['setup']}",
        "",
        "## HTTP service (`recvae serve`, top-10, one uvicorn worker, `--threads 1`: the load generator runs on the same 2 cores)",
        "",
        "| max-batch | clients | requests | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/req | client CPU ms/req |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["serving"]:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['requests_per_second']:.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                     f"{r['server_cpu_ms_per_request']:.1f} | {r['client_cpu_ms_per_request']:.1f} |")
    lines += ["", "CPU ms/req: CPU time of the server process and of the load generator (this process) "
              "divided by the requests answered; the machine has 2 cores for both and whatever else runs."]
    lines += [
        "",
        f"## `recvae recommend RUN --all-users --k {result['k_all_users']}` ({a['users']:,} users, Parquet)",
        "",
        "| what | seconds | rows/s | peak RSS GB |",
        "|---|---:|---:|---:|",
        f"| whole command (process start, load, score, top-k, write) | {a['seconds']:.1f} | {a['rows_per_second']:,.0f} | {a['peak_rss_gb']:.2f} |",
        f"| forward passes alone (same users, batches of 1,000) | {a['matmul_seconds']:.1f} | | |",
        "",
        "| target | value | met |",
        "|---|---:|:---:|",
    ]
    for name, (value, target, met) in result["targets"].items():
        lines.append(f"| {name} (target {target}) | {value:.2f} | {'yes' if met else 'no'} |")
    lines += ["", f"Load average before / after: {result['load_before']} / {result['load_after']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level (default 10)")
    p.add_argument("--k-all-users", type=int, default=100)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="a small data set and short loads, to check the script")
    a = p.parse_args(argv)
    shape = (5000, 2000, 150_000) if a.smoke else None
    load_before = [round(v, 2) for v in os.getloadavg()]
    import torch

    with tempfile.TemporaryDirectory(prefix="recvae-serving-") as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "run"
        t = time.perf_counter()
        data = build_run(run_dir, shape=shape)
        print(f"run directory built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rng = np.random.default_rng(0)
        rows = rng.choice(data.n_users, size=2000, replace=False)
        histories = [data.item_ids[data.matrix[r].indices].tolist() for r in rows]
        del data

        batch = all_users(run_dir, tmp / "all.parquet", a.k_all_users)
        batch["matmul_seconds"] = matmul_seconds(run_dir)
        batch["users"] = batch["rows"] // a.k_all_users
        print(f"all users: {batch}", file=sys.stderr)

        serving = serve_sweep(run_dir, histories, 64, (1, 8, 64), a.seconds)
        serving += serve_sweep(run_dir, histories, 1, (8, 64), a.seconds)
        print(f"serving: {serving}", file=sys.stderr)

    best = {c: max((r for r in serving if r["clients"] == c), key=lambda r: r["requests_per_second"]) for c in (8, 64)}
    default = {r["clients"]: r for r in serving if r["max_batch"] == 64}
    values = {
        "p99_ms_at_8": default[8]["p99_ms"],
        "rps_at_64": default[64]["requests_per_second"],
        "all_users_x_matmul": batch["seconds"] / batch["matmul_seconds"],
        "all_users_rss_gb": batch["peak_rss_gb"],
    }
    targets = {
        name: (values[name], TARGETS[name], values[name] > TARGETS[name] if name == "rps_at_64" else values[name] < TARGETS[name])
        for name in TARGETS
    }
    result = {
        "setup": (
            "Synthetic ML-20M-shaped data (136,677 users x 20,108 items, seed 0; benchmarks/paper_table.py), "
            "the paper's Mult-VAE network (600-200) after one gradient step on 500 users (untrained weights "
            f"for practical purposes); server and load generator share this {os.cpu_count()}-core CPU; "
            f"torch {torch.__version__}, Python {platform.python_version()}. Produced by `benchmarks/serving.py`."
        ),
        "k_all_users": a.k_all_users,
        "all_users": batch,
        "serving": serving,
        "best_at": {str(c): r["max_batch"] for c, r in best.items()},
        "targets": targets,
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "serving.json", result)
    write_bytes(a.out / "serving.md", markdown(result).encode())
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
