"""A log that is not MovieLens-shaped (issue 28): ``customer_id,product_sku,ts`` with string ids
and Unix or ISO times, through the command line: a time column mixing formats, files of a few
users, and ids with spaces around them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.data import Interactions, read_interactions, strong_generalization_split
from recvae.data.ids import match_ids
from recvae.errors import InputError, ParameterError

COLUMNS = ["--user-col", "customer_id", "--item-col", "product_sku", "--rating-col", "none"]
JAN_1 = 1_704_067_200  # 2024-01-01 00:00:00 UTC


def write_log(path, rows, header="customer_id,product_sku,ts"):
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def shop_rows(iso: bool, n_users: int = 60, per_user: int = 20):
    """``n_users`` customers with ``per_user`` of 120 products each, one a day in January 2024
    (times in Unix seconds or as ISO datetimes: the same instants)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        for k, item in enumerate(rng.choice(120, per_user, replace=False)):
            seconds = JAN_1 + ((k + u) % 28) * 86_400 + u * 60
            when = pd.Timestamp(seconds, unit="s").strftime("%Y-%m-%d %H:%M:%S") if iso else seconds
            rows.append((f"c{u}", f"p{item}", when))
    return rows


# ---------------------------------------------------------------- 1. a time column mixing formats
def test_a_time_column_mixing_unix_and_iso_is_one_error_naming_the_first_of_each(tmp_path, capsys):
    path = write_log(tmp_path / "shop.csv", [("c0", "p0", 1700000000), ("c0", "p1", 1700000060),
                                              ("c1", "p0", 1700000120), ("c1", "p2", "2024-01-03"),
                                              ("c2", "p1", "2024-01-04")])
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), *COLUMNS, "--timestamp-col", "ts", "--cutoff", "2024-01-02",
                 "--model", "popularity", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"recvae: error: {path}: --timestamp-col: column 'ts' mixes time formats, line 2: 1700000000 (Unix seconds) "
        "and line 5: 2024-01-03 (ISO date); give one format per column: all Unix seconds, or all ISO dates/datetimes\n")
    assert not out.exists()
    # ISO first: the first of each kind, in the order of the file
    write_log(path, [("c0", "p0", "2024-01-03T10:00:00"), ("c0", "p1", "2024-01-03"), ("c1", "p0", 1700000000)])
    with pytest.raises(ParameterError) as e:
        read_interactions(path, "customer_id", "product_sku", timestamp_col="ts", min_user_interactions=0)
    assert str(e.value) == (f"{path}: timestamp_col: column 'ts' mixes time formats, line 2: 2024-01-03T10:00:00 (ISO "
                            "datetime) and line 4: 1700000000 (Unix seconds); give one format per column: all Unix "
                            "seconds, or all ISO dates/datetimes")


def test_unix_and_iso_columns_each_read_as_the_same_seconds_and_split_alike(tmp_path, capsys):
    epoch = write_log(tmp_path / "epoch.csv", shop_rows(iso=False))
    iso = write_log(tmp_path / "iso.csv", shop_rows(iso=True))
    a, b = (read_interactions(p, "customer_id", "product_sku", timestamp_col="ts", min_user_interactions=0)
            for p in (epoch, iso))
    assert a.timestamps.tolist() == b.timestamps.tolist()
    coo = b.matrix.tocoo()  # the timestamps follow the stored entries
    got = {(b.user_ids[r], b.item_ids[c]): t for r, c, t in zip(coo.row, coo.col, b.timestamps)}
    assert got == {(u, i): float(t) for u, i, t in shop_rows(iso=False)}  # the ISO text is the same instants
    assert got[("c1", shop_rows(iso=False)[20][1])] == JAN_1 + 86_400 + 60  # day 2, 00:01 UTC
    splits = []
    for path in (epoch, iso):
        out = tmp_path / f"run-{path.stem}"
        assert main(["-q", "train", "--data", str(path), *COLUMNS, "--timestamp-col", "ts", "--cutoff", "2024-01-15",
                     "--model", "popularity", "--show", "0", "--out", str(out)]) == 0
        splits.append(json.loads((out / "run.json").read_text())["split"])
    assert splits[0] == splits[1] and splits[0]["protocol"] == "cutoff"


def test_a_datetime_column_is_read_as_seconds():
    """A Parquet timestamp column (datetime64) gave microseconds as if they were seconds."""
    frame = pd.DataFrame({"user": ["a", "a"], "item": ["x", "y"],
                          "ts": pd.to_datetime(["2024-01-01 00:00:00", "2024-01-02 00:00:30"])})
    data = Interactions.from_dataframe(frame, timestamp_col="ts", min_user_interactions=0)
    assert data.timestamps.tolist() == [JAN_1, JAN_1 + 86_430]


# ---------------------------------------------------------------- 2. files of a few users
@pytest.mark.parametrize("n_users", [1, 2])
@pytest.mark.parametrize("extra", [[], ["--n-heldout-users", "1"], ["--timestamp-col", "ts", "--cutoff", "2024-01-15"],
                                   ["--timestamp-col", "ts", "--leave-last", "1"], ["--model", "multvae"]],
                         ids=["paper-split", "n-heldout-users", "cutoff", "leave-last", "multvae"])
def test_too_few_users_to_split_is_said_of_the_data_naming_no_flag(tmp_path, capsys, n_users, extra):
    """A one-customer file said "--n-heldout-users: ... expected fewer than 0.5", a flag never typed."""
    path = write_log(tmp_path / "shop.csv", shop_rows(iso=False, n_users=n_users, per_user=110))
    argv = ["train", "--data", str(path), *COLUMNS, "--out", str(tmp_path / "run"), *extra]
    if "--model" not in extra:
        argv += ["--model", "popularity"]
    assert main(argv) == 2
    users = "1 user" if n_users == 1 else "2 users"
    assert capsys.readouterr().err == (f"recvae: error: {path}: {users} after preprocessing; a split needs at least 3: "
                                       "one to train on, one to validate and one to test\n")
    assert not (tmp_path / "run").exists()


def test_too_few_users_is_an_input_error_in_the_library_too():
    data = Interactions.from_dataframe(pd.DataFrame({"user": [1, 1, 2, 2], "item": [1, 2, 1, 3]}),
                                       min_user_interactions=0)
    with pytest.raises(InputError) as e:
        strong_generalization_split(data)
    assert (e.value.param, str(e.value)) == (None, "2 users after preprocessing; a split needs at least 3: one to "
                                                   "train on, one to validate and one to test")


def test_held_out_users_with_nothing_to_hold_out_are_said_of_the_data(tmp_path, capsys):
    """Three customers, two with 2 products each: the validation user drawn had nothing to hold
    out, and training failed on "heldout: ..." or "values: expected at least one per-user value"."""
    rows = [("c0", f"p{i}", JAN_1 + i) for i in range(120)] + [(c, f"p{i}", JAN_1) for c in ("c1", "c2") for i in (1, 2)]
    path = write_log(tmp_path / "shop.csv", rows)
    for model in ("popularity", "multvae"):
        assert main(["train", "--data", str(path), *COLUMNS, "--min-user-interactions", "1", "--model", model,
                     "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == (f"recvae: error: {path}: none of the 1 validation user(s) drawn has an "
                                           "interaction to hold out, which needs 5 or more on the training items: more "
                                           "users, or more interactions per user\n")


def test_few_interactions_and_default_columns_are_said_of_the_data(tmp_path, capsys):
    path = write_log(tmp_path / "shop.csv", [(f"c{u}", f"p{i}", JAN_1) for u in range(3) for i in range(3)])
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(path), *COLUMNS, "--model", "popularity", "--out", out]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {path}: no user has 5 or more interactions, the minimum of "
                                       "--min-user-interactions (the most active user has 3): nothing left\n")
    # columns by default: the message does not start with a flag the user never typed...
    assert main(["train", "--data", str(path), "--model", "popularity", "--out", out]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {path}: column 'user' not found; available columns: "
                                       "['customer_id', 'product_sku', 'ts'] (the default, as --user-col was not given)\n")
    # ...and starts with the one the user typed, abbreviated or not
    for typed in (["--user-col", "customer"], ["--user-col=customer"], ["--user", "customer"]):
        assert main(["train", "--data", str(path), *typed, "--model", "popularity", "--out", out]) == 2
        assert capsys.readouterr().err == (f"recvae: error: {path}: --user-col: column 'customer' not found; "
                                           "available columns: ['customer_id', 'product_sku', 'ts']\n")


# ---------------------------------------------------------------- 3. spaces around ids
def spaced_log(tmp_path):
    """The shop log with ratings, where c0 is also written ' c0' and p5 also 'p5 '."""
    rows = [(u, i, 5) for u, i, _ in shop_rows(iso=False, n_users=40)]
    rows[1] = (" c0", rows[1][1], 5)
    rows = [(u, "p5 " if i == "p5" and k % 2 else i, r) for k, (u, i, r) in enumerate(rows)]
    return write_log(tmp_path / "shop.csv", rows, header="customer_id,product_sku,rating"), rows


def test_ids_with_spaces_around_them_are_one_id_with_one_warning(tmp_path, caplog):
    path, rows = spaced_log(tmp_path)
    n_spaced = sum(u != u.strip() for u, _, _ in rows) + sum(i != i.strip() for _, i, _ in rows)
    with caplog.at_level(logging.WARNING):
        data = read_interactions(path, "customer_id", "product_sku", min_user_interactions=0)
    assert data.n_users == 40 and " c0" not in data.user_ids and "p5 " not in data.item_ids
    assert data.matrix[data.user_index("c0")].nnz == 20
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: removed the spaces around {n_spaced} id(s) (' c0' is read as 'c0'); the first at line 3, column "
        "'customer_id'"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a run reads the file for its data, positives and seen items: one line
        assert main(["-q", "train", "--data", str(path), "--user-col", "customer_id", "--item-col", "product_sku",
                     "--model", "ease", "--show", "0", "--out", str(tmp_path / "run")]) == 0
    assert sum("removed the spaces" in r.getMessage() for r in caplog.records) == 1


def test_recommend_and_similar_find_ids_written_with_spaces(tmp_path, capsys):
    path, _ = spaced_log(tmp_path)
    run = str(tmp_path / "run")
    assert main(["-q", "train", "--data", str(path), "--user-col", "customer_id", "--item-col", "product_sku",
                 "--model", "ease", "--show", "0", "--out", run]) == 0
    who = write_log(tmp_path / "who.csv", [(" c0",)], header="customer_id")
    capsys.readouterr()
    assert main(["-q", "recommend", run, "--users", str(who), "--k", "5"]) == 0
    table = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out), dtype=str)
    seen = set(pd.read_csv(path, dtype=str).query("customer_id.str.strip() == 'c0'")["product_sku"].str.strip())
    assert set(table["user"]) == {"c0"} and len(table) == 5 and not set(table["item"]) & seen  # c0 of the run
    assert main(["-q", "similar", run, "--items", " p5", "--k", "3"]) == 0
    similar = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out), dtype=str)
    assert similar["item"].tolist() == ["p5"] * 3 and "p5" not in set(similar["similar_item"])
    # a request's ids (the service) go through the same lookup
    codes, converted, bad = match_ids([" c0", "c0 ", "c9"], pd.Index(["c0", "c9"]))
    assert codes.tolist() == [0, 0, 1] and converted.tolist() == ["c0", "c0", "c9"] and not bad.any()


def test_numeric_ids_are_unaffected(tmp_path, caplog):
    path = write_log(tmp_path / "ints.csv", [(u, i, 5) for u in (1, 2) for i in (10, 20)] + [(" 1", " 30", 5)],
                     header="user,item,rating")
    with caplog.at_level(logging.WARNING):
        data = read_interactions(path, rating_col="rating", min_user_interactions=0)
    assert data.user_ids.tolist() == [1, 2] and data.item_ids.tolist() == [10, 20, 30] and not caplog.records
