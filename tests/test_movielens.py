"""MovieLens loaders: GroupLens layouts built by the tests, served from 127.0.0.1; real files."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import recvae.data.movielens as ml
from archives import EXPECTED_DENSE, EXPECTED_ITEMS, EXPECTED_USERS, LAYOUT, RATINGS, TITLES, LocalServer
from archives import grouplens_files, grouplens_zip, sha256
from recvae.data import ChecksumError, DownloadError, load_movielens, load_movielens_ratings, load_movielens_titles

NAMES = list(LAYOUT)


@pytest.fixture
def server(monkeypatch):
    with LocalServer() as s:
        monkeypatch.setenv(ml.URL_ENV_VAR, s.url)
        yield s


def expect_digest(monkeypatch, name: str, archive: bytes) -> None:
    """Make the registry expect the test archive's own SHA-256 (and no MD5)."""
    spec = dataclasses.replace(ml.DATASETS[name], sha256=sha256(archive), md5=None)
    monkeypatch.setitem(ml.DATASETS, name, spec)


def assert_paper_preprocessed(it) -> None:
    assert it.user_ids.tolist() == EXPECTED_USERS and it.item_ids.tolist() == EXPECTED_ITEMS
    np.testing.assert_array_equal(it.matrix.toarray(), EXPECTED_DENSE)


def read_only(path: Path):
    path.chmod(0o555)


# ---------------------------------------------------------------- registry
def test_registry_urls_and_digest_formats(monkeypatch):
    monkeypatch.delenv(ml.URL_ENV_VAR, raising=False)
    assert set(ml.DATASETS) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest-small"}
    for name, spec in ml.DATASETS.items():
        assert ml.movielens_url(name) == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.md5 is None or re.fullmatch(r"[0-9a-f]{32}", spec.md5)
        assert (spec.folder, spec.ratings_file, spec.items_file) == LAYOUT[name]
    monkeypatch.setenv(ml.URL_ENV_VAR, "http://mirror.example/ml/")
    assert ml.movielens_url("ml-1m") == "http://mirror.example/ml/ml-1m.zip"


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"name: unknown MovieLens dataset 'ml-2m'; known: ml-100k, ml-1m, ml-10m, ml-20m"):
        load_movielens("ml-2m", tmp_path)


# ---------------------------------------------------------------- download + read, every release
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("cache_beside_the_data")  # the default: the cache beside the data
def test_download_then_load_each_release(name, server, monkeypatch, tmp_path):
    archive = grouplens_zip(name)
    server.files[f"{name}.zip"] = archive
    expect_digest(monkeypatch, name, archive)
    it = load_movielens(name, tmp_path, show_progress=False)
    assert_paper_preprocessed(it)
    # the zip is read in place: besides it only the cache of the preprocessed data is written
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}.zip", ml.CACHE_FOLDER])
    # second load: from the zip, no new request
    assert load_movielens(name, tmp_path, show_progress=False).nnz == it.nnz
    assert server.requests[f"{name}.zip"] == 1

    df = load_movielens_ratings(name, tmp_path)
    assert list(df.columns) == ["user", "item", "rating", "timestamp"]
    assert df["rating"].dtype == np.float64 and len(df) == len(RATINGS)
    assert df["timestamp"].tolist() == [r[3] for r in RATINGS]
    if name == "ml-100k":  # integer stars only
        assert df["rating"].tolist() == [float(int(r[2])) for r in RATINGS]
    else:
        assert df["rating"].tolist() == [r[2] for r in RATINGS]

    titles = load_movielens_titles(name, tmp_path)
    assert titles.to_dict() == TITLES  # ':' in '::' files, quoted ',' in CSV, latin-1 accents


def test_paper_defaults_can_be_changed(server, monkeypatch, tmp_path):
    archive = grouplens_zip("ml-1m")
    server.files["ml-1m.zip"] = archive
    expect_digest(monkeypatch, "ml-1m", archive)
    it = load_movielens("ml-1m", tmp_path, rating_threshold=None, min_user_interactions=0, show_progress=False)
    assert it.user_ids.tolist() == [1, 2, 3] and it.nnz == len(RATINGS)
    it = load_movielens("ml-1m", tmp_path, min_user_interactions=2, min_item_interactions=2, show_progress=False)
    # users 1, 2, 3 (3 has items 10 and 70 above 3.5); items seen >= 2 times: 10, 20, 30, 40
    assert it.user_ids.tolist() == [1, 2, 3] and it.item_ids.tolist() == [10, 20, 30, 40]


# ---------------------------------------------------------------- local files, no network
@pytest.mark.parametrize("name", ["ml-1m", "ml-10m", "ml-100k", "ml-latest-small"])
def test_extracted_folder_in_a_read_only_dir(name, tmp_path, monkeypatch):
    monkeypatch.setenv(ml.URL_ENV_VAR, "http://127.0.0.1:9")  # would fail if used
    for path, data in grouplens_files(name).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    folder = tmp_path / LAYOUT[name][0]
    read_only(folder)
    read_only(tmp_path)
    try:
        assert_paper_preprocessed(load_movielens(name, tmp_path))
        assert load_movielens_titles(name, tmp_path)[10] == TITLES[10]
    finally:
        tmp_path.chmod(0o755)
        folder.chmod(0o755)


def test_ml10m_folder_named_like_the_dataset_is_accepted(tmp_path):
    for path, data in grouplens_files("ml-10m").items():
        path = path.replace("ml-10M100K/", "ml-10m/")
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    assert_paper_preprocessed(load_movielens("ml-10m", tmp_path, download=False))


def test_zip_in_a_read_only_dir_is_read_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv(ml.URL_ENV_VAR, "http://127.0.0.1:9")
    (tmp_path / "ml-20m.zip").write_bytes(grouplens_zip("ml-20m"))
    read_only(tmp_path)
    try:
        assert_paper_preprocessed(load_movielens("ml-20m", tmp_path))
        assert os.listdir(tmp_path) == ["ml-20m.zip"]
    finally:
        tmp_path.chmod(0o755)


def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "ml-25m.zip").write_bytes(grouplens_zip("ml-25m"))
    monkeypatch.setenv("RECVAE_DATA", str(tmp_path))
    assert_paper_preprocessed(load_movielens("ml-25m", download=False))


def test_missing_files_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"ml-1m: ratings.dat not found; looked for {re.escape(str(tmp_path))}/ml-1m/ratings.dat, .*ml-1m.zip"):
        load_movielens("ml-1m", tmp_path, download=False)
    assert os.listdir(tmp_path) == []


def test_read_only_dir_without_the_data_names_the_dir(tmp_path, server):
    read_only(tmp_path)
    try:
        with pytest.raises(PermissionError, match=rf"{re.escape(str(tmp_path))} is not writable"):
            load_movielens("ml-1m", tmp_path, show_progress=False)
    finally:
        tmp_path.chmod(0o755)
    assert os.listdir(tmp_path) == [] and server.requests["ml-1m.zip"] == 0


def test_damaged_zip_placed_by_hand(tmp_path):
    (tmp_path / "ml-1m.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=r"ml-1m.zip: not a valid zip archive .*delete it to download again"):
        load_movielens("ml-1m", tmp_path, download=False)
    (tmp_path / "ml-1m.zip").write_bytes(grouplens_zip("ml-20m"))  # wrong content
    with pytest.raises(FileNotFoundError, match=r"ml-1m.zip: no ml-1m/ratings.dat inside the archive"):
        load_movielens("ml-1m", tmp_path, download=False)


def test_malformed_ratings_line_names_file_and_line(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::1\n1::20::4::2::oops\n")
    with pytest.raises(ValueError, match=r"ml-1m/ratings.dat: malformed '::'-separated file: .*line 2"):
        load_movielens_ratings("ml-1m", tmp_path, download=False)


# ---------------------------------------------------------------- download failures
def test_corrupted_archive_retries_once_then_fails_cleanly(server, monkeypatch, tmp_path):
    good = grouplens_zip("ml-1m")
    bad = good[:-10] + b"\0" * 10
    server.files["ml-1m.zip"] = bad
    expect_digest(monkeypatch, "ml-1m", good)
    with pytest.raises(ChecksumError) as info:
        load_movielens("ml-1m", tmp_path, show_progress=False)
    assert sha256(good) in str(info.value) and sha256(bad) in str(info.value)
    assert str(tmp_path / "ml-1m.zip") in str(info.value)
    assert server.requests["ml-1m.zip"] == 2
    assert os.listdir(tmp_path) == []


def test_404_fails_cleanly(server, tmp_path):
    with pytest.raises(DownloadError, match=r"ml-32m\.zip failed: HTTP 404"):
        load_movielens("ml-32m", tmp_path, show_progress=False)
    assert os.listdir(tmp_path) == []


def test_connection_cut_fails_cleanly(server, monkeypatch, tmp_path):
    archive = grouplens_zip("ml-20m")
    server.cut["ml-20m.zip"] = archive[: len(archive) // 2]
    expect_digest(monkeypatch, "ml-20m", archive)
    with pytest.raises(DownloadError, match=r"ml-20m\.zip"):
        load_movielens("ml-20m", tmp_path, show_progress=False)
    assert os.listdir(tmp_path) == []


def test_cut_download_without_length_from_a_mirror_is_not_kept(server, tmp_path):
    # ml-latest-small has no published digest; this mirror sends no Content-Length and closes early
    archive = grouplens_zip("ml-latest-small")
    server.unsized["ml-latest-small.zip"] = archive[: len(archive) // 2]
    with pytest.raises(DownloadError, match=r"ml-latest-small\.zip is not a whole zip archive"):
        load_movielens("ml-latest-small", tmp_path, show_progress=False)
    assert os.listdir(tmp_path) == []  # no ml-latest-small.zip for the next run to trip over
    server.unsized["ml-latest-small.zip"] = archive  # the next run gets it whole
    assert_paper_preprocessed(load_movielens("ml-latest-small", tmp_path, show_progress=False))
    assert (tmp_path / "ml-latest-small.zip").read_bytes() == archive


def _cut(archive: bytes) -> bytes:
    return archive[: len(archive) // 2]


def _corrupted_member(archive: bytes) -> bytes:
    bad = bytearray(archive)
    bad[60] ^= 0xFF  # inside the first member's (ratings.csv's) compressed bytes
    return bytes(bad)


@pytest.mark.parametrize("damage", [_cut, _corrupted_member])
@pytest.mark.usefixtures("cache_beside_the_data")  # the default: the cache beside the data
def test_damaged_archive_in_the_data_dir_is_downloaded_again_with_one_note(damage, server, tmp_path, caplog):
    archive = grouplens_zip("ml-latest-small")
    (tmp_path / "ml-latest-small.zip").write_bytes(damage(archive))  # what an earlier version kept
    server.unsized["ml-latest-small.zip"] = archive
    with caplog.at_level(logging.INFO, logger="recvae.data"):
        assert_paper_preprocessed(load_movielens("ml-latest-small", tmp_path, show_progress=False))
    notes = [r for r in caplog.records if r.name == "recvae.data.movielens"]  # the downloader logs its own
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING, caplog.text
    assert notes[0].getMessage().startswith(f"{tmp_path / 'ml-latest-small.zip'} is damaged (")
    assert "downloading it again" in notes[0].getMessage()
    assert (tmp_path / "ml-latest-small.zip").read_bytes() == archive
    assert server.requests["ml-latest-small.zip"] == 1
    # the cache is keyed by the new archive: a second load reads it, no request, no note
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recvae.data"):
        assert_paper_preprocessed(load_movielens("ml-latest-small", tmp_path, show_progress=False))
    assert "is damaged" not in caplog.text and server.requests["ml-latest-small.zip"] == 1
    assert len(list((tmp_path / ml.CACHE_FOLDER).glob("*.npz"))) == 1  # one cache (beside it: its kept counts)


@pytest.mark.parametrize("damage", [_cut, _corrupted_member])
def test_damaged_archive_without_download_names_the_file(damage, tmp_path):
    (tmp_path / "ml-latest-small.zip").write_bytes(damage(grouplens_zip("ml-latest-small")))
    with pytest.raises(ValueError, match=r"ml-latest-small\.zip: not a valid zip archive \(.+\); delete it to "
                                         r"download again"):
        load_movielens("ml-latest-small", tmp_path, download=False)


def test_md5_from_the_registry_is_checked(server, monkeypatch, tmp_path):
    # the real registry entries carry GroupLens's MD5 and no SHA-256: a test archive fails it
    server.files["ml-100k.zip"] = grouplens_zip("ml-100k")
    with pytest.raises(ChecksumError, match=rf"MD5 mismatch .*expected {ml.DATASETS['ml-100k'].md5}"):
        load_movielens("ml-100k", tmp_path, show_progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- real data
def _paper_reference(ratings: pd.DataFrame) -> pd.DataFrame:
    """The paper's preprocessing written independently with pandas: rating > 3.5, users >= 5."""
    kept = ratings[ratings["rating"] > 3.5].drop_duplicates(["user", "item"])
    counts = kept.groupby("user")["item"].size()
    return kept[kept["user"].isin(counts.index[counts >= 5])]


def _assert_same(it, ref: pd.DataFrame) -> None:
    assert it.n_users == ref["user"].nunique() and it.n_items == ref["item"].nunique() and it.nnz == len(ref)
    coo = it.matrix.tocoo()
    got = set(zip(it.user_ids[coo.row].tolist(), it.item_ids[coo.col].tolist()))
    assert got == set(zip(ref["user"].tolist(), ref["item"].tolist()))


@pytest.mark.realdata
def test_real_ml100k(real_data_dir):
    it = load_movielens("ml-100k", real_data_dir, download=False)
    raw = pd.read_csv(real_data_dir / "ml-100k" / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    assert len(raw) == 100_000
    _assert_same(it, _paper_reference(raw))
    assert (it.n_users, it.n_items, it.nnz) == (938, 1447, 55_361)
    titles = load_movielens_titles("ml-100k", real_data_dir)
    assert len(titles) == 1682 and titles[1] == "Toy Story (1995)"


@pytest.mark.realdata
def test_real_ml_latest_small(real_data_dir):
    if not (real_data_dir / "ml-latest-small" / "ratings.csv").exists():
        pytest.skip("ml-latest-small not in the data directory")
    it = load_movielens("ml-latest-small", real_data_dir, download=False)
    raw = pd.read_csv(real_data_dir / "ml-latest-small" / "ratings.csv").rename(columns={"userId": "user", "movieId": "item"})
    _assert_same(it, _paper_reference(raw))
    assert (it.n_users, it.n_items, it.nnz) == (659, 6169, 51_535)
    assert load_movielens_titles("ml-latest-small", real_data_dir)[1] == "Toy Story (1995)"


@pytest.mark.usefixtures("cache_beside_the_data")  # the default: the cache beside the data
def test_load_movielens_caches_preprocessed_data(tmp_path, monkeypatch):
    """A second load reads the .npz cache instead of parsing; other settings or a changed
    file never read a stale cache; a read-only data directory is never written to."""
    from recvae.data import movielens

    folder = tmp_path / "ml-1m"
    folder.mkdir()
    rows = [f"{u}::{i}::{5 if (u + i) % 3 else 2}::0" for u in range(1, 9) for i in range(1, 8)]
    (folder / "ratings.dat").write_text("\n".join(rows) + "\n")
    first = movielens.load_movielens("ml-1m", tmp_path, min_user_interactions=1)
    cached = list((tmp_path / movielens.CACHE_FOLDER).glob("ml-1m-*.npz"))
    assert len(cached) == 1

    def no_parsing(*a, **k):
        raise AssertionError("parsed although a cache exists")

    monkeypatch.setattr(movielens, "load_movielens_ratings", no_parsing)
    again = movielens.load_movielens("ml-1m", tmp_path, min_user_interactions=1)
    assert (again.matrix != first.matrix).nnz == 0
    assert again.item_ids.tolist() == first.item_ids.tolist()
    with pytest.raises(AssertionError, match="parsed although"):
        movielens.load_movielens("ml-1m", tmp_path, min_user_interactions=2)  # other settings
    monkeypatch.undo()

    (folder / "ratings.dat").write_text("\n".join(rows[:20]) + "\n")  # the file changed
    changed = movielens.load_movielens("ml-1m", tmp_path, min_user_interactions=1)
    assert changed.nnz < first.nnz

    readonly = tmp_path / "ro"
    (readonly / "ml-1m").mkdir(parents=True)
    (readonly / "ml-1m" / "ratings.dat").write_text("\n".join(rows) + "\n")
    readonly.chmod(0o555)
    try:
        movielens.load_movielens("ml-1m", readonly, min_user_interactions=1)
        assert not (readonly / movielens.CACHE_FOLDER).exists()
    finally:
        readonly.chmod(0o755)


@pytest.mark.realdata
@pytest.mark.usefixtures("cache_beside_the_data")  # the default: the cache beside the data
def test_movielens_reports_what_it_kept_parsed_or_cached(real_data_dir, tmp_path, monkeypatch):
    """The kept/dropped counts of a release come with it whether it is parsed or read from the
    cache (kept beside the cache), so `train --dataset` reports them as `train --data` does."""
    import shutil

    shutil.copytree(real_data_dir / "ml-100k", tmp_path / "ml-100k")
    raw = pd.read_csv(tmp_path / "ml-100k" / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    counts = raw[raw["rating"] > 3.5].groupby("user").size()
    for source in ("parsed", "cached"):
        report: dict = {}
        data = load_movielens("ml-100k", tmp_path, download=False, report=report)
        monkeypatch.setattr(ml, "load_movielens_ratings", None)  # the second load must not parse
        assert report["rows"] == 100_000 and report["below_threshold"] == int((raw["rating"] <= 3.5).sum()), source
        assert report["users_below_min"] == int((counts < 5).sum()) == 4, source
        assert report["interactions_of_those_users"] == int(counts[counts < 5].sum()), source
        assert data.nnz == 55_361
    assert len(list((tmp_path / ".recvae-cache").glob("*.kept.json"))) == 1


# ---------------------------------------------------------------- where the cache goes
def _listing(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size and modification time (a file made
    and removed again still changes its folder's)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


def test_the_cache_goes_where_cache_dir_or_recvae_cache_says(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::5::0\n" for u in range(1, 7) for i in range(1, 7)))
    before = _listing(tmp_path / "data")
    first = load_movielens("ml-1m", tmp_path / "data", cache_dir=tmp_path / "given")
    assert [p.suffix for p in sorted((tmp_path / "given").iterdir())] == [".json", ".npz"]  # the cache, its counts
    monkeypatch.setenv("RECVAE_CACHE", str(tmp_path / "env"))
    monkeypatch.setattr(ml, "load_movielens_ratings", None)  # the second load of each must not parse
    assert load_movielens("ml-1m", tmp_path / "data", cache_dir=tmp_path / "given").nnz == first.nnz == 36
    monkeypatch.undo()
    monkeypatch.setenv("RECVAE_CACHE", str(tmp_path / "env"))
    load_movielens("ml-1m", tmp_path / "data")
    assert len(list((tmp_path / "env").glob("ml-1m-*.npz"))) == 1
    assert _listing(tmp_path / "data") == before  # neither wrote beside the data


@pytest.mark.realdata
def test_the_suite_leaves_the_real_data_folder_as_it_was(real_data_dir, tmp_path, monkeypatch):
    """CI's data folder (../shared/data) is read, never written: a run on a real release caches
    its preprocessed data in $RECVAE_CACHE (a scratch folder, tests/conftest.py), not beside it."""
    from recvae.cli import main

    before = _listing(real_data_dir)
    monkeypatch.setenv("RECVAE_CACHE", str(tmp_path / "cache"))
    assert main(["-q", "train", "--dataset", "ml-100k", "--data-dir", str(real_data_dir), "--model", "popularity",
                 "--show", "0", "--out", str(tmp_path / "run")]) == 0
    assert load_movielens("ml-100k", real_data_dir, download=False, timestamps=True).nnz == 55_361
    assert len(list((tmp_path / "cache").glob("ml-100k-*.npz"))) >= 2  # the run's reads and the last one
    assert _listing(real_data_dir) == before
