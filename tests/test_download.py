"""The downloader against a local HTTP server: success, checksum mismatch, 404, cut connection,
a body of unknown length."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import pytest

from archives import LocalServer, grouplens_zip, sha256
from recvae.data import ChecksumError, DownloadError, download

BODY = os.urandom(3 * (1 << 20) + 123)  # more than one read chunk


@pytest.fixture
def server():
    with LocalServer() as s:
        yield s


def test_good_download_is_verified_and_placed(server, tmp_path):
    server.files["a.zip"] = BODY
    dest = tmp_path / "sub" / "a.zip"  # the folder is created
    out = download(f"{server.url}/a.zip", dest, sha256(BODY), show_progress=False)
    assert out == dest and dest.read_bytes() == BODY
    assert os.listdir(dest.parent) == ["a.zip"]
    assert server.requests["a.zip"] == 1


def test_md5_is_used_when_no_sha256(server, tmp_path):
    server.files["a.zip"] = BODY
    dest = tmp_path / "a.zip"
    download(f"{server.url}/a.zip", dest, None, show_progress=False, md5=hashlib.md5(BODY).hexdigest())
    assert dest.read_bytes() == BODY
    with pytest.raises(ChecksumError, match=r"MD5 mismatch"):
        download(f"{server.url}/a.zip", tmp_path / "b.zip", None, show_progress=False, md5="0" * 32)
    assert not (tmp_path / "b.zip").exists()


def test_no_digest_downloads_with_a_warning(server, tmp_path, caplog):
    server.files["a.zip"] = BODY
    with caplog.at_level(logging.WARNING, logger="recvae.data.download"):
        download(f"{server.url}/a.zip", tmp_path / "a.zip", None, show_progress=False)
    assert f"not verified (its SHA-256 is {sha256(BODY)})" in caplog.text
    assert (tmp_path / "a.zip").read_bytes() == BODY


def test_checksum_mismatch_retries_once_then_names_file_and_digests(server, tmp_path):
    corrupted = BODY[:-1] + bytes([BODY[-1] ^ 0xFF])
    server.files["a.zip"] = corrupted
    dest = tmp_path / "a.zip"
    with pytest.raises(ChecksumError) as info:
        download(f"{server.url}/a.zip", dest, sha256(BODY), show_progress=False)
    msg = str(info.value)
    assert str(dest) in msg and sha256(BODY) in msg and sha256(corrupted) in msg
    assert info.value.expected == sha256(BODY) and info.value.actual == sha256(corrupted)
    assert server.requests["a.zip"] == 2  # one retry
    assert os.listdir(tmp_path) == []  # no partial or temporary file


def test_retry_recovers_from_a_transient_corruption(server, tmp_path):
    server.files["a.zip"] = [b"garbage", BODY]  # first response corrupted, then good
    download(f"{server.url}/a.zip", tmp_path / "a.zip", sha256(BODY), show_progress=False)
    assert (tmp_path / "a.zip").read_bytes() == BODY and server.requests["a.zip"] == 2
    assert os.listdir(tmp_path) == ["a.zip"]


def test_404_is_a_clear_error_and_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match=r"download of http://127\.0\.0\.1:\d+/missing\.zip failed: HTTP 404"):
        download(f"{server.url}/missing.zip", tmp_path / "m.zip", None, show_progress=False)
    assert server.requests["missing.zip"] == 1
    assert os.listdir(tmp_path) == []


def test_connection_cut_midway_leaves_nothing(server, tmp_path):
    server.cut["a.zip"] = BODY[:5000]
    with pytest.raises(DownloadError, match=r"was cut: received 5000 of 6000 bytes|failed: .*Incomplete"):
        download(f"{server.url}/a.zip", tmp_path / "a.zip", sha256(BODY), show_progress=False)
    assert server.requests["a.zip"] == 2  # network failures are retried too
    assert os.listdir(tmp_path) == []


def test_existing_file_is_kept_when_the_download_fails(server, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"previous")
    server.files["a.zip"] = b"corrupted"
    with pytest.raises(ChecksumError):
        download(f"{server.url}/a.zip", dest, sha256(BODY), show_progress=False, retries=0)
    assert dest.read_bytes() == b"previous" and os.listdir(tmp_path) == ["a.zip"]
    assert server.requests["a.zip"] == 1  # retries=0: a single attempt


def test_unwritable_directory_is_named(server, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    server.files["a.zip"] = BODY
    try:
        with pytest.raises(PermissionError, match=rf"{re.escape(str(ro))} is not writable"):
            download(f"{server.url}/a.zip", ro / "a.zip", sha256(BODY), show_progress=False)
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == [] and server.requests["a.zip"] == 0  # refused before fetching


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"sha256: expected 64 hexadecimal digits, got 'abc'"):
        download("http://127.0.0.1:9/x", tmp_path / "x", "abc", show_progress=False)
    with pytest.raises(ValueError, match=r"retries: expected a non-negative integer, got -1"):
        download("http://127.0.0.1:9/x", tmp_path / "x", None, show_progress=False, retries=-1)


def test_downloaded_file_gets_the_mode_the_umask_gives(server, tmp_path):
    server.files["a.zip"] = BODY
    old = os.umask(0o022)
    try:
        download(f"{server.url}/a.zip", tmp_path / "a.zip", sha256(BODY), show_progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "a.zip").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_next_download_removes_parts_left_by_a_killed_one(server, tmp_path):
    server.files["a.zip"] = BODY
    stale = [tmp_path / ".a.zip.x1y2z3.part", tmp_path / ".a.zip.abcdef.part"]
    for p in stale:
        p.write_bytes(BODY[:1000])  # what a download killed mid-way leaves
    other = tmp_path / ".b.zip.abcdef.part"  # another archive's: not ours to remove
    other.write_bytes(b"x")
    download(f"{server.url}/a.zip", tmp_path / "a.zip", sha256(BODY), show_progress=False)
    assert sorted(os.listdir(tmp_path)) == [".b.zip.abcdef.part", "a.zip"]


# -- no Content-Length and no checksum: only a zip archive that tests whole is kept -------------
ZIP = grouplens_zip("ml-latest-small")


def test_truncated_zip_without_length_or_checksum_is_not_kept(server, tmp_path):
    server.unsized["a.zip"] = ZIP[: len(ZIP) // 2]  # the mirror closed early; nothing says so
    dest = tmp_path / "a.zip"
    with pytest.raises(DownloadError, match=rf"download of {re.escape(server.url)}/a\.zip is not a whole zip "
                                            r"archive \(.*\); nothing written to .*a\.zip"):
        download(f"{server.url}/a.zip", dest, None, show_progress=False)
    assert server.requests["a.zip"] == 2  # retried like a cut connection
    assert os.listdir(tmp_path) == []  # neither the final name nor a temporary file


def test_zip_without_length_or_checksum_is_kept_when_it_tests_whole(server, tmp_path):
    server.unsized["a.zip"] = [ZIP[:-100], ZIP]  # cut once, then whole: the retry recovers
    dest = tmp_path / "a.zip"
    download(f"{server.url}/a.zip", dest, None, show_progress=False)
    assert dest.read_bytes() == ZIP and os.listdir(tmp_path) == ["a.zip"]
    assert server.requests["a.zip"] == 2


def test_corrupted_member_without_length_or_checksum_is_not_kept(server, tmp_path):
    bad = bytearray(ZIP)
    bad[60] ^= 0xFF  # inside the first member's compressed bytes: the directory is intact
    server.unsized["a.zip"] = bytes(bad)
    with pytest.raises(DownloadError, match=r"is not a whole zip archive"):
        download(f"{server.url}/a.zip", tmp_path / "a.zip", None, show_progress=False, retries=0)
    assert os.listdir(tmp_path) == []


def test_failed_check_keeps_the_file_already_there(server, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"previous")
    server.unsized["a.zip"] = ZIP[:-1]
    with pytest.raises(DownloadError):
        download(f"{server.url}/a.zip", dest, None, show_progress=False, retries=0)
    assert dest.read_bytes() == b"previous" and os.listdir(tmp_path) == ["a.zip"]


def test_other_file_without_length_or_checksum_cannot_be_verified(server, tmp_path):
    server.unsized["a.csv"] = b"user,item\n1,2\n"
    with pytest.raises(DownloadError, match=r"a\.csv: the server sent no length and no checksum is known"):
        download(f"{server.url}/a.csv", tmp_path / "a.csv", None, show_progress=False, retries=0)
    assert os.listdir(tmp_path) == []


def test_length_or_checksum_suffices_without_the_zip_test(server, tmp_path):
    server.unsized["a.bin"] = BODY  # no length, but the checksum is known
    download(f"{server.url}/a.bin", tmp_path / "a.bin", sha256(BODY), show_progress=False)
    assert (tmp_path / "a.bin").read_bytes() == BODY
    server.files["b.zip"] = b"not a zip"  # a length, no checksum: the length is the check
    download(f"{server.url}/b.zip", tmp_path / "b.zip", None, show_progress=False)
    assert (tmp_path / "b.zip").read_bytes() == b"not a zip"
