"""`recvae recommend` through the command line: every user of a run, id types, seen items, K
beyond the catalogue, the fallback's source and scale (the input problems of issue 13)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recvae.cli import main
from recvae.data import Interactions
from recvae.experiment import load_run
from recvae.recommend import RunRecommender
from recvae.data.splits import HeldOutUsers


def make_log(int_ids: bool) -> pd.DataFrame:
    """90 users in 3 taste clusters over 120 items; liked items rated 5, a few others 1-2."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(90):
        c = u % 3
        for i in rng.choice(np.arange(c * 40, c * 40 + 40), size=8, replace=False):
            rows.append((u, i, 5.0))
        for i in rng.choice(120, size=3, replace=False):
            rows.append((u, i, float(rng.choice([1, 2]))))
    df = pd.DataFrame(rows, columns=["uid", "iid", "stars"]).drop_duplicates(["uid", "iid"])
    if not int_ids:
        df["uid"] = "u" + df.uid.astype(str)
        df["iid"] = "m" + df.iid.astype(str)
    return df


def train(tmp_path_factory, df: pd.DataFrame, model: str, extra=()):
    folder = tmp_path_factory.mktemp(f"run-{model}")
    log = folder / "log.csv"
    df.to_csv(log, index=False)
    out = folder / "run"
    argv = ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", model, "--out", str(out), "--n-heldout-users", "10", "--show", "0", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def str_run(tmp_path_factory):
    df = make_log(int_ids=False)
    return train(tmp_path_factory, df, "multdae", ["--epochs", "3", "--batch-size", "30"]), df


@pytest.fixture(scope="module")
def int_run(tmp_path_factory):
    df = make_log(int_ids=True)
    return train(tmp_path_factory, df, "popularity"), df


def recommend(run, *args, capsys=None) -> pd.DataFrame:
    code = main(["-q", "recommend", str(run), *args])
    assert code == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def test_all_users_covers_every_user_with_full_history_and_no_seen_item(str_run, tmp_path, capsys):
    run, log = str_run
    out = tmp_path / "all.csv"
    assert main(["-q", "recommend", str(run), "--all-users", "--k", "5", "--output", str(out), "--batch-size", "7"]) == 0
    recs = pd.read_csv(out)
    assert list(recs.columns) == ["user", "rank", "item", "score", "source"]
    assert recs.groupby("user").size().eq(5).all()
    assert set(recs.user) == set(log.uid)  # training and held-out users alike
    assert set(recs.source) == {"model"}
    # nothing the user has at any rating comes back, low ratings included
    seen = set(zip(log.uid, log.iid))
    assert not any((u, i) in seen for u, i in zip(recs.user, recs.item))
    assert (log.stars < 3.5).any()
    # a held-out test user's list is the model's top-5 for fold-in + held-out items, low ratings excluded
    model, _ = load_run(run)
    test = HeldOutUsers.load(run / "test.npz")
    train = Interactions.load(run / "train.npz")
    user = test.user_ids[0]
    history = (test.fold_in[0] + test.heldout[0]).tocsr()
    low = log[(log.uid == user) & (log.stars < 3.5)].iid
    exclude = sp.csr_matrix((np.ones(len(low)), (np.zeros(len(low), int), train.item_index(low.to_numpy()))), shape=history.shape)
    ids, scores = model.recommend(history, N=5, exclude=exclude)
    mine = recs[recs.user == user]
    assert mine.item.tolist() == train.item_ids[ids[0]].tolist()
    np.testing.assert_allclose(mine.score, scores[0], rtol=1e-5)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask(), "output keeps the usual permissions"
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_all_users_parquet_equals_csv_and_users_subset(str_run, tmp_path, capsys):
    run, log = str_run
    pytest.importorskip("pyarrow")
    pq = tmp_path / "all.parquet"
    assert main(["-q", "recommend", str(run), "--all-users", "--k", "3", "--output", str(pq), "--batch-size", "20"]) == 0
    full = pd.read_parquet(pq)
    csv = recommend(run, "--all-users", "--k", "3", capsys=capsys)
    pd.testing.assert_frame_equal(full, csv, check_dtype=False, atol=1e-5)
    users = tmp_path / "some.csv"
    pd.DataFrame({"who": ["u4", "u7"]}).to_csv(users, index=False)
    some = recommend(run, "--users", str(users), "--user-col", "who", "--k", "3", capsys=capsys)
    assert some.user.tolist()[::3] == ["u4", "u7"]  # in the file's order
    expected = full[full.user.isin(["u4", "u7"])].sort_values(["user", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(some, expected, check_dtype=False, atol=1e-5)


def test_int_ids_match_whatever_their_type_in_the_file(int_run, tmp_path, capsys):
    run, log = int_run
    inp = tmp_path / "h.csv"
    # one id that is not a number ("alice", a new user) must not stop "1" from matching user 1
    inp.write_text("uid,iid\n1,3\nalice,3\n")
    recs = recommend(run, "--input", str(inp), "--k", "10", capsys=capsys)
    one = recs[recs.user.astype(str) == "1"]
    assert len(one) == 10 and set(one.source) == {"model"}
    assert not set(one.item) & set(log[log.uid == 1].iid), "user 1 got items it already has"
    alice = recs[recs.user == "alice"]
    assert 3 not in set(alice.item)


def test_an_item_that_cannot_be_an_id_names_line_and_column(int_run, tmp_path, capsys):
    run, _ = int_run
    inp = tmp_path / "h.csv"
    inp.write_text("uid,iid\n1,3\n1,1.5\n")
    assert main(["recommend", str(run), "--input", str(inp)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"recvae: error: --input {inp}: line 3, column 'iid' (--item-col) holds '1.5', "
                           "which cannot be an item id of the run (its item ids are integers)")


def test_users_only_file_and_run_defaults(int_run, tmp_path, capsys):
    run, log = int_run
    inp = tmp_path / "users.tsv"
    inp.write_text("uid\n5\n8\n")
    recs = recommend(run, "--input", str(inp), "--k", "4", capsys=capsys)  # --user-col from the run
    assert recs.groupby("user").size().to_dict() == {5: 4, 8: 4}
    for u in (5, 8):
        assert not set(recs[recs.user == u].item) & set(log[log.uid == u].iid)
    assert main(["recommend", str(run), "--input", str(inp), "--item-col", "movie"]) == 2
    assert "no item column 'movie' (--item-col); found ['uid']" in capsys.readouterr().err
    assert main(["recommend", str(run), "--input", str(inp), "--user-col", "user"]) == 2
    assert "no user column 'user' (--user-col); found ['uid']" in capsys.readouterr().err


def test_low_ratings_of_the_file_count_as_seen_not_as_history(int_run, tmp_path, capsys):
    run, _ = int_run
    inp = tmp_path / "h.csv"
    # a new user: item 0 liked (5), item 20 disliked (1): 20 is never recommended
    pd.DataFrame({"uid": [999, 999], "iid": [0, 20], "stars": [5, 1]}).to_csv(inp, index=False)
    recs = recommend(run, "--input", str(inp), "--k", "100", capsys=capsys)
    assert not {0, 20} & set(recs.item)
    kept = recommend(run, "--input", str(inp), "--k", "100", "--include-seen", capsys=capsys)
    assert {20} <= set(kept.item) and 0 in set(kept.item)
    # only the disliked row: nothing positive, so the popularity fallback, still without item 20
    pd.DataFrame({"uid": [999], "iid": [20], "stars": [1]}).to_csv(inp, index=False)
    recs = recommend(run, "--input", str(inp), "--k", "100", capsys=capsys)
    assert set(recs.source) == {"popularity"} and 20 not in set(recs.item)


@pytest.mark.slow
def test_k_beyond_the_catalogue_returns_it_all_fast(int_run, tmp_path, caplog):
    run, log = int_run
    out = tmp_path / "r.csv"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "recvae.cli", "recommend", str(run), "--all-users", "--k", "1000000000", "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 60
    catalogue = set(Interactions.load(run / "train.npz").item_ids.tolist())
    assert f"k = 1000000000 exceeds the catalogue: returning all {len(catalogue)} items" in proc.stderr
    recs = pd.read_csv(out)
    per_user = recs.groupby("user").size()
    seen = log[log.iid.isin(catalogue)].groupby("uid").size()
    assert (per_user == len(catalogue) - seen.reindex(per_user.index)).all()  # all unseen items, once


def test_output_equal_to_input_is_refused(int_run, tmp_path, capsys):
    run, _ = int_run
    inp = tmp_path / "h.csv"
    inp.write_text("uid\n5\n")
    assert main(["recommend", str(run), "--input", str(inp), "--output", str(inp)]) == 2
    assert f"--output {inp}: is the --input file" in capsys.readouterr().err
    assert inp.read_text() == "uid\n5\n"
    assert main(["recommend", str(run), "--users", str(inp), "--output", str(tmp_path / "." / "h.csv")]) == 2
    assert "is the --users file" in capsys.readouterr().err


def test_run_without_seen_file_still_works(int_run, tmp_path, capsys, caplog):
    run, log = int_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "seen.npz").unlink()
    with caplog.at_level(logging.INFO, logger="recvae.recommend"):
        recs = recommend(old, "--all-users", "--k", "3", capsys=capsys)
    assert any("has no seen.npz" in r.getMessage() for r in caplog.records)
    assert recs.user.nunique() == log.uid.nunique()


def test_input_file_errors_name_flag_file_and_line(int_run, tmp_path, capsys):
    run, _ = int_run

    def error(path, flag="--input"):
        assert main(["recommend", str(run), flag, str(path)]) == 2
        return capsys.readouterr().err.strip()

    assert error(tmp_path / "nope.csv") == f"recvae: error: --input {tmp_path / 'nope.csv'}: no such file"
    assert error(tmp_path, "--users") == f"recvae: error: --users {tmp_path}: is a directory, expected a file"
    (tmp_path / "empty.csv").write_text("")
    assert error(tmp_path / "empty.csv") == f"recvae: error: --input {tmp_path / 'empty.csv'}: file is empty"
    (tmp_path / "bad.csv").write_text("uid,iid\n1,3\n1,3,4\n")
    assert error(tmp_path / "bad.csv") == (f"recvae: error: --input {tmp_path / 'bad.csv'}: malformed comma-separated "
                                           "file: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3")


def test_input_without_known_extension_is_csv_and_compressed_files_read(int_run, tmp_path, capsys):
    run, _ = int_run
    (tmp_path / "h.txt").write_text("uid,iid\n1,3\n")
    want = recommend(run, "--input", str(tmp_path / "h.txt"), "--k", "5", capsys=capsys)
    pd.DataFrame({"uid": [1], "iid": [3]}).to_csv(tmp_path / "h.csv.gz", index=False)
    got = recommend(run, "--input", str(tmp_path / "h.csv.gz"), "--k", "5", capsys=capsys)
    pd.testing.assert_frame_equal(got, want)
    assert len(got) == 5


def test_precision_bf16_scores_as_the_bf16_model_and_a_float32_only_run_refuses_it(str_run, int_run, capsys):
    run, _ = str_run
    exact = recommend(run, "--all-users", "--k", "5", capsys=capsys)
    half = recommend(run, "--all-users", "--k", "5", "--precision", "bf16", capsys=capsys)
    model = RunRecommender(run, precision="bf16")
    want = model.recommend(model.known_histories(np.arange(len(model.user_ids))), 5)
    np.testing.assert_allclose(half["score"], want["score"], rtol=1e-6)
    assert half["item"].tolist() == want["item"].astype(half["item"].dtype).tolist()
    assert not np.allclose(half["score"], exact["score"], rtol=1e-6, atol=0)  # the bf16 product ran
    assert main(["-q", "recommend", str(int_run[0]), "--all-users", "--precision", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "recvae: error: --precision: Popularity scores in float32 only (expected one of ['fp32'], got 'bf16')")


@pytest.mark.parametrize("name", ["recs.xlsx", "recs.json", "recs.pt", "recs"])
def test_an_output_extension_it_cannot_write_is_refused_before_any_work(int_run, tmp_path, capsys, name):
    """`--output recs.xlsx` wrote CSV under that name without a word (issue 28)."""
    run, _ = int_run
    out = tmp_path / name
    assert main(["recommend", str(run), "--all-users", "--output", str(out)]) == 2
    suffix = out.suffix or "no extension"
    assert capsys.readouterr().err == (f"recvae: error: --output {out}: {suffix}: expected one of .csv, .tsv, .tab, "
                                       ".parquet, .pq (CSV, TSV or Parquet), or '-' for CSV on stdout\n")
    assert list(tmp_path.iterdir()) == []


def test_the_written_path_is_said_and_stdout_is_not(int_run, tmp_path, capsys, caplog):
    run, log = int_run
    out = tmp_path / "recs.TSV"  # the extension in any case
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert main(["recommend", str(run), "--all-users", "--k", "3", "--output", str(out)]) == 0
    n_users = log.uid.nunique()
    assert f"wrote {n_users} users' top-3 to {out}" in caplog.messages
    assert pd.read_csv(out, sep="\t").groupby("user").size().eq(3).all()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert main(["recommend", str(run), "--all-users", "--k", "3"]) == 0
    assert not [m for m in caplog.messages if m.startswith("wrote")]


def test_similar_refuses_an_unknown_extension_and_says_where_it_wrote(str_run, tmp_path, capsys, caplog):
    run, _ = str_run
    bad = tmp_path / "sim.json"
    assert main(["similar", str(run), "--items", "m0", "--output", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"recvae: error: --output {bad}: .json: expected one of .csv,")
    assert not bad.exists()
    out = tmp_path / "sim.csv"
    with caplog.at_level(logging.INFO, logger="recvae"):
        assert main(["similar", str(run), "--items", "m0", "m1", "--k", "4", "--output", str(out)]) == 0
    assert f"wrote the top-4 similar items of 2 item(s) to {out}" in caplog.messages
    assert len(pd.read_csv(out)) == 8


def test_a_history_file_on_the_wrong_separator_names_the_sep_flag(int_run, tmp_path, capsys):
    run, _ = int_run
    inp = tmp_path / "h.csv"
    inp.write_text("uid;iid\n5;20\n")
    assert main(["recommend", str(run), "--input", str(inp)]) == 2
    assert capsys.readouterr().err == (f"recvae: error: {inp}: --sep: its header 'uid;iid' is one column when split "
                                       "on ','; the file looks semicolon-separated: give --sep ';'\n")


def test_a_json_history_file_is_refused_under_its_flag(int_run, tmp_path, capsys):
    run, _ = int_run
    inp = tmp_path / "h.json"
    inp.write_text('[{"uid": 5, "iid": 20}]')
    assert main(["recommend", str(run), "--input", str(inp)]) == 2
    assert capsys.readouterr().err.startswith(f"recvae: error: --input {inp}: .json files are not read; save it as "
                                              "CSV or Parquet (known: CSV (.csv),")
