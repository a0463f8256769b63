"""SIGINT and SIGTERM in every command, not only `train`: one line, exit 130 / 143, no
temporary file left; a resumed run reports the training time of all its segments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the shared fixture)

from recvae.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(log_csv, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("sig") / "run"
    assert main(train_argv(log_csv, out, epochs=2)) == 0
    return out


def test_ctrl_c_in_evaluate_is_one_line_and_130(run, capsys, monkeypatch):
    import recvae.evaluation

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recvae.evaluation, "evaluate", interrupted)
    assert main(["evaluate", str(run)]) == 130
    assert capsys.readouterr().err.strip() == "recvae: stopped by SIGINT; no output was left half-written"


SLOW_RECOMMEND = """
import sys, time
import recvae.recommend as r
original = r.RunRecommender.recommend
def slow(self, *a, **k):
    time.sleep(0.2)
    return original(self, *a, **k)
r.RunRecommender.recommend = slow
from recvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_during_recommend_all_users_leaves_no_file(run, tmp_path, sig, code, name):
    target = tmp_path / "all.csv"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RECOMMEND, "recommend", str(run), "--all-users",
                             "--batch-size", "5", "--output", str(target)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"recvae: stopped by {name}; no output was left half-written"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "neither the table nor its temporary file"


@pytest.mark.slow
def test_a_resumed_run_reports_the_time_of_all_its_segments(log_csv, tmp_path, capsys):  # noqa: F811
    import torch

    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, "--keep-checkpoint", epochs=3)) == 0
    # the first segment's epochs are given 100 s each, so that only their count decides the total
    # (the two segments' own set-up times differ from run to run)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(ckpt["history"]) == 3
    for row in ckpt["history"]:
        row.update(seconds=100.0, val_seconds=0.0)
    torch.save(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(train_argv(log_csv, out, "--resume", epochs=5)) == 0
    history = json.loads((out / "history.json").read_text())
    total = json.loads((out / "metrics.json").read_text())["train_seconds"]
    assert [h["seconds"] for h in history[:3]] == [100.0] * 3
    resumed = sum(h["seconds"] + (h["val_seconds"] or 0) for h in history[3:])
    assert len(history) == 5 and 300 + resumed <= total < 300 + 60  # each earlier epoch counted once
    assert f"trained in {total:.1f} s" in capsys.readouterr().out


@pytest.mark.slow
def test_a_redirected_train_log_is_plain_lines_one_per_epoch(log_csv, tmp_path):  # noqa: F811
    argv = [a for a in train_argv(log_csv, tmp_path / "run", epochs=30) if a != "-q"]
    proc = subprocess.run([sys.executable, "-m", "recvae.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "\r" not in log and "\x1b" not in log, "no progress-bar control characters in a log file"
    epoch_lines = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 30 and epoch_lines[0].startswith("epoch 1/30, loss ")
    assert "validation NDCG@100" in epoch_lines[-1] and "beta" in epoch_lines[-1]
    assert len(log.splitlines()) <= 30 + 25
    # -q after the command: only the results
    quiet = subprocess.run([sys.executable, "-m", "recvae.cli", *argv[:-2], "--out", str(tmp_path / "q"), "-q"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert quiet.returncode == 0 and not [line for line in quiet.stderr.splitlines() if line.startswith("epoch ")]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.6, 1.2])
def test_ctrl_c_while_the_command_is_starting_is_one_line(log_csv, tmp_path, delay):  # noqa: F811
    """Imports (numpy, torch) take the first second or two; an interrupt there is one line, not an
    ImportError's traceback or torch's exit-time statistics."""
    proc = subprocess.Popen([sys.executable, "-m", "recvae", *train_argv(log_csv, tmp_path / "run", epochs=2)],  # -q
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # this machine was fast: the run finished before the signal
        return
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("recvae: stopped by SIGINT"), err
    assert "Traceback" not in err and "FakeTensor" not in out + err
