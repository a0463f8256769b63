"""Splits in time (recvae.data.time_splits.cutoff_split / leave_last_split) and their options: exactly
which interaction lands in training, fold-in or target, ties included; timestamps through
reading; the command line's options, run.json, resume, and one-line errors."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from recvae.cli import main
from recvae.data import Interactions, cutoff_split, leave_last_split, make_split, read_interactions
from recvae.data.time_splits import format_time, parse_cutoff
from recvae.errors import ParameterError
from recvae.experiment import DataSpec, RunConfig, load_split
from recvae.settings import resume_differences

T = 1451606400  # 2016-01-01 00:00:00 UTC


def interactions(rows, **kwargs) -> Interactions:
    df = pd.DataFrame(rows, columns=["user", "item", "ts"])
    return Interactions.from_dataframe(df, timestamp_col="ts", min_user_interactions=0, **kwargs)


def pairs_of(matrix, user_ids, item_ids) -> dict:
    """{user id: set of item ids} of a CSR matrix."""
    return {user_ids[r]: {item_ids[c] for c in matrix[r].indices} for r in range(matrix.shape[0])}


def heldout_pairs(split) -> dict:
    """{user id: (fold-in items, target items)} of the validation and test users together."""
    out = {}
    for users in (split.validation, split.test):
        fold = pairs_of(users.fold_in, users.user_ids, split.item_ids)
        target = pairs_of(users.heldout, users.user_ids, split.item_ids)
        out.update({u: (fold[u], target[u]) for u in fold})
    return out


# ---------------------------------------------------------------- cutoff
CUTOFF_ROWS = [
    (1, "x", 50), (1, "y", 90), (1, "z", 100), (1, "w", 150),  # z at the cutoff: the future; w on no training item
    (2, "x", 10), (2, "y", 20), (2, "v", 130),
    (3, "x", 30), (3, "y", 40), (3, "z", 60), (3, "v", 99),  # all before: always trains
    (4, "y", 200), (4, "w", 210),  # all at or after: trains on nothing
    (5, "x", 70), (5, "v", 120),
]
#: what each user able to be held out (1, 2, 5) folds in and is scored on, whichever set draws them
CUTOFF_HELDOUT = {1: ({"x", "y"}, {"z"}), 2: ({"x", "y"}, {"v"}), 5: ({"x"}, {"v"})}
#: what each user trains on when a training user
CUTOFF_TRAIN = {1: {"x", "y"}, 2: {"x", "y"}, 3: {"x", "y", "z", "v"}, 5: {"x"}}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutoff_puts_every_interaction_where_it_belongs(seed):
    split = cutoff_split(interactions(CUTOFF_ROWS), 100, n_heldout_users=1, seed=seed)
    held = heldout_pairs(split)
    assert len(split.validation.user_ids) == len(split.test.user_ids) == 1 and len(held) == 2
    assert {u: CUTOFF_HELDOUT[u] for u in held} == held
    trained = pairs_of(split.train.matrix, split.train.user_ids, split.train.item_ids)
    assert trained == {u: CUTOFF_TRAIN[u] for u in (1, 2, 3, 5) if u not in held}  # user 4: nothing before
    assert sorted(split.item_ids) == ["v", "x", "y", "z"]  # w was never seen before the cutoff
    d = split.describe()
    assert (d["protocol"], d["cutoff"], d["cutoff_utc"]) == ("cutoff", 100.0, "1970-01-01 00:01:40")
    assert d["train"]["n_users_without_training_interactions"] == 1
    left_out = {1: 2, 2: 1, 5: 1}[next(u for u in (1, 2, 5) if u not in held)]  # the training user's future
    assert d["train"]["n_interactions_not_trained_on"] == 2 + left_out  # + user 4's two
    assert "heldout_fraction" not in d and d["n_heldout_users_rule"] == "given"


def test_cutoff_draws_are_seeded_and_default_to_half_of_those_who_can_be_held_out():
    data = interactions(CUTOFF_ROWS)
    a, b = (cutoff_split(data, 100, seed=7) for _ in range(2))
    assert a.test.user_ids.tolist() == b.test.user_ids.tolist()
    assert a.n_heldout_users == 1  # 10% of 5 users = 1 (3 users can be held out: at most 1 + 1)
    assert a.describe()["n_heldout_users_rule"].endswith(
        "at most half the 3 users who can be held out (with interactions both before and at or after "
        "1970-01-01 00:01:40 UTC)")


def test_cutoff_accepts_iso_dates_and_unix_seconds_alike():
    assert parse_cutoff("2016-01-01") == parse_cutoff("1451606400") == parse_cutoff(T) == float(T)
    assert parse_cutoff("2016-01-01T01:30:00+01:30") == T  # a zone is honoured; none means UTC
    assert parse_cutoff("2016-01-01 00:00:01") == T + 1 and format_time(T) == "2016-01-01 00:00:00"
    rows = [(u, i, T + 3600 * (k - 2)) for u in range(4) for k, i in enumerate("abcd")]
    rows += [(9, i, T - 99999) for i in "abcd"]  # a training user who saw every item before
    a = cutoff_split(interactions(rows), "2016-01-01", n_heldout_users=1)
    b = cutoff_split(interactions(rows), T, n_heldout_users=1)
    assert heldout_pairs(a) == heldout_pairs(b) and all(h == ({"a", "b"}, {"c", "d"}) for h in heldout_pairs(a).values())


@pytest.mark.parametrize("cutoff, message", [
    (5, "cutoff: 1970-01-01 00:00:05 UTC is before every interaction (the first is at 1970-01-01 00:00:10 UTC): "
        "no training interaction"),
    (211, "cutoff: 1970-01-01 00:03:31 UTC is after every interaction (the last is at 1970-01-01 00:03:30 UTC): "
          "nothing to test"),
    (11, "cutoff: 1 user(s) with interactions both before and at or after 1970-01-01 00:00:11 UTC; a validation "
         "and a test user need at least 2"),
    ("next tuesday", "cutoff: expected an ISO date or datetime (2016-01-01, 2016-01-01T12:00:00) or Unix seconds, "
                     "got 'next tuesday'"),
    (math.nan, "cutoff: expected an ISO date or datetime (2016-01-01, 2016-01-01T12:00:00) or Unix seconds, got nan"),
])
def test_cutoff_errors(cutoff, message):
    with pytest.raises(ParameterError) as e:
        cutoff_split(interactions(CUTOFF_ROWS), cutoff)
    assert str(e.value) == message


def test_too_many_heldout_users_for_those_who_can_be_held_out():
    with pytest.raises(ParameterError) as e:
        cutoff_split(interactions(CUTOFF_ROWS), 100, n_heldout_users=2)
    assert str(e.value) == ("n_heldout_users: 2 validation + 2 test users, but only 3 users with interactions both "
                            "before and at or after 1970-01-01 00:01:40 UTC can be held out; expected at most 1")


# ---------------------------------------------------------------- leave last N
LEAVE_ROWS = [
    # user 1: a at 10, then c, d, b all at 20: by time, equal times in file order -> a, c, d, b
    (1, "c", 20), (1, "a", 10), (1, "d", 20), (1, "b", 20),
    # user 2: the pair (2, a) twice: its earliest time (5) counts, so b is the last one
    (2, "a", 5), (2, "b", 8), (2, "a", 50), (2, "c", 7),
    # user 3: two interactions, so with N = 2 nothing to fold in: cannot be held out
    (3, "a", 1), (3, "b", 2),
    (4, "a", 3), (4, "b", 4), (4, "c", 5), (4, "d", 6),
    (8, "a", 1), (8, "b", 1), (9, "c", 1), (9, "d", 1),  # two each: always training users, so every item trains
]


def test_leave_last_orders_by_time_then_source_row():
    data = interactions(LEAVE_ROWS)
    order = {1: ["a", "c", "d", "b"], 2: ["a", "c", "b"], 4: ["a", "b", "c", "d"]}  # by time, ties by row
    expected = {u: (set(items[:-2]), set(items[-2:])) for u, items in order.items()}
    seen = {}
    for seed in range(6):
        split = leave_last_split(data, 2, n_heldout_users=1, seed=seed)
        held = heldout_pairs(split)
        assert 3 not in held and held == {u: expected[u] for u in held}
        trained = pairs_of(split.train.matrix, split.train.user_ids, split.train.item_ids)
        assert set(trained) == {1, 2, 3, 4, 8, 9} - set(held)  # training users keep everything
        assert trained == {u: {i for v, i, _ in LEAVE_ROWS if v == u} for u in trained}
        seen.update(held)
    assert seen == expected  # every user able to be held out was drawn by some seed
    d = split.describe()
    assert (d["protocol"], d["leave_last"], d["ties"]) == (
        "leave_last", 2, "equal times in the order of their rows in the source")


def test_leave_last_counts_on_the_training_items():
    # user 9's last item "new" is on no training item: the last 1 of the others is the target
    rows = [(u, i, t) for u in (1, 2) for t, i in enumerate("abc")] + [(9, "a", 1), (9, "b", 2), (9, "new", 3)]
    for seed in range(4):
        split = leave_last_split(interactions(rows), 1, n_heldout_users=1, seed=seed)
        held = heldout_pairs(split)
        if 9 in held:
            assert held[9] == ({"a"}, {"b"})
            assert split.describe()["validation" if 9 in split.validation.user_ids else "test"][
                "n_interactions_on_items_not_in_train"] == 1


@pytest.mark.parametrize("n, message", [
    (0, "leave_last: expected a positive integer (targets per held-out user), got 0"),
    (True, "leave_last: expected a positive integer (targets per held-out user), got True"),
    (4, "leave_last: 0 user(s) with more than 4 interactions; a validation and a test user need at least 2"),
])
def test_leave_last_errors(n, message):
    with pytest.raises(ParameterError) as e:
        leave_last_split(interactions(LEAVE_ROWS), n)
    assert str(e.value) == message


def test_a_split_in_time_needs_timestamps_and_one_kind():
    data = Interactions.from_dataframe(pd.DataFrame({"user": [1, 2], "item": [1, 2]}), min_user_interactions=0)
    with pytest.raises(ParameterError, match=r"^timestamp_col: a split in time needs each interaction's time"):
        cutoff_split(data, 100)
    with pytest.raises(ParameterError, match=r"^leave_last: cannot be combined with cutoff"):
        make_split(interactions(LEAVE_ROWS), cutoff=3, leave_last=1)
    assert make_split(interactions(LEAVE_ROWS), n_heldout_users=1).protocol == "strong_generalization"


# ---------------------------------------------------------------- timestamps when reading
def test_timestamps_survive_reading_and_preprocessing(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,rating,when\n1,a,5,2016-01-02\n1,b,2,2016-01-01\n1,a,4,2015-12-31T23:00:00Z\n"
                    "2,b,5,2016-01-01 12:00\n")
    it = read_interactions(path, rating_col="rating", timestamp_col="when", min_user_interactions=0)
    # (1, b) is rated 2: dropped; (1, a) twice: its earliest time and that row (line 4, position 2)
    assert it.matrix.toarray().tolist() == [[1, 0], [0, 1]]
    assert it.timestamps.tolist() == [T - 3600, T + 43200] and it.sequence.tolist() == [2, 3]
    back = Interactions.load(it.save(tmp_path / "c.npz"))
    assert back.timestamps.tolist() == it.timestamps.tolist() and back.sequence.tolist() == [2, 3]


@pytest.mark.parametrize("value, message", [
    ("", "line 3 has no time (1 empty value(s) in the column)"),
    ("soon", "line 3 holds 'soon'"),
    ("2016-13-01", "line 3 holds '2016-13-01'"),
])
def test_bad_timestamps_name_file_and_line(tmp_path, value, message):
    path = tmp_path / "log.csv"
    path.write_text(f"user,item,ts\n1,a,2016-01-01\n1,b,{value}\n")
    with pytest.raises(ParameterError) as e:
        read_interactions(path, timestamp_col="ts", min_user_interactions=0)
    assert str(e.value) == (f"{path}: timestamp_col: column 'ts': {message}; expected Unix seconds or an ISO date or "
                            "datetime (2016-01-31, 2016-01-31 12:00:00)")
    path.write_text("user,item,ts\n1,a,1451606400\n1,b,1451606401\n2,a,x\n")  # numbers, then not
    with pytest.raises(ParameterError, match=r"column 'ts': line 4 holds 'x'; expected"):
        read_interactions(path, timestamp_col="ts", min_user_interactions=0)


# ---------------------------------------------------------------- experiment: run.json and resume
def test_run_config_records_the_split_and_resume_compares_it(tmp_path):
    spec = DataSpec(path="log.csv", timestamp_col="ts")
    config = RunConfig(data=spec, model="popularity", cutoff="2016-01-01")
    from recvae.settings import describe as _description

    saved = _description(config)
    assert saved["split_settings"] == {"split_seed": 0, "n_heldout_users": None, "holdout": "users", "cutoff": "2016-01-01"}
    assert saved["data"]["timestamp_col"] == "ts"
    assert resume_differences(config, saved) == []
    other = RunConfig(data=DataSpec(path="log.csv", timestamp_col="ts"), model="popularity", leave_last=1)
    assert sorted(resume_differences(other, saved)) == [("cutoff", "2016-01-01", None), ("leave_last", None, 1)]
    paper = RunConfig(data=DataSpec(path="log.csv"), model="popularity")
    old = _description(paper)  # a run.json written before splits in time: no such keys
    assert old["split_settings"] == {"split_seed": 0, "n_heldout_users": None, "holdout": "users"}
    assert "timestamp_col" in old["data"]
    del old["data"]["timestamp_col"], old["split_settings"]["holdout"]
    assert resume_differences(paper, old) == []


def test_timestamp_column_without_a_split_in_time_is_refused():
    with pytest.raises(ParameterError, match=r"^timestamp_col: 'ts' given without a split in time"):
        load_split(RunConfig(data=DataSpec(path="never-read.csv", timestamp_col="ts")))


# ---------------------------------------------------------------- command line
def _cli_log(tmp_path):
    """40 background users rate 6 of 120 items each before T (user 100 also once after); users 1-4
    can be held out (their expected fold-in and targets below); user 5 rates only after T."""
    rows = []
    for u in range(40):
        rows += [(100 + u, f"i{(u * 7 + k) % 120:03d}", 5, T - 1000 + k) for k in range(6)]
    rows.append((100, "i119", 5, T + 5))
    rows += [(1, f"i{k:03d}", 5, T - 300 + 50 * k) for k in range(4)] + [(1, "i004", 5, T), (1, "i005", 5, T + 10),
                                                                           (1, "new", 5, T + 20), (1, "i006", 2, T - 1)]
    rows += [(2, f"i{k:03d}", 5, T - 10 + k) for k in range(10, 14)] + [(2, "i014", 5, T + 1)]
    rows += [(3, f"i{k:03d}", 5, T - 100 + k) for k in range(20, 25)] + [(3, "i025", 5, T + 5), (3, "i026", 4, T + 6)]
    rows += [(4, f"i{k:03d}", 5, T - 9) for k in range(30, 33)] + [(4, f"i{k:03d}", 5, T + 9) for k in range(33, 36)]
    rows += [(5, f"i{k:03d}", 5, T + k) for k in range(40, 45)]
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_csv(path, index=False)
    return path, rows


CLI_HELDOUT = {
    100: ({f"i{k:03d}" for k in range(6)}, {"i119"}),  # a background user with one interaction after T
    1: ({"i000", "i001", "i002", "i003"}, {"i004", "i005"}),  # i004 at T: a target; "new": no training item
    2: ({"i010", "i011", "i012", "i013"}, {"i014"}),
    3: ({"i020", "i021", "i022", "i023", "i024"}, {"i025", "i026"}),
    4: ({"i030", "i031", "i032"}, {"i033", "i034", "i035"}),
}


def test_train_with_a_cutoff_through_the_command_line(tmp_path, capsys, caplog):
    from recvae.rundir import RunDir

    path, rows = _cli_log(tmp_path)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="recvae"):
        assert main(["train", "--data", str(path), "--cutoff", "2016-01-01", "--n-heldout-users", "2",
                     "--model", "popularity", "--show", "0", "--out", str(out)]) == 0
    assert "log.csv: reading its 'timestamp' column as the time of each interaction" in caplog.text
    run = RunDir(out)
    model = run.load_model()
    held = {}
    for name in ("validation", "test"):
        users = run.load_users(name, model)
        fold, target = (pairs_of(m, users.user_ids, model.item_ids_) for m in (users.fold_in, users.heldout))
        held.update({u: (fold[u], target[u]) for u in fold})
    assert len(held) == 4 and held == {u: CLI_HELDOUT[u] for u in held}  # 4 of the 5 users who can be
    train = run.load_train(model)
    expected = {}
    for u, i, r, t in rows:
        if u not in held and u != 5 and t < T and r > 3.5:  # user 5: nothing before T
            expected.setdefault(u, set()).add(i)
    assert pairs_of(train.matrix, train.user_ids, train.item_ids) == expected  # nothing at or after T
    saved = json.loads((out / "run.json").read_text())
    assert saved["split_settings"]["cutoff"] == "2016-01-01" and saved["data"]["timestamp_col"] == "timestamp"
    assert saved["split"]["protocol"] == "cutoff" and saved["split"]["cutoff"] == T
    # resuming with another split is refused naming the flag
    capsys.readouterr()
    assert main(["train", "--data", str(path), "--leave-last", "1", "--n-heldout-users", "2", "--model", "popularity",
                 "--show", "0", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recvae: error: --resume: ") and "--cutoff: '2016-01-01' in the run, now None; " \
        "--leave-last: None in the run, now 1" in err


def test_leave_last_through_the_command_line(tmp_path):
    from recvae.rundir import RunDir

    path, rows = _cli_log(tmp_path)
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(path), "--leave-last", "1", "--n-heldout-users", "3",
                 "--model", "popularity", "--show", "0", "--out", str(out)]) == 0
    run = RunDir(out)
    model = run.load_model()
    for name in ("validation", "test"):
        users = run.load_users(name, model)
        assert users.heldout.sum(axis=1).tolist() == [[1]] * users.n_users  # exactly the last one each
        last = {u: max((t, i) for v, i, r, t in rows if v == u and r > 3.5 and i in set(model.item_ids_))[1]
                for u in users.user_ids}
        assert pairs_of(users.heldout, users.user_ids, model.item_ids_) == {u: {last[u]} for u in users.user_ids}


@pytest.mark.parametrize("extra, message", [
    (["--cutoff", "2016-01-01", "--leave-last", "2"], "--leave-last: cannot be combined with --cutoff; choose one "
                                                      "split in time"),
    (["--timestamp-col", "timestamp"], "--timestamp-col: 'timestamp' given without a split in time (--cutoff or "
                                       "--leave-last), the one use of timestamps"),
    (["--leave-last", "0"], "--leave-last: expected a positive integer (targets per held-out user), got 0"),
    (["--cutoff", "soon"], "--cutoff: expected an ISO date or datetime (2016-01-01, 2016-01-01T12:00:00) or Unix "
                           "seconds, got 'soon'"),
    (["--cutoff", "2015-01-01"], "--cutoff: 2015-01-01 00:00:00 UTC is before every interaction (the first is at "
                                 "2015-12-31 23:43:20 UTC): no training interaction"),
    (["--cutoff", "2017-01-01"], "--cutoff: 2017-01-01 00:00:00 UTC is after every interaction (the last is at "
                                 "2016-01-01 00:00:44 UTC): nothing to test"),
    (["--cutoff", "2016-01-01", "--timestamp-col", "ts"], "{path}: --timestamp-col: column 'ts' not found; "
                                                          "available columns: ['user', 'item', 'rating', 'timestamp']"),
])
def test_bad_time_options_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    path, _ = _cli_log(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--model", "popularity", "--out", str(out), *extra]) == 2
    assert capsys.readouterr().err.strip() == "recvae: error: " + message.format(path=path)
    assert not out.exists()


def test_time_options_on_files_without_times(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u in range(9) for i in range(5)))
    assert main(["train", "--data", str(path), "--rating-col", "none", "--cutoff", "2016-01-01",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"recvae: error: {path}: a split in time needs the time of each interaction, and no time column was given: "
        "name it with --timestamp-col (columns: ['user', 'item'])")
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,timestamp\n1,2,100\n1,3,\n")
    assert main(["train", "--data", str(bad), "--rating-col", "none", "--leave-last", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"recvae: error: {bad}: --timestamp-col: column 'timestamp': line 3 has no time (1 empty value(s) in the "
        "column); expected Unix seconds or an ISO date or datetime (2016-01-31, 2016-01-31 12:00:00)")
    prepared = tmp_path / "prepared"
    assert main(["-q", "prepare", "--data", str(path), "--rating-col", "none", "--out", str(prepared)]) == 0
    assert main(["train", "--prepared", str(prepared), "--cutoff", "2016-01-01"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"recvae: error: --prepared: {prepared} holds no timestamps (recvae prepare keeps none): split in time from "
        "the interaction file (--data) or the dataset (--dataset)")
