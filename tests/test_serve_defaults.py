"""`recvae serve`'s defaults: one worker per available core with one torch thread each on the CPU
(the fastest measured, benchmarks/results/serving.md), one worker on CUDA; and the choices of
``--unknown-users``. uvicorn is replaced by a recorder here: what the command would start is
checked without starting it (tests/test_serve.py starts real servers)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import torch  # noqa: E402

import recvae.serve.server as server  # noqa: E402
from recvae.cli import main  # noqa: E402
from recvae.errors import ParameterError  # noqa: E402
from recvae.serve import ENV, UNKNOWN_USERS, create_app, run_server  # noqa: E402
from recvae.serve.settings import MAX_DEFAULT_WORKERS, available_cores, serving_layout  # noqa: E402

from test_recommend_cli import make_log  # noqa: E402
from test_serve import free_port  # noqa: E402


@pytest.mark.parametrize("cores, cuda, given, layout", [
    (2, False, {}, (2, 1)),  # this machine: 2 workers x 1 thread (2,999 req/s against 1,883 for 1 worker)
    (1, False, {}, (1, 1)),
    (4, False, {}, (4, 1)),
    (16, False, {}, (8, 1)),  # at most 8 workers: each holds the model; the cores left, 1 each for the loop
    (32, False, {}, (8, 3)),
    (2, True, {}, (1, 1)),  # CUDA: one worker, one model in GPU memory
    (16, True, {}, (1, 15)),
    (2, False, {"workers": 1}, (1, 1)),  # the default before
    (8, False, {"workers": 1}, (1, 7)),
    (2, False, {"threads": 2}, (2, 2)),
    (8, True, {"workers": 3}, (3, 1)),
])
def test_the_defaults_resolve_to_one_worker_per_core_or_one_on_cuda(cores, cuda, given, layout):
    assert MAX_DEFAULT_WORKERS == 8
    assert serving_layout(cores, cuda, **given) == layout


def test_the_cores_are_those_this_process_may_use():
    assert available_cores() == len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("defaults")
    make_log(int_ids=False).to_csv(folder / "log.csv", index=False)
    assert main(["-q", "train", "--data", str(folder / "log.csv"), "--user-col", "uid", "--item-col", "iid",
                 "--rating-col", "stars", "--model", "popularity", "--n-heldout-users", "10", "--show", "0",
                 "--out", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture
def started(monkeypatch):
    """What `recvae serve` hands uvicorn, instead of serving: ``[(app, options, torch threads)]``;
    the environment and torch's threads of this process restored afterwards."""
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options, torch.get_num_threads())))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def serve(run_dir, *extra) -> int:
    return main(["-q", "serve", str(run_dir), "--port", str(free_port()), *extra])


def test_no_options_on_two_cores_start_two_workers_of_one_thread(run_dir, started, monkeypatch):
    monkeypatch.setattr(server, "available_cores", lambda: 2)
    assert serve(run_dir, "--unknown-users", "popular") == 0
    [(app, options, _)] = started
    assert app == "recvae.serve:app_from_env" and options["factory"] and options["workers"] == 2
    assert os.environ[ENV["threads"]] == "1" and os.environ[ENV["unknown_users"]] == "popular"


def test_one_core_or_cuda_serve_the_run_loaded_in_this_process(run_dir, started, monkeypatch):
    monkeypatch.setattr(server, "available_cores", lambda: 1)
    assert serve(run_dir) == 0
    monkeypatch.setattr(server, "available_cores", lambda: 4)
    monkeypatch.setattr(server, "on_cuda", lambda model: True)
    assert serve(run_dir) == 0
    (one, options, threads), (cuda, cuda_options, cuda_threads) = started
    assert "workers" not in options and "workers" not in cuda_options  # the application itself: one worker
    assert one.fastapi.state.run.run_dir == cuda.fastapi.state.run.run_dir == run_dir
    assert (threads, cuda_threads) == (1, 3)  # the cores less one for the event loop


def test_explicit_workers_and_threads_are_kept(run_dir, started, monkeypatch):
    monkeypatch.setattr(server, "available_cores", lambda: 2)
    assert serve(run_dir, "--workers", "1") == 0
    assert serve(run_dir, "--workers", "3", "--threads", "2") == 0
    (one, _, threads), (many, options, _) = started
    assert not isinstance(one, str) and threads == 1
    assert many == "recvae.serve:app_from_env" and options["workers"] == 3 and os.environ[ENV["threads"]] == "2"


def test_unknown_users_takes_404_or_popular(run_dir, capsys):
    from recvae.cli.serve import UNKNOWN_USERS as WRITTEN_OUT

    assert WRITTEN_OUT == UNKNOWN_USERS == ("404", "popular")
    with pytest.raises(SystemExit) as stop:
        serve(run_dir, "--unknown-users", "maybe")
    assert stop.value.code == 2
    assert "argument --unknown-users: invalid choice: 'maybe' (choose from '404', 'popular')" in capsys.readouterr().err
    message = "unknown_users maybe: expected one of 404, popular"
    with pytest.raises(ParameterError, match=f"^{message}$"):
        create_app(run_dir, unknown_users="maybe")
    with pytest.raises(ParameterError, match=f"^{message}$"):
        run_server(run_dir, port=free_port(), unknown_users="maybe")


def test_the_help_says_each_worker_loads_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "each loads the model and the run's histories once, so memory grows with them" in text
    assert "one per CPU core available, at most 8, with 1 torch thread each" in text
