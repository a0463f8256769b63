"""One writer per directory, held on the directory itself.

The lock is an ``flock`` on a descriptor of the directory, not on a file inside it: deleting or
replacing the lock file (anyone who may write the folder can) lets no second writer in, and the
kernel releases the lock when its holder dies, however it dies. The lock file beside it only
tells a refused writer who holds the directory; it is created afresh (``O_EXCL | O_NOFOLLOW``),
never opened through a symbolic link, and a link at its name is refused in one line.

Where a directory cannot be locked (NFS emulates ``flock`` with write locks, which a directory's
descriptor cannot take) the lock file itself is locked, as before: one writer at a time still,
but deleting the file then frees the lock. Not POSIX (no ``fcntl``): no locking; the holder's
file is still written.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from recvae.errors import ParameterError, RecvaeError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: (st_dev, st_ino) of the directories this process holds: its own checks must not probe them
_held: set = set()


class RunLocked(RecvaeError, ValueError):
    """Another process is writing the run directory."""


def check_not_link(path: Path, param: str, advice: str = "remove it") -> None:
    """:class:`ParameterError` naming ``param`` (the directory's parameter, e.g. ``out``) when
    ``path`` is a symbolic link: recvae never writes through one (anyone who may write a shared
    folder can plant one, aimed at a file of their choice)."""
    if path.is_symlink():
        raise ParameterError(param, f"is a symbolic link (to {os.readlink(path)}); recvae never writes through "
                                    f"one: {advice}", given=path)


def open_dir(folder: Path, param: str) -> int:
    check_not_link(folder, param, "give the directory it points to")
    try:
        return os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError as e:
        raise OSError(e.errno, f"cannot open the directory: {e.strerror}", str(folder)) from None


def _read(path: Path) -> str:
    """The lock file's text ("" when absent or unreadable), never read through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)


def holder(folder: Path, lock_name: str) -> str:
    """Who holds ``folder``, as its lock file says."""
    return describe(_read(folder / lock_name))


def describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _refused(folder: Path, lock_name: str, param: str) -> RunLocked:
    return RunLocked(f"another recvae is writing this run directory ({holder(folder, lock_name)}); wait until it "
                     f"ends, or choose another {{{param}}}", param=param, given=folder, names=(param,))


def check_free(folder: Path, lock_name: str, param: str = "out") -> None:
    """:class:`RunLocked` naming the holder when another process holds ``folder`` now (a probe
    before the checks of what the folder holds, which a writer's files in flight would mislead)."""
    if fcntl is None or not folder.is_dir() or folder.is_symlink():
        return
    fd = open_dir(folder, param)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in _held:
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refused(folder, lock_name, param) from None
    except OSError:  # no locks on directories here (see hold): the hold itself decides
        pass
    finally:
        os.close(fd)  # releases the probe's lock


@contextlib.contextmanager
def hold(folder: Path, lock_name: str, param: str = "out", wait: bool = False):
    """Hold ``folder`` (which exists) for this process; yields what the previous lock file said
    ("" when there was none: a lock file left means its writer died, as the lock is free).
    Held by another process: :class:`RunLocked`, or with ``wait`` wait until it is free (for
    short steps that many processes take in turn, such as the manifest of a partitioned output)."""
    fd = open_dir(folder, param)
    nb = 0 if wait else fcntl.LOCK_NB if fcntl is not None else 0
    try:
        on_dir = fcntl is not None
        if on_dir:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | nb)
            except BlockingIOError:
                raise _refused(folder, lock_name, param) from None
            except OSError:  # NFS emulates flock with write locks, which a directory cannot take:
                on_dir = False  # the lock file is locked instead (deleting it then frees the lock)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        path = folder / lock_name
        check_not_link(path, param)
        previous = _read(path)
        if on_dir:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a dead writer's (the lock is free); made afresh below
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["recvae", *sys.argv[1:]]) if sys.argv else "recvae"}
        # kept open while held: its inode cannot be reused, so a replacement never looks like it
        lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_EXCL if on_dir else 0) | _NOFOLLOW, 0o644)
        if not on_dir and fcntl is not None:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | nb)
            except BlockingIOError:
                os.close(lock_fd)
                raise _refused(folder, lock_name, param) from None
            os.ftruncate(lock_fd, 0)
        _held.add(key)
        try:
            os.write(lock_fd, json.dumps(me).encode())
            yield previous
        finally:
            _held.discard(key)
            with contextlib.suppress(OSError):  # only the file this process made, never a replacement
                mine, now = os.fstat(lock_fd), os.lstat(path)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    path.unlink()
            os.close(lock_fd)
    finally:
        os.close(fd)  # closing releases the flock
