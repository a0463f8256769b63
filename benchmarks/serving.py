"""Serving speed on this CPU: the HTTP service under wrk, and `recommend --all-users`.

On the ML-20M-shaped synthetic data of benchmarks/paper_table.py (136,677 users x 20,108 items,
~9.9M interactions) with the paper's Mult-VAE network (20,108-600-200-600-20,108) whose weights
come from one gradient step on 500 users (i.e. effectively untrained: speed does not depend on
the weights' values), written as a run directory:

1. Scoring alone, in this process: the service's micro-batch path (``RunRecommender.
   recommend_arrays``: forward pass, exclusions, top-10) over batches of 1, 8 and 64 request
   histories, CPU ms per request, with the torch threads a server worker gets.
2. ``recvae serve -q RUN`` in a subprocess for each configuration (the default, no options: one
   worker per core with 1 torch thread each on this machine; one worker, the default before; and
   bf16 variants; the targets are checked on each); the C load generator wrk (one thread, a Lua script posting
   top-10 requests with the histories of 2,000 random users of the data) keeps 1, 8 and 64
   connections busy for ``--seconds`` each: requests per second, p50/p99 latency (wrk
   ``--latency``), non-2xx answers and socket errors, and the server's CPU ms per request (user +
   system time of the server and its worker processes, /proc/PID/stat, before and after the
   level).
3. ``recvae recommend RUN --all-users --k 100`` in a subprocess (Parquet output): wall seconds,
   rows per second and peak RSS, beside the forward passes alone over the same users (batches of
   1,000, no top-k, no writing), measured in this process. ``--skip-all-users`` leaves it out.

Needs wrk (Debian/Ubuntu package ``wrk``; https://github.com/wg/wrk). Writes
benchmarks/results/serving.json and .md (through recvae.fileio) and prints the table. Run it
alone: ``python benchmarks/serving.py`` (about 5 minutes on 2 cores; ``--run-dir DIR`` keeps the
built run directory in DIR and reuses it on the next call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import synthetic_ml20m  # noqa: E402

from recvae.data import Interactions  # noqa: E402
from recvae.data.splits import strong_generalization_split  # noqa: E402
from recvae.evaluation import evaluate  # noqa: E402
from recvae.data.source import Recorded, seen_interactions  # noqa: E402
from recvae.experiment import DataSpec, RunConfig, RunResult, write_run_dir  # noqa: E402
from recvae.fileio import write_bytes, write_json  # noqa: E402
from recvae.models import MultVAE  # noqa: E402
from recvae.models.base import SCORING_PRECISIONS as PRECISIONS  # noqa: E402
from recvae.recommend import RunRecommender  # noqa: E402
from recvae.rundir import is_run_dir  # noqa: E402
from recvae.serve.server import wait_until_ready  # noqa: E402
from recvae.serve.settings import available_cores, serving_layout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
LEVELS = (1, 8, 64)
#: what `recvae serve` with no options runs on this machine (a CPU model: no CUDA)
DEFAULT_WORKERS, DEFAULT_THREADS = serving_layout(available_cores(), cuda=False)
#: (label, extra `recvae serve` arguments): the default (no options), one worker (the default
#: before, with its threads as the default resolves them for one worker), and the output layer
#: scoring in bf16 (one worker with a torch thread per core: its event loop idles while a batch
#: of every client is scored; the last: the README's throughput settings, batches capped at half
#: the 64 connections so that each worker's batches stay short); the targets are checked on each
CONFIGS = (
    (f"default (no options): {DEFAULT_WORKERS} worker(s) x {DEFAULT_THREADS} torch thread(s) on {available_cores()} "
     "cores", []),
    (f"1 worker x {serving_layout(available_cores(), cuda=False, workers=1)[1]} torch thread(s) (the default before)",
     ["--workers", "1"]),
    ("bf16 scoring, 1 worker", ["--workers", "1", "--precision", "bf16"]),
    ("bf16 scoring, 1 worker x 2 torch threads", ["--workers", "1", "--threads", "2", "--precision", "bf16"]),
    ("bf16 scoring, 2 workers x 1 torch thread, batches of <= 32",
     ["--workers", "2", "--threads", "1", "--max-batch", "32", "--precision", "bf16"]),
)
TARGETS = {"rps_at_64": 2000.0, "p99_ms_at_64": 50.0, "p99_ms_at_8": 10.0, "all_users_x_matmul": 2.0,
           "all_users_rss_gb": 2.0}


def build_run(out: Path, seed: int = 0, shape=None) -> Interactions:
    """A run directory of the paper's Mult-VAE on the synthetic data (weights: one step on 500 users)."""
    data = synthetic_ml20m(seed=seed) if shape is None else synthetic_ml20m(seed=seed, shape=shape)
    split = strong_generalization_split(data, n_heldout_users=min(10_000, data.n_users // 10), seed=seed)
    few = Interactions(split.train.matrix[:500], split.train.user_ids[:500], split.train.item_ids)
    model = MultVAE(epochs=1, batch_size=500, random_state=seed, device="cpu").fit(few, show_progress=False)
    test = evaluate(model, split.test)
    spec = DataSpec(path="synthetic-ml20m", rating_col=None, rating_threshold=None)
    config = RunConfig(data=spec, model="multvae", params={"epochs": 1, "batch_size": 500})
    # no rating threshold: the seen items are the known histories (the data has no source file to read)
    write_run_dir(out, config, split, RunResult(model, None, test, 0.0, split), plot=False,
                  read=Recorded(seen_interactions(split, None)))
    return data


def request_histories(data: Interactions, n: int = 2000, seed: int = 0) -> list[list]:
    rows = np.random.default_rng(seed).choice(data.n_users, size=min(n, data.n_users), replace=False)
    return [data.item_ids[data.matrix[r].indices].tolist() for r in rows]


# -- 1. scoring alone ---------------------------------------------------------------------------
def request_codes(run: RunRecommender, histories: list[list]) -> list[np.ndarray]:
    """Each request history as the service sees it: sorted, unique catalogue positions."""
    return [np.unique(run.item_codes(h, str)) for h in histories]


def scoring_cost(run: RunRecommender, codes: list[np.ndarray], threads: int, batches=(1, 8, 64),
                 seconds: float = 2.0) -> list[dict]:
    """CPU and wall ms per request of the service's scoring (micro-batch matrices, forward pass,
    exclusions, top-10) at each batch size and scoring precision, in this process with
    ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    out = []
    for precision in PRECISIONS:
        run.model.set_scoring_precision(precision)
        out += [{"precision": precision, **r} for r in _scoring_cost(run, codes, batches, seconds)]
    run.model.set_scoring_precision("fp32")
    return out


def _scoring_cost(run: RunRecommender, codes: list[np.ndarray], batches, seconds: float) -> list[dict]:
    from recvae.serve.batching import MicroBatcher

    batcher = MicroBatcher(run, max(batches))
    out = []
    for size in batches:
        rows = [codes[i % len(codes)] for i in range(size)]
        empty = [np.zeros(0, dtype=np.int64)] * size
        run.recommend_arrays(batcher._matrix(rows), batcher._matrix(empty), 10)  # warm
        n, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds or n < 3:
            run.recommend_arrays(batcher._matrix(rows), batcher._matrix(empty), 10)
            n += size
        out.append({"batch": size, "cpu_ms_per_request": (time.process_time() - cpu) / n * 1e3,
                    "wall_ms_per_request": (time.perf_counter() - wall) / n * 1e3})
    return out


def bf16_agreement(run: RunRecommender, codes: list[np.ndarray], k: int = 10, batch: int = 64) -> dict:
    """How far bf16 scoring's top-k lists are from fp32's for the request histories: the mean
    share of the k items both have, and the share of lists that are identical (same order)."""
    from recvae.serve.batching import MicroBatcher

    batcher = MicroBatcher(run, batch)
    lists = {}
    for precision in PRECISIONS:
        run.model.set_scoring_precision(precision)
        ids = [run.recommend_arrays(batcher._matrix(codes[s:s + batch]),
                                    batcher._matrix([np.zeros(0, dtype=np.int64)] * len(codes[s:s + batch])), k)[0]
               for s in range(0, len(codes), batch)]
        lists[precision] = np.concatenate(ids)
    run.model.set_scoring_precision("fp32")
    a, b = lists["fp32"], lists["bf16"]
    shared = [len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]
    return {"k": k, "requests": len(a), "mean_shared": float(np.mean(shared)),
            "identical_lists": float(np.mean((a == b).all(axis=1)))}


# -- 2. the HTTP service under wrk --------------------------------------------------------------
def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit("benchmarks/serving.py needs the load generator wrk, which is not installed: "
                 "`apt-get install wrk` (Debian/Ubuntu package wrk) or build it from https://github.com/wg/wrk")
    return path


def lua_script(histories: list[list], path: Path, k: int = 10) -> Path:
    """wrk's script: POST /recommend, each request the next history of the list."""
    bodies = ",\n".join("[==[" + json.dumps({"items": h, "k": k}, separators=(",", ":")) + "]==]" for h in histories)
    path.write_text(
        "local bodies = {\n" + bodies + "\n}\n"
        "local n = 0\n"
        "local headers = {['Content-Type'] = 'application/json'}\n"
        "request = function()\n"
        "  n = n % #bodies + 1\n"
        "  return wrk.format('POST', '/recommend', headers, bodies[n])\n"
        "end\n"
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> dict:
    """Requests, seconds, req/s, p50/p99 ms (from ``--latency``), non-2xx and socket errors."""
    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", value).groups()
        return float(number) * _UNITS[unit]

    done = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, flags=re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if done is None or "50" not in latency or "99" not in latency:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    requests, seconds = int(done.group(1)), ms(done.group(2) + done.group(3)) / 1e3
    return {
        "requests": requests, "seconds": seconds, "requests_per_second": requests / seconds,
        "p50_ms": ms(latency["50"]), "p99_ms": ms(latency["99"]),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, sockets.groups())) if sockets else 0,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc): the server and uvicorn's worker processes."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far (Linux /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Server:
    """``recvae serve RUN ARGS`` as a child process (own process group), stopped in every outcome."""

    def __init__(self, run_dir: Path, args: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recvae.cli", "-q", "serve", str(run_dir), "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def __enter__(self):
        try:
            deadline = time.monotonic() + 300
            wait_until_ready(self.base, self.proc, 300, self.output)
            self.wait_idle(deadline)
            return self
        except BaseException:
            self.__exit__()
            raise

    def wait_idle(self, deadline: float) -> None:
        """Until every worker has started and loaded the model: the server's processes are
        as many as it has workers (plus the supervisor) and have used no CPU for a second.
        (A worker still loading accepts no connection, and wrk keeps the ones it opened.)"""
        args = self.proc.args
        workers = next((int(v) for flag, v in zip(args, args[1:]) if flag == "--workers"), DEFAULT_WORKERS)
        quiet, last = 0, None
        while quiet < 4 and time.monotonic() < deadline:
            pids = process_tree(self.proc.pid)
            now = cpu_seconds(pids)
            ready = len(pids) >= (workers + 1 if workers > 1 else 1)
            quiet = quiet + 1 if ready and last is not None and now - last < 0.02 else 0
            last = now
            time.sleep(0.25)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the supervisor passes it on to its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or any(p != self.proc.pid for p in process_tree(self.proc.pid)):
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()

    def post(self, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.base}/recommend", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())


def wrk_level(wrk: str, server: Server, script: Path, connections: int, seconds: float) -> dict:
    pids = process_tree(server.proc.pid)
    load = [round(v, 2) for v in os.getloadavg()]
    before = cpu_seconds(pids)
    proc = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
                           "-s", str(script), server.base], capture_output=True, text=True)
    after = cpu_seconds(pids)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    r = parse_wrk(proc.stdout)
    r["server_cpu_ms_per_request"] = (after - before) / max(r["requests"], 1) * 1e3
    r["load_average_before"] = load
    return {"connections": connections, **r}


def serve_sweep(wrk: str, run_dir: Path, script: Path, histories, label: str, args: list[str], seconds: float,
                levels=LEVELS) -> list[dict]:
    """Each level against one server with ``args``; the answers checked first."""
    out = []
    with Server(run_dir, args) as server:
        status, answer = server.post({"items": histories[0], "k": 10})
        if status != 200 or answer.get("source") != "model" or len(answer.get("items", ())) != 10:
            raise RuntimeError(f"unexpected answer {status}: {answer}")
        subprocess.run([wrk, "-t1", "-c8", "-d2s", "-s", str(script), server.base], capture_output=True)  # warm-up
        for c in levels:
            r = wrk_level(wrk, server, script, c, seconds)
            out.append({"config": label, "args": " ".join(args), **r})
            print(f"  {label:>33} | {c:>3} connections | {r['requests_per_second']:7.0f} req/s | "
                  f"p50 {r['p50_ms']:6.1f} ms | p99 {r['p99_ms']:6.1f} ms | server CPU "
                  f"{r['server_cpu_ms_per_request']:.2f} ms/req | non-2xx {r['non_2xx']} | "
                  f"socket errors {r['socket_errors']}", file=sys.stderr)
    return out


# -- 3. every user as a batch job ---------------------------------------------------------------
def matmul_seconds(run: RunRecommender, batch_size: int = 1000) -> float:
    """Forward passes alone over every user of the run (what --all-users must at least do)."""
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
    return {"seconds": seconds, "rows": rows, "rows_per_second": rows / seconds, "peak_rss_gb": rss_gb,
            "users": rows // k}


# -- report -------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def markdown(result: dict) -> str:
    m = result["machine"]
    peak = result["load_before"][0]  # the levels' own load averages include the benchmark's earlier levels
    lines = [
        "# Serving speed (CPU)",
        "",
        result["setup"],
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}. Load average "
        f"before / after: {result['load_before']} / {result['load_after']}. Produced by `{result['command']}`.",
        "",
        *([f"**Measured under load** (1-minute load average {peak:.1f} on {m['cores']} cores before the "
           "benchmark began: other work shared the CPU), so the rates and latencies understate the service; "
           "the CPU ms per request are the figures to compare.", ""] if peak > m["cores"] / 2 else []),
        "## HTTP service (`recvae serve`, top-10 for a new user's history, wrk with 1 thread on the same cores)",
        "",
        "| configuration | connections | requests | req/s | p50 ms | p99 ms | non-2xx | socket errors "
        "| server CPU ms/req | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["serving"]:
        lines.append(f"| {r['config']} (`{r['args'] or 'no options'}`) | {r['connections']} | {r['requests']} | "
                     f"{r['requests_per_second']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']} | "
                     f"{r['socket_errors']} | {r['server_cpu_ms_per_request']:.2f} | "
                     f"{' '.join(f'{v:.1f}' for v in r['load_average_before'])} |")
    lines += [
        "",
        "Server CPU ms/req: user + system time of the server's processes (and its workers) over the "
        "level, divided by the requests answered; it includes the scoring below. Load before: the 1, 5 and "
        "15-minute load averages before the level, the benchmark's own earlier levels included.",
        "",
        f"## Scoring alone (in this process, {result['scoring_threads']} torch thread(s): forward pass, "
        "exclusions, top-10 of a micro-batch)",
        "",
        "| precision | batch | CPU ms/request | wall ms/request |",
        "|---|---:|---:|---:|",
    ]
    for r in result["scoring"]:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['cpu_ms_per_request']:.3f} | "
                     f"{r['wall_ms_per_request']:.3f} |")
    g = result["bf16_agreement"]
    lines += [
        "",
        f"bf16 against fp32 scoring, top-{g['k']} of the {g['requests']:,} request histories: "
        f"{g['mean_shared']:.1%} of the items shared on average, {g['identical_lists']:.1%} of the lists identical "
        "(this model's weights are nearly untrained: tests/test_scoring_precision.py checks a trained one "
        "on MovieLens).",
    ]
    a = result.get("all_users")
    if a:
        lines += [
            "",
            f"## `recvae recommend RUN --all-users --k {result['k_all_users']}` ({a['users']:,} users, Parquet)",
            "",
            "| what | seconds | rows/s | peak RSS GB |",
            "|---|---:|---:|---:|",
            f"| whole command (process start, load, score, top-k, write) | {a['seconds']:.1f} | "
            f"{a['rows_per_second']:,.0f} | {a['peak_rss_gb']:.2f} |",
            f"| forward passes alone (same users, batches of 1,000) | {a['matmul_seconds']:.1f} | | |",
        ]
    lines += ["", "## Targets", "", "| configuration | target | value | met |", "|---|---|---:|:---:|"]
    for label, checks in result["targets"].items():
        for name, (value, target, met) in checks.items():
            lines.append(f"| {label} | {name} (target {target:g}) | {value:.2f} | {'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(serving: list[dict], batch: dict | None, label: str) -> dict:
    at = {r["connections"]: r for r in serving if r["config"] == label}
    values = {}
    if 64 in at:
        values["rps_at_64"] = at[64]["requests_per_second"]
        values["p99_ms_at_64"] = at[64]["p99_ms"]
    if 8 in at:
        values["p99_ms_at_8"] = at[8]["p99_ms"]
    if batch:
        values["all_users_x_matmul"] = batch["seconds"] / batch["matmul_seconds"]
        values["all_users_rss_gb"] = batch["peak_rss_gb"]
    return {name: (v, TARGETS[name], v >= TARGETS[name] if name.startswith("rps") else v < TARGETS[name])
            for name, v in values.items()}


def repo_relative(arg: str) -> str:
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="wrk's load per connection level (default 10)")
    p.add_argument("--k-all-users", type=int, default=100)
    p.add_argument("--skip-all-users", action="store_true", help="leave out `recommend --all-users`")
    p.add_argument("--run-dir", type=Path, help="build the run directory here, or reuse it if it is one")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="a small data set and short loads, to check the script")
    a = p.parse_args(argv)
    wrk = wrk_path()
    shape = (5000, 2000, 150_000) if a.smoke else None
    seconds = 2.0 if a.smoke else a.seconds
    load_before = [round(v, 2) for v in os.getloadavg()]
    given = list(sys.argv[1:] if argv is None else argv)
    if "--run-dir" in given:  # where the built run is kept changes no figure, and is a path of this machine
        i = given.index("--run-dir")
        del given[i:i + 2]
    given = [w for w in given if not w.startswith("--run-dir=")]
    command = shlex.join(["python", "benchmarks/serving.py", *map(repo_relative, given)])

    with tempfile.TemporaryDirectory(prefix="recvae-serving-") as tmp:
        tmp = Path(tmp)
        run_dir = a.run_dir or tmp / "run"
        t = time.perf_counter()
        if is_run_dir(run_dir) and (run_dir / "histories.json").is_file():
            histories = json.loads((run_dir / "histories.json").read_text())
            print(f"reusing the run directory {run_dir}", file=sys.stderr)
        else:
            data = build_run(run_dir, shape=shape)
            histories = request_histories(data)
            (run_dir / "histories.json").write_text(json.dumps(histories))
            del data
            print(f"run directory built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        script = lua_script(histories, tmp / "post.lua")

        run = RunRecommender(run_dir)
        threads = DEFAULT_THREADS  # what a worker of the default configuration gets
        codes = request_codes(run, histories)
        scoring = scoring_cost(run, codes, threads, seconds=1.0 if a.smoke else 3.0)
        for r in scoring:
            print(f"  scoring ({r['precision']}), batch {r['batch']:>3}: {r['cpu_ms_per_request']:.3f} CPU ms/request",
                  file=sys.stderr)
        agreement = bf16_agreement(run, codes)
        print(f"  bf16 vs fp32 top-10: {agreement}", file=sys.stderr)

        batch = None
        if not a.skip_all_users:
            batch = all_users(run_dir, tmp / "all.parquet", a.k_all_users)
            batch["matmul_seconds"] = matmul_seconds(run)
            print(f"  all users: {batch}", file=sys.stderr)
        del run

        serving = []
        for label, args in CONFIGS:
            serving += serve_sweep(wrk, run_dir, script, histories, label, args, seconds)

    result = {
        "setup": (
            "Synthetic ML-20M-shaped data (136,677 users x 20,108 items, seed 0; benchmarks/paper_table.py), "
            "the paper's Mult-VAE network (600-200) after one gradient step on 500 users (untrained weights "
            "for practical purposes). Requests: top-10 for the histories of 2,000 random users of the data "
            "(mean ~70 items). Server and load generator share the machine's cores."
        ) if not a.smoke else "Smoke run: small synthetic data, short loads.",
        "command": command,
        "machine": machine(),
        "scoring_threads": threads,
        "scoring": scoring,
        "bf16_agreement": agreement,
        "serving": serving,
        "k_all_users": a.k_all_users,
        "all_users": batch,
        "targets": {**{label: targets(serving, None, label) for label, _ in CONFIGS},
                    **({"recommend --all-users": targets([], batch, "")} if batch else {})},
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
