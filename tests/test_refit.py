"""Training on every user: `train --holdout none`, `recvae refit` of a finished run, what the other
commands do with a run that has no held-out users, the runs/ default of `train`, and the reason
`recommend` gives for a user the preprocessing dropped."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.data import Interactions
from recvae.data.source import DataSpec, dropped_users
from recvae.data.splits import strong_generalization_split
from recvae.recommend import RunRecommender, user_items_csr
from recvae.rundir import RunDir, new_run_dir

from test_recommend_cli import make_log

#: users the preprocessing drops: 3 positives (below the minimum of 5), and only low ratings
FEW = [("few1", "m0", 5.0), ("few1", "m1", 5.0), ("few1", "m2", 4.0)]
LOW = [("low1", "m0", 2.0), ("low1", "m5", 1.0)]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    df = make_log(int_ids=False)
    extra = pd.DataFrame(FEW + LOW, columns=["uid", "iid", "stars"])
    path = tmp_path_factory.mktemp("refit-log") / "log.csv"
    pd.concat([df, extra]).to_csv(path, index=False)
    return path


def train_argv(log, *extra):
    return ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--show", "0", *extra]


#: the options of the neural runs here: small batches, CPU, float32
NEURAL = ("--batch-size", "30", "--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def base(log, tmp_path_factory):
    """A finished Mult-DAE run with held-out users and early stopping (the run to refit)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(train_argv(log, *NEURAL, "--model", "multdae", "--epochs", "12", "--patience", "3", "--lr", "0.003",
                           "--dropout", "0.3", "--n-heldout-users", "10", "--seed", "4", "--out", str(out))) == 0
    return out


@pytest.fixture(scope="module")
def final(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("final") / "run"
    assert main(["-q", "refit", str(base), "--out", str(out)]) == 0
    return out


def read(path):
    return json.loads(path.read_text())


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- train --holdout none --------------------------------------------------------------------

def test_holdout_none_trains_every_user_for_exactly_the_epochs(log, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(train_argv(log, *NEURAL, "--model", "multdae", "--epochs", "4", "--holdout", "none", "--out", str(out))) == 0
    stdout = capsys.readouterr().out
    assert "multdae on log: trained on all 90 users (720 interactions) in " in stdout
    assert "no held-out users, so no metrics" in stdout and "| split |" not in stdout
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["val_ndcg@100"].isna().all()  # no validation
    run = RunRecommender(out)
    users = set(pd.read_csv(log).query("stars > 3.5").groupby("uid").size().loc[lambda c: c >= 5].index)
    assert len(users) == 90 and set(run.user_ids) == users  # every user of the data, all in training
    assert run.model.best_epoch_ == 4
    description = read(out / "run.json")
    assert description["split_settings"] == {"split_seed": 0, "n_heldout_users": None, "holdout": "none"}
    assert description["split"]["protocol"] == "none"
    assert description["split"]["validation"]["n_users"] == 0 and description["split"]["test"]["n_users"] == 0
    assert description["split"]["train"] == {"n_users": 90, "n_interactions": 720}
    metrics = read(out / "metrics.json")
    assert (metrics["validation"], metrics["test"], metrics["ended"]) == (None, None, "completed")


@pytest.mark.parametrize("extra, message", [
    (["--patience", "3"], "--patience: early stopping needs validation users, and --holdout 'none' holds out none: "
                          "every user trains for the fixed number of epochs"),
    (["--n-heldout-users", "10"], "--n-heldout-users: --holdout 'none' holds out no user; give one or the other"),
    (["--cutoff", "2016-01-01"], "--cutoff: a split in time chooses held-out users, and --holdout 'none' holds out "
                                 "none; give one or the other"),
    (["--leave-last", "1"], "--leave-last: a split in time chooses held-out users, and --holdout 'none' holds out "
                            "none; give one or the other"),
])
def test_holdout_none_refuses_what_needs_held_out_users(log, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    assert main(train_argv(log, "--holdout", "none", "--out", str(out), *extra)) == 2
    assert error_line(capsys) == f"recvae: error: {message}"
    assert not out.exists()


# -- refit -----------------------------------------------------------------------------------

def test_refit_takes_the_best_epoch_and_parameters_of_the_run(base, final, log, capsys):
    base_history = pd.read_csv(base / "history.csv")
    scores = base_history["val_ndcg@100"].to_numpy()
    best = int(base_history["epoch"][int(np.argmax(scores))])  # the first epoch of the highest score
    assert best == RunDir(base).load_model().best_epoch_
    assert best < read(base / "run.json")["params"]["epochs"]  # kept by validation, before the run's last epoch
    description = read(final / "run.json")
    assert description["refit_of"] == {"run": str(base), "best_epoch": best}
    assert description["split_settings"]["holdout"] == "none"
    assert description["data"] == read(base / "run.json")["data"]
    params = description["params"]
    assert (params["epochs"], params["lr"], params["dropout"], params["random_state"]) == (best, 0.003, 0.3, 4)
    assert params["patience"] is None  # no early stopping without validation users
    assert pd.read_csv(final / "history.csv")["epoch"].tolist() == list(range(1, best + 1))
    model = RunDir(final).load_model()
    assert (model.lr, model.dropout, model.epochs, model.best_epoch_) == (0.003, 0.3, best, best)
    assert len(RunRecommender(final).user_ids) == 90  # validation and test users now train too
    assert read(final / "metrics.json")["test"] is None


def test_refit_of_ease_fits_on_every_user(log, tmp_path, capsys):
    run, out = tmp_path / "ease", tmp_path / "ease-final"
    assert main(train_argv(log, "--model", "ease", "--l2", "50", "--n-heldout-users", "10", "--out", str(run))) == 0
    capsys.readouterr()
    assert main(["refit", str(run), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ease refit on all 90 users (720 interactions) in ")
    assert lines[1] == f"run directory: {out}"
    description = read(out / "run.json")
    assert description["refit_of"] == {"run": str(run), "best_epoch": None}
    assert description["params"] == {"l2": 50.0, "dtype": "float64"}
    frame = pd.read_csv(log).query("stars > 3.5")
    frame = frame[frame.uid.map(frame.uid.value_counts()) >= 5]
    model = RunDir(out).load_model()
    assert sorted(model.item_ids_) == sorted(frame.iid.unique())  # every positive item of every user
    assert set(RunDir(run).load_model().item_ids_) <= set(model.item_ids_)


def unfinished(base, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(base, copy)
    (copy / "metrics.json").unlink()
    return copy, (f"RUN_DIR {copy}: the run has not finished (no model or no metrics.json); finish it with the "
                  "`recvae train` command that started it plus --resume, then refit")


def damaged(base, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(base, copy)
    weights = copy / "model" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    return copy, None  # the model loader's own message, naming the file


def foreign(base, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    return folder, f"RUN_DIR {folder}: not a run directory (no run.json)"


def refit_run(base, final):
    return final, (f"RUN_DIR {final}: the run has no held-out users already (a refit of {base}): it trained on every "
                   "user, so there is nothing to refit")


@pytest.mark.parametrize("case", [unfinished, damaged, foreign, "refit"])
def test_refit_refusals_are_one_line_and_write_nothing(base, final, tmp_path, capsys, case):
    source, message = refit_run(base, final) if case == "refit" else case(base, tmp_path)
    out = tmp_path / "out"
    assert main(["refit", str(source), "--out", str(out)]) == 2
    line = error_line(capsys)
    if message is None:
        assert re.fullmatch(rf"recvae: error: .*{re.escape(str(source / 'model' / 'weights.pt'))}.*damaged or replaced.*",
                            line), line
    else:
        assert line == f"recvae: error: {message}"
    assert not out.exists()


def test_refit_into_its_own_run_is_refused(base, capsys):
    assert main(["refit", str(base), "--out", str(base)]) == 2
    assert error_line(capsys) == f"recvae: error: --out: {base} is the run being refit; write the refit to another directory"


# -- a run without held-out users: evaluate, recommend, similar -------------------------------

def test_evaluate_says_there_is_nothing_to_evaluate(base, final, log, tmp_path, capsys):
    assert main(["evaluate", str(final)]) == 2
    assert error_line(capsys) == (
        f"recvae: error: RUN_DIR {final}: the run has no held-out users (it trained on every user), so there is "
        f"nothing to evaluate; its settings were chosen on the held-out users of {base}: recvae evaluate {base}")
    out = tmp_path / "trained-on-all"
    assert main(train_argv(log, "--model", "popularity", "--holdout", "none", "--out", str(out))) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert error_line(capsys) == (f"recvae: error: RUN_DIR {out}: the run has no held-out users (it trained on every "
                                  "user), so there is nothing to evaluate")


def recommend(run, *args, capsys) -> pd.DataFrame:
    assert main(["-q", "recommend", str(run), *args]) == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def test_recommend_and_similar_work_on_a_refit_run(final, log, tmp_path, capsys):
    run = RunRecommender(final)
    every = recommend(final, "--all-users", "--k", "5", capsys=capsys)
    assert set(every["user"]) == set(run.user_ids) and len(every) == 5 * 90
    assert (every["source"] == "model").all()
    # a training user: its known history in, its seen items (any rating) out
    frame = pd.read_csv(log)
    u5 = recommend(final, "--users", str(write(tmp_path / "u.csv", uid=["u5"])), "--k", "5", capsys=capsys)
    row = run.users.get_loc("u5")
    ids, _ = run.model.recommend(run.known[row], N=5, exclude=run.seen[row])
    assert u5["item"].tolist() == run.item_ids[ids[0]].tolist()
    assert not set(u5["item"]) & set(frame.loc[frame.uid == "u5", "iid"])
    # fold-in of a new history
    new = recommend(final, "--input", str(write(tmp_path / "h.csv", uid=["new"] * 3, iid=["m0", "m1", "m2"],
                                                stars=[5, 5, 5])), "--k", "4", capsys=capsys)
    history = user_items_csr(np.zeros(3, int), run.items.get_indexer(["m0", "m1", "m2"]), 1, run.n_items)
    ids, _ = run.model.recommend(history, N=4)
    assert new["item"].tolist() == run.item_ids[ids[0]].tolist() and (new["source"] == "model").all()
    similar = pd.read_csv(io.StringIO(_similar(final, capsys)))
    codes, scores = run.model.similar_items(run.items.get_indexer(["m3"]), N=3)
    assert similar["similar_item"].tolist() == run.item_ids[codes[0]].tolist()
    assert np.allclose(similar["score"], scores[0], atol=1e-6)


def _similar(run, capsys) -> str:
    assert main(["-q", "similar", str(run), "--items", "m3", "--k", "3"]) == 0
    return capsys.readouterr().out


def write(path, **columns):
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_serve_answers_from_a_refit_run(final):
    httpx = pytest.importorskip("httpx")
    from test_serve import start_server

    run = RunRecommender(final)
    with start_server(final) as (base_url, _):
        model = httpx.get(f"{base_url}/model", timeout=30).json()
        assert model["metrics"]["test"] is None and model["metrics"]["validation"] is None
        answer = httpx.post(f"{base_url}/recommend", json={"user": "u7", "k": 4}, timeout=30).json()
        row = run.users.get_loc("u7")
        ids, scores = run.model.recommend(run.known[row], N=4, exclude=run.seen[row])
        assert answer["items"] == run.item_ids[ids[0]].tolist() and answer["source"] == "model"
        assert np.allclose(answer["scores"], scores[0], atol=1e-5)
        new = httpx.post(f"{base_url}/recommend", json={"items": ["m0", "m1"], "k": 3}, timeout=30).json()
        assert new["source"] == "model" and len(new["items"]) == 3
        assert httpx.post(f"{base_url}/similar", json={"item": "m3", "k": 2}, timeout=30).status_code == 200
        gone = httpx.post(f"{base_url}/recommend", json={"user": "few1", "k": 3}, timeout=30)
        assert gone.status_code == 404
        assert gone.json()["detail"][0]["msg"] == ("unknown user 'few1': not a user of the run; dropped by "
                                                   "preprocessing (3 interactions, fewer than --min-user-interactions 5)")
        never = httpx.post(f"{base_url}/recommend", json={"user": "nobody", "k": 3}, timeout=30)
        assert never.json()["detail"][0]["msg"] == "unknown user 'nobody': not a user of the run"


# -- the runs/ default -----------------------------------------------------------------------

def test_train_without_out_writes_a_new_folder_under_runs(log, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in train_argv(log, "--model", "popularity", "--n-heldout-users", "10") if a != "-q"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    match = re.fullmatch(r"run directory: (runs/log-popularity-\d{8}-\d{6})", lines[0])
    assert match, lines[0]
    run = tmp_path / match.group(1)
    assert read(run / "run.json")["model"] == "popularity" and (run / "metrics.json").is_file()
    assert lines[-1] == f"run directory: {match.group(1)}"


def test_two_default_folders_in_the_same_second_differ(tmp_path):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a, b = new_run_dir(tmp_path / "runs", "d-m"), new_run_dir(tmp_path / "runs", "d-m")
    if a.name.endswith(stamp):  # the clock did not tick between the two
        assert b.name == f"d-m-{stamp}-2"
    assert a != b and a.is_dir() and b.is_dir()


def test_train_without_out_and_a_bad_option_writes_nothing(log, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(train_argv(log, *NEURAL, "--model", "multdae", "--lr", "-1")) == 2
    assert "--lr" in error_line(capsys)
    assert main(train_argv(log, *NEURAL, "--model", "multdae", "--user-col", "nope")) == 2
    assert "nope" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


# -- users the preprocessing dropped ---------------------------------------------------------

def test_recommend_names_why_a_dropped_user_is_not_in_the_run(base, tmp_path, capsys, caplog):
    dropped = pd.read_csv(base / "dropped_users.csv")
    assert dropped.to_dict("records") == [{"user": "low1", "interactions": 0, "reason": "rating_threshold"},
                                          {"user": "few1", "interactions": 3, "reason": "min_user_interactions"}]
    users = write(tmp_path / "users.csv", uid=["few1", "low1", "nobody", "u1"])
    with caplog.at_level(logging.INFO, logger="recvae"):
        table = recommend(base, "--users", str(users), "--k", "3", capsys=capsys)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [
        "user few1: dropped by preprocessing (3 interactions, fewer than --min-user-interactions 5); "
        "recommending popular items",
        "user low1: dropped by preprocessing (no rating above --rating-threshold 3.5); recommending popular items",
        "1 of 4 user ids unknown to the run (e.g. 'nobody')",
    ]
    sources = table.groupby("user")["source"].first().to_dict()
    assert sources == {"few1": "popularity", "low1": "popularity", "nobody": "popularity", "u1": "model"}


def test_dropped_users_names_those_the_split_left_out():
    """Users with 5 positives, 3 on items no one else has: held out, they keep 2 items on the
    training catalogue, too few to hold any out, so the split drops them."""
    rows = [(u, i) for u in range(40) for i in range(u % 4 * 10, u % 4 * 10 + 8)]
    rows += [(100 + u, i) for u in range(20) for i in (0, 1)] + [(100 + u, 1000 + 3 * u + j) for u in range(20)
                                                                 for j in range(3)]
    data = Interactions.from_dataframe(pd.DataFrame(rows, columns=["user", "item"]), min_user_interactions=5)
    split = strong_generalization_split(data, n_heldout_users=12, seed=0)
    spec = DataSpec(path="unused.csv", rating_col=None, rating_threshold=None)
    table = dropped_users(spec, data, data, split, raw=None)
    known = set(split.train.user_ids) | set(split.validation.user_ids) | set(split.test.user_ids)
    left_out = sorted(set(data.user_ids) - known)
    assert left_out and all(u >= 100 for u in left_out)
    assert table.to_dict("records") == [{"user": u, "interactions": 2, "reason": "split"} for u in left_out]
