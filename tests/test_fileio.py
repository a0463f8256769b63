"""recvae.fileio: the one temp-file-and-rename writer, and the readers whose errors name the file."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from recvae import fileio
from recvae.fileio import atomic_open, atomic_path, atomic_write, read_json, read_npz


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_path_renames_on_success_with_the_umask_mode(tmp_path, umask_022):
    target = tmp_path / "out.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.csv.") and not target.exists()
        tmp.write_text("a,b\n")  # a writer that wants a file name
    assert target.read_text() == "a,b\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["out.csv"]


def test_atomic_open_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, suffix=".part") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=rf"^{path}: not valid JSON \(Expecting value at line 2 column 7\)$"):
        read_json(path)
    path.write_text('"text"')
    with pytest.raises(ValueError, match=rf"^{path}: expected an object at the top level of the JSON, got a string$"):
        read_json(path)
    assert read_json(path, expect=str) == "text"


def test_read_npz_names_the_file(tmp_path):
    good = tmp_path / "a.npz"
    np.savez(good, x=np.arange(3))
    assert read_npz(good)["x"].tolist() == [0, 1, 2]
    bad = tmp_path / "b.npz"
    bad.write_bytes(b"\x80\x04not a zip")  # a pickle header: must not be unpickled
    with pytest.raises(ValueError, match=rf"^{bad}: damaged or not an .npz archive \(expected the weights\)$"):
        read_npz(bad, "weights")


def test_a_signal_just_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The signal lands in the instant the temporary file is created, before its name could be
    kept (a Ctrl-C the moment writing begins): the cleanup knows the name already, so no
    temporary file is left behind and the target is untouched."""
    made = fileio._create

    def create_then_signal(tmp):
        fd = made(tmp)
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next instruction
        return fd

    monkeypatch.setattr(fileio, "_create", create_then_signal)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
    assert list(tmp_path.iterdir()) == []
