"""Saved runs as a user meets them: damaged, edited or moved artefacts and bad input give one line
on stderr naming the file or flag (exit status 2) through the real `recvae` command; the device
saved with a model is a preference; the package metadata admits a torch range."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import recvae
from recvae.cli import main
from recvae.experiment import load_run
from recvae.rundir import RunDir
from recvae.models import load_model

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """150 users, 120 string-id items; every rating 5 (kept)."""
    rng = np.random.default_rng(3)
    rows = [(f"u{u}", f"m{i}", 5) for u in range(150) for i in rng.choice(120, size=10, replace=False)]
    path = tmp_path_factory.mktemp("log") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def runs(log_csv, tmp_path_factory):
    """One small run directory per model kind, trained through the command."""
    root = tmp_path_factory.mktemp("runs")
    for model, extra in (("multvae", ["--epochs", "2", "--hidden-dims", "16", "--latent-dim", "8"]),
                         ("ease", []), ("popularity", [])):
        argv = ["-q", "train", "--data", str(log_csv), "--model", model, "--out", str(root / model),
                "--n-heldout-users", "20", "--show", "0", *extra]
        assert main(argv) == 0
    return root


@pytest.fixture
def copy_run(runs, tmp_path):
    def copy(model: str) -> Path:
        return Path(shutil.copytree(runs / model, tmp_path / model))
    return copy


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("recvae: error: "), err
    return lines[-1]


def evaluate_fails(run: Path, capsys, *extra) -> str:
    assert main(["evaluate", str(run), *extra]) == 2
    return one_error_line(capsys)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_meta(run: Path, change, redigest: str | None = None) -> None:
    """Apply ``change`` to ``run/model/model.json``; with ``redigest`` record that file's new
    SHA-256, as if the damage had happened before saving, so later checks are what fire."""
    meta_file = run / "model" / "model.json"
    meta = json.loads(meta_file.read_text())
    change(meta)
    if redigest:
        meta["files"][redigest] = sha256(run / "model" / redigest)
    meta_file.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------ device
@NO_CUDA
def test_run_saved_on_cuda_loads_on_cpu(copy_run, capsys, caplog):
    run = copy_run("multvae")
    edit_meta(run, lambda m: m["params"].update(device="cuda"))
    with caplog.at_level(logging.INFO, logger="recvae.models.device"):
        model, _ = load_run(run)
    assert model.device_.type == "cpu" and model.device == "cuda"  # kept as the saved preference
    assert "trained on cuda; this machine has no CUDA, loading on the CPU" in caplog.text
    assert main(["evaluate", str(run)]) == 0
    assert "| test | 20 |" in capsys.readouterr().out


@NO_CUDA
def test_asking_for_cuda_without_cuda_is_one_line(copy_run, log_csv, tmp_path, capsys):
    run = copy_run("multvae")
    with pytest.raises(ValueError, match=r"^device: 'cuda' asks for CUDA, but this torch .* has"):
        load_model(run / "model", device="cuda")
    with pytest.raises(ValueError, match=r"^device: 'cuda' asks for CUDA"):  # also where it would be unused
        load_model(copy_run("ease") / "model", device="cuda")
    msg = evaluate_fails(run, capsys, "--device", "cuda")
    assert msg.startswith("recvae: error: --device: 'cuda' asks for CUDA")
    assert main(["train", "--data", str(log_csv), "--device", "cuda", "--epochs", "1",
                 "--out", str(tmp_path / "r")]) == 2
    assert one_error_line(capsys).startswith("recvae: error: --device: 'cuda' asks for CUDA")


def test_evaluate_on_an_explicit_cpu(runs, capsys):
    assert main(["evaluate", str(runs / "multvae"), "--device", "cpu"]) == 0
    saved = json.loads((runs / "multvae" / "metrics.json").read_text())["test"]["metrics"]["ndcg@100"]["mean"]
    assert f"{saved:.4f}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ integrity
def test_model_json_records_the_digest_of_each_model_file(runs):
    for model, name in (("multvae", "weights.pt"), ("ease", "arrays.npz"), ("popularity", "arrays.npz")):
        meta = json.loads((runs / model / "model" / "model.json").read_text())
        assert meta["format_version"] == 2
        assert meta["files"] == {name: sha256(runs / model / "model" / name)}


@pytest.mark.parametrize("model, name", [("multvae", "weights.pt"), ("ease", "arrays.npz")])
def test_flipped_byte_is_refused_naming_the_file(copy_run, capsys, model, name):
    run = copy_run(model)
    path = run / "model" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    msg = evaluate_fails(run, capsys)
    assert f"{path}: damaged or replaced: its SHA-256 {sha256(path)[:16]}" in msg
    assert f"recorded in {run / 'model' / 'model.json'}" in msg


@pytest.mark.parametrize("size", [0, 1000])
def test_truncated_or_empty_weights_file(copy_run, capsys, size):
    run = copy_run("multvae")
    path = run / "model" / "weights.pt"
    path.write_bytes(path.read_bytes()[:size])
    assert f"{path}: damaged or replaced" in evaluate_fails(run, capsys)
    # with a matching digest (damaged before it was saved) the reader itself names the file
    edit_meta(run, lambda m: None, redigest="weights.pt")
    assert f"recvae: error: {path}: not a readable weights file" in evaluate_fails(run, capsys)


def test_nan_weights_are_refused_naming_file_and_tensor(copy_run, capsys):
    run = copy_run("multvae")
    path = run / "model" / "weights.pt"
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name][0, :3] = float("nan")
    torch.save(state, path)
    edit_meta(run, lambda m: None, redigest="weights.pt")
    msg = evaluate_fails(run, capsys)
    assert msg == f"recvae: error: {path}: {name!r} holds 3 non-finite value(s) (NaN or infinity); the model is unusable"


def test_nan_in_baseline_arrays(copy_run, capsys):
    run = copy_run("popularity")
    path = run / "model" / "arrays.npz"
    counts = np.load(path)["item_counts"].copy()
    counts[5] = np.inf
    with open(path, "wb") as f:
        np.savez(f, item_counts=counts)
    edit_meta(run, lambda m: None, redigest="arrays.npz")
    assert f"{path}: 'item_counts' holds 1 non-finite value(s)" in evaluate_fails(run, capsys)


def test_damaged_npz_files(copy_run, capsys):
    run = copy_run("ease")
    arrays = run / "model" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-200])
    edit_meta(run, lambda m: None, redigest="arrays.npz")
    assert f"recvae: error: {arrays}: damaged or not an .npz archive" in evaluate_fails(run, capsys)
    run = copy_run("popularity")
    test_npz = run / "test.npz"
    data = bytearray(test_npz.read_bytes())
    data[60:80] = bytes(20)  # inside the first member's compressed data: the zip index stays valid
    test_npz.write_bytes(bytes(data))
    assert f"recvae: error: {test_npz}: damaged .npz archive, cannot read the held-out users" in evaluate_fails(run, capsys)


def test_item_vocabulary_checked_against_the_weights(copy_run, capsys):
    run = copy_run("multvae")
    edit_meta(run, lambda m: m["item_ids"].pop())
    meta_file = run / "model" / "model.json"
    n = json.loads(meta_file.read_text())["n_items"]
    assert evaluate_fails(run, capsys) == (
        f"recvae: error: {meta_file}: item_ids: expected a list of n_items = {n} ids, got {n - 1} ids")
    edit_meta(run, lambda m: m.update(n_items=n - 1))  # consistent with the ids, not with the weights
    msg = evaluate_fails(run, capsys)
    assert msg.startswith(f"recvae: error: {run / 'model' / 'weights.pt'}: ") and f"expected ({n - 1}" in msg


def test_train_npz_of_another_vocabulary_is_refused(copy_run):
    run = copy_run("multvae")
    model, _ = load_run(run)
    assert RunDir(run).load_train(model).n_items == model.n_items_
    edit_meta(run, lambda m: m["item_ids"].reverse())  # same ids, another order: every id would shift
    model, _ = load_run(run)
    with pytest.raises(ValueError, match=r"train.npz: its item ids differ from the model's"):
        RunDir(run).load_train(model)


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.update(colour="red"), "model.json: unknown key(s) 'colour'"),
    (lambda m: m["params"].update(depth=3), "model.json: params: unknown key(s) 'depth' for MultVAE"),
    (lambda m: m.pop("history"), "model.json: missing key(s) 'history'"),
    (lambda m: m["params"].update(latent_dim=9), "weights.pt: "),  # weights of another shape
    (lambda m: m["params"].update(dropout=2.0), "model.json: params: dropout: expected a probability"),
])
def test_bad_model_json_is_one_line_naming_it(copy_run, capsys, change, expected):
    run = copy_run("multvae")
    edit_meta(run, change)
    msg = evaluate_fails(run, capsys)
    assert msg.startswith(f"recvae: error: {run / 'model'}") and expected in msg


def test_malformed_json_names_the_file_and_position(copy_run, capsys):
    run = copy_run("ease")
    meta_file = run / "model" / "model.json"
    meta_file.write_text(meta_file.read_text()[:-30])
    msg = evaluate_fails(run, capsys)
    assert msg.startswith(f"recvae: error: {meta_file}: not valid JSON (") and " at line " in msg


def test_run_json_that_is_not_an_object(copy_run, capsys):
    run = copy_run("popularity")
    (run / "run.json").write_text("[1, 2]\n")
    assert evaluate_fails(run, capsys) == (
        f"recvae: error: {run / 'run.json'}: expected an object at the top level of the JSON, got an array")
    (run / "run.json").write_text("{}")
    assert evaluate_fails(run, capsys) == f"recvae: error: {run / 'run.json'}: model: expected a string, got None"


def test_previous_format_loads_with_a_warning(copy_run, caplog, capsys):
    run = copy_run("multvae")
    edit_meta(run, lambda m: (m.pop("files"), m.update(format_version=1)))
    with caplog.at_level(logging.WARNING, logger="recvae.models.base"):
        assert main(["evaluate", str(run)]) == 0
    assert "format_version 1) without file digests: weights.pt is not verified" in caplog.text
    edit_meta(run, lambda m: m.update(format_version=3))
    assert "model.json: format_version 3, expected 2" in evaluate_fails(run, capsys)


# ------------------------------------------------------------------------------ the command
def test_debug_shows_the_traceback_global_or_after_the_command(copy_run, capsys):
    run = copy_run("popularity")
    (run / "run.json").write_text("[]")
    assert evaluate_fails(run, capsys).endswith("got an array")
    # with --debug the exception leaves main(): Python prints its traceback, exit status 1
    for argv in (["--debug", "evaluate", str(run)], ["evaluate", str(run), "--debug"]):
        with pytest.raises(ValueError, match="got an array"):
            main(argv)
        assert capsys.readouterr().err == ""


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch, capsys):
    import recvae.cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(recvae.cli.datasets, "run", broken)
    assert main(["datasets"]) == 1  # its traceback, then a line saying it is a bug
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith(f"RuntimeError: a bug\nrecvae: this is a bug in recvae {recvae.__version__}; please report "
                        "it with the traceback above\n")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"recvae {recvae.__version__}"


def test_wrong_columns_name_the_flags(log_csv, tmp_path, capsys):
    for flag in ("--user-col", "--item-col", "--rating-col"):
        assert main(["train", "--data", str(log_csv), flag, "nope", "--out", str(tmp_path / "r")]) == 2
        hint = "; if the data has no ratings, give --rating-col none" if flag == "--rating-col" else ""
        assert one_error_line(capsys) == (
            f"recvae: error: {log_csv}: {flag}: column 'nope' not found; available columns: ['user', 'item', 'rating']"
            + hint)


def test_empty_and_malformed_csv_name_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    assert main(["train", "--data", str(empty)]) == 2
    assert one_error_line(capsys) == f"recvae: error: {empty}: file is empty"
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating\n1,2,5\n1,2,5,6,7\n")
    assert main(["train", "--data", str(bad)]) == 2
    msg = one_error_line(capsys)
    assert msg.startswith(f"recvae: error: {bad}: malformed comma-separated file") and "line 3" in msg


def test_parquet_without_pyarrow_is_one_line(log_csv, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    data = tmp_path / "log.parquet"
    pd.read_csv(log_csv).to_parquet(data)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails: as if absent
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert one_error_line(capsys) == (
        f"recvae: error: {data}: reading Parquet need(s) the optional package pyarrow, which is not installed "
        "(pip install 'recvae[parquet]')")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ packaging
def test_package_metadata_admits_a_torch_range():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    assert "2.13.0" in torch_req.specifier and "2.4.0" in torch_req.specifier and "2.14.1" in torch_req.specifier
    assert "2.3.1" not in torch_req.specifier  # no CPU fused Adam before 2.4
    assert "version" in project["dynamic"]
    constraints = (ROOT / "scripts" / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints  # the exact pin lives in this project's set-up only
    assert (ROOT / "recvae" / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["recvae"]
