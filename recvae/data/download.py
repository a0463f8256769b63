"""Download a file over HTTP(S) with a progress bar, checksum verification and atomic placement."""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path


from recvae.errors import ParameterError, RecvaeError
from recvae.fileio import atomic_open, ensure_writable_dir
from recvae.progress import bar as progress_bar

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
PART_SUFFIX = ".part"  # of the temporary file a download streams into


class DownloadError(RecvaeError, OSError):
    """The file could not be fetched (HTTP error, connection lost, truncated body)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected digest."""

    def __init__(self, path, algorithm: str, expected: str, actual: str, url: str):
        self.path, self.algorithm, self.expected, self.actual, self.url = path, algorithm, expected, actual, url
        super().__init__(
            f"{path}: {algorithm.upper()} mismatch for {url}: expected {expected}, got {actual}. "
            "The download is corrupted or the file changed upstream; nothing was kept."
        )


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    show_progress: bool = True,
    retries: int = 1,
    *,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` and return ``dest`` once its checksum is verified.

    The body is streamed into a temporary file in ``dest``'s folder, hashed on the fly and
    moved onto ``dest`` with :func:`os.replace` only when complete and verified, so ``dest``
    is either absent/unchanged or the full verified file, and no partial file remains.

    Verification: SHA-256 when ``sha256`` is given, else MD5 when ``md5`` is given (GroupLens
    publishes MD5s), else none, with a logged warning (the computed SHA-256 is logged so it
    can be recorded). Whatever the checksum, a body shorter than the ``Content-Length`` is
    refused. A server that sends no ``Content-Length`` ends the body by closing the
    connection, so a cut body looks whole: with no checksum either, a ``.zip`` is kept only
    when it opens as a zip archive and every member's CRC tests good, and any other file is
    refused (nothing can tell whether it is whole).

    A checksum mismatch, a truncated or damaged body or a network error are retried
    ``retries`` more times; then :class:`ChecksumError` (naming the file, the expected and
    the actual digest) or :class:`DownloadError` is raised. HTTP errors such as 404 are not
    retried.
    """
    dest = Path(dest)
    if not isinstance(retries, int) or retries < 0:
        raise ParameterError("retries", f"expected a non-negative integer, got {retries!r}")
    expected = _expected_digest(sha256, md5)
    folder = dest.parent
    ensure_writable_dir(folder, hint="choose another (data_dir= or $RECVAE_DATA)")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            logger.warning("retrying download of %s (attempt %d of %d): %s", url, attempt + 1, retries + 1, last_error)
        try:
            _fetch_once(url, dest, expected, show_progress, timeout)
            return dest
        except ChecksumError as e:
            last_error = e
        except PermissionError:
            raise
        except urllib.error.HTTPError as e:
            raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason} (nothing written to {dest})") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if isinstance(e, DownloadError):
                last_error = e
            else:
                reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                last_error = DownloadError(f"download of {url} failed: {reason} (nothing written to {dest})")
                last_error.__cause__ = e
    assert last_error is not None
    raise last_error


def _expected_digest(sha256: str | None, md5: str | None) -> tuple[str, str] | None:
    for name, value, length in (("sha256", sha256, 64), ("md5", md5, 32)):
        if value is not None:
            value = value.strip().lower()
            if len(value) != length or any(c not in "0123456789abcdef" for c in value):
                raise ParameterError(name, f"expected {length} hexadecimal digits, got {value!r}")
            return name, value
    return None


def _remove_stale_parts(dest: Path) -> None:
    """Delete the temporary files an earlier, killed download of ``dest`` left beside it."""
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*{PART_SUFFIX}"):
        logger.info("removing %s, left by an interrupted download", stale)
        stale.unlink(missing_ok=True)


def _fetch_once(url: str, dest: Path, expected: tuple[str, str] | None, show_progress: bool, timeout: float) -> None:
    sha = hashlib.sha256()
    other = hashlib.new(expected[0]) if expected and expected[0] != "sha256" else None
    _remove_stale_parts(dest)
    with atomic_open(dest, suffix=PART_SUFFIX) as out:
        request = urllib.request.Request(url, headers={"User-Agent": "recvae"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with progress_bar(total=total, show=show_progress, unit="B", unit_scale=True, desc=dest.name,
                              leave=False) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    sha.update(chunk)
                    if other is not None:
                        other.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # http.client returns a short body without raising when the server closes early
        if total is not None and received != total:
            raise DownloadError(
                f"download of {url} was cut: received {received} of {total} bytes (nothing written to {dest})"
            )
        actual_sha = sha.hexdigest()
        if expected is None and total is None:  # nothing says how long the file is: test it
            out.flush()
            _check_whole(Path(out.name), url, dest)
        if expected is None:
            logger.warning("no known checksum for %s: not verified (its SHA-256 is %s)", url, actual_sha)
        else:
            algorithm, digest = expected
            actual = actual_sha if other is None else other.hexdigest()
            if actual != digest:
                raise ChecksumError(dest, algorithm, digest, actual, url)
    logger.info("downloaded %s to %s (%d bytes, sha256 %s)", url, dest, received, actual_sha)


def zip_damage(path: str | os.PathLike) -> str | None:
    """Why the zip archive at ``path`` is not whole (cannot be opened, or a member fails its
    CRC), or None when it tests good. Reads and decompresses every member."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None if bad is None else f"member {bad} fails its CRC check"


def _check_whole(part: Path, url: str, dest: Path) -> None:
    """A download of unknown length and without checksum: DownloadError unless it is a whole zip."""
    if dest.suffix.lower() != ".zip":
        raise DownloadError(f"download of {url}: the server sent no length and no checksum is known, so nothing "
                            f"tells whether it is whole (nothing written to {dest})")
    damage = zip_damage(part)
    if damage is not None:
        raise DownloadError(f"download of {url} is not a whole zip archive ({damage}); nothing written to {dest}")
