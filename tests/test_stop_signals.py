"""SIGINT and SIGTERM where they still broke the promise of one line and 130 / 143 (issue 31:
8, 9): ``serve`` with one worker and with several, and any command once it has finished,
while the interpreter's exit hooks run (tqdm's monitor thread: a Ctrl-C there printed
'Exception ignored in atexit callback' and exit 0)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_runs import log_csv, train_argv  # noqa: E402,F401  (log_csv: the shared fixture)
from test_serve import free_port, run_dir  # noqa: E402,F401  (run_dir: the module's trained run)
from test_serve_edges import env, serve  # noqa: E402

pytestmark = pytest.mark.slow  # each starts a process that imports torch (and serves)

LINE = "recvae: stopped by {}; no output was left half-written"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stopped_by_a_signal_says_so_whatever_the_workers(run_dir, tmp_path, workers, sig):  # noqa: F811
    """One worker exited 0 without a line on SIGINT; two exited 0 on either signal."""
    log = tmp_path / "server.log"
    with serve(run_dir, log, "--workers", str(workers)) as (port, proc):
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    text = log.read_text()
    assert text.rstrip().splitlines()[-1] == LINE.format(signal.Signals(sig).name)
    assert "Traceback" not in text


EXIT_HOOK = ("import atexit, sys, time\n"
             "atexit.register(lambda: (sys.stderr.write('exit hooks\\n'), sys.stderr.flush(), time.sleep(30)))\n"
             "sys.argv = ['recvae', *sys.argv[1:]]\n"
             "from recvae.launch import main\n"
             "main()\n")


@pytest.mark.parametrize("command", ["datasets", "evaluate", "recommend", "train", "tune"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_exit_hooks_is_one_line(run_dir, log_csv, tmp_path, command, sig):  # noqa: F811
    """An exit hook that takes its time (as tqdm's monitor thread's join can), interrupted once
    the command has done its work."""
    data = ["--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--n-heldout-users", "30"]
    argv = {"datasets": ["datasets"],
            "evaluate": ["evaluate", str(run_dir)],
            "recommend": ["recommend", str(run_dir), "--all-users", "--k", "2", "--output", str(tmp_path / "r.csv")],
            "train": train_argv(log_csv, tmp_path / "run", epochs=1),
            "tune": ["-q", "tune", *data, "--model", "ease", "--trials", "2", "--out", str(tmp_path / "tuned")],
            }[command]
    proc = subprocess.Popen([sys.executable, "-c", EXIT_HOOK, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        lines = []
        while not lines or lines[-1] != "exit hooks\n":
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        proc.send_signal(sig)
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err == LINE.format(signal.Signals(sig).name) + "\n"
