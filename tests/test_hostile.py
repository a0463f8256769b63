"""A shared machine and a full disk (issue 31): links planted by whoever may write a shared
folder, a lock file deleted or replaced under its writer, damaged studies, checkpoints and
prepared arrays, a full or read-only disk, and temporary files left by killed writers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the fixture, shared)

from recvae.data import Interactions
from recvae.data.prepared import load_prepared, write_prepared
from recvae.dbcheck import DamagedStudy, check_study
from recvae.fileio import atomic_write, ensure_writable_dir, read_torch, write_bytes
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
    assert str(info.value) == (f"out {out / LOCK_FILE}: is a symbolic link (to ../victim.txt); recvae never "
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
    assert str(info.value) == (f"out {tmp_path / 'run'}: is a symbolic link (to {elsewhere}); recvae never writes "
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
    assert str(info.value) == (f"output {output}: is model/weights.pt of the run directory {run}; "
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
        with pytest.raises(RunLocked, match=f"out {out}: another recvae is writing this run directory"):
            with RunDir(out).lock():
                pytest.fail("a second writer got in")
        with pytest.raises(RunLocked):  # --overwrite is refused before it would empty anything
            RunDir(out).check_writable_for(overwrite=True)
    # the first writer leaves the replacement alone (not its file); the directory is free again
    assert lock.exists() == (meddle == "replace")
    with RunDir(out).lock():
        pass


def test_where_a_directory_cannot_be_locked_the_lock_file_is(tmp_path, monkeypatch):
    """NFS: flock on a directory's descriptor fails (EBADF); one writer at a time all the same."""
    import stat

    from recvae import locking

    real_flock = fcntl.flock

    def flock(fd, op):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, op)

    monkeypatch.setattr(locking.fcntl, "flock", flock)
    out = tmp_path / "run"
    with RunDir(out).lock():
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"\\(pid {os.getpid()} on "):
            with RunDir(out).lock():
                pytest.fail("a second writer got in")
        RunDir(out).check_writable_for(overwrite=True)  # the probe cannot tell here: the hold decides
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_writer_is_told_the_holder_not_the_files_in_flight(tmp_path):
    """Two trains started in the same instant: the second saw the first's temporary file and
    advised --overwrite; it names the holder."""
    out = tmp_path / "run"
    with held_elsewhere(out) as pid:
        (out / ".train.npz.abcdefgh.tmp").write_bytes(b"in flight")
        with pytest.raises(RunLocked) as info:
            RunDir(out).check_writable_for()
        assert str(info.value).startswith(f"out {out}: another recvae is writing this run directory (pid {pid} on ")
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
    assert str(info.value) == f"{study_db}: {expected}; move it away (or overwrite) to start the study again"


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
    with pytest.raises(ValueError, match=f"out {run / STUDY_FILE}: is a symbolic link"):
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


def _sqlite_error(pragma: str, statement: str) -> sqlite3.Error:
    """A real SQLite error: a database capped at two pages is full, a query_only one read-only."""
    db = sqlite3.connect(":memory:")
    db.execute("create table t(a)")
    db.execute(pragma)
    try:
        db.executemany(statement, [("x" * 1000,)] * 100)
    except sqlite3.Error as e:
        return e
    finally:
        db.close()
    raise AssertionError("no error")


@pytest.mark.parametrize("pragma, cause", [
    ("pragma max_page_count=2", "no space left on the device, or the quota is exceeded (SQLITE_FULL)"),
    ("pragma query_only=1", "the file system or the file is read-only (SQLITE_READONLY)"),
])
def test_a_full_disk_under_the_study_is_one_line_exit_2(tmp_path, monkeypatch, capsys, pragma, cause):
    """SQLite's 'database or disk is full', wrapped by SQLAlchemy deep in Optuna, was a traceback."""
    import sqlalchemy.exc

    from recvae import tuning
    from recvae.cli import main

    orig = _sqlite_error(pragma, "insert into t values(?)")

    def full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, orig)

    monkeypatch.setattr(tuning, "tune", full)
    log = tmp_path / "log.csv"
    log.write_text("user,item,rating\n" + "".join(f"u{u},i{(u * 7 + k) % 150},5\n" for u in range(300) for k in range(10)))
    out = tmp_path / "run"
    code = main(["-q", "tune", "--data", str(log), "--n-heldout-users", "20", "--out", str(out), "--model", "ease",
                 "--trials", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"recvae: error: {out / STUDY_FILE}: cannot write the study: {cause}; "
                                               "the trials it records are intact: --resume continues once there is room")


# -- (5) a full disk, an exceeded quota, a read-only file system --------------------------------
class FullDisk(io.RawIOBase):
    """A file that takes ``limit`` bytes, then fails as a full disk does with ``code`` (what
    torch's writer meets: it wraps the OSError in a RuntimeError)."""

    def __init__(self, f, limit: int, code: int):
        self.f, self.n, self.limit, self.code = f, 0, limit, code

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        if self.n > self.limit:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(b)


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on the device (ENOSPC)"),
                                         (errno.EDQUOT, "the disk quota is exceeded (EDQUOT)"),
                                         (errno.EROFS, "the file system is read-only (EROFS)")])
def test_a_full_disk_is_one_line_naming_the_file_and_the_cause(tmp_path, code, cause):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")

    with pytest.raises(OSError) as info:
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(1000)}, FullDisk(f, 100, code)))
    assert str(info.value) == (f"{target}: cannot write it: {cause}; the file it would replace and everything "
                               "written before are intact")
    assert info.value.errno == code
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_of_train_is_one_line_and_loses_nothing(log_csv, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """The second epoch's checkpoint meets a full disk (torch's writer reports it as a
    RuntimeError 'unexpected pos'): one line, exit 2; the first epoch's checkpoint is whole and
    --resume with room finishes the run."""
    from recvae.cli import main

    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        return real_save(obj, FullDisk(f, 4096, errno.ENOSPC) if len(calls) == 2 else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(train_argv(log_csv, out, epochs=3)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"recvae: error: {out / 'checkpoint.pt'}: cannot write it: no space left on the device (ENOSPC); "
                   "the file it would replace and everything written before are intact"), err
    assert read_torch(out / "checkpoint.pt", "checkpoint")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(train_argv(log_csv, out, "--resume", epochs=3)) == 0
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("real", [True, False])
def test_a_read_only_file_system_is_named_as_such(tmp_path, monkeypatch, real):
    """A real read-only mount where the machine has one of the usual ones, else the flag injected."""
    if real:
        folder = next((Path(p) for p in ("/sys", "/proc/sys", "/usr") if os.path.isdir(p)
                       and os.statvfs(p).f_flag & os.ST_RDONLY), None)
        if folder is None:
            pytest.skip("none of /sys, /proc/sys, /usr is a read-only mount on this machine")
    else:
        folder = tmp_path
        real_statvfs = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda p: type("V", (), {"f_flag": real_statvfs(p).f_flag | os.ST_RDONLY}))
        monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK)
    with pytest.raises(PermissionError) as info:
        ensure_writable_dir(folder)
    assert str(info.value) == f"the directory {folder} is not writable: it is on a read-only file system; choose another"


@pytest.mark.slow
def test_train_onto_a_small_file_system_is_one_line(tmp_path, capsys):
    """A real full disk: $RECVAE_TEST_SMALL_FS names a folder on a file system of a few MB (e.g.
    a tmpfs mounted with size=2m); mounting one needs privileges the tests do not assume."""
    small = os.environ.get("RECVAE_TEST_SMALL_FS")
    if not small:
        pytest.skip("set RECVAE_TEST_SMALL_FS to a folder on a file system of a few MB (mounting one needs root)")
    from recvae.cli import main

    log = tmp_path / "log.csv"
    log.write_text("user,item,rating\n" + "".join(f"u{u},i{(u * 7 + k) % 3000},5\n" for u in range(3000) for k in range(20)))
    out = Path(small) / f"run-{os.getpid()}"
    code = main(["-q", "train", "--data", str(log), "--n-heldout-users", "100", "--epochs", "2", "--hidden-dims", "600",
                 "--latent-dim", "200", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot write it: no space left on the device (ENOSPC)" in err and "Traceback" not in err


def test_a_not_writable_output_folder_has_no_data_hint(tmp_path, capsys):
    """--out / --output errors ended with '(data_dir= or $RECVAE_DATA for data)'."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as info:
            ensure_writable_dir(folder)
        assert str(info.value) == f"the directory {folder} is not writable; choose another"
        with pytest.raises(PermissionError) as info:
            RunDir(folder / "run").lock().__enter__()
        assert str(info.value) == f"out {folder / 'run'}: cannot create the directory {folder / 'run'}: {folder} is not writable"
    finally:
        folder.chmod(0o755)


# -- (6) the checkpoint's and a prepared directory's digests -------------------------------------
def _tensor_record(data: bytes) -> tuple[int, int]:
    """(start, size) of the largest tensor record of a torch.save archive."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    n, e = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + e, info.file_size


def test_a_flipped_byte_inside_a_checkpoints_tensor_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "w": torch.arange(256, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    start, size = _tensor_record(bytes(data))
    data[start + size // 2] ^= 0x01  # torch alone loads this as another number
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        read_torch(path, "checkpoint")
    assert str(info.value).startswith(f"{path}: damaged checkpoint: the record ")
    assert str(info.value).endswith(" differs from the CRC-32 written with it")


@pytest.mark.slow
def test_every_flipped_bit_of_a_checkpoint_is_refused_or_changes_nothing(tmp_path):
    payload = {"epoch": 2, "w": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
               "opt": {"state": {0: {"step": torch.tensor(3.0)}}}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = tmp_path / "checkpoint.pt"
    for j in range(len(data)):
        hurt = bytearray(data)
        hurt[j] ^= 1 << (j % 8)
        path.write_bytes(bytes(hurt))
        try:
            got = read_torch(path, "checkpoint")
        except ValueError:
            continue
        assert got["epoch"] == 2 and torch.equal(got["w"], payload["w"]), f"byte {j} accepted changed"
        assert torch.equal(got["opt"]["state"][0]["step"], payload["opt"]["state"][0]["step"])


@pytest.fixture
def prepared(tmp_path):
    m = np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32)
    import scipy.sparse as sp

    return write_prepared(Interactions(sp.csr_matrix(m), np.array([10, 20]), np.array([7, 8, 9])),
                          tmp_path / "prepared")


def test_a_reversed_item_ids_file_of_a_prepared_directory_is_refused(prepared):
    assert load_prepared(prepared).item_ids.tolist() == [7, 8, 9]
    np.save(prepared / "item_ids.npy", np.array([9, 8, 7]))  # the right shape and kind: only a digest tells
    with pytest.raises(ValueError) as info:
        load_prepared(prepared)
    assert str(info.value).startswith(f"{prepared / 'item_ids.npy'}: damaged or replaced: its SHA-256 ")
    assert str(info.value).endswith(f"recorded in prepared.json; write it again with `recvae prepare --data FILE "
                                    f"--out {prepared}`")


def test_a_prepared_directory_without_digests_loads_with_a_warning(prepared, caplog):
    d = json.loads((prepared / "prepared.json").read_text())
    del d["files"]
    (prepared / "prepared.json").write_text(json.dumps(d))
    assert load_prepared(prepared).n_items == 3
    assert "records no SHA-256 of its arrays (an older recvae wrote it): not verified" in caplog.text


# -- (7) temporary files of outputs --------------------------------------------------------------
def test_the_next_write_removes_a_dead_writers_temporary_only(tmp_path, victim):
    out = tmp_path / "recs.csv"
    stale = tmp_path / ".recs.csv.k1ll3d00.tmp"  # what a SIGKILLed `recommend --output` left
    stale.write_bytes(b"x" * 4096)
    live = tmp_path / ".recs.csv.w0rk1ng0.tmp"  # a writer still at work holds its flock
    live.write_bytes(b"in progress")
    other = tmp_path / ".recs.csv.x.abcdefgh.tmp"  # another output's ("recs.csv.x")
    other.write_bytes(b"not this output's")
    (tmp_path / ".recs.csv.l1nk0000.tmp").symlink_to(victim)
    before = sha(victim)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write_bytes(out, b"user,item\n")
    finally:
        os.close(fd)
    assert out.read_bytes() == b"user,item\n"
    assert not stale.exists() and live.exists() and other.exists()
    assert sha(victim) == before


def test_a_dead_prepare_leaves_no_folder_after_the_next(prepared):
    stale = prepared.parent / ".prepared.k1ll3d00.tmp"
    stale.mkdir()
    (stale / "indices.npy").write_bytes(b"half")
    write_prepared(load_prepared(prepared), prepared)
    assert not stale.exists()
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["prepared"]


# -- (9) messages that name the flag or the file -------------------------------------------------
@pytest.fixture
def timed_log(tmp_path):
    def write(stamp=lambda u, k: 1_000_000 + u * 100 + k):
        path = tmp_path / "timed.csv"
        path.write_text("uid,iid,stars,ts\n" + "".join(f"u{u},i{(u * 7 + k) % 150},5,{stamp(u, k)}\n"
                                                       for u in range(200) for k in range(10)))
        return path
    return write


@pytest.mark.parametrize("cutoff, stamp, expected", [
    ("3000-01-01", None, "--cutoff: 3000-01-01 00:00:00 UTC is after every interaction (the last is at "
                         "1970-01-12 19:18:29 UTC): nothing to test"),
    ("99999999999999999999", None, "--cutoff: 1e+20 Unix seconds UTC is after every interaction (the last is at "
                                   "1970-01-12 19:18:29 UTC): nothing to test"),
    ("2000-01-01", lambda u, k: "1e300", "--cutoff: 2000-01-01 00:00:00 UTC is before every interaction (the "
                                         "first is at 1e+300 Unix seconds UTC): no training interaction"),
])
def test_a_cutoff_or_times_beyond_the_calendar_name_the_flag(timed_log, tmp_path, capsys, cutoff, stamp, expected):
    """They said 'Cannot cast ... without overflow' and 'Out of bounds timestamp', naming nothing."""
    from recvae.cli import main

    log = timed_log(stamp) if stamp else timed_log()
    code = main(["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
                 "--timestamp-col", "ts", "--cutoff", cutoff, "--model", "ease", "--n-heldout-users", "20",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and capsys.readouterr().err.strip() == f"recvae: error: {expected}"


def test_a_nan_in_a_prepared_directory_names_its_file(prepared):
    data = np.load(prepared / "data.npy")
    data[2] = np.nan
    np.save(prepared / "data.npy", data)
    with pytest.raises(ValueError) as info:
        load_prepared(prepared)
    assert str(info.value) == (f"{prepared / 'data.npy'}: value nan at interaction 2, expected a finite number; "
                               f"write it again with `recvae prepare --data FILE --out {prepared}`")


def test_a_crafted_pickle_checkpoint_is_one_line_without_torch_warnings(tmp_path):
    """A plain pickle (not torch's zip) made torch warn twice before the one line."""
    import pickle
    import warnings

    class Exploit:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"epoch": 1, "payload": Exploit()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as info:
            read_torch(path, "checkpoint")
    assert [str(w.message) for w in caught] == []
    assert str(info.value) == (f"{path}: not a readable checkpoint, damaged or another format (BadZipFile: File is "
                               "not a zip file)")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["recommend", "similar"])
def test_the_next_output_removes_what_a_killed_one_left(log_csv, tmp_path, capsys, command):  # noqa: F811
    """What a SIGKILLed `recommend --output` left (2 MB here; gigabytes for a batch job) stayed."""
    from recvae.cli import main

    run = tmp_path / "run"
    assert main(train_argv(log_csv, run, epochs=1)) == 0
    output = tmp_path / "out" / "recs.csv"
    output.parent.mkdir()
    left = output.parent / ".recs.csv.k1ll3d00.tmp"
    left.write_bytes(b"u1,m1,1,0.5\n" * 1000)
    argv = (["recommend", str(run), "--all-users", "--k", "2"] if command == "recommend"
            else ["similar", str(run), "--items", "m0", "--k", "2"])
    assert main(["-q", *argv, "--output", str(output)]) == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["recs.csv"]
