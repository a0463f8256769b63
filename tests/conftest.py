"""Shared fixtures. Real MovieLens checks read the data directory resolved like the library does:
$RECVAE_DATA (CI points it at ../shared/data), else ../shared/data beside the repository.
The cache of preprocessed data goes to a scratch folder ($RECVAE_CACHE), never the data folder.
Synthetic data: ``data`` (a planted-cluster matrix and a fold-in split, tests/synthetic.py) and
``log_csv`` (an interaction file for the command line); a test module may define its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthetic import fold_in_split, planted

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    candidates = [os.environ.get("RECVAE_DATA"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "ml-100k" / "u.data").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session", autouse=True)
def threads_per_worker():
    """Under pytest-xdist (`-n 2`, the README's command) the workers share the cores: each, and
    every command it starts, takes its share of threads. Two torch thread pools on one core do
    not share it, they fight over it: their spinning threads made a training 20x slower on this
    2-core machine when two jobs of 2 threads each ran at once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    import torch

    share = str(max(1, (os.cpu_count() or 1) // workers))
    before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = share  # the commands the tests start (train, serve, torchrun)
    torch.set_num_threads(int(share))
    yield
    torch.set_num_threads(before[0])
    if before[1] is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before[1]


@pytest.fixture(scope="session", autouse=True)
def sigint_as_in_a_terminal():
    """The signal tests send SIGINT to commands (in this process and in children): a suite started
    as a background job of a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored,
    which its children inherit too, and a Ctrl-C would then stop nothing. Restore the default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def cache_outside_the_data(tmp_path_factory):
    """The suite never writes into a data folder it reads (CI's ../shared/data stays untouched):
    the cache of preprocessed data goes to a scratch folder for the session, for this process
    and the commands it starts ($RECVAE_CACHE). A test of the default (beside the data) unsets it."""
    previous = os.environ.get("RECVAE_CACHE")
    os.environ["RECVAE_CACHE"] = str(tmp_path_factory.mktemp("recvae-cache"))
    yield Path(os.environ["RECVAE_CACHE"])
    if previous is None:
        os.environ.pop("RECVAE_CACHE", None)
    else:
        os.environ["RECVAE_CACHE"] = previous


@pytest.fixture
def cache_beside_the_data(monkeypatch):
    """The library's default cache folder, ``<data dir>/.recvae-cache``, for a test of it (on a
    scratch data folder)."""
    monkeypatch.delenv("RECVAE_CACHE", raising=False)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder holding real MovieLens files; skips the test with the reason when absent."""
    d = _real_data_dir()
    if d is None:
        pytest.skip("real MovieLens data not found: set RECVAE_DATA or place ../shared/data beside the repo")
    return d


@pytest.fixture
def one_thread():
    """Small networks train many times faster on one thread than on two of a shared machine
    (torch's thread pool waits cost more than the work); the number of threads is restored after
    the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    """400 users in 4 planted clusters over 60 items (8 items each): 300 training users, and the
    last 100 split into fold-in (4 items) and held-out rows."""
    X = planted()
    return X[:300], fold_in_split(X[300:])


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """240 users in 6 taste clusters over 120 string-id items; ratings 1-5 (kept when > 3.5)."""
    rng = np.random.default_rng(7)
    rows = []
    for u in range(240):
        cluster = u % 6
        liked = rng.choice(np.arange(cluster * 20, cluster * 20 + 20), size=12, replace=False)
        noise = rng.choice(120, size=3, replace=False)
        for i in liked:
            rows.append((f"u{u}", f"m{i}", 5.0))
        for i in noise:
            rows.append((f"u{u}", f"m{i}", float(rng.choice([1, 2, 4]))))
    path = tmp_path_factory.mktemp("log") / "log.csv"
    pd.DataFrame(rows, columns=["uid", "iid", "stars"]).to_csv(path, index=False)
    return path
