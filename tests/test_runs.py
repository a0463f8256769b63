"""The life of a run through the real `recvae train` command: kill and resume, SIGINT/SIGTERM,
--out protection, a non-finite loss, a missing plotting library."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recvae.cli import main
from recvae.models.networks import MultNetwork
from recvae.rundir import RunDir


def checkpoint_epoch(out):
    return RunDir(out).checkpoint_epoch()

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 10


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """360 users in 6 taste clusters over 120 string-id items."""
    rng = np.random.default_rng(7)
    rows = [(f"u{u}", f"m{i}", 5.0) for u in range(360)
            for i in rng.choice(np.arange(u % 6 * 20, u % 6 * 20 + 20), size=12, replace=False)]
    path = tmp_path_factory.mktemp("log") / "log.csv"
    pd.DataFrame(rows, columns=["uid", "iid", "stars"]).to_csv(path, index=False)
    return path


def train_argv(log_csv, out, *extra, epochs=EPOCHS):
    return ["-q", "train", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--n-heldout-users", "30", "--show", "0", "--hidden-dims", "16", "--latent-dim", "4",
            "--batch-size", "50", "--epochs", str(epochs), "--device", "cpu", "--precision", "fp32",
            "--out", str(out), *extra]


def recvae_cmd(argv):
    return [sys.executable, "-m", "recvae.cli", *argv]


def start(argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(recvae_cmd(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_epochs(proc, out: Path, n: int, timeout: float = 120.0) -> None:
    """Poll the run's checkpoint until it holds epoch ``n``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (checkpoint_epoch(out) or 0) >= n:
                return
        except (OSError, RuntimeError):
            pass  # not written yet
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"no {n} epochs within {timeout} s")


@pytest.fixture
def running():
    """Started subprocesses; killed at teardown whatever the outcome."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


@pytest.fixture(scope="module")
def straight(log_csv, tmp_path_factory):
    """An uninterrupted run: the reference for every resumed one."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_argv(log_csv, out)) == 0
    return out


def weights(run: Path) -> dict:
    return torch.load(run / "model" / "weights.pt", weights_only=True)


def assert_same_run(run: Path, reference: Path) -> None:
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert ma["ended"] == mb["ended"] == "completed"
    assert (ma["validation"]["metrics"], ma["test"]["metrics"]) == (mb["validation"]["metrics"], mb["test"]["metrics"])
    assert json.loads((run / "history.json").read_text())[-1]["epoch"] == EPOCHS
    names = {p.name for p in run.iterdir()}
    assert names == {p.name for p in reference.iterdir()} == {
        "model", "run.json", "train.npz", "seen.npz", "dropped_users.csv", "dropped_seen.npz", "validation.npz",
        "test.npz", "metrics.json", "history.csv", "history.json", "learning_curve.png"}, "the checkpoint goes when the run finishes"


# -- kill, resume -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(log_csv, tmp_path, straight, running):
    out = tmp_path / "run"
    proc = start(train_argv(log_csv, out), tmp_path)
    running.append(proc)
    wait_for_epochs(proc, out, 3)
    proc.kill()
    proc.wait(timeout=30)
    assert not (out / "metrics.json").exists() and 3 <= checkpoint_epoch(out) < EPOCHS
    # an unfinished run is not evaluated; it says how to go on
    proc = subprocess.run(recvae_cmd(["evaluate", str(out)]), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "has not finished" in proc.stderr and "--resume" in proc.stderr
    assert main(train_argv(log_csv, out, "--resume")) == 0
    assert_same_run(out, straight)


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so(straight, log_csv, capsys):
    before = (straight / "metrics.json").read_bytes()
    assert main(train_argv(log_csv, straight, "--resume")) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"recvae: --out {straight}: the run has finished (metrics.json, no checkpoint.pt): nothing to resume"
    assert (straight / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_other_data_or_model_settings_by_flag(straight, log_csv, tmp_path, capsys):
    cases = [("--split-seed", "1", "--split-seed: 0 in the run, now 1"),
             ("--dropout", "0.3", "--dropout: 0.5 in the run, now 0.3"),
             ("--min-user-interactions", "6", "--min-user-interactions: 5 in the run, now 6"),
             ("--seed", "4", "--seed: 0 in the run, now 4")]
    for flag, value, message in cases:
        assert main(train_argv(log_csv, straight, "--resume", flag, value)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.csv"
    other.write_bytes(log_csv.read_bytes())
    assert main(train_argv(other, straight, "--resume")) == 2
    assert f"--data: '{log_csv}' in the run, now '{other}'" in capsys.readouterr().err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_stops_with_one_line_and_the_resume_command(log_csv, tmp_path, straight, running, sig, code):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")  # an old run: --overwrite empties it, the resume command drops it
    argv = train_argv(log_csv, out, "--overwrite")
    proc = start(argv, tmp_path)
    running.append(proc)
    wait_for_epochs(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    epoch = checkpoint_epoch(out)  # a valid checkpoint of a finished epoch
    resume = shlex.join(["recvae", *[a for a in argv if a != "--overwrite"], "--resume"])
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert err.strip() == f"recvae: stopped by {name} after epoch {epoch} (checkpoint in {out}); resume with: {resume}"
    assert 2 <= epoch < EPOCHS and "Traceback" not in err
    if sig == signal.SIGTERM:  # the printed command finishes the run as if never stopped
        command = shlex.split(err.split("resume with: ")[1])
        assert command[0] == "recvae"
        assert main(command[1:]) == 0
        assert_same_run(out, straight)


# -- --out protection and validation before any write ------------------------------------------
def test_out_holding_files_is_refused_unless_overwrite(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"old")
    (out / "history.json").write_text("[]")
    argv = ["-q", "train", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--n-heldout-users", "50", "--show", "0", "--model", "popularity", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"recvae: error: --out {out}: the directory already holds files (checkpoint.pt, "
                           "history.json); pass --overwrite to replace them, or --resume to continue the run there")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.json"]
    assert main([*argv, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "checkpoint.pt" not in names and "history.json" not in names, "two runs mixed in one directory"
    assert json.loads((out / "model" / "model.json").read_text())["class"] == "Popularity"


def test_overwrite_empties_only_a_run_directory(log_csv, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(train_argv(log_csv, out, "--overwrite")) == 2
    assert "--overwrite empties only run directories" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["--dropout", "1"], "--dropout: expected a probability in [0, 1), got 1.0"),
    (["--seed", "-1"], "--seed: expected None or a non-negative integer, got -1"),
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0.0"),
    (["--min-user-interactions", "-1"], "--min-user-interactions: expected a non-negative integer, got -1"),
])
def test_bad_arguments_create_nothing(log_csv, tmp_path, capsys, extra, message):
    out = tmp_path / "new" / "run"
    assert main(train_argv(log_csv, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_resume_and_overwrite_need_out(log_csv, capsys):
    argv = train_argv(log_csv, "x", "--resume")
    argv[argv.index("--out"):argv.index("--out") + 2] = []
    assert main(argv) == 2
    assert "--resume: needs --out" in capsys.readouterr().err


# -- non-finite loss ------------------------------------------------------------------------------
def test_non_finite_loss_at_epoch_1_leaves_no_directory(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, "--lr", "1e30")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recvae: error: non-finite training loss at epoch 1, update ")
    assert err.endswith(f"with --lr 1e+30: no epoch had finished, nothing was learnt, nothing written to --out {out}; "
                        "lower --lr (e.g. --lr 1e+29) or try --precision fp32")
    assert "epoch 0" not in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_non_finite_loss_later_keeps_the_best_epoch_as_a_usable_run(log_csv, tmp_path, straight, monkeypatch,
                                                                    capsys):
    original = MultNetwork.loss
    calls = {"n": 0}
    updates_per_epoch = 6  # 300 training users in batches of 50

    def poisoned(self, batch, beta=1.0, generator=None, kl_weights=None):
        terms = original(self, batch, beta, generator, kl_weights)
        calls["n"] += 1
        if calls["n"] == 4 * updates_per_epoch + 3:  # epoch 5, update 27
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(MultNetwork, "loss", poisoned)
    out = tmp_path / "run"
    argv = train_argv(log_csv, out, "--lr", "0.001")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    history = json.loads((out / "history.json").read_text())
    kept = max(history, key=lambda h: h["val_ndcg@100"])["epoch"]
    resume = shlex.join(["recvae", *[a for a in argv if a not in ("--lr", "0.001")], "--resume", "--lr", "0.0005"])
    assert err == (f"recvae: error: non-finite training loss at epoch 5, update 27 with --lr 0.001; {out} holds the "
                   f"model of epoch {kept} (evaluate and recommend work on it); to go on from the checkpoint of "
                   f"epoch 4 with half the learning rate: {resume}")
    assert len(history) == 4 and checkpoint_epoch(out) == 4
    assert json.loads((out / "model" / "model.json").read_text())["best_epoch"] == kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ended"].startswith("non-finite training loss")
    assert main(["evaluate", str(out)]) == 0
    assert f"{metrics['test']['metrics']['ndcg@100']['mean']:.4f}" in capsys.readouterr().out
    monkeypatch.undo()
    # the advice works: the resume at half the rate finishes the run (no longer the straight one)
    assert main(shlex.split(resume)[1:]) == 0
    assert json.loads((out / "metrics.json").read_text())["ended"] == "completed"
    assert not (out / "checkpoint.pt").exists() and len(json.loads((out / "history.json").read_text())) == EPOCHS


# -- optional plotting library --------------------------------------------------------------------
@pytest.mark.slow
def test_train_without_matplotlib_warns_once_and_keeps_the_run(log_csv, tmp_path):
    out = tmp_path / "run"
    code = ("import sys; sys.modules['matplotlib'] = None; from recvae.cli import main; "
            f"sys.exit(main({train_argv(log_csv, out, epochs=2)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines.count("matplotlib is not installed: no learning_curve.png (pip install 'recvae[plot]')") == 1
    # besides it, only the small-sample notes of the validation and test tables (30 users each)
    assert [ln for ln in lines if not ln.startswith("matplotlib")] == [
        "evaluate: 30 held-out users (fewer than 50): the metrics and their standard errors say little; hold out "
        "more users (n_heldout_users) or use more data"] * 2
    names = {p.name for p in out.iterdir()}
    assert "metrics.json" in names and "model" in names and "learning_curve.png" not in names


@pytest.mark.slow
def test_keep_checkpoint_then_resume_with_more_epochs(log_csv, tmp_path, straight):
    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, "--keep-checkpoint", epochs=EPOCHS - 4)) == 0
    assert checkpoint_epoch(out) == EPOCHS - 4
    assert main(train_argv(log_csv, out, "--resume")) == 0
    assert_same_run(out, straight)


def test_train_on_parquet_without_pyarrow_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    path = tmp_path / "log.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["train", "--data", str(path), "--model", "popularity", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"recvae: error: {path}: reading Parquet need(s) the optional package pyarrow, which is not installed "
        "(pip install 'recvae[parquet]')")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_after_a_kill_during_evaluation_evaluates_the_saved_model(straight, log_csv, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "metrics.json").unlink()  # killed after the model was saved, before the metrics
    (out / "learning_curve.png").unlink()
    trained = (out / "history.json").stat().st_mtime_ns
    assert main(train_argv(log_csv, out, "--resume")) == 0
    assert (out / "history.json").stat().st_mtime_ns == trained, "trained again instead of evaluating the model"
    assert_same_run(out, straight)


def test_fewer_items_than_the_largest_cutoff_fails_before_training(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [(u, i) for u in range(200) for i in rng.choice(60, size=8, replace=False)]
    data = tmp_path / "small.csv"
    data.write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--rating-col", "none", "--epochs", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"recvae: error: {data}: 60 items after preprocessing, fewer than 100, "
                                               "the largest K of the metrics (Recall@K and NDCG@K at K = 20, 50, 100): "
                                               "a run needs at least 100 items")
    assert not out.exists()


@pytest.mark.slow
def test_resume_removes_the_temporary_file_a_kill_left_mid_write(log_csv, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, "--keep-checkpoint", epochs=2)) == 0
    stray = out / ".history.json.x1y2z3.tmp"  # what SIGKILL during an atomic write leaves
    stray.write_text("[")
    assert main(train_argv(log_csv, out, "--resume", epochs=3)) == 0
    assert not stray.exists()
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == 3
