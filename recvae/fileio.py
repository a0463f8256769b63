"""Atomic file writes: a temporary file beside the target, then a rename, so a reader (or a
crash) never sees a half-written file. Every writer of the library goes through here, and so
does every reader of the library's own JSON and ``.npz`` files, whose errors name the file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from recvae.errors import FileSystemError, InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def ensure_writable_dir(folder: str | os.PathLike, hint: str = "choose another") -> Path:
    """Create ``folder`` if needed; ``PermissionError`` naming it when it cannot be written
    (``hint``: what to do then).

    A folder without any write bit counts as read-only even for root (for whom ``os.access``
    always says yes), so a data directory shared read-only is never written to.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and existing != folder and not _writable(existing):
        raise PermissionError(f"cannot create the directory {folder}: {existing} {_why_not(existing)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the directory {folder}: {e.strerror or e}") from e
    if not _writable(folder):
        raise PermissionError(f"the directory {folder} {_why_not(folder)}; {hint}")
    return folder


def _why_not(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "is not writable: it is on a read-only file system"
    except (OSError, AttributeError):  # pragma: no cover - no statvfs
        pass
    return "is not writable"


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Yield a temporary binary file beside ``path``; when the block ends without error it is
    flushed, synced, given the mode the umask gives (``mkstemp`` makes 0600) and renamed onto
    ``path``. On any error (or Ctrl-C) it is removed and ``path`` is left untouched.

    For streaming writers (downloads); the temporary name is ``.<name>.<random><suffix>``.
    """
    with atomic_path(path, suffix) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield the *path* of an empty temporary file beside ``path``, for writers that want a
    file name (``DataFrame.to_parquet``, ``savefig``); renamed onto ``path`` with the mode the
    umask gives when the block ends without error, removed otherwise.

    The rename replaces whatever is at ``path``, a symbolic link included, and never writes
    through one (``mkstemp`` creates with ``O_EXCL``). The temporary file is ``flock``-ed while
    it is written, so the next write of ``path`` can tell a dead writer's leftover (removed
    there, :func:`remove_stale_temporaries`) from a live one. A full disk, an exceeded quota or a
    read-only file system, however the writer reports it (torch wraps it in a RuntimeError), is
    an ``OSError`` of one line naming ``path`` and the cause."""
    path = Path(path)
    folder = ensure_writable_dir(path.parent)
    remove_stale_temporaries(path, suffix)
    fd, tmp = None, None
    try:
        for _ in range(TEMPORARY_ATTEMPTS):
            # named before it is made, inside the cleanup's reach: a Ctrl-C or SIGTERM the instant
            # it is created (before a name returned by mkstemp could be kept) still finds it
            tmp = folder / f".{path.name}.{_random_name()}{suffix}"
            try:
                fd = _create(tmp)
                break
            except FileExistsError:
                tmp = None  # another writer's
            except OSError as e:
                tmp = None
                raise _disk_error(path, e) or PermissionError(
                    f"cannot write to directory {folder}: {e.strerror or e}") from e
        else:
            raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")
        _hold(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        error = _disk_error(path, e)
        if error is not None:
            raise error from None
        raise
    finally:
        if fd is not None:
            os.close(fd)


TEMPORARY_ATTEMPTS = 100
_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _random_name() -> str:
    """8 characters, as ``mkstemp``'s (what :func:`remove_stale_temporaries` recognises)."""
    return "".join(secrets.choice(_NAME_CHARACTERS) for _ in range(8))


def _create(tmp: Path) -> int:
    """Create ``tmp`` exclusively (never through a link), mode 0600 as ``mkstemp``; its descriptor."""
    return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)


#: what a full or read-only disk raises: the cause a write names (errno -> words)
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only"}


def _disk_error(path: Path, error: BaseException) -> OSError | None:
    """The one-line ``OSError`` for ``error`` when it is (or was caused by) a full disk, an
    exceeded quota or a read-only file system; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return FileSystemError(path, f"cannot write it: {DISK_ERRORS[error.errno]} "
                                         f"({errno.errorcode[error.errno]}); the file it would replace and everything "
                                         "written before are intact", errno=error.errno)
        error = error.__cause__ or error.__context__
    return None


def _hold(fd: int) -> None:
    """Mark a temporary as live. Where it cannot be locked (NFS takes no lock on a directory's
    descriptor) it is written all the same, and no later write can tell it dead: it stays."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(path: str | os.PathLike, suffix: str = ".tmp") -> None:
    """Remove the temporary files (or folders, :func:`atomic_dir`) that earlier writes of
    ``path`` left when killed (SIGKILL gives no chance to clean up): ``.<name>.<8 random
    characters><suffix>`` beside it whose ``flock`` is free, i.e. whose writer is gone. Only
    ``path``'s own: an output's folder is the user's, and a name of another file is left alone."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover - not POSIX: no way to tell a live writer
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        names = [n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for n in names:
        stale = path.parent / n
        try:
            fd = os.open(stale, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # gone, or a link (O_NOFOLLOW): not a file of ours to judge
            continue
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: its writer is alive
            continue
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(stale) if stat.S_ISDIR(mode) else stale.unlink()
        finally:
            os.close(fd)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary names (``.<name>.<random>.tmp``),
    which a process killed mid-write (SIGKILL) leaves behind."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporary files that writes killed midway left in ``folder``."""
    for p in Path(folder).iterdir():
        if is_temporary(p.name) and p.is_file():
            p.unlink()


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary binary file beside ``path``, then rename it into place.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    with atomic_open(path) as f:
        write(f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """JSON with numpy scalars/arrays and paths converted."""
    write_bytes(path, (json.dumps(obj, indent=indent, default=_json_default) + "\n").encode())


def jsonable(value):
    """``value`` as JSON gives it back (tuples as lists; anything else JSON lacks as its text): the
    form in which settings are stored and then compared with what a later process has."""
    return json.loads(json.dumps(value, default=str))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, expect=dict):
    """The content of a JSON file; ``ValueError`` naming the file when it is not valid JSON or
    (``expect``) not of the expected top-level type, ``FileNotFoundError`` when absent."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if expect is not None and not isinstance(obj, expect):
        names = {dict: "an object", list: "an array", str: "a string", type(None): "null", bool: "a boolean"}
        got = names.get(type(obj), f"a {type(obj).__name__}")
        raise InputError(path, f"expected {names.get(expect, expect.__name__)} at the top level of the JSON, got {got}")
    return obj


def read_npz(path: str | os.PathLike, what: str = "array file") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read without pickle; ``ValueError`` naming the file (and
    ``what`` it should be) when it is not a readable ``.npz`` archive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the {what})")
    if not zipfile.is_zipfile(path):  # else np.load would try (and refuse) to unpickle it
        raise InputError(path, f"damaged or not an .npz archive (expected the {what})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(path, f"damaged .npz archive, cannot read the {what} ({e})") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside ``path`` to fill; on success it is renamed to ``path``.

    An existing ``path`` is replaced (moved aside, then removed once the new one is in place).
    On any error the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = ensure_writable_dir(path.parent)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp"))
    held = os.open(tmp, os.O_RDONLY)  # flock-ed while it is filled: see remove_stale_temporaries
    aside = None
    try:
        _hold(held)
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, aside / "old")
        os.replace(tmp, path)
    except BaseException:
        if aside is not None and (aside / "old").exists():
            os.replace(aside / "old", path)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def check_zip_crc(path: Path, what: str) -> None:
    """``ValueError`` naming ``path`` when a record of the zip archive (what ``torch.save`` writes)
    differs from the CRC-32 its header records. torch's reader checks none, so a flipped byte
    in a tensor loads as another number; with this check every one-bit flip of a checkpoint is
    refused or changes nothing that is read (tests/test_hostile.py flips each bit)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            # torch's reader takes a record marked as a folder (MS-DOS attribute 0x10) for an empty
            # one and loads whatever memory held: the CRC of its bytes cannot tell
            bad = bad or next((i.filename for i in archive.infolist() if i.external_attr & 0x10), None)
    except Exception as e:  # noqa: BLE001  any of zipfile's errors (a flipped 'encrypted' bit: RuntimeError)
        detail = " ".join(str(e).split())[:120]
        raise InputError(path, f"not a readable {what}, damaged or another format ({type(e).__name__}"
                         f"{': ' + detail if detail else ''})") from None
    if bad is not None:
        raise InputError(path, f"damaged {what}: the record {bad} differs from the CRC-32 written with it")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch(path: str | os.PathLike, what: str = "file", map_location="cpu", mmap: bool = False):
    """The tensors (dicts, lists, numbers) of a file written by ``torch.save``, read with
    ``weights_only=True`` (no pickled code runs); ``ValueError`` naming the file and ``what`` it
    should be when it is empty, truncated, another format or a crafted pickle."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the {what})")
    if path.stat().st_size == 0:
        raise InputError(path, f"not a readable {what} (an empty file)")
    if not mmap:  # a memory-mapped read takes a few counters, not the tensors: nothing to verify
        check_zip_crc(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # torch's own text for a crafted pickle suggests weights_only=False: never the advice here
        if "weights_only" in str(e) or isinstance(e, pickle.UnpicklingError):
            detail = "it holds objects other than tensors"
        else:
            detail = " ".join(str(e).split()).split(". ")[0][:120]
        raise InputError(path, f"not a readable {what}, damaged or another format ({type(e).__name__}"
                         f"{': ' + detail if detail else ''})") from None
