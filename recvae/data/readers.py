"""Reading interaction tables: CSV, TSV, GroupLens ``::`` files and Parquet, with errors that
name the file and the line; :func:`read_interactions` reads and preprocesses in one call."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable, Hashable, Sequence

import pandas as pd

from recvae.data.interactions import Interactions
from recvae.data.preprocessing import PAPER
from recvae.errors import InputError, ParameterError
from recvae.optional import MissingDependencyError, require

_EXTENSION_FORMATS = {
    ".csv": ("csv", ","),
    ".tsv": ("csv", "\t"),
    ".tab": ("csv", "\t"),
    ".dat": ("csv", "::"),  # GroupLens ML-1M / ML-10M
    ".data": ("csv", "\t"),  # GroupLens ML-100K ``u.data``
    ".parquet": ("parquet", None),
    ".pq": ("parquet", None),
}


def read_table(
    path: str | os.PathLike,
    *,
    sep: str | None = None,
    format: str | None = None,
    names: Sequence[str] | None = None,
    header: int | None | str = "infer",
    encoding: str = "utf-8",
    id_cols: Sequence[Hashable] = (),
    default_sep: str | None = None,
    locate: bool = False,
    opener: Callable | None = None,
):
    """Read a delimited text file or a Parquet file into a DataFrame.

    The format comes from ``format`` (``"csv"`` or ``"parquet"``), else from the extension:
    ``.parquet``/``.pq`` are Parquet whatever ``sep`` says; any other file is text, split on
    ``sep`` if given, else as its extension says: ``.csv`` (``,``), ``.tsv``/``.tab``/``.data``
    (tab), ``.dat`` (GroupLens ``::``), also compressed (``.csv.gz``, ...); an extension that
    names no format is split on ``default_sep``, or is an error without it. ``names`` gives
    column names for a file without a header line (``header="infer"`` then means no header);
    ``header=None`` forces "no header". The columns ``id_cols`` of a text file are read as
    text (e.g. ids with leading zeros); Parquet columns keep their stored types.

    With ``locate=True`` returns ``(frame, locate)`` where ``locate(j)`` names row ``j`` of the
    frame as the user finds it in the file: ``line N`` of a text file (a header is line 1),
    ``row N`` of a Parquet file.

    ``opener`` (internal) opens a binary stream for ``path`` instead of the file system, e.g.
    a member of a zip archive; ``path`` is then only used for the format and for messages.
    Errors start with the file's name, and name the line when the parser reports it.
    """
    path_str = str(path)
    if opener is None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path_str}: no such file")
        if p.is_dir():
            raise IsADirectoryError(f"{path_str}: is a directory, expected a file")
        opener = lambda: contextlib.nullcontext(p)  # noqa: E731  (a path: pandas infers compression)
    fmt, sep = _resolve_format(path_str, sep, format, default_sep)
    if fmt == "parquet":
        require("pyarrow", f"{path_str}: reading Parquet")
        try:
            with opener() as f:
                df = pd.read_parquet(f)
        except Exception as e:
            raise InputError(path_str, f"could not read as Parquet: {e}") from e
        if names is not None:
            if len(names) != df.shape[1]:
                raise ParameterError("names", f"{len(names)} names given but {path_str} has {df.shape[1]} columns")
            df.columns = list(names)
        return (df, lambda j: f"row {j + 1}") if locate else df
    if header == "infer":
        header = None if names is not None else 0
    kwargs = dict(header=header, names=names, encoding=encoding, dtype={c: str for c in id_cols} or None)
    try:
        if sep == "::":
            df = _read_double_colon(opener, path_str, kwargs)
        else:
            with opener() as f:
                df = pd.read_csv(f, sep=sep, engine="python" if len(sep) > 1 else "c", **kwargs)
    except pd.errors.ParserError as e:
        raise InputError(path_str, f"malformed {_sep_name(sep)} file: {e}") from e
    except pd.errors.EmptyDataError as e:
        raise InputError(path_str, "file is empty") from e
    except UnicodeDecodeError as e:
        raise InputError(path_str, f"not valid {encoding} text ({e}); pass encoding=") from e
    except ValueError as e:
        raise InputError(path_str, f"cannot parse as a {_sep_name(sep)} file: {e}") from e
    _check_separated(df, path_str, sep, names)
    first = 1 if header is None else header + 2  # the file line of the frame's row 0
    return (df, lambda j: f"line {j + first}") if locate else df


#: separators a file read as one column may really use (the hint of :func:`_check_separated`)
_OTHER_SEPS = (";", "\t", "|", ",")


def _check_separated(df: pd.DataFrame, path: str, sep: str, names) -> None:
    """A file read as one column whose header holds another separator was split on the wrong
    one (a ``;``-separated file under ``.csv``): say so and which to give, rather than report
    its columns missing."""
    if names is not None or df.shape[1] != 1:
        return
    header = str(df.columns[0])
    other = next((c for c in _OTHER_SEPS if c != sep and c in header), None)
    if other is not None:
        raise ParameterError("sep", f"its header {header!r} is one column when split on {sep!r}; the file looks "
                             f"{_sep_name(other)}: give {{sep}} {other!r}", where=path, names=("sep",))


def _read_double_colon(opener, path_str: str, kwargs: dict) -> pd.DataFrame:
    """Read a GroupLens ``::`` file fast: split on ``:`` with the C parser, keep even columns.

    Falls back to pandas' (slow) python engine when a field itself holds a ``:`` (titles
    in ``movies.dat``), which the fast path detects as non-empty odd columns or ragged rows,
    and for a header line or columns read as text.
    """
    names = kwargs["names"]
    header = kwargs["header"]
    if header is None and kwargs["dtype"] is None:
        try:
            with opener() as f:
                raw = pd.read_csv(f, sep=":", header=None, encoding=kwargs["encoding"])
            odd = raw.columns[1::2]
            if raw.shape[1] % 2 == 1 and all(raw[c].isna().all() for c in odd):
                cols = raw.columns[0::2]
                if names is None or len(names) == len(cols):
                    df = raw[cols].copy()
                    df.columns = list(names) if names is not None else range(len(cols))
                    return df
        except pd.errors.ParserError:
            pass  # ragged after splitting on ':' -> let the exact parser decide and report
    with opener() as f:
        return pd.read_csv(f, sep=re.escape("::"), engine="python", **kwargs)


#: compression suffixes pandas reads (after the format's extension: ``ratings.csv.gz``)
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")
#: files of formats that hold no delimited table, refused by name rather than parsed as text
_NOT_TABLES = (".xlsx", ".xls", ".xlsm", ".ods", ".json", ".jsonl", ".ndjson", ".xml", ".pkl", ".pickle",
               ".pt", ".npy", ".npz", ".h5", ".hdf5", ".feather", ".sqlite", ".db")
_KNOWN = ("known: CSV (.csv), TSV (.tsv, .tab, .data), GroupLens '::' (.dat), Parquet (.parquet, .pq), "
          "the text ones also compressed (.csv.gz, ...)")


def _resolve_format(path: str, sep: str | None, format: str | None, default_sep: str | None = None,
                    ) -> tuple[str, str | None]:
    if format is not None:
        if format not in ("csv", "parquet"):
            raise ParameterError("format", f"expected 'csv' or 'parquet', got {format!r}")
        if format == "csv" and sep is None:
            sep = _EXTENSION_FORMATS.get(Path(path).suffix.lower(), ("csv", ","))[1] or ","
        return format, sep
    suffix = Path(path).suffix.lower()
    if suffix in _COMPRESSIONS:
        suffix = Path(path[: -len(suffix)]).suffix.lower()
    if suffix in _NOT_TABLES:  # whatever sep says: split on it, a spreadsheet or JSON is garbage
        raise ParameterError("path", f"{suffix} files are not read; save it as CSV or Parquet ({_KNOWN})",
                             given=path)
    if _EXTENSION_FORMATS.get(suffix, ("csv",))[0] == "parquet":
        return "parquet", None
    if sep is not None:
        return "csv", sep
    if suffix not in _EXTENSION_FORMATS:
        if default_sep is not None:
            return "csv", default_sep
        raise InputError(
            path, f"cannot tell the format from the extension {suffix!r}; give {{sep}} (e.g. ',', '\\t', '::') "
            f"for a text file, or name a Parquet file .parquet; {_KNOWN}", names=("sep",)
        )
    return _EXTENSION_FORMATS[suffix]


#: column names of common interaction logs: (user, item, rating or None), tried in this order
KNOWN_SCHEMAS = (("userId", "movieId", "rating"), ("user_id", "item_id", "rating"), ("user_id", "movie_id", "rating"),
                 ("user_id", "item_id", None), ("userID", "itemID", "rating"))


def read_columns(path: str | os.PathLike, sep: str | None = None) -> list[str]:
    """The column names of a table file, from its header alone (Parquet: its schema); empty when
    they cannot be read cheaply (a ``::`` file has no header)."""
    path_str = str(path)
    try:
        fmt, sep = _resolve_format(path_str, sep, None, default_sep=",")
    except ValueError:
        return []
    try:
        if fmt == "parquet":
            require("pyarrow", f"{path_str}: reading Parquet")
            import pyarrow.parquet as pq

            return list(pq.read_schema(path_str).names)
        if sep is None or len(sep) > 1 or Path(path_str).suffix.lower() in _COMPRESSIONS:
            return []
        return [str(c) for c in pd.read_csv(path_str, sep=sep, nrows=0).columns]
    except MissingDependencyError:
        raise
    except Exception:  # a peek only: the full read reports a damaged file properly
        return []


def known_schema(columns) -> tuple[str, str, str | None] | None:
    """The first of :data:`KNOWN_SCHEMAS` whose columns ``columns`` holds."""
    present = set(columns)
    return next((s for s in KNOWN_SCHEMAS if {c for c in s if c} <= present), None)


def _sep_name(sep: str | None) -> str:
    return {",": "comma-separated", "\t": "tab-separated", ";": "semicolon-separated", "|": "pipe-separated",
            "::": "'::'-separated"}.get(sep, f"{sep!r}-separated")


def read_interactions(
    path: str | os.PathLike,
    user_col: Hashable = "user",
    item_col: Hashable = "item",
    rating_col: Hashable | None = None,
    sep: str | None = None,
    *,
    format: str | None = None,
    names: Sequence[str] | None = None,
    header: int | None | str = "infer",
    encoding: str = "utf-8",
    rating_threshold: float | None = PAPER.rating_threshold,
    min_user_interactions: int = PAPER.min_user_interactions,
    min_item_interactions: int = PAPER.min_item_interactions,
    timestamp_col: Hashable | None = None,
) -> Interactions:
    """Read a ratings/interactions file into :class:`Interactions`.

    File handling as in :func:`read_table` (CSV, TSV, ``::``, Parquet; header or ``names=``);
    preprocessing as in :meth:`Interactions.from_dataframe`, with the paper's defaults
    (:class:`~recvae.data.Preprocessing`: ratings > 3.5 of ``rating_col``, users with >= 5 of
    them; ``**Preprocessing.keep_all().kwargs()`` keeps every row). ``timestamp_col`` keeps each
    interaction's time, for a split in time (:mod:`recvae.data.splits`). Errors name the file and
    line. Example for ML-1M::

        read_interactions("ml-1m/ratings.dat", names=["user", "item", "rating", "ts"], rating_col="rating")
    """
    df, locate = read_table(path, sep=sep, format=format, names=names, header=header, encoding=encoding, locate=True)
    return Interactions.from_dataframe(
        df,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        rating_threshold=rating_threshold,
        min_user_interactions=min_user_interactions,
        min_item_interactions=min_item_interactions,
        timestamp_col=timestamp_col,
        source=str(path),
        locate=locate,
    )
