"""Links planted by a neighbour (issue 31): a symbolic link at each name a run directory uses
(the lock, every run file, ``model/``, a temporary, the study's files) and at ``--out`` /
``--output``, met by each command that writes. Whatever the command answers (it finishes, or
refuses in one line), nothing outside the directory changes: the files the links point to are
compared byte for byte, and nothing new appears beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the fixture, shared)

from recvae.cli import main
from recvae.rundir import LOCK_FILE, MODEL_DIR, RUN_FILES, STUDY_FILES

pytestmark = pytest.mark.slow  # every test runs commands that train or read a run (seconds each)


@pytest.fixture(scope="module")
def finished(log_csv, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(log_csv, out, epochs=2)) == 0
    return out


@pytest.fixture
def outside(tmp_path):
    """What a neighbour aims at: a file, a table, a folder with a file and a run-like name."""
    folder = tmp_path / "outside"
    (folder / "victimdir").mkdir(parents=True)
    (folder / "victim.txt").write_text("the neighbour's file\n")
    (folder / "victimdir" / "kept.bin").write_bytes(bytes(range(256)))
    return folder


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` (links not followed) and the bytes of each file."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def plant(path: Path, outside: Path) -> None:
    """A link at ``path`` (replacing what is there) to the victim folder for ``model``, else to
    the victim file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(outside / ("victimdir" if path.name == MODEL_DIR else "victim.txt"))


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), err
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("recvae: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
    return code, err


#: every name a run directory uses, a temporary of a write and the lock among them
RUN_NAMES = sorted({*RUN_FILES, LOCK_FILE, ".run.json.abcdefgh.tmp", f"{MODEL_DIR}/.weights.pt.abcdefgh.tmp"})


@pytest.mark.parametrize("name", RUN_NAMES)
def test_train_overwrite_over_a_link_at_each_run_name(finished, log_csv, tmp_path, outside, capsys, name):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    plant(out / name, outside)
    before = snapshot(outside)
    code, err = run(train_argv(log_csv, out, "--overwrite", epochs=1), capsys)
    assert snapshot(outside) == before
    if name in (LOCK_FILE, MODEL_DIR):
        assert code == 2 and "is a symbolic link" in err or "holds other files" in err, err


@pytest.mark.parametrize("mode", [(), ("--overwrite",), ("--resume",)])
def test_train_never_writes_through_a_lock_link(finished, log_csv, tmp_path, outside, capsys, mode):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "metrics.json").unlink()  # trained, not evaluated: --resume has work to do
    (out / LOCK_FILE).symlink_to(outside / "victim.txt")
    before = snapshot(outside)
    code, err = run(train_argv(log_csv, out, *mode, epochs=2), capsys)
    assert code == 2 and snapshot(outside) == before
    if mode:  # a run that --overwrite or --resume may take: refused for its link alone
        assert f"--out {out / LOCK_FILE}: is a symbolic link (to {outside / 'victim.txt'})" in err, err
    # a dangling link creates nothing where it points
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).symlink_to(outside / "planted.txt")
    run(train_argv(log_csv, out, "--overwrite", epochs=1), capsys)
    assert not (outside / "planted.txt").exists()


@pytest.mark.parametrize("command", ["train", "refit", "tune", "prepare"])
def test_an_out_that_is_a_link_is_refused_or_replaced_never_written_through(finished, log_csv, tmp_path, outside,  # noqa: F811
                                                                           capsys, command):
    out = tmp_path / "out"
    out.symlink_to(outside / "victimdir")
    argv = {
        "train": train_argv(log_csv, out, "--overwrite", epochs=1),
        "refit": ["-q", "refit", str(finished), "--out", str(out), "--overwrite"],
        "tune": tune_argv(log_csv, out, "--trials", "2", "--overwrite"),
        "prepare": ["-q", "prepare", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid",
                    "--rating-col", "stars", "--out", str(out)],
    }[command]
    before = snapshot(outside)
    code, err = run(argv, capsys)
    assert snapshot(outside) == before
    assert code == 2 and f"--out {out}: is a symbolic link (to {outside / 'victimdir'})" in err, err


def tune_argv(log_csv, out, *extra):  # noqa: F811
    return ["-q", "tune", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--n-heldout-users", "30", "--model", "ease", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tuned(log_csv, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("tuned") / "run"
    assert main(tune_argv(log_csv, out, "--trials", "2")) == 0
    return out


@pytest.mark.parametrize("name", sorted({LOCK_FILE, *STUDY_FILES}))
def test_tune_never_writes_through_a_link_at_its_names(tuned, log_csv, tmp_path, outside, capsys, name):  # noqa: F811
    """The study's links aim at a neighbour's own SQLite database (SQLite would write it, or
    its journal over the victim file)."""
    shutil.copy(tuned / "study.db", outside / "victim.db")
    for extra in (("--trials", "3", "--resume"), ("--trials", "2", "--overwrite")):
        out = tmp_path / f"run{len(extra)}{extra[-1]}"
        shutil.copytree(tuned, out)
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside / ("victim.db" if name == "study.db" else "victim.txt"))
        before = snapshot(outside)
        code, err = run(tune_argv(log_csv, out, *extra), capsys)
        assert snapshot(outside) == before, extra
        if name == LOCK_FILE or extra[-1] == "--resume":
            assert code == 2 and f"{out / name}: is a symbolic link" in err, err


@pytest.mark.parametrize("command", ["recommend", "similar"])
@pytest.mark.parametrize("where", ["link at the output", "link at its temporary", "folder linked into the run"])
def test_an_output_never_lands_outside_or_on_the_run(finished, tmp_path, outside, capsys, command, where):
    before_run = snapshot(finished)
    folder = tmp_path / "p"
    folder.mkdir()
    output = folder / "recs.csv"
    if where == "link at the output":
        output.symlink_to(outside / "victim.txt")
    elif where == "link at its temporary":
        (folder / ".recs.csv.abcdefgh.tmp").symlink_to(outside / "victim.txt")
    else:
        (folder / "m").symlink_to(finished / MODEL_DIR)
        output = folder / "m" / "weights.pt"
    argv = (["recommend", str(finished), "--all-users", "--k", "2", "--output", str(output)] if command == "recommend"
            else ["similar", str(finished), "--items", "m0", "--k", "2", "--output", str(output)])
    before = snapshot(outside)
    code, err = run(["-q", *argv], capsys)
    assert snapshot(outside) == before and snapshot(finished) == before_run
    if where == "folder linked into the run":
        assert code == 2 and "is model/weights.pt of the run directory" in err, err
    else:
        assert code == 0 and output.is_file() and not output.is_symlink()
