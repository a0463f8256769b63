"""The check of a study's SQLite database before Optuna opens it.

SQLAlchemy reports a damaged file as a long traceback from deep inside a query; this says it in
one line naming the file, before anything reads or writes it. SQLite follows symbolic links (to
the database and to the journal files it makes beside it), so a link at any of those names is
refused: it would let whoever planted it have the study written over a file of their choice.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from recvae.errors import FileSystemError, InputError
from recvae.locking import check_not_link

#: the first 16 bytes of every SQLite 3 database
SQLITE_HEADER = b"SQLite format 3\x00"


#: SQLite's primary result codes of a disk that takes no more (sqlite3.Error.sqlite_errorcode & 0xFF)
SQLITE_DISK_ERRORS = {13: "no space left on the device, or the quota is exceeded (SQLITE_FULL)",
                      8: "the file system or the file is read-only (SQLITE_READONLY)"}


class DamagedStudy(InputError):
    """The study's database is not a readable SQLite database."""


def check_study(path: str | os.PathLike, beside=()) -> None:
    """Whether the SQLite database ``path`` (absent: a new study, nothing to check) is whole:
    its header, then SQLite's ``PRAGMA integrity_check``. ``beside``: the files SQLite keeps next to
    it (journal, WAL), which like ``path`` must not be symbolic links. Raises
    :class:`DamagedStudy` naming the file and what is wrong, ``ValueError`` for a link."""
    path = Path(path)
    for p in (path, *map(Path, beside)):
        check_not_link(p, "out")
    if not path.exists():
        return
    advice = "; move it away (or {overwrite}) to start the study again"
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise OSError(e.errno, f"cannot read the study: {e.strerror}", str(path)) from None
    if head != SQLITE_HEADER:
        what = "an empty file" if not head else ("truncated" if len(head) < len(SQLITE_HEADER) else
                                                 "no SQLite header")
        raise DamagedStudy(path, f"damaged, not an SQLite database ({what}){advice}", names=("overwrite",))
    try:
        # a plain connection, as Optuna's: a journal left by a killed writer is rolled back first
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = db.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as e:
        raise DamagedStudy(path, f"damaged SQLite database ({e}){advice}", names=("overwrite",)) from None
    problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedStudy(path, f"damaged SQLite database ({problems[0]}{more}){advice}", names=("overwrite",))



def study_write_error(error: BaseException, where: str) -> OSError | None:
    """The one-line ``OSError`` for ``error`` when it is (or was caused by: SQLAlchemy wraps it)
    SQLite's full disk or read-only file; None otherwise. ``where``: the study's file or URL."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(error, sqlite3.Error) and code is not None and code & 0xFF in SQLITE_DISK_ERRORS:
            return FileSystemError(where, f"cannot write the study: {SQLITE_DISK_ERRORS[code & 0xFF]}; the trials "
                                          "it records are intact: {resume} continues once there is room",
                                   names=("resume",))
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__
    return None
