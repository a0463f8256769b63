"""A shared machine and a full disk (issue 31): links planted by whoever may write a shared
folder, a lock file deleted or replaced under its writer, damaged studies, checkpoints and
prepared arrays, a full or read-only disk, and temporary files left by killed writers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from recvae.dbcheck import DamagedStudy, check_study
from recvae.recommend_files import check_output
from recvae.rundir import LOCK_FILE, RUN_JSON, STUDY_FILE, RunDir, RunLocked

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("the neighbour's file\n")
    return path


# -- (1) the lock file's symlink -----------------------------------------------------------------
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, victim):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to("../victim.txt")
    before = sha(victim)
    with pytest.raises(ValueError) as info:
        with RunDir(out).lock():
            pytest.fail("took a lock through a link")
    assert str(info.value) == (f"--out {out / LOCK_FILE}: is a symbolic link (to ../victim.txt); recvae never "
                               "writes through one: remove it")
    assert sha(victim) == before and (out / LOCK_FILE).is_symlink()


def test_a_dangling_lock_link_creates_nothing_where_it_points(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to("../planted.txt")
    with pytest.raises(ValueError, match="is a symbolic link"):
        with RunDir(out).lock():
            pass
    assert not (tmp_path / "planted.txt").exists()


def test_an_out_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(ValueError) as info:
        RunDir(tmp_path / "run").check_writable_for()
    assert str(info.value) == (f"--out {tmp_path / 'run'}: is a symbolic link (to {elsewhere}); recvae never writes "
                               "through one: give the directory it points to")
    with pytest.raises(ValueError, match="is a symbolic link"):
        with RunDir(tmp_path / "run").lock():
            pass
    assert list(elsewhere.iterdir()) == []


def test_a_model_folder_that_is_a_link_loses_no_file_where_it_points(tmp_path):
    """Taking the lock removes the temporaries of killed writes, in the run and its model folder:
    never in a folder that ``model`` links to."""
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / ".weights.pt.abcdefgh.tmp").write_text("not ours")
    (out / "model").symlink_to(outside)
    with RunDir(out).lock():
        pass
    assert (outside / ".weights.pt.abcdefgh.tmp").read_text() == "not ours"


# -- (2) path guards compare resolved paths -----------------------------------------------------
def test_output_through_a_linked_folder_onto_a_run_file_is_refused(tmp_path):
    run = tmp_path / "RUN"
    (run / "model").mkdir(parents=True)
    (run / RUN_JSON).write_text("{}")
    (run / "model" / "weights.pt").write_bytes(b"weights")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "m").symlink_to("../RUN/model")
    output = str(tmp_path / "p" / "m" / "weights.pt")
    with pytest.raises(ValueError) as info:
        check_output(output)
    assert str(info.value) == (f"--output {output}: is model/weights.pt of the run directory {run}; "
                               "choose a path outside the run's files")
    # a link at the output's own name, aimed at a run file, is refused the same way
    (tmp_path / "p" / "out.csv").symlink_to(run / "model" / "weights.pt")
    with pytest.raises(ValueError, match="is model/weights.pt of the run directory"):
        check_output(str(tmp_path / "p" / "out.csv"))


# -- (3) the lock holds against deletion and replacement ----------------------------------------
@contextlib.contextmanager
def held_elsewhere(out: Path):
    """``out`` held by another process (``RunDir.lock``) until the block ends."""
    code = ("import sys; from recvae.rundir import RunDir\n"
            f"with RunDir({str(out)!r}).lock():\n    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow  # another process imports recvae (seconds)
@pytest.mark.parametrize("meddle", ["delete", "replace"])
def test_the_lock_holds_when_its_file_is_deleted_or_replaced(tmp_path, meddle):
    out = tmp_path / "run"
    lock = out / LOCK_FILE
    with held_elsewhere(out) as pid:
        assert json.loads(lock.read_text())["pid"] == pid
        lock.unlink()
        if meddle == "replace":
            lock.write_text(json.dumps({"pid": 1, "host": "h", "started": "then", "command": "recvae x"}))
        with pytest.raises(RunLocked, match=f"--out {out}: another recvae is writing this run directory"):
            with RunDir(out).lock():
                pytest.fail("a second writer got in")
        with pytest.raises(RunLocked):  # --overwrite is refused before it would empty anything
            RunDir(out).check_writable_for(overwrite=True)
    # the first writer leaves the replacement alone (not its file); the directory is free again
    assert lock.exists() == (meddle == "replace")
    with RunDir(out).lock():
        pass


@pytest.mark.slow
def test_a_second_writer_is_told_the_holder_not_the_files_in_flight(tmp_path):
    """Two trains started in the same instant: the second saw the first's temporary file and
    advised --overwrite; it names the holder."""
    out = tmp_path / "run"
    with held_elsewhere(out) as pid:
        (out / ".train.npz.abcdefgh.tmp").write_bytes(b"in flight")
        with pytest.raises(RunLocked) as info:
            RunDir(out).check_writable_for()
        assert str(info.value).startswith(f"--out {out}: another recvae is writing this run directory (pid {pid} on ")
        assert "--overwrite" not in str(info.value)
    with RunDir(out).lock():  # the holder's own checks pass: it probes no lock it holds
        RunDir(out).check_writable_for(overwrite=True)


# -- (4) a damaged study database ----------------------------------------------------------------
@pytest.fixture
def study_db(tmp_path):
    path = tmp_path / STUDY_FILE
    with sqlite3.connect(path) as db:
        db.execute("create table trials(id integer primary key, value text)")
        db.execute("create index by_value on trials(value)")
        db.executemany("insert into trials(value) values (?)", [(f"trial {i} " * 8,) for i in range(2000)])
    return path


def test_a_whole_study_passes(study_db):
    check_study(study_db)
    check_study(study_db.parent / "absent.db")  # a new study: nothing to check


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[:1000], "damaged SQLite database (database disk image is malformed)"),
    (lambda b: b[:10], "damaged, not an SQLite database (truncated)"),
    (lambda b: b"", "damaged, not an SQLite database (an empty file)"),
    (lambda b: bytes(len(b)), "damaged, not an SQLite database (no SQLite header)"),
    (lambda b: random.Random(0).randbytes(len(b)), "damaged, not an SQLite database (no SQLite header)"),
])
def test_a_damaged_study_is_one_line_naming_it(study_db, damage, expected):
    study_db.write_bytes(damage(study_db.read_bytes()))
    with pytest.raises(DamagedStudy) as info:
        check_study(study_db)
    assert str(info.value) == f"{study_db}: {expected}; move it away (or --overwrite) to start the study again"


def test_two_flipped_bytes_in_a_study_are_found(study_db):
    data = study_db.read_bytes()
    rng = random.Random(1)
    found = 0
    for _ in range(40):
        hurt = bytearray(data)
        for _ in range(2):
            j = rng.randrange(100, len(hurt))  # past the header: the pages themselves
            hurt[j] ^= 0xFF
        study_db.write_bytes(bytes(hurt))
        try:
            check_study(study_db)
        except DamagedStudy as e:
            assert str(e).startswith(f"{study_db}: damaged SQLite database (")
            found += 1
    assert found >= 38  # integrity_check compares every index with its table: nearly every flip shows


def test_a_study_file_that_is_a_link_is_refused(tmp_path, study_db, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / STUDY_FILE).symlink_to(study_db)
    with pytest.raises(ValueError, match=f"--out {run / STUDY_FILE}: is a symbolic link"):
        RunDir(run).study_url()
    (run / STUDY_FILE).unlink()
    (run / (STUDY_FILE + "-journal")).symlink_to(victim)  # SQLite would write its journal there
    with pytest.raises(ValueError, match="-journal: is a symbolic link"):
        RunDir(run).study_url()


@pytest.mark.slow
def test_tune_resume_of_a_damaged_study_is_one_line_exit_2(tmp_path, capsys):
    """What printed a 90-line SQLAlchemy traceback, exit 1."""
    from recvae.cli import main

    log = tmp_path / "log.csv"
    log.write_text("user,item,rating\n" + "".join(f"u{u},i{(u * 7 + k) % 150},5\n" for u in range(300) for k in range(10)))
    out = tmp_path / "run"
    out.mkdir()
    (out / STUDY_FILE).write_bytes(b"SQLite format 3\x00" + bytes(4080))  # a zeroed database
    code = main(["-q", "tune", "--data", str(log), "--n-heldout-users", "20", "--out", str(out), "--model", "ease",
                 "--trials", "2", "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err == (f"recvae: error: {out / STUDY_FILE}: damaged SQLite database (file is not a database); "
                   "move it away (or --overwrite) to start the study again")
