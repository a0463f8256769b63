"""The run directory's one owner, through the real command line: one writer at a time, outputs
that cannot land on a run's files, temporary files at every depth, --overwrite that keeps a
user's files wherever they are, and stop messages that say what is on disk."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the fixture, shared)

from recvae import rundir as rundir_module
from recvae.cli import main
from recvae.rundir import LOCK_FILE, RunDir, RunLocked

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
pytestmark = pytest.mark.slow  # every test trains through the command line (2-20 s each)


def run_cli(argv, cwd, timeout=180):
    return subprocess.run([sys.executable, "-m", "recvae.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def finished(log_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(log_csv, out, epochs=EPOCHS)) == 0
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one writer at a time ------------------------------------------------------------------------
def test_two_trains_on_one_out_one_writes_the_other_is_refused(log_csv, tmp_path):
    out = tmp_path / "run"
    argv = [a for a in train_argv(log_csv, out, epochs=40) if a != "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "recvae.cli", *argv], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    by_code = {p.returncode: r for p, r in zip(procs, results)}
    assert sorted(by_code) == [0, 2], results
    won_out, lost_err = by_code[0][0], by_code[2][1]
    errors = [line for line in lost_err.splitlines() if line.startswith("recvae:")]  # beside the info lines
    assert len(errors) == 1 and f"--out {out}:" in errors[0] and "Traceback" not in lost_err
    assert "another recvae is writing this run directory (pid" in lost_err or "already holds files" in lost_err
    # the directory holds the results the winner printed
    test_ndcg = json.loads((out / "metrics.json").read_text())["test"]["metrics"]["ndcg@100"]
    printed = re.search(r"\| test \| 30 \| .* \| ([0-9.]+) ± ([0-9.]+) \|", won_out)
    assert printed and float(printed.group(1)) == pytest.approx(test_ndcg["mean"], abs=5e-5)
    assert not (out / LOCK_FILE).exists(), "the lock goes with its writer"


def test_a_held_lock_names_its_holder_and_a_dead_ones_is_taken_over(log_csv, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with RunDir(out).lock():
        assert main(train_argv(log_csv, out, epochs=1)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"recvae: error: --out {out}: another recvae is writing this run directory "
                              f"(pid {os.getpid()} on ")
        assert len(err.splitlines()) == 1
        with pytest.raises(RunLocked):
            with RunDir(out).lock():
                pass
    assert list(out.iterdir()) == []
    # a writer killed with SIGKILL leaves its lock file; flock died with it: taken over, with a note
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then", "command": "recvae x"}))
    assert main(train_argv(log_csv, out, epochs=1)) == 0
    assert "took over the lock of a command that is no longer running (pid 999999 on gone" in caplog.text
    assert not (out / LOCK_FILE).exists() and (out / "metrics.json").is_file()


# -- outputs never land on a run's files -----------------------------------------------------------
@pytest.mark.parametrize("target", ["model/weights.pt", "train.npz", "history.csv", "model/model.json"])
def test_recommend_output_onto_a_run_file_is_refused(finished, target, capsys):
    before = snapshot(finished)
    assert main(["recommend", str(finished), "--all-users", "--output", str(finished / target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"recvae: error: --output {finished / target}: is {target} of the run directory {finished}; "
                   "choose a path outside the run's files")
    assert snapshot(finished) == before
    # beside the run's files is the user's choice
    assert main(["-q", "recommend", str(finished), "--all-users", "--output", str(finished.parent / "top.csv")]) == 0


def test_train_or_tune_out_inside_a_run_is_refused(finished, log_csv, capsys):
    before = snapshot(finished)
    assert main(train_argv(log_csv, finished / "model", epochs=1)) == 2
    assert "is model of the run directory" in capsys.readouterr().err
    assert main(["-q", "tune", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col",
                 "stars", "--model", "ease", "--grid", "l2=10", "--n-heldout-users", "30",
                 "--out", str(finished / "model" / "x")]) == 2
    assert "is model/x of the run directory" in capsys.readouterr().err
    assert snapshot(finished) == before


# -- temporary files and the user's files at every depth ----------------------------------------
def test_resume_removes_temporaries_inside_model_and_overwrite_keeps_a_users_file_there(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, "--keep-checkpoint", epochs=2)) == 0
    stray = out / "model" / ".weights.pt.k1l2m3.tmp"  # what SIGKILL during the model save leaves
    stray.write_bytes(b"half")
    assert main(train_argv(log_csv, out, "--resume", epochs=3)) == 0
    assert not stray.exists()
    mine = out / "model" / "notes.txt"
    mine.write_text("mine")
    assert main(train_argv(log_csv, out, "--overwrite", epochs=1)) == 2
    assert ("--overwrite empties only run directories, and this one holds other files (model/notes.txt)"
            in capsys.readouterr().err)
    assert mine.read_text() == "mine"
    assert main(train_argv(log_csv, out, "--resume", epochs=4)) == 2
    assert "holds files that are not the run's (model/notes.txt)" in capsys.readouterr().err


# -- stop messages say what is on disk --------------------------------------------------------------
def interrupt_when(monkeypatch, target, name, predicate=lambda *a, **k: True):
    original = getattr(target, name)

    def stop(*a, **k):
        if predicate(*a, **k):
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(target, name, stop)


def test_stop_during_the_plot_says_the_metrics_are_written_and_resume_draws_it(log_csv, tmp_path, capsys,
                                                                               monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    argv = train_argv(log_csv, out, epochs=2)
    interrupt_when(monkeypatch, RunDir, "draw_learning_curve")
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    resume = shlex.join(["recvae", *argv, "--resume"])
    assert err == (f"recvae: stopped by SIGINT after the metrics were written ({out} holds the finished run), "
                   f"before the learning curve was drawn; draw it with: {resume}")
    assert (out / "metrics.json").is_file() and not (out / "learning_curve.png").exists()
    monkeypatch.undo()
    metrics = (out / "metrics.json").read_bytes()
    assert main([*argv, "--resume"]) == 0
    assert "nothing to resume; drew the learning curve it lacked" in capsys.readouterr().err
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "metrics.json").read_bytes() == metrics


def test_stop_before_run_json_suggests_a_command_that_works(log_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = train_argv(log_csv, out, epochs=1)
    interrupt_when(monkeypatch, rundir_module, "write_json", lambda path, *a, **k: Path(path).name == "run.json")
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    again = shlex.join(["recvae", *argv, "--overwrite"])
    assert err == (f"recvae: stopped by SIGINT while {out} was being set up (no run.json yet, nothing trained); "
                   f"start again with: {again}")
    assert (out / "train.npz").is_file() and not (out / "run.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 2  # what the old message advised: refused, saying what works
    assert "it holds only run files, so --overwrite starts it again" in capsys.readouterr().err
    assert main(shlex.split(again)[1:]) == 0 and (out / "metrics.json").is_file()


def test_tune_stopped_during_its_final_write_leaves_only_its_trials_and_says_so(log_csv, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "tuned"
    argv = ["-q", "tune", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", "ease", "--grid", "l2=10,100", "--n-heldout-users", "30", "--out", str(out)]
    interrupt_when(monkeypatch, RunDir, "write_tuning")
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"recvae: stopped by SIGINT during the trials; --out {out} holds the study with 2 finished trial(s); "
        f"continue with: recvae {' '.join(argv)} --resume")
    assert [p.name for p in out.iterdir()] == ["study.db"]  # no half-written run, the trials kept
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert (out / "tuning.csv").is_file() and (out / "metrics.json").is_file()
    # with --overwrite a stop in the final write leaves the new search's trials only
    interrupt_when(monkeypatch, RunDir, "write_tuning")
    assert main([*argv, "--overwrite"]) == 130
    assert "holds the study with 2 finished trial(s)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["study.db"]


def test_a_signal_inside_the_checkpoint_write_keeps_the_epoch_and_its_history_in_step(log_csv, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    argv = train_argv(log_csv, out, epochs=EPOCHS)
    original = torch.save
    calls = {"n": 0}

    def save_and_signal(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls["n"] += 1
            if calls["n"] == 3:  # SIGINT lands in the middle of epoch 3's checkpoint
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        return original(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_and_signal)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recvae: stopped by SIGINT after epoch 3 (checkpoint in {out}); resume with: ")
    history = json.loads((out / "history.json").read_text())
    assert RunDir(out).checkpoint_epoch() == 3 == history[-1]["epoch"] == len(history)
    assert len((out / "history.csv").read_text().splitlines()) == 4
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == EPOCHS
