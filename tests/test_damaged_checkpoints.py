"""A damaged or foreign checkpoint.pt met by `recvae train --resume`: one line naming the file
and what to do, exit 2, never a traceback, never pickled code run."""

from __future__ import annotations

import pickle
import shutil
import struct
import zipfile

import pytest
import torch

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the shared fixture)

from recvae.cli import main


@pytest.fixture(scope="module")
def kept(log_csv, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("kept") / "run"
    assert main(train_argv(log_csv, out, "--keep-checkpoint", epochs=2)) == 0
    return out


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _flip_a_tensor_byte(path):
    """One flipped bit inside a tensor's record: torch alone loads it as another number."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _crafted(path):
    torch.save({"epoch": 1, "payload": Exploit()}, path)


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(b""), "not a readable checkpoint (an empty file)"),
    (lambda p: p.write_text("this is text, not a checkpoint\n" * 4), "not a readable checkpoint, damaged or another format"),
    (lambda p: p.write_bytes(p.read_bytes()[:2000]), "not a readable checkpoint, damaged or another format"),
    (_crafted, "it holds objects other than tensors"),
    (_flip_a_tensor_byte, "damaged checkpoint: the record "),
    (lambda p: p.write_bytes(pickle.dumps({"epoch": 1})), "not a readable checkpoint"),
    (lambda p: torch.save([1, 2, 3], p), "not a recvae checkpoint"),
])
def test_a_damaged_checkpoint_is_one_line_naming_it(kept, log_csv, tmp_path, capsys, damage, expected):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(kept, out)
    damage(out / "checkpoint.pt")
    assert main(train_argv(log_csv, out, "--resume", epochs=3)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recvae: error: "), err
    assert f"{out / 'checkpoint.pt'}" in err and expected in err, err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert "pickled code ran" not in captured.out + captured.err
