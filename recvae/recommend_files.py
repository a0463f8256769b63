"""The files of batch recommendation: history files and user lists in (joined with what a run
knows of each user), recommendation tables out (CSV, TSV or Parquet, written batch by batch and
renamed into place at the end). ``recvae recommend`` is a thin command over these."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from recvae.data import read_table
from recvae.errors import MissingPathError, ParameterError, UnwritablePathError
from recvae.fileio import atomic_path
from recvae.optional import MissingDependencyError, require
from recvae.recommend import COLUMNS, Histories, RunRecommender, log_unknown
from recvae.rundir import DROPPED_FILE, check_not_in_run

logger = logging.getLogger(__name__)


def read_histories(run: RunRecommender, path, kind: str = "input", user_col=None, item_col=None, rating_col=None,
                   rating_threshold=None, sep=None, strict: bool = False) -> Histories:
    """The users of a history file (``kind="input"``: user, item and optional rating columns) or
    of a user list (``kind="users"``) with their histories: the file's rows (rating above the
    threshold: history; at or below: seen only) joined with what the run knows of each user.
    Columns, separator and threshold default to the run's (``None``); ``rating_col="none"``:
    no rating column. Errors name the parameter ``kind`` and its file, the line and the column."""
    given = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col}
    data = run.data
    user_col = user_col or data.get("user_col") or "user"
    item_col = item_col or data.get("item_col") or "item"
    rating_col = rating_col if rating_col is not None else data.get("rating_col")
    rating_col = None if rating_col is None or str(rating_col).lower() == "none" else rating_col
    threshold = rating_threshold if rating_threshold is not None else data.get("rating_threshold")
    try:  # ids as text: converted to the run's types later, one by one; no known extension: CSV
        frame, locate = read_table(path, sep=sep or data.get("sep"), id_cols=(user_col, item_col),
                                   default_sep=",", locate=True)
    except (ValueError, FileNotFoundError, IsADirectoryError, MissingDependencyError) as e:
        if isinstance(e, ParameterError) and e.param == "sep":
            raise  # a wrong separator: its file, and the parameter that fixes it
        if isinstance(e, ParameterError) and e.param == "path":
            raise e.renamed(kind) from e  # a format it does not read: the file's parameter is ours
        # the file's error under its parameter (a missing file stays a FileNotFoundError)
        cls = MissingPathError if isinstance(e, FileNotFoundError) else ParameterError
        raise cls(kind, str(e).removeprefix(f"{path}: "), given=path) from e
    columns = list(map(str, frame.columns))
    if user_col not in frame.columns:
        raise ParameterError(kind, f"no user column {user_col!r} ({{user_col}}); found {columns}", given=path,
                             names=("user_col",))
    users_only = kind == "users" or item_col not in frame.columns
    if kind == "input" and users_only and given["item_col"] is not None:
        raise ParameterError(kind, f"no item column {item_col!r} ({{item_col}}); found {columns}", given=path,
                             names=("item_col",))
    if kind == "input" and given["rating_col"] is not None and rating_col and rating_col not in frame.columns:
        raise ParameterError(kind, f"no rating column {rating_col!r} ({{rating_col}}); found {columns}", given=path,
                             names=("rating_col",))
    missing = frame[user_col].isna().to_numpy()
    if missing.any():
        raise ParameterError(kind, f"{locate(int(np.argmax(missing)))}, column {user_col!r} ({{user_col}}): user id "
                             "missing", given=path, names=("user_col",))
    rows, ids = run.user_rows(frame[user_col])
    position, users = pd.factorize(pd.Series(ids, dtype=object), sort=False)
    user_rows = np.full(len(users), -1, dtype=np.int64)
    user_rows[position] = rows
    empty = np.zeros((0, 2), dtype=np.int64)
    if users_only:
        new = np.flatnonzero(user_rows < 0)
        dropped = log_dropped(run, np.asarray(users)[new], np.zeros(len(new), dtype=bool))
        log_unknown("user ids", np.asarray(users)[new[~dropped]], len(users))
        return run.histories(np.asarray(users), user_rows, empty, empty)
    codes = run.item_codes(frame[item_col], names=(kind, "item_col"),
                           locate=lambda j: f"{{{kind}}} {path}: {locate(j)}, column {item_col!r} ({{item_col}})")
    unknown = codes < 0
    if unknown.any() and strict:
        examples = pd.unique(frame[item_col][unknown])[:5].tolist()
        raise ParameterError(kind, f"{int(unknown.sum())} row(s) name item ids unknown to the model (e.g. {examples}); "
                             "drop {strict} to skip them", given=path, names=("strict",))
    log_unknown("item ids", frame[item_col].to_numpy()[unknown], frame[item_col].nunique())
    positive = ~unknown
    if rating_col is not None and rating_col in frame.columns and threshold is not None:
        ratings = pd.to_numeric(frame[rating_col], errors="coerce").to_numpy(np.float64)
        bad = np.isnan(ratings) & frame[rating_col].notna().to_numpy()
        if bad.any():
            j = int(np.argmax(bad))
            raise ParameterError(kind, f"{locate(j)}, column {rating_col!r} ({{rating_col}}): expected a number, "
                                 f"got {frame[rating_col].iloc[j]!r}", given=path, names=("rating_col",))
        positive &= ratings > float(threshold)  # a missing rating is not a positive
    pairs = np.column_stack([position, codes])
    new = np.flatnonzero(user_rows < 0)
    if new.size:
        with_rows = np.isin(new, position[positive])
        log_dropped(run, np.asarray(users)[new], with_rows)
        logger.info("%d user(s) not in the run: recommended from the file's rows alone", new.size)
    return run.histories(np.asarray(users), user_rows, pairs[positive], pairs[~unknown & ~positive])


#: dropped users named one by one in the log; the rest are counted
DROPPED_SHOWN = 5


def log_dropped(run: RunRecommender, users: np.ndarray, with_rows: np.ndarray) -> np.ndarray:
    """One warning per user of the source that the run left out (why, and what they get: the
    file's rows when ``with_rows``, else popular items), the first few by name and the rest
    counted; returns which of ``users`` were dropped ones."""
    reasons = run.why_dropped(users)
    dropped = np.array([r is not None for r in reasons], dtype=bool)
    for j in np.flatnonzero(dropped)[:DROPPED_SHOWN]:
        what = "recommending from the file's rows" if with_rows[j] else "recommending popular items"
        logger.warning("user %s: %s; %s", users[j], reasons[j], what)
    if dropped.sum() > DROPPED_SHOWN:
        logger.warning("%d more users dropped by preprocessing or the split (each with its reason in %s)",
                       dropped.sum() - DROPPED_SHOWN, run.run_dir / DROPPED_FILE)
    return dropped


#: the tables :func:`table_writer` writes, by the output's extension (``-``: CSV on stdout)
OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def output_format(output: str) -> str:
    """The format of the table ``output`` names ('-': CSV on stdout), from its extension; any
    other extension (``.xlsx``, ``.json``, none) is refused rather than written as CSV under it."""
    if output == "-":
        return "csv"
    kind = OUTPUT_FORMATS.get(Path(output).suffix.lower())
    if kind is None:
        suffix = Path(output).suffix or "no extension"
        raise ParameterError("output", f"{suffix}: expected one of {', '.join(OUTPUT_FORMATS)} "
                             "(CSV, TSV or Parquet), or '-' for CSV on stdout", given=output)
    return kind


def check_output(output: str, inputs=()) -> None:
    """Whether ``output`` ('-' for stdout) can take a table: a known extension
    (:data:`OUTPUT_FORMATS`), its folder exists, it is none of ``inputs`` (``(parameter, path)``
    pairs) and no file of a run directory."""
    if output == "-":
        return
    for param, given in inputs:
        if given is not None and _same_file(given, output):
            raise ParameterError("output", f"is the {{{param}}} file; choose another", given=output, names=(param,))
    parent = Path(output).parent
    if not parent.is_dir():
        raise ParameterError("output", f"folder {parent} does not exist", given=output)
    check_not_in_run(output, "output")
    output_format(output)


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


@contextmanager
def table_writer(output: str, metadata: dict[str, str] | None = None, like: pd.DataFrame | None = None):
    """Yield ``write(frame)`` appending DataFrames to ``output``: CSV or TSV appended batch by
    batch, Parquet as one row group per batch (by extension, :func:`output_format`), ``-`` CSV
    on stdout. A file is written under a temporary name and renamed at the end
    (recvae.fileio.atomic_path): a failure leaves nothing half-written, and only one batch is
    ever in memory.

    Parquet only: ``metadata`` goes into the file's footer (key-value metadata of its schema);
    ``like``, a frame of the same columns, gives a file without rows its columns' types (by
    default, columns of no type), so that it reads as a part of the same table as the others."""
    state = {"header": True}
    if output == "-":
        def write(frame):
            frame.to_csv(sys.stdout, index=False, header=state["header"])
            state["header"] = False

        yield write
        if state["header"]:
            pd.DataFrame(columns=COLUMNS).to_csv(sys.stdout, index=False)
        return
    out, kind = Path(output), output_format(output)
    try:
        with atomic_path(out) as tmp:
            if kind == "parquet":
                with _parquet_writer(tmp, metadata, like) as write:
                    yield write
            else:
                sep = "\t" if kind == "tsv" else ","
                with open(tmp, "w", newline="") as f:
                    def write(frame):
                        frame.to_csv(f, index=False, header=state["header"], sep=sep)
                        state["header"] = False

                    yield write
                    if state["header"]:
                        pd.DataFrame(columns=COLUMNS).to_csv(f, index=False, sep=sep)
    except PermissionError as e:
        raise UnwritablePathError("output", str(e), given=output) from e


@contextmanager
def _parquet_writer(path: Path, metadata: dict[str, str] | None = None, like: pd.DataFrame | None = None):
    pa = require("pyarrow", "an output in Parquet")
    import pyarrow.parquet as pq

    writer = None

    def table_of(frame):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}) if metadata else table

    def write(frame):
        nonlocal writer
        if len(frame) == 0:
            return
        table = table_of(frame)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table.cast(writer.schema))

    try:
        yield write
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        pq.write_table(table_of(pd.DataFrame(columns=COLUMNS) if like is None else like).slice(0, 0), path)
