"""A damaged prepared directory: one line naming the file and how to write it again, from
load_prepared and from `recvae train --prepared`, never a traceback or an IndexError later."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recvae.cli import main
from recvae.data import Interactions
from recvae.data.prepared import load_prepared, read_prepared_description, write_prepared

N_USERS, N_ITEMS = 40, 15


@pytest.fixture
def prepared(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    m = sp.random(N_USERS, N_ITEMS, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    m.data[:] = 1.0
    m.sort_indices()
    ids = Interactions(m, np.arange(100, 100 + N_USERS), np.array([f"i{j}" for j in range(N_ITEMS)]))
    return write_prepared(ids, tmp_path / "prepared", preprocessing={"path": "log.csv", "rating_threshold": 3.5})


def _resave(path: Path, name: str, change) -> None:
    a = np.load(path / f"{name}.npy")
    a = change(a.copy())
    np.save(path / f"{name}.npy", a, allow_pickle=False)


def _set(index, value):
    def change(a):
        a[index] = value
        return a
    return change


def _edit_json(path: Path, change) -> None:
    d = json.loads((path / "prepared.json").read_text())
    change(d)
    (path / "prepared.json").write_text(json.dumps(d))


def _truncate(path: Path, name: str, keep: int) -> None:
    f = path / name
    f.write_bytes(f.read_bytes()[:keep])


def _swap_middle_of_indptr(a):
    k = len(a) // 2
    a[k], a[k + 1] = a[k + 1], a[k]
    assert a[k] != a[k + 1]
    return a


# (damage, the file named, what the message says)
DAMAGES = {
    "index out of range": (lambda p: _resave(p, "indices", _set(3, N_ITEMS)), "indices.npy",
                           rf"item index {N_ITEMS} out of range \[0, {N_ITEMS}\)"),
    "negative index": (lambda p: _resave(p, "indices", _set(-1, -1)), "indices.npy",
                       rf"item index -1 out of range \[0, {N_ITEMS}\)"),
    "indptr not monotone": (lambda p: _resave(p, "indptr", _swap_middle_of_indptr), "indptr.npy",
                            r"row pointers decrease"),
    "indptr not from 0": (lambda p: _resave(p, "indptr", _set(0, 1)), "indptr.npy", r"start at 1, not 0"),
    "indptr not to nnz": (lambda p: _resave(p, "indptr", _set(-1, 3)), "indptr.npy", r"end at 3, not at nnz = \d+"),
    "indices truncated": (lambda p: _truncate(p, "indices.npy", 200), "indices.npy", r"cannot be read"),
    "indptr header cut": (lambda p: _truncate(p, "indptr.npy", 20), "indptr.npy", r"cannot be read"),
    "item ids truncated": (lambda p: _truncate(p, "item_ids.npy", 150), "item_ids.npy", r"cannot be read"),
    "data missing": (lambda p: (p / "data.npy").unlink(), "data.npy", r"missing"),
    "indices of another length": (lambda p: _resave(p, "indices", lambda a: a[:-1]), "indices.npy",
                                  r"shape \(\d+,\), expected \(\d+,\) as prepared.json says"),
    "fewer user ids": (lambda p: _resave(p, "user_ids", lambda a: a[:-1]), "user_ids.npy",
                       rf"shape \({N_USERS - 1},\), expected \({N_USERS},\) as prepared.json says"),
    "float indices": (lambda p: _resave(p, "indices", lambda a: a.astype(np.float64)), "indices.npy",
                      r"float64 values, expected integers"),
    "more users in the json": (lambda p: _edit_json(p, lambda d: d.update(n_users=N_USERS + 1)), "indptr.npy",
                               rf"shape \({N_USERS + 1},\), expected \({N_USERS + 2},\) as prepared.json says"),
    "garbage json": (lambda p: (p / "prepared.json").write_text('{"format_version": 1, "n_us'), "prepared.json",
                     r"not valid JSON \(.*line 1 column"),
    "binary json": (lambda p: (p / "prepared.json").write_bytes(b"\xff\xfe\x00garbage"), "prepared.json",
                    r"not valid JSON"),
    "json not an object": (lambda p: (p / "prepared.json").write_text("[1, 2]"), "prepared.json",
                           r"expected a JSON object, got a list"),
    "missing nnz": (lambda p: _edit_json(p, lambda d: d.pop("nnz")), "prepared.json", r"no 'nnz' key"),
    "missing preprocessing": (lambda p: _edit_json(p, lambda d: d.pop("preprocessing")), "prepared.json",
                              r"no 'preprocessing' key"),
    "n_items not a count": (lambda p: _edit_json(p, lambda d: d.update(n_items="15")), "prepared.json",
                            r"'n_items' is '15', expected a whole number >= 0"),
    "preprocessing not an object": (lambda p: _edit_json(p, lambda d: d.update(preprocessing=[])), "prepared.json",
                                    r"'preprocessing' is \[\], expected a JSON object"),
}


def _expected(prepared: Path, file: str, what: str) -> str:
    return (rf"{re.escape(str(prepared / file))}: .*{what}.*; write it again with "
            rf"`recvae prepare --data log\.csv --out {re.escape(str(prepared))}`|"
            rf"{re.escape(str(prepared / file))}: .*{what}.*; write it again with "
            rf"`recvae prepare --data FILE --out {re.escape(str(prepared))}`")


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_load_prepared_names_the_damaged_file(prepared, damage):
    hurt, file, what = DAMAGES[damage]
    hurt(prepared)
    with pytest.raises(ValueError, match=_expected(prepared, file, what)) as info:
        load_prepared(prepared)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_train_on_a_damaged_prepared_directory_is_one_line(prepared, damage, tmp_path, capsys):
    hurt, file, what = DAMAGES[damage]
    hurt(prepared)
    out = tmp_path / "run"
    rc = main(["-q", "train", "--prepared", str(prepared), "--epochs", "1", "--batch-size", "8", "--hidden-dims", "8",
               "--latent-dim", "4", "--n-heldout-users", "5", "--device", "cpu", "--show", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.fullmatch(f"recvae: error: (?:{_expected(prepared, file, what)})", lines[0]), lines[0]
    assert not out.exists()


def test_the_command_to_write_it_again_follows_the_recorded_source(prepared):
    _edit_json(prepared, lambda d: d.update(preprocessing={"dataset": "ml-1m"}, nnz=d["nnz"] + 1))
    with pytest.raises(ValueError, match=rf"; write it again with `recvae prepare --dataset ml-1m --out "
                                         rf"{re.escape(str(prepared))}`$"):
        load_prepared(prepared)


def test_a_whole_prepared_directory_loads_memory_mapped(prepared):
    d = read_prepared_description(prepared)
    assert (d["n_users"], d["n_items"]) == (N_USERS, N_ITEMS)
    it = load_prepared(prepared)
    assert it.matrix.shape == (N_USERS, N_ITEMS) and it.user_ids[0] == 100 and it.item_ids[-1] == f"i{N_ITEMS - 1}"
    for a in (it.matrix.indptr, it.matrix.indices, it.matrix.data):  # not copied by the checks
        while not isinstance(a, np.memmap) and a.base is not None:
            a = a.base
        assert isinstance(a, np.memmap)


def test_empty_rows_and_an_empty_matrix_are_whole(tmp_path):
    m = sp.csr_matrix((3, 4), dtype=np.float32)
    it = load_prepared(write_prepared(Interactions(m, np.arange(3), np.arange(4)), tmp_path / "empty"))
    assert it.nnz == 0 and it.matrix.shape == (3, 4)
    m = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=np.float32))
    it = load_prepared(write_prepared(Interactions(m, np.arange(3), np.arange(3)), tmp_path / "gaps"))
    assert it.matrix.toarray().tolist() == m.toarray().tolist()
