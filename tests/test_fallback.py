"""The popularity fallback of users the model cannot score never offers an item the user has:
a user of the source that preprocessing dropped (``dropped_seen.npz`` keeps their items), through
`recvae recommend`, the library and `recvae serve --unknown-users popular` (issue 28)."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.data import Interactions
from recvae.recommend import RunRecommender
from recvae.rundir import DROPPED_SEEN_FILE

from test_recommend_cli import make_log

#: users the preprocessing drops: 3 positives (below the minimum of 5), and only low ratings
FEW = [("few1", "m0", 5.0), ("few1", "m1", 5.0), ("few1", "m2", 4.0)]
LOW = [("low1", "m0", 2.0), ("low1", "m5", 1.0)]
FEW_ITEMS, LOW_ITEMS = {"m0", "m1", "m2"}, {"m0", "m5"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fallback")
    log = folder / "log.csv"
    pd.concat([make_log(int_ids=False), pd.DataFrame(FEW + LOW, columns=["uid", "iid", "stars"])]).to_csv(log, index=False)
    out = folder / "run"
    assert main(["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
                 "--model", "multdae", "--epochs", "3", "--batch-size", "30", "--n-heldout-users", "10",
                 "--show", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run(run_dir):
    return RunRecommender(run_dir)


def recommend(run_dir, *args, capsys) -> pd.DataFrame:
    assert main(["-q", "recommend", str(run_dir), *args]) == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def write(path, **columns):
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def popular(run) -> list:
    """The catalogue by popularity, as the fallback ranks it (ties: catalogue order)."""
    return run.item_ids[np.argsort(-run.popularity, kind="stable")].tolist()


def test_the_run_records_the_items_of_the_users_it_dropped(run_dir, run):
    assert FEW_ITEMS | LOW_ITEMS <= set(run.item_ids)  # on the catalogue: a fallback could offer them
    seen = Interactions.load(run_dir / DROPPED_SEEN_FILE)
    assert seen.user_ids.tolist() == ["low1", "few1"]  # the users of dropped_users.csv, in its order
    assert seen.item_ids.tolist() == run.item_ids.tolist()
    assert {u: set(seen.item_ids[seen.matrix[r].indices]) for r, u in enumerate(seen.user_ids)} == \
        {"few1": FEW_ITEMS, "low1": LOW_ITEMS}  # every rating: low1's 2 and 1 stars too


def test_a_dropped_user_never_gets_one_of_its_items_back(run_dir, run, tmp_path, capsys):
    users = write(tmp_path / "users.csv", uid=["few1", "low1", "nobody"])
    table = recommend(run_dir, "--users", str(users), "--k", "1000", capsys=capsys)
    assert (table["source"] == "popularity").all()
    lists = table.groupby("user", sort=False)["item"].apply(list).to_dict()
    everything = popular(run)
    assert lists["nobody"] == everything  # a user the source never had: nothing to leave out
    assert lists["few1"] == [i for i in everything if i not in FEW_ITEMS]
    assert lists["low1"] == [i for i in everything if i not in LOW_ITEMS]
    few = table[table["user"] == "few1"]
    assert few["rank"].tolist() == list(range(1, len(everything) - 2))
    # the score: the fraction of training users having the item
    np.testing.assert_allclose(few["score"], run.popularity[run.items.get_indexer(few["item"])], rtol=1e-6)


def test_a_dropped_users_history_file_rows_leave_its_recorded_items_out_too(run_dir, run, tmp_path, capsys):
    history = write(tmp_path / "h.csv", uid=["few1"], iid=["m3"], stars=[5.0])
    table = recommend(run_dir, "--input", str(history), "--k", "1000", capsys=capsys)
    assert (table["source"] == "model").all()
    assert set(table["item"]) == set(run.item_ids) - FEW_ITEMS - {"m3"}
    # --include-seen: nothing left out
    table = recommend(run_dir, "--input", str(history), "--k", "1000", "--include-seen", capsys=capsys)
    assert set(table["item"]) == set(run.item_ids)


def test_all_users_covers_the_runs_users_not_the_dropped_ones(run_dir, run, capsys):
    table = recommend(run_dir, "--all-users", "--k", "2", capsys=capsys)
    assert set(table["user"]) == set(run.user_ids) and not {"few1", "low1"} & set(table["user"])
    assert (table["source"] == "model").all()


def test_the_library_leaves_a_dropped_users_items_out(run):
    empty = np.zeros((0, 2), dtype=np.int64)
    batch = run.histories(np.array(["few1", "u1", "nobody"], dtype=object), run.user_rows(["few1", "u1", "nobody"])[0],
                          empty, empty)
    table = run.recommend(batch, k=1000)
    lists = table.groupby("user", sort=False)["item"].apply(list).to_dict()
    assert lists["few1"] == [i for i in popular(run) if i not in FEW_ITEMS]
    assert lists["nobody"] == popular(run)
    row = run.users.get_loc("u1")  # a user of the run: as before, its own seen items left out
    assert not set(lists["u1"]) & set(run.item_ids[run.seen[row].indices])


def test_a_run_from_before_says_once_that_its_fallback_may_offer_their_items(run_dir, tmp_path, capsys, caplog):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / DROPPED_SEEN_FILE).unlink()
    users = write(tmp_path / "users.csv", uid=["few1", "low1", "nobody"])
    with caplog.at_level(logging.WARNING, logger="recvae"):
        table = recommend(old, "--users", str(users), "--k", "1000", "--batch-size", "1", capsys=capsys)
    notes = [r.getMessage() for r in caplog.records if DROPPED_SEEN_FILE in r.getMessage()]
    assert notes == [f"{old} has no {DROPPED_SEEN_FILE} (a run from an older recvae): the popular items offered to "
                     "the users it left out (dropped_users.csv) may include items they already have"]
    assert FEW_ITEMS <= set(table.loc[table["user"] == "few1", "item"])  # what it warned of


def test_a_damaged_or_foreign_dropped_seen_file_is_one_line_naming_it(run_dir, tmp_path, capsys):
    users = write(tmp_path / "users.csv", uid=["few1"])
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    path = bad / DROPPED_SEEN_FILE
    path.write_bytes(path.read_bytes()[:-100])
    assert main(["-q", "recommend", str(bad), "--users", str(users)]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {path}: damaged or not an .npz archive (expected the "
                                       "interactions cache)\n")
    seen = Interactions.load(run_dir / DROPPED_SEEN_FILE)
    Interactions(seen.matrix[:, 1:].tocsr(), seen.user_ids, seen.item_ids[1:]).save(path)  # another catalogue
    assert main(["-q", "recommend", str(bad), "--users", str(users)]) == 2
    assert capsys.readouterr().err == f"recvae: error: {path}: its items are not the run's\n"


@pytest.mark.slow
def test_serve_answers_unknown_users_with_popular_items_they_do_not_have(run_dir, run):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import start_server

    everything = popular(run)
    with start_server(run_dir, "--unknown-users", "popular") as (base, _):
        def post(body):
            r = httpx.post(f"{base}/recommend", json=body, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        few = post({"user": "few1", "k": run.n_items})
        assert few["source"] == "popularity" and few["unknown_items"] == []
        assert few["items"] == [i for i in everything if i not in FEW_ITEMS]
        np.testing.assert_allclose(few["scores"], run.popularity[run.items.get_indexer(few["items"])], rtol=1e-6)
        assert post({"user": "low1", "k": 3})["items"] == [i for i in everything if i not in LOW_ITEMS][:3]
        nobody = post({"user": "nobody", "k": 4, "exclude": [everything[0], "gone"]})
        assert nobody == {"items": everything[1:5], "scores": pytest.approx(
            run.popularity[run.items.get_indexer(everything[1:5])].tolist(), rel=1e-6),
            "source": "popularity", "unknown_items": ["gone"]}
        assert post({"user": "u1", "k": 3})["source"] == "model"  # a user of the run: as before
