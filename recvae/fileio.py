"""Atomic file writes: a temporary file beside the target, then a rename, so a reader (or a
crash) never sees a half-written file. Every writer of the library goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; ``PermissionError`` naming it when it cannot be written.

    A folder without any write bit counts as read-only even for root (for whom ``os.access``
    always says yes), so a data directory shared read-only is never written to.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and existing != folder and not _writable(existing):
        raise PermissionError(f"cannot create the directory {folder}: {existing} is not writable")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the directory {folder}: {e.strerror or e}") from e
    if not _writable(folder):
        raise PermissionError(
            f"the directory {folder} is not writable; choose another (data_dir= or $RECVAE_DATA for data)"
        )
    return folder


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary binary file beside ``path``, then rename it into place.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = ensure_writable_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PermissionError(f"cannot write to directory {folder}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """JSON with numpy scalars/arrays and paths converted."""
    write_bytes(path, (json.dumps(obj, indent=indent, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside ``path`` to fill; on success it is renamed to ``path``.

    An existing ``path`` is replaced (moved aside, then removed once the new one is in place).
    On any error the temporary directory is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp"))
    aside = None
    try:
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
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
