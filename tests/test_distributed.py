"""Data-parallel training on CPU with gloo: torchrun runs, gradient coverage, failures, prepared data.

Every process started here is stopped in every outcome (``_Procs`` kills its process groups;
the spawned groups are joined with a deadline). Runs use 1 thread per process.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.multiprocessing as mp

from checkpoints import ckpt, resume
from recvae import distributed
from recvae.cli import main
from recvae.data.prepared import load_prepared, write_prepared
from recvae.data import Interactions, read_interactions
from recvae.fileio import atomic_dir
from recvae.models.networks import NetworkConfig, build_network
from recvae.models.sparse_layers import BatchPart
from recvae.models.training_loop import batch_of
from recvae.models.vae import MultVAE

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # per launch; generous because CI machines are shared
#: 1-process vs 2-process weights after the run: equal up to float summation order
WEIGHT_ATOL = 1e-5


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RECVAE_DIST_TIMEOUT="30")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Procs:
    """Start commands in their own process groups; ``wait`` with a deadline; kill what is left on exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def wait(self, timeout=TIMEOUT_S) -> list[tuple[int, str]]:
        """Every command's (status, output); their pipes are read at once, so a command that
        writes much cannot block on a full pipe while another is waited for. Past the deadline,
        every group left is killed and the failure shows what each command had printed."""
        texts: dict[int, list[str]] = {}

        def read(i, p):
            texts[i] = [p.stdout.read()]

        readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(self.procs)]
        for r in readers:
            r.start()
        deadline = time.monotonic() + timeout
        late = []
        for i, p in enumerate(self.procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(i)
        if late:
            self.__exit__()
        for r in readers:
            r.join(timeout=10)
        out = [(p.returncode, "".join(texts.get(i, ["<unread>"]))) for i, p in enumerate(self.procs)]
        if late:
            shown = "\n".join(f"--- command {i} (status {rc}, {'killed at the deadline' if i in late else 'ended'}):"
                               f"\n{text[-4000:]}" for i, (rc, text) in enumerate(out))
            pytest.fail(f"command(s) {late} still running after {timeout} s:\n{shown}")
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _two_agents(port: int, program: list[str], launcher=TORCHRUN) -> list[list[str]]:
    """Two torchrun agents as two nodes of one process each, meeting on localhost as the README's
    two-machine command does (static rendezvous: node 0's agent holds the store)."""
    return [[*(TORCHRUN if node == 0 else launcher), "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), *program]
            for node in range(2)]


#: torchrun whose rendezvous shutdown starts 2 s late: the other node's agent, which holds the
#: store, has exited by then. With a c10d rendezvous the late agent then writes to the gone store
#: and prints a C++ TCPStore trace at a normal exit; the static rendezvous has nothing to close.
LATE_AGENT = """
import sys, time
from torch.distributed.elastic.rendezvous import dynamic_rendezvous, static_tcp_rendezvous
for cls in (dynamic_rendezvous.DynamicRendezvousHandler, static_tcp_rendezvous.StaticTCPRendezvous):
    def late(self, _shutdown=cls.shutdown):
        time.sleep(2)
        return _shutdown(self)
    cls.shutdown = late
from torch.distributed.run import main
sys.exit(main())
"""


# -- data and the 1-process reference ---------------------------------------------------------
@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """393 users, 200 items; with 2 x 20 held-out users, 353 training users = 22 batches of 16 + 1:
    in the last batch the second process's share is empty."""
    rng = np.random.default_rng(3)
    rows = [(u, int(i), 5) for u in range(393)
            for i in rng.choice(200, size=rng.integers(6, 30), replace=False, p=None)]
    path = tmp_path_factory.mktemp("dist") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def _train_args(source: list[str], out) -> list[str]:
    return ["-q", "train", *source, "--epochs", "2", "--batch-size", "16", "--hidden-dims", "24", "--latent-dim", "8",
            "--n-heldout-users", "20", "--precision", "fp32", "--device", "cpu", "--show", "0", "--out", str(out)]


@pytest.fixture(scope="module")
def reference(log_csv, tmp_path_factory):
    """The same training run as one ordinary process (in this process)."""
    out = tmp_path_factory.mktemp("dist") / "one"
    assert main(_train_args(["--data", str(log_csv)], out)) == 0
    return out


def _weights(run: Path) -> dict:
    return torch.load(run / "model" / "weights.pt", weights_only=True)


def _assert_same_run(run: Path, reference: Path, steps=(23, 46)) -> float:
    """Weights within WEIGHT_ATOL, same history (``steps`` after each epoch, losses to 1e-5,
    validation NDCG); returns the max difference."""
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= WEIGHT_ATOL, diff
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run, reference))
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(steps)
    for x, y in zip(ha, hb):
        for key in ("loss", "nll", "kl", "beta", "val_ndcg@100"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    return diff


# -- torchrun ---------------------------------------------------------------------------------
def _two_processes(args: list[str]) -> str:
    """``torchrun --standalone --nproc-per-node 2 -m recvae ARGS``: its output, once it exited 0."""
    with _Procs() as procs:
        procs.start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "recvae", *args], env=_env())
        [(rc, text)] = procs.wait()
    assert rc == 0, text
    return text


@pytest.mark.slow
def test_two_processes_give_the_one_process_model(log_csv, reference, tmp_path):
    out = tmp_path / "two"
    text = _two_processes(_train_args(["--data", str(log_csv)], out))
    diff = _assert_same_run(out, reference)
    print(f"max |w_2proc - w_1proc| = {diff:.2e}")  # measured: 7.5e-08
    assert text.count("| test |") == 1  # rank 0 alone prints the results
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.slow
def test_binary_latent_two_processes_give_the_one_process_model(log_csv, tmp_path):
    """The bits' noise follows the batch split as the Gaussian noise does (relaxed bits: the
    straight-through sample's forward pass is a step, so any shift would show at once)."""
    extra = ["--latent", "bernoulli", "--temperature", "1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_train_args(["--data", str(log_csv)], one), *extra]) == 0
    _two_processes([*_train_args(["--data", str(log_csv)], two), *extra])
    _assert_same_run(two, one)


@pytest.mark.slow
def test_sampled_softmax_two_processes_give_the_one_process_model(log_csv, tmp_path):
    """The shared negatives are drawn once per global batch from the same generator on every
    process, after the step's other random numbers: each user's loss is the one-process one."""
    extra = ["--softmax", "sampled", "--n-negatives", "30", "--proposal", "popularity"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_train_args(["--data", str(log_csv)], one), *extra]) == 0
    _two_processes([*_train_args(["--data", str(log_csv)], two), *extra])
    _assert_same_run(two, one)
    assert json.loads((two / "run.json").read_text())["params"]["softmax"] == "sampled"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["recvae", "recvae-linear"])
def test_recvae_two_processes_give_the_one_process_model(log_csv, tmp_path, model):
    """RecVAE's encoder and decoder passes split as Mult-VAE's updates: dropout and noise drawn
    for the global batch, each phase's gradients summed. Every pass ends on a batch of one user,
    so rank 0's share is empty there and it must still draw that batch's random numbers: the
    next pass goes on with the same generator (an outer epoch reseeds it, a pass does not).
    With the linear path, rank 0 computes B and sends it: validation on the sum is the same."""
    extra = ["--model", model, "--hidden-dims", "24,24", "--encoder-epochs", "2", "--lr", "1e-3"]
    extra += ["--l2", "50"] if model == "recvae-linear" else []
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_train_args(["--data", str(log_csv)], one), *extra]) == 0
    _two_processes([*_train_args(["--data", str(log_csv)], two), *extra])
    diff = _assert_same_run(two, one, steps=(69, 138))  # (2 encoder + 1 decoder passes) x 23 updates per epoch
    print(f"{model}: max |w_2proc - w_1proc| = {diff:.2e}")
    linear = {"linear_weight"} if model == "recvae-linear" else set()  # w, a buffer of the state dict
    assert {k.split(".")[0] for k in _weights(two)} == {"encoder", "old_encoder", "decoder"} | linear  # RecVAE's
    if model == "recvae-linear":
        B1, B2 = (np.load(run / "model" / "linear.npz")["B"] for run in (one, two))
        np.testing.assert_array_equal(B1, B2)


@pytest.mark.slow
def test_hybrid_two_processes_give_the_one_process_model(log_csv, tmp_path):
    """Mult-VAE with a linear path: rank 0 computes B and sends it, so both processes train with
    its bits; a learned w's gradient is summed as the network's are."""
    extra = ["--model", "multvae-linear", "--l2", "50", "--linear-weight-mode", "learned"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_train_args(["--data", str(log_csv)], one), *extra]) == 0
    _two_processes([*_train_args(["--data", str(log_csv)], two), *extra])
    diff = _assert_same_run(two, one)
    print(f"multvae-linear: max |w_2proc - w_1proc| = {diff:.2e}")
    assert "linear_weight" in _weights(two)
    B1, B2 = (np.load(run / "model" / "linear.npz")["B"] for run in (one, two))
    np.testing.assert_array_equal(B1, B2)


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(log_csv, reference, tmp_path):
    out = tmp_path / "nodes"
    with _Procs() as procs:
        for cmd in _two_agents(_free_port(), ["-m", "recvae", *_train_args(["--data", str(log_csv)], out)]):
            procs.start(cmd, env=_env(LOGLEVEL="INFO"))  # the agents' steps, shown should one hang
        results = procs.wait()
    assert [rc for rc, _ in results] == [0, 0], results
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_a_normal_two_node_exit_prints_no_trace_when_one_agent_is_late(log_csv, tmp_path):
    late = tmp_path / "late_agent.py"
    late.write_text(LATE_AGENT)
    out = tmp_path / "nodes"
    with _Procs() as procs:
        cmds = _two_agents(_free_port(), ["-m", "recvae", "-q", *_train_args(["--data", str(log_csv)], out)],
                           launcher=[sys.executable, str(late)])
        for cmd in cmds:
            procs.start(cmd, env=_env())
        results = procs.wait()
    assert [rc for rc, _ in results] == [0, 0], results
    second = results[1][1]
    assert "TCPStore" not in second and "frame #" not in second and "Traceback" not in second, second
    assert "test" in results[0][1]  # node 0 printed the metrics table


def _children(pid: int, word: bytes) -> list[int]:
    """The live processes whose parent is ``pid`` and whose command line holds ``word`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and word in (stat.parent / "cmdline").read_bytes() and _alive(int(stat.parent.name)):
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie that nobody reaps (an orphan's new parent may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc (Linux)")
def test_workers_stop_when_the_torchrun_agent_is_killed(log_csv, tmp_path):
    """SIGKILL cannot be forwarded: the workers notice their parent is gone and stop within seconds."""
    out = tmp_path / "orphans"
    workers: list[int] = []
    with _Procs() as procs:
        try:  # the workers run in sessions of their own (torchrun's choice): killed by pid below in any case
            agent = procs.start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "recvae",
                                 *_train_args(["--data", str(log_csv)], out), "--epochs", "100000"], env=_env())
            deadline = time.monotonic() + TIMEOUT_S
            while len(workers) != 2 or not (out / "run.json").exists():  # both joined, training begun
                assert agent.poll() is None and time.monotonic() < deadline, agent.poll()
                time.sleep(0.2)
                workers = _children(agent.pid, b"recvae")
            os.kill(agent.pid, signal.SIGKILL)
            killed = time.monotonic()
            while any(_alive(w) for w in workers) and time.monotonic() - killed < 20:
                time.sleep(0.1)
            stopped_in = time.monotonic() - killed
            left = [w for w in workers if _alive(w)]
        finally:
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGKILL)
        text, _ = agent.communicate(timeout=30)  # EOF: the workers, which share the agent's pipe, are gone
    print(f"both workers gone {stopped_in:.1f} s after the agent was killed")
    assert not left and stopped_in < 10, (stopped_in, text[-3000:])
    assert text.count("is gone: stopping this process") == 2, text[-3000:]  # one line each
    # each stops as on the SIGTERM torchrun would have forwarded (status 143), rather than on the
    # error of a collective whose peer stopped first
    assert text.count("recvae: stopped by SIGTERM") == 2 and "recvae: error:" not in text, text[-3000:]
    assert not (out / "model").exists()  # stopped mid-training: no final model written


REAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
# PR_SET_CHILD_SUBREAPER: the orphan is handed to this process, which can then wait for it
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
child = '''
import os, signal, sys, time
from recvae import distributed
if sys.argv[1] == "ignores-sigterm":  # a process that cannot stop on SIGTERM: the watch exits it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
distributed.watch_parent(poll_s=0.1, grace_s=1.0)
print(os.getpid(), flush=True)
time.sleep(60)
'''
parent = '''
import os, subprocess, sys
c = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(c.stdout.readline().strip(), flush=True)  # the child watches: die as SIGKILL leaves it
os.kill(os.getpid(), 9)
'''
p = subprocess.Popen([sys.executable, "-c", parent, child, sys.argv[1]], stdout=subprocess.PIPE, text=True)
orphan = int(p.stdout.readline())
p.wait()
died = time.monotonic()
try:
    pid, status = os.waitpid(orphan, 0)
finally:  # whatever happens, the orphan does not outlive this process
    try:
        os.kill(orphan, 9)
    except ProcessLookupError:
        pass
print(json.dumps({"parent": p.returncode, "after": time.monotonic() - died,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a subreaper (prctl) is Linux's")
@pytest.mark.parametrize("case", ["stops-on-sigterm", "ignores-sigterm"])
def test_watch_parent_stops_an_orphan(case):
    """The watch alone: its parent killed, a process gets SIGTERM; one that ignores it exits 143 anyway."""
    with _Procs() as procs:
        procs.start([sys.executable, "-c", REAPER, case], env=_env())
        [(rc, text)] = procs.wait(timeout=60)
    assert rc == 0, text
    result = json.loads(text.strip().splitlines()[-1])
    assert result["parent"] == -signal.SIGKILL
    if case == "stops-on-sigterm":
        assert result["signal"] == signal.SIGTERM and result["after"] < 3, result
    else:
        assert result["code"] == distributed.EXIT_PARENT_GONE == 143 and 1 <= result["after"] < 4, result
    assert text.count("is gone: stopping this process") == 1, text


FAILING_RANK = """
import os, sys
import recvae.models.vae as vae
from recvae.cli import main
if os.environ["RANK"] == "1":  # this process dies at its third update
    step, calls = vae.training_step, []
    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise SystemExit("rank 1 stops here")
        return step(*a, **k)
    vae.training_step = failing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_with_a_clear_message(log_csv, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "failed"
    start = time.monotonic()
    with _Procs() as procs:
        for cmd in _two_agents(_free_port(), [str(script), *_train_args(["--data", str(log_csv)], out)]):
            procs.start(cmd, env=_env(RECVAE_DIST_TIMEOUT="20"))
        results = procs.wait()
    assert all(rc != 0 for rc, _ in results), results
    errors = [line for _, text in results for line in text.splitlines() if line.startswith("recvae: error:")]
    assert len(errors) == 1, results  # rank 0's one line; rank 1 died
    assert errors[0].startswith("recvae: error: torch.distributed: ")
    assert "failed on rank 0 of 2; another process probably failed or stopped" in errors[0]
    assert time.monotonic() - start < TIMEOUT_S
    # died in epoch 1: the run's description and split (written before training) but no checkpoint,
    # history or model
    assert {p.name for p in out.glob("*")} <= {"run.json", "train.npz", "validation.npz", "test.npz", "seen.npz",
                                              "dropped_users.csv", "dropped_seen.npz"}


@pytest.mark.slow
def test_a_rank_that_cannot_reach_the_rendezvous(log_csv, tmp_path):
    out = tmp_path / "lonely"
    port = _free_port()  # nobody listens there
    env = _env(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               RECVAE_DIST_TIMEOUT="3")
    with _Procs() as procs:
        procs.start([sys.executable, "-m", "recvae", *_train_args(["--data", str(log_csv)], out)], env=env)
        [(rc, text)] = procs.wait()
    assert rc == 2, text
    # ours is the last line and the only one of ours; before it, torch's c10d logs its socket errors
    # from C++ (silenced by TORCH_CPP_LOG_LEVEL=FATAL)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("recvae:")] == lines[-1:], text
    assert lines[-1].startswith(f"recvae: error: torch.distributed: cannot join the process group at 127.0.0.1:{port} "
                               "(rank 1 of 2): "), text
    assert not out.exists()


# -- gradients inside a spawned gloo group ----------------------------------------------------
def _spawned(fn, nprocs=2, timeout=TIMEOUT_S, *args):
    port = _free_port()
    ctx = mp.spawn(fn, args=(nprocs, port, *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "spawned processes did not finish in time"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _init(rank, world, port):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _random_csr(n_users, n_items, seed) -> sp.csr_matrix:
    X = sp.random(n_users, n_items, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    X.data[:] = 1.0
    X[np.arange(n_users), np.arange(n_users) % n_items] = 1.0  # nobody empty
    X.sort_indices()
    return X


def _gradients_worker(rank, world, port):
    _init(rank, world, port)
    try:
        group = distributed.current()
        X = _random_csr(30, 40, seed=1)
        config = NetworkConfig(n_items=40, hidden_dims=(12,), latent_dim=5)
        for rows in (np.array([5, 2, 9, 11, 0, 7, 3]), np.array([4])):  # 4 + 3 users, then 1 + 0
            net = build_network(config, torch.Generator().manual_seed(0))
            batch = batch_of(X, rows, "cpu", group)
            assert batch.part == BatchPart.of(np.diff(X.indptr)[rows], *distributed.shard_bounds(len(rows), rank, world))
            if batch.n_rows:  # this process's share of the global batch's mean loss
                net.loss(batch, beta=0.3, generator=torch.Generator().manual_seed(5)).loss.mul(
                    batch.n_rows / len(rows)).backward()
            local = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}
            nbytes = distributed.allreduce_gradients(net.parameters())
            reduced = {n: p.grad for n, p in net.named_parameters()}
            assert nbytes == 4 * sum(p.numel() for p in net.parameters())

            # the one-process gradient of the whole batch, with the same random numbers
            ref = build_network(config, torch.Generator().manual_seed(0))
            ref.loss(batch_of(X, rows, "cpu", distributed.Group()), beta=0.3,
                     generator=torch.Generator().manual_seed(5)).loss.backward()
            assert set(reduced) == {n for n, _ in ref.named_parameters()}  # no parameter left out
            for name, p in ref.named_parameters():
                gathered = [torch.empty_like(p) for _ in range(world)]
                torch.distributed.all_gather(gathered, local[name])
                torch.testing.assert_close(reduced[name], sum(gathered), rtol=0, atol=1e-6)  # the sum of the shares
                torch.testing.assert_close(reduced[name], p.grad, rtol=1e-5, atol=1e-6)  # = the global batch's
                if len(rows) > 1 and name in ("input_weight", "output_weight"):  # a share alone differs
                    assert not torch.allclose(local[name], p.grad, atol=1e-6)

        # the Python API inside the caller's group: a resumed run continues to the same weights
        train, run_dir = _random_csr(60, 40, seed=2), Path(os.environ["DIST_TEST_TMP"]) / "resume"
        small = dict(hidden_dims=(8,), latent_dim=4, batch_size=8, random_state=0, device="cpu", precision="fp32")
        val = (train[:10], _random_csr(10, 40, seed=3) - train[:10].multiply(_random_csr(10, 40, seed=3)))
        MultVAE(**small, epochs=2).fit(train, val, callbacks=[ckpt(run_dir)])  # kept: resumed below
        resumed = MultVAE(**small, epochs=3).fit(train, val, callbacks=[ckpt(run_dir)], resume_from=resume(run_dir))
        # epochs 1-2 come from rank 0's checkpoint on every rank (rank 0's timings included)
        assert resumed.history_[:2] == json.loads((run_dir / "history.json").read_text())[:2]
        straight = MultVAE(**small, epochs=3).fit(train, val)
        for (name, a), b in zip(resumed.module_.state_dict().items(), straight.module_.state_dict().values()):
            assert torch.equal(a, b), name
        assert [h["val_ndcg@100"] for h in resumed.history_] == [h["val_ndcg@100"] for h in straight.history_]

        # more processes than users per batch: one line through the CLI, nothing written
        err = io.StringIO()
        out = Path(os.environ["DIST_TEST_TMP"]) / f"too-small-{rank}"
        with contextlib.redirect_stderr(err):
            rc = main(["-q", "train", "--data", os.environ["DIST_TEST_CSV"], "--batch-size", "1", "--out", str(out)])
        assert rc == 2
        assert err.getvalue().strip() == ("recvae: error: --batch-size: 1 users per update cannot be split over 2 "
                                          "processes; use at most 1 processes or larger batches")
        assert not out.exists()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_in_a_process_group_gradients_are_summed_resume_works_and_errors_are_one_line(log_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TEST_CSV", str(log_csv))
    monkeypatch.setenv("DIST_TEST_TMP", str(tmp_path))
    _spawned(_gradients_worker)


def test_outside_a_process_group_one_process_of_one():
    assert distributed.current() == distributed.Group(0, 1)
    assert distributed.current().is_main and not distributed.current().parallel
    assert distributed.broadcast_int(7) == 7
    assert [distributed.shard_bounds(7, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [distributed.shard_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
    assert BatchPart.of(np.array([3, 1, 4, 1]), 1, 3) == BatchPart(4, 1, 3, 9, 3, 8)


# -- prepared data ----------------------------------------------------------------------------
def _memory_mapped(a) -> bool:
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.mark.slow
def test_a_run_on_a_prepared_directory_equals_the_run_on_the_file(log_csv, reference, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert main(["-q", "prepare", "--data", str(log_csv), "--out", str(prepared)]) == 0
    assert "prepared 393 users x 200 items" in capsys.readouterr().out
    loaded = load_prepared(prepared)
    assert all(_memory_mapped(a) for a in (loaded.matrix.indptr, loaded.matrix.indices, loaded.matrix.data))
    original = read_interactions(log_csv)
    assert (loaded.matrix != original.matrix).nnz == 0
    np.testing.assert_array_equal(loaded.item_ids, original.item_ids)
    description = json.loads((prepared / "prepared.json").read_text())
    assert description["preprocessing"]["rating_threshold"] == 3.5 and description["nnz"] == original.nnz

    out = tmp_path / "run"
    assert main(_train_args(["--prepared", str(prepared)], out)) == 0
    a, b = _weights(out), _weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    data = json.loads((out / "run.json").read_text())["data"]  # the source and preprocessing, and where read
    assert data == dict(json.loads((reference / "run.json").read_text())["data"], prepared=str(prepared))


def test_prepared_directory_errors(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(["--prepared", str(tmp_path / "missing")], out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"recvae: error: --prepared {tmp_path / 'missing'}: not a prepared dataset (no prepared.json); "
        f"write one with `recvae prepare --data FILE --out {tmp_path / 'missing'}`")
    assert not out.exists()

    prepared = write_prepared(read_interactions(log_csv), tmp_path / "prepared")
    assert main(_train_args(["--prepared", str(prepared), "--min-user-interactions", "3"], out)) == 2
    assert capsys.readouterr().err.strip() == ("recvae: error: --prepared: the preprocessing was fixed by "
                                               "`recvae prepare`; drop --min-user-interactions")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a prepared dataset"):
        write_prepared(read_interactions(log_csv), other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    for text in ("one", "two"):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text(text)
    assert (target / "a").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or set-aside folder left
    ids = Interactions(sp.csr_matrix(np.eye(2, dtype=np.float32)), np.array(["x", "y"]), np.array([10, 20]))
    back = load_prepared(write_prepared(ids, tmp_path / "p"))
    assert list(back.user_ids) == ["x", "y"] and list(back.item_ids) == [10, 20]


EXIT_PROBE = """
import atexit, sys
import recvae.distributed  # as every command that can join a process group imports it
atexit.register(lambda: print("interpreter teardown ran", flush=True))
sys.argv = ["recvae", "datasets"]
from recvae.launch import main
main()
"""


@pytest.mark.slow
def test_a_torchrun_worker_leaves_without_the_interpreter_teardown():
    """Where C++ threads of torch and gloo, torn down at exit, can abort a rank that has
    finished (SIGABRT, which torchrun counts as a failure). What the command printed still
    arrives whole: the streams are flushed first (a pipe's stdout is block-buffered)."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    plain, worker = (subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, env=e,
                                    cwd=REPO, timeout=TIMEOUT_S)
                     for e in (env, dict(env, RANK="0", WORLD_SIZE="1")))
    assert plain.returncode == worker.returncode == 0, (plain.stderr, worker.stderr)
    assert plain.stdout.endswith("interpreter teardown ran\n") and "ml-1m" in plain.stdout
    assert worker.stdout == plain.stdout.replace("interpreter teardown ran\n", "")
