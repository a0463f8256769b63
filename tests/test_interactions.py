"""Interactions: construction from tables, id lookups, the .npz cache, and the file readers."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recvae.data import Interactions, read_interactions, read_table


def frame(rows, cols=("user", "item", "rating")):
    return pd.DataFrame(rows, columns=list(cols))


def dense(it: Interactions) -> np.ndarray:
    return it.matrix.toarray()


# ---------------------------------------------------------------- from_dataframe
def test_threshold_is_strict_and_duplicates_merge():
    df = frame([(1, "a", 4), (1, "b", 3.5), (2, "a", 5), (2, "a", 4.5), (2, "c", 3.6), (3, "b", 1)])
    it = Interactions.from_dataframe(df, rating_col="rating", rating_threshold=3.5, min_user_interactions=0)
    # 3.5 is not > 3.5; user 3 has nothing left; the duplicate (2, a) counts once
    assert it.user_ids.tolist() == [1, 2]
    assert it.item_ids.tolist() == ["a", "c"]
    np.testing.assert_array_equal(dense(it), [[1, 0], [1, 1]])
    assert it.matrix.dtype == np.float32 and it.matrix.has_sorted_indices
    assert it.nnz == 3


def test_without_ratings_every_row_counts():
    df = frame([(5, 7), (5, 7), (3, 9)], cols=("u", "i"))
    it = Interactions.from_dataframe(df, "u", "i", min_user_interactions=0)
    assert it.user_ids.tolist() == [3, 5] and it.item_ids.tolist() == [7, 9]
    np.testing.assert_array_equal(dense(it), [[0, 1], [1, 0]])
    assert it.user_ids.dtype == np.int64


def test_min_counts_user_filter_then_item_filter_single_pass():
    # users: 1 has 3 items, 2 has 2, 3 has 1. min_user=2 drops user 3 (item z then has
    # 0 left). Items after that: x 2, y 2, w 1 -> min_item=2 drops w, which leaves user 1
    # with 2 items and user 2 with 2; no second pass.
    rows = [(1, "x"), (1, "y"), (1, "w"), (2, "x"), (2, "y"), (3, "z"), (3, "w")]
    rows = rows[:-1]  # user 3: only z
    it = Interactions.from_dataframe(frame(rows, ("user", "item")), min_user_interactions=2, min_item_interactions=2)
    assert it.user_ids.tolist() == [1, 2]
    assert it.item_ids.tolist() == ["x", "y"]
    np.testing.assert_array_equal(dense(it), [[1, 1], [1, 1]])


def test_item_filter_counts_after_user_filter_and_is_not_iterated():
    # item q has 2 interactions, one from user 9 who is dropped by the user filter ->
    # q has 1 left and goes; then user 1 has 1 item left (< 2) but stays: single pass.
    rows = [(1, "p"), (1, "q"), (2, "p"), (2, "r"), (3, "p"), (3, "r"), (9, "q")]
    it = Interactions.from_dataframe(frame(rows, ("user", "item")), min_user_interactions=2, min_item_interactions=2)
    assert it.item_ids.tolist() == ["p", "r"]
    assert it.user_ids.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(dense(it), [[1, 0], [1, 1], [1, 1]])


def test_string_ids_are_sorted_and_stored_as_unicode():
    df = frame([("zoe", "m2"), ("al", "m10"), ("al", "m2")], ("user", "item"))
    it = Interactions.from_dataframe(df, min_user_interactions=0)
    assert it.user_ids.tolist() == ["al", "zoe"] and it.item_ids.tolist() == ["m10", "m2"]
    assert it.user_ids.dtype.kind == "U"


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(user_col="uid"), KeyError, r"user_col: column 'uid' not found; available columns: \['user', 'item', 'rating'\]"),
        (dict(item_col="movieId"), KeyError, r"item_col: column 'movieId' not found; available columns"),
        (dict(rating_col="score"), KeyError, r"rating_col: column 'score' not found"),
        (dict(rating_threshold=-math.inf), ValueError, r"rating_threshold: expected a finite number or None, got -inf"),
        (dict(rating_col="rating", rating_threshold=5), ValueError,
         r"^no rating is above 5, the threshold of rating_threshold \(the highest is 5\): nothing left$"),
        (dict(min_user_interactions=3), ValueError, r"^no user has 3 or more interactions, the minimum of "
                                                    r"min_user_interactions \(the most active user has 2\): nothing left$"),
        (dict(min_item_interactions=3), ValueError, r"^no item has 3 or more interactions after the user filter, the "
                                                    r"minimum of min_item_interactions \(the most popular item has 2\)"),
        (dict(min_user_interactions=-1), ValueError, r"min_user_interactions: expected a non-negative integer, got -1"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, pattern):
    df = frame([(1, "a", 4), (1, "b", 5), (2, "a", 2)])
    with pytest.raises(exc, match=pattern):
        Interactions.from_dataframe(df, **{"min_user_interactions": 0, **kwargs})


def test_non_numeric_rating_names_column_and_first_bad_row():
    df = pd.DataFrame({"user": [1, 2, 3, 4], "item": [1, 1, 1, 1], "rating": ["4", "5", "five", "x"]})
    with pytest.raises(ValueError, match=r"rating_col: column 'rating' must be numeric; row 2 \(index 2\) holds 'five'"):
        Interactions.from_dataframe(df, rating_col="rating", min_user_interactions=0)


def test_missing_ids_are_an_error():
    df = pd.DataFrame({"user": [1.0, np.nan, 3.0], "item": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"user_col: column 'user' has 1 missing id\(s\); first at row 1"):
        Interactions.from_dataframe(df, min_user_interactions=0)
    df = pd.DataFrame({"user": [1, 2], "item": ["a", None]})
    with pytest.raises(ValueError, match=r"item_col: column 'item' has 1 missing id"):
        Interactions.from_dataframe(df, min_user_interactions=0)


def test_mixed_id_types_are_an_error():
    df = pd.DataFrame({"user": pd.Series([1, "b"], dtype=object), "item": [1, 2]})
    with pytest.raises(ValueError, match=r"user_col: column 'user' mixes id types"):
        Interactions.from_dataframe(df, min_user_interactions=0)


def test_empty_table_is_an_error():
    with pytest.raises(ValueError, match="the table is empty"):
        Interactions.from_dataframe(frame([], ("user", "item")), min_user_interactions=0)


def test_source_prefixes_messages():
    with pytest.raises(KeyError, match=r"ratings\.csv: user_col"):
        Interactions.from_dataframe(frame([(1, 2, 3)]), user_col="u", source="ratings.csv")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8), st.sampled_from([1.0, 2.5, 3.5, 4.0, 5.0])), min_size=1, max_size=40),
    st.integers(0, 3),
)
def test_matches_a_set_based_reference(rows, min_user):
    """The matrix holds exactly the distinct (user, item) pairs with rating > 3.5 of users
    with >= min_user such pairs, at their sorted-id positions."""
    pairs = {(u, i) for u, i, r in rows if r > 3.5}
    per_user = {u: sum(1 for p in pairs if p[0] == u) for u, _ in pairs}
    pairs = {(u, i) for u, i in pairs if per_user[u] >= min_user}
    df = frame(rows)
    if not pairs:
        with pytest.raises(ValueError, match="nothing left"):
            Interactions.from_dataframe(df, rating_col="rating", rating_threshold=3.5, min_user_interactions=min_user)
        return
    it = Interactions.from_dataframe(df, rating_col="rating", rating_threshold=3.5, min_user_interactions=min_user)
    assert it.user_ids.tolist() == sorted({u for u, _ in pairs})
    assert it.item_ids.tolist() == sorted({i for _, i in pairs})
    coo = it.matrix.tocoo()
    got = {(int(it.user_ids[r]), int(it.item_ids[c])) for r, c in zip(coo.row, coo.col)}
    assert got == pairs and it.nnz == len(pairs) and set(coo.data) == {1.0}


# ---------------------------------------------------------------- id lookups
def test_index_lookups_return_minus_one_for_unknown():
    it = Interactions.from_dataframe(frame([("u1", 10), ("u2", 30), ("u3", 20)], ("user", "item")), min_user_interactions=0)
    assert it.user_index(["u3", "nobody", "u1"]).tolist() == [2, -1, 0]
    assert it.user_index("u2") == 1 and it.user_index("x") == -1
    assert it.item_index([30, 10, 99]).tolist() == [2, 0, -1]
    assert it.item_index(np.array([20])).tolist() == [1]
    assert it.item_index(["10", 10]).tolist() == [-1, 0]  # exact: a string is not an int id
    assert it.item_index(20) == 1 and isinstance(it.item_index(20), int)
    # round trip: ids -> indices -> ids
    assert it.item_ids[it.item_index(it.item_ids)].tolist() == it.item_ids.tolist()


# ---------------------------------------------------------------- .npz cache
@pytest.mark.parametrize("ids", [("int", [3, 1, 2]), ("str", ["c", "a", "b"])])
def test_npz_round_trip(tmp_path, ids):
    _, users = ids
    df = pd.DataFrame({"user": users + users[:1], "item": ["x", "y", "z", "z"]})
    it = Interactions.from_dataframe(df, min_user_interactions=0)
    path = it.save(tmp_path / "cache.npz")
    assert os.listdir(tmp_path) == ["cache.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as z:  # readable without pickle
        assert z["user_ids"].dtype.kind in "iU"
    back = Interactions.load(path)
    assert back.user_ids.tolist() == it.user_ids.tolist() and back.user_ids.dtype == it.user_ids.dtype
    assert back.item_ids.tolist() == it.item_ids.tolist()
    assert (back.matrix != it.matrix).nnz == 0 and back.matrix.dtype == np.float32
    assert back.user_index(users[0]) == it.user_index(users[0])


def test_npz_save_overwrites_atomically_and_load_errors(tmp_path):
    it = Interactions.from_dataframe(frame([(1, 2), (2, 3)], ("user", "item")), min_user_interactions=0)
    target = tmp_path / "c.npz"
    target.write_bytes(b"old")
    it.save(target)
    assert Interactions.load(target).nnz == 2
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.npz"))):
        Interactions.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: damaged or not an .npz archive"):
        Interactions.load(tmp_path / "junk.npz")


def test_npz_save_to_read_only_dir_names_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        it = Interactions.from_dataframe(frame([(1, 2)], ("user", "item")), min_user_interactions=0)
        with pytest.raises(PermissionError, match=re.escape(str(ro))):
            it.save(ro / "c.npz")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- readers
RATINGS = [(1, 10, 4.0, 100), (1, 20, 2.0, 101), (2, 10, 5.0, 102), (2, 30, 4.5, 103)]


def _expected(it):
    assert it.user_ids.tolist() == [1, 2] and it.item_ids.tolist() == [10, 30]
    np.testing.assert_array_equal(dense(it), [[1, 0], [1, 1]])


@pytest.mark.parametrize(
    "filename, text, kwargs",
    [
        ("r.csv", "user,item,rating,ts\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in RATINGS), {}),
        ("r.tsv", "user\titem\trating\tts\n" + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS), {}),
        ("r.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS), dict(names=["user", "item", "rating", "ts"])),
        ("u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in RATINGS), dict(names=["user", "item", "rating", "ts"])),
        ("r.txt", "".join(f"{u};{i};{r};{t}\n" for u, i, r, t in RATINGS), dict(sep=";", names=["user", "item", "rating", "ts"])),
    ],
)
def test_text_readers_round_trip(tmp_path, filename, text, kwargs):
    path = tmp_path / filename
    path.write_text(text)
    df = read_table(path, **kwargs)
    assert df.shape == (4, 4) and df["user"].tolist() == [1, 1, 2, 2] and df["item"].tolist() == [10, 20, 10, 30]
    _expected(read_interactions(path, rating_col="rating", min_user_interactions=0, **kwargs))  # threshold: 3.5


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(RATINGS, columns=["user", "item", "rating", "ts"])
    for name in ("r.parquet", "r.bin"):
        df.to_parquet(tmp_path / name)
        fmt = None if name.endswith(".parquet") else "parquet"
        _expected(read_interactions(tmp_path / name, rating_col="rating", rating_threshold=3.5, format=fmt,
                                       min_user_interactions=0))


def test_double_colon_fields_holding_colons(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_text("1::Star Wars: Episode IV (1977)::Action|Sci-Fi\n2::Heat (1995)::Action\n")
    df = read_table(path, names=["item", "title", "genres"])
    assert df["title"].tolist() == ["Star Wars: Episode IV (1977)", "Heat (1995)"]
    assert df["item"].tolist() == [1, 2]


@pytest.mark.parametrize(
    "filename, text",
    [
        ("bad.csv", "user,item\n1,2\n3,4,5\n6,7\n"),
        ("bad.dat", "1::2::5::100\n3::4::5::101::9\n"),
    ],
)
def test_malformed_line_is_reported_with_file_and_line(tmp_path, filename, text):
    path = tmp_path / filename
    path.write_text(text)
    names = None if filename.endswith(".csv") else ["user", "item", "rating", "ts"]
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: malformed .*line [23]\b"):
        read_table(path, names=names)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.csv"))):
        read_interactions(tmp_path / "nope.csv")
    (tmp_path / "r.xyz").write_text("user,item\n1,2\n")
    with pytest.raises(ValueError, match=r"r\.xyz: cannot tell the format from the extension '\.xyz'; give sep "):
        read_interactions(tmp_path / "r.xyz")
    (tmp_path / "r.csv").write_text("userId,movieId\n1,2\n")
    with pytest.raises(KeyError, match=r"r\.csv: user_col: column 'user' not found; available columns: \['userId', 'movieId'\]"):
        read_interactions(tmp_path / "r.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: file is empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes("user,item\n1,Am\xe9lie\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not valid utf-8 text"):
        read_table(tmp_path / "latin.csv")
    assert read_table(tmp_path / "latin.csv", encoding="latin-1")["item"].tolist() == ["Amélie"]
    with pytest.raises(ValueError, match=r"format: expected 'csv' or 'parquet', got 'xls'"):
        read_table(tmp_path / "r.csv", format="xls")


def test_csv_without_header_uses_names(tmp_path):
    (tmp_path / "r.csv").write_text("1,10,4\n2,10,5\n")
    it = read_interactions(tmp_path / "r.csv", names=["user", "item", "rating"], rating_col="rating", rating_threshold=4,
                          min_user_interactions=0)
    assert it.user_ids.tolist() == [2] and it.item_ids.tolist() == [10]
    assert sp.isspmatrix_csr(it.matrix)


def test_atomic_write_never_creates_folders_under_a_read_only_one(tmp_path):
    """Root may write anywhere; a folder without write bits must still stay untouched."""
    from recvae.fileio import atomic_write

    ro = tmp_path / "shared"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            atomic_write(ro / "cache" / "x.npz", lambda f: f.write(b"x"))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
    atomic_write(tmp_path / "ok.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "ok.bin").read_bytes() == b"abc"
    assert (tmp_path / "ok.bin").stat().st_mode & 0o044  # readable by others, unlike mkstemp's 0600


def test_read_table_id_columns_as_text_and_locate(tmp_path):
    (tmp_path / "h.csv").write_text("user,item,rating\n007,10,4\n8,011,\n")
    df, locate = read_table(tmp_path / "h.csv", id_cols=("user", "item", "absent"), locate=True)
    assert df["user"].tolist() == ["007", "8"] and df["item"].tolist() == ["10", "011"]
    assert df["rating"].dtype.kind == "f" and locate(0) == "line 2"  # the header is line 1
    (tmp_path / "h.dat").write_text("007::10\n8::11\n")
    df, locate = read_table(tmp_path / "h.dat", names=["user", "item"], id_cols=("user",), locate=True)
    assert df["user"].tolist() == ["007", "8"] and df["item"].tolist() == [10, 11] and locate(1) == "line 2"
    (tmp_path / "h.txt").write_text("user;item\n1;2\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_table(tmp_path / "h.txt")
    assert read_table(tmp_path / "h.txt", default_sep=";")["item"].tolist() == [2]
    assert read_table(tmp_path / "h.txt", sep=";", default_sep=",")["item"].tolist() == [2]


def test_read_table_compressed_text_and_parquet_whatever_sep(tmp_path):
    df = pd.DataFrame({"user": [1, 2], "item": [3, 4]})
    df.to_csv(tmp_path / "h.tsv.gz", sep="\t", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "h.tsv.gz"), df)
    pytest.importorskip("pyarrow")
    df.to_parquet(tmp_path / "h.parquet")
    got, locate = read_table(tmp_path / "h.parquet", sep="::", id_cols=("user",), locate=True)
    pd.testing.assert_frame_equal(got, df)  # Parquet columns keep their stored types
    assert locate(0) == "row 1"


def test_a_missing_rating_column_hints_at_no_ratings_by_the_parameters_name():
    """The hint said "give none" without naming what to give it to (issue 28)."""
    from recvae.errors import ColumnError

    with pytest.raises(ColumnError) as info:
        Interactions.from_dataframe(pd.DataFrame({"user": [1], "item": [2]}), rating_col="rating")
    assert str(info.value) == ("rating_col: column 'rating' not found; available columns: ['user', 'item']; if the data "
                               "has no ratings, give rating_col none")
