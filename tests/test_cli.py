"""End to end through the `recvae` command line on a small synthetic interaction file."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.data import Interactions




def train_args(log_csv, out, model="multvae", extra=()):
    return [
        "-q", "train", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
        "--model", model, "--out", str(out), "--n-heldout-users", "30", "--show", "1", *extra,
    ]


@pytest.fixture(scope="module")
def vae_run(log_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    code = main(train_args(log_csv, out, extra=["--epochs", "30", "--batch-size", "50"]))
    assert code == 0
    return out


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(vae_run):
    names = {p.name for p in vae_run.iterdir()}
    for expected in ["run.json", "metrics.json", "model", "train.npz", "validation.npz", "test.npz",
                     "history.csv", "learning_curve.png"]:
        assert expected in names, f"{expected} missing from {sorted(names)}"
    run = json.loads((vae_run / "run.json").read_text())
    assert run["model"] == "multvae"
    assert run["data"]["item_col"] == "iid"
    assert run["split"]["seed"] == 0
    metrics = json.loads((vae_run / "metrics.json").read_text())
    # planted clusters: held-out items lie among the 20 of the user's cluster, so a model that
    # found the clusters has them in its top 20; a random ranking of ~110 items gets about 0.18
    assert metrics["test"]["metrics"]["recall@20"]["mean"] > 0.7
    assert not list(vae_run.glob("*.tmp*")), "temporary files left behind"


def test_train_prints_table_and_top10(log_csv, tmp_path, capsys):
    assert main(train_args(log_csv, tmp_path / "pop", model="popularity")) == 0
    out = capsys.readouterr().out
    assert "| test | 30 |" in out
    assert "Recall@20" in out and "NDCG@100" in out
    assert "top-10 for test user u" in out
    assert " 10." in out


@pytest.mark.slow
def test_evaluate_reproduces_saved_test_metrics(vae_run, capsys):
    assert main(["evaluate", str(vae_run)]) == 0
    out = capsys.readouterr().out
    saved = json.loads((vae_run / "metrics.json").read_text())["test"]["metrics"]["ndcg@100"]["mean"]
    assert f"{saved:.4f}" in out


@pytest.mark.slow
def test_recommend_known_and_new_user(vae_run, tmp_path, log_csv):
    log = pd.read_csv(log_csv)
    known = "u0"  # cluster 0, in training or held out: either way a history row works
    history = pd.DataFrame(
        {"uid": [known, "new-user", "new-user", "new-user"], "iid": ["m0", "m21", "m22", "m23"]}
    )
    inp = tmp_path / "history.csv"
    history.to_csv(inp, index=False)
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(vae_run), "--input", str(inp), "--k", "5", "--output", str(out)]) == 0
    recs = pd.read_csv(out)
    assert list(recs.columns) == ["user", "rank", "item", "score", "source"]
    assert recs.groupby("user").size().to_dict() == {known: 5, "new-user": 5}
    new = recs[recs.user == "new-user"]
    assert not set(new.item) & {"m21", "m22", "m23"}, "already-seen items recommended"
    assert set(new.item) <= set(log.iid), "ids outside the input's id space"
    # planted structure: a user who liked items of cluster 1 gets cluster-1 items (m20..m39)
    assert all(20 <= int(i[1:]) < 40 for i in new.item)
    assert list(new["rank"]) == [1, 2, 3, 4, 5]
    assert (np.diff(new.score) <= 0).all()


@pytest.mark.slow
def test_recommend_to_stdout_and_parquet(vae_run, tmp_path, capsys):
    inp = tmp_path / "h.csv"
    pd.DataFrame({"uid": ["x"], "iid": ["m5"]}).to_csv(inp, index=False)
    assert main(["-q", "recommend", str(vae_run), "--input", str(inp), "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "user,rank,item,score,source" and len(lines) == 4
    pq = tmp_path / "r.parquet"
    assert main(["recommend", str(vae_run), "--input", str(inp), "--k", "3", "--output", str(pq)]) == 0
    assert len(pd.read_parquet(pq)) == 3


@pytest.mark.slow
def test_unknown_items_dropped_or_strict(vae_run, tmp_path, capsys, caplog):
    inp = tmp_path / "h.csv"
    pd.DataFrame({"uid": ["x", "x", "y"], "iid": ["m5", "nope", "gone"]}).to_csv(inp, index=False)
    with caplog.at_level("INFO"):
        assert main(["recommend", str(vae_run), "--input", str(inp), "--k", "2"]) == 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == ["2 of 3 item ids unknown to the run (e.g. 'nope', 'gone')"]
    assert warnings[0].name == "recvae.data.ids"  # the one place ids are matched
    recs = pd.read_csv(io.StringIO(capsys.readouterr().out))
    # y has no known item: the popularity fallback, scored as the fraction of training users
    train = Interactions.load(vae_run / "train.npz")
    fraction = np.asarray(train.matrix.sum(axis=0)).ravel() / train.n_users
    y = recs[recs.user == "y"]
    assert y.source.tolist() == ["popularity"] * 2
    assert y.item.tolist() == train.item_ids[np.argsort(-fraction, kind="stable")[:2]].tolist()
    np.testing.assert_allclose(y.score, np.sort(fraction)[::-1][:2], rtol=1e-6)
    assert recs[recs.user == "x"].source.tolist() == ["model"] * 2
    assert main(["recommend", str(vae_run), "--input", str(inp), "--strict"]) == 2
    assert "2 row(s) name item ids unknown to the model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "missing.csv"], "--data missing.csv: no such file"),
        (["train", "--dataset", "ml-7k"], "unknown MovieLens dataset 'ml-7k'"),
        (["recommend", "nowhere", "--input", "x.csv"], "not a run directory"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_column_and_model(log_csv, tmp_path, capsys):
    assert main(["train", "--data", str(log_csv), "--user-col", "who", "--out", str(tmp_path / "r")]) == 2
    assert "'who'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a failed load must leave no run directory"
    assert main(train_args(log_csv, tmp_path / "r2", model="svd")) == 2
    assert "unknown model 'svd'" in capsys.readouterr().err


@pytest.mark.slow
def test_unwritable_output(vae_run, tmp_path, capsys):
    inp = tmp_path / "h.csv"
    pd.DataFrame({"uid": ["x"], "iid": ["m5"]}).to_csv(inp, index=False)
    assert main(["recommend", str(vae_run), "--input", str(inp), "--output", str(tmp_path / "no" / "r.csv")]) == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.slow
def test_help_of_each_command():
    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["recommend", "--help"], ["serve", "--help"], ["datasets", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "recvae.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "usage: recvae" in proc.stdout


def test_datasets_lists_presence(tmp_path, capsys, monkeypatch):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t1\t5\t0\n")
    (tmp_path / "ml-1m.zip").write_bytes(b"")
    monkeypatch.setenv("RECVAE_CACHE", str(tmp_path / "cache"))
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == f"cache of preprocessed data: {(tmp_path / 'cache').resolve()} ($RECVAE_CACHE, else beside the data)"
    monkeypatch.delenv("RECVAE_CACHE")
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == (f"cache of preprocessed data: {tmp_path.resolve() / '.recvae-cache'} ($RECVAE_CACHE, "
                                   "else beside the data)")
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "present" in lines["ml-100k"] and "present" in lines["ml-1m"]
    assert "absent" in lines["ml-20m"]
    assert set(lines) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest-small"}


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("ease", ["--epochs", "3"], "--model ease: does not take --epochs"),
        ("multdae", ["--anneal-cap", "0.3"], "--model multdae: does not take --anneal-cap"),
        ("multdae", ["--kl-weighting", "activity"], "--model multdae: does not take --kl-weighting"),
        ("multvae", ["--l2", "10"], "--model multvae: does not take --l2"),
    ],
)
def test_options_a_model_does_not_take(log_csv, tmp_path, capsys, model, extra, message):
    assert main(train_args(log_csv, tmp_path / "r", model=model, extra=extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing written for a rejected command"


def test_a_hyperparameter_flag_is_read_by_its_kind(log_csv, tmp_path, capsys):
    """The flag's text is parsed by the kind in the model's table; a bad one is argparse's error."""
    with pytest.raises(SystemExit) as stop:
        main(train_args(log_csv, tmp_path / "r", extra=["--hidden-dims", "600,x"]))
    assert stop.value.code == 2
    message = "argument --hidden-dims: expected comma-separated positive integers such as 600 or 600,300"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing written for a rejected command"


def test_hyperparameters_reach_the_model(log_csv, tmp_path):
    out = tmp_path / "deep"
    extra = ["--epochs", "2", "--hidden-dims", "32,16", "--latent-dim", "8", "--beta", "0.5", "--lam", "0.001",
             "--kl-weighting", "activity"]
    assert main(train_args(log_csv, out, extra=extra)) == 0
    params = json.loads((out / "model" / "model.json").read_text())["params"]
    assert params["hidden_dims"] == [32, 16] and params["latent_dim"] == 8 and params["kl_weighting"] == "activity"
    assert params["beta"] == 0.5 and params["lam"] == 0.001 and params["epochs"] == 2
    history = pd.read_csv(out / "history.csv")
    assert (history["beta"] == 0.5).all()
