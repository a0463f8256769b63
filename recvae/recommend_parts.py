"""Every user of a run as a partitioned Parquet dataset, written by independent shards.

``recvae recommend RUN --all-users --output DIR/ --shard K/N`` scores the K-th of N contiguous
shares of the run's users into ``DIR/part-K-of-N.parquet``; under ``torchrun`` each process is
a shard (:meth:`Shard.from_torchrun`). The folder::

    part-01-of-12.parquet   shard 1's users, in the run's user order (K is zero-padded to the width
    part-02-of-12.parquet   of N, so that the parts sort by name in the run's user order)
    ...
    _manifest.json          written once every part is there: N, each part's users and rows, the
                            run (its model's digest) and the options; no manifest: not complete

pandas (``pd.read_parquet(DIR)``), pyarrow and Spark read the folder as one table; they skip
names starting with ``_`` or ``.``: the manifest, the lock and the temporary file of a part being
written (:func:`recvae.fileio.atomic_path`). DuckDB and Polars read the glob ``DIR/*.parquet``,
which those do not match. Any other file in the folder would be read as data, so a folder holding
one is refused.

A shard scores whole batches of ``--batch-size`` users counted from the run's first user
(:meth:`Shard.user_range`), so each user is scored in the same batch as one process scoring every
user would: the union of the parts is that output row for row, bit for bit where the number of
threads is the same (a matrix product's rounding depends on the batch's shape and the threads).

Each part records in its footer (:data:`PART_KEY`, Parquet key-value metadata) what it was
written from (:data:`IDENTITY`: the model's digest, the run's number of users, ``k``, the
options that change the rows, ``N``). A shard whose part is there and matches does nothing; a
part written from anything else is refused, unless ``overwrite`` (then it is removed), so a
folder never mixes two runs, two ``k`` or two numbers of shards. The manifest is written by
whichever shard sees every part, under the folder's lock (:func:`recvae.locking.hold`), so
shards finishing together never write it from an incomplete or changing set of parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recvae import __version__, locking
from recvae.distributed import launched_by_torchrun, shard_bounds
from recvae.errors import ParameterError, RecvaeError, UnwritablePathError
from recvae.fileio import ensure_writable_dir, sha256_file, write_json
from recvae.optional import require
from recvae.recommend import COLUMNS, RunRecommender
from recvae.recommend_files import table_writer
from recvae.rundir import LOCK_FILE, MODEL_DIR, MODEL_FILES, check_not_in_run, is_run_dir

#: the manifest's name: readers of the folder skip it (a leading ``_``)
MANIFEST_FILE = "_manifest.json"
#: the footer key of a part's record (JSON: :data:`IDENTITY`, its shard and users)
PART_KEY = "recvae.part"
FORMAT = "recvae recommendations 1"
#: what parts of one folder share: the run's model and number of users, and the options
IDENTITY = ("model_sha256", "users", "k", "include_seen", "precision", "batch_size", "shards")
_PART_NAME = re.compile(r"part-(\d+)-of-(\d+)\.parquet")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (counted from 1) of ``count``; ``torchrun``: this process's, as torchrun
    numbers it (``RANK`` + 1 of ``WORLD_SIZE``)."""

    index: int = 1
    count: int = 1
    torchrun: bool = False

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"K/N"`` (``--shard``), K from 1 to N; a :class:`ParameterError` naming ``shard`` else."""
        match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
        if match is None:
            raise ParameterError("shard", "expected K/N: this shard's number K, from 1 to N, and the number of "
                                 "shards N, e.g. 2/8", given=text)
        k, n = int(match[1]), int(match[2])
        if n < 1:
            raise ParameterError("shard", f"expected at least 1 shard (K/N), got N = {n}", given=text)
        if not 1 <= k <= n:
            raise ParameterError("shard", f"K counts from 1: expected 1 to {n} (the first shard is 1/{n}, the last "
                                 f"{n}/{n})", given=text)
        return cls(k, n)

    @classmethod
    def from_torchrun(cls) -> "Shard | None":
        """This process's shard under torchrun (or a launcher setting ``RANK`` and ``WORLD_SIZE``)
        with more than one process; None otherwise."""
        if not launched_by_torchrun():
            return None
        count = int(os.environ["WORLD_SIZE"])
        return cls(int(os.environ["RANK"]) + 1, count, torchrun=True) if count > 1 else None

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}" + (" (torchrun)" if self.torchrun else "")

    @property
    def file_name(self) -> str:
        """``part-K-of-N.parquet``, K zero-padded to the width of N."""
        return f"part-{self.index:0{len(str(self.count))}d}-of-{self.count}.parquet"

    def user_range(self, n_users: int, batch_size: int) -> tuple[int, int]:
        """Positions ``[start, stop)`` of this shard's users in the run's user order: whole batches
        of ``batch_size`` counted from the first user, split as evenly as they go
        (:func:`recvae.distributed.shard_bounds`). More shards than batches is an error: a shard
        would have nothing to score."""
        n_batches = -(-n_users // batch_size)
        if self.count > n_batches:
            why = (f"the run's {n_users} users make {n_batches} batch(es) of {{batch_size}} {batch_size}, and each "
                   "shard scores whole batches")
            if self.torchrun:
                raise RecvaeError(f"torchrun started {self.count} processes, one shard each, but {why}: start at most "
                                  f"{n_batches}, or give a smaller {{batch_size}}", names=("batch_size",))
            raise ParameterError("shard", f"{why}: use at most {n_batches} shards, or a smaller {{batch_size}}",
                                 given=f"{self.index}/{self.count}", names=("batch_size",))
        first, stop = shard_bounds(n_batches, self.index - 1, self.count)
        return first * batch_size, min(stop * batch_size, n_users)


def _part_shard(name: str) -> Shard | None:
    """The shard whose part is named ``name``, None for any other name."""
    match = _PART_NAME.fullmatch(name)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        return None
    shard = Shard(int(match[1]), int(match[2]))
    return shard if shard.file_name == name else None


def is_dataset_output(output: str) -> bool:
    """Whether ``--output`` names a folder (a partitioned dataset): it ends with ``/`` or is a
    directory already."""
    return output != "-" and (output.endswith(("/", os.sep)) or Path(output).is_dir())


def check_dataset_output(output: str) -> Path:
    """The folder ``output`` names, when it can take a partitioned dataset: a directory or none
    yet, in a folder that exists, never a symbolic link, a run directory or a folder of one."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ParameterError("output", "is a file, not a directory (a partitioned dataset is a directory of parts)",
                             given=output)
    locking.check_not_link(folder, "output", "give the directory it points to")
    if not folder.parent.is_dir():
        raise ParameterError("output", f"folder {folder.parent} does not exist", given=output)
    if is_run_dir(folder):
        raise ParameterError("output", "is a run directory; give the recommendations a directory of their own",
                             given=output)
    check_not_in_run(folder, "output")
    return folder


def model_digest(run_dir: str | os.PathLike) -> str:
    """SHA-256 over the files of the run's model folder (names and contents): what tells one
    model from another, wherever the run directory is."""
    folder = Path(run_dir) / MODEL_DIR
    digest = hashlib.sha256()
    for name in sorted(MODEL_FILES):
        if (folder / name).is_file():
            digest.update(f"{name} {sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()


def identity(run: RunRecommender, shard: Shard, k: int, include_seen: bool = False, precision: str = "fp32",
             batch_size: int = 1000) -> dict:
    """What every part of one folder shares (:data:`IDENTITY`)."""
    return {"model_sha256": model_digest(run.run_dir), "users": len(run.user_ids), "k": int(k),
            "include_seen": bool(include_seen), "precision": str(precision), "batch_size": int(batch_size),
            "shards": shard.count}


def read_part(path: Path) -> dict | None:
    """A part's record from its footer: ``identity`` (None for a file that is no readable part,
    ``why`` then says what it is), ``shard``, ``user_range``, ``rows``, ``run_dir``. None when
    the file is gone (another shard's ``overwrite`` removed it)."""
    pa = require("pyarrow", "a partitioned output")
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, pa.ArrowException) as e:
        return {"identity": None, "why": f"is not a readable Parquet file ({' '.join(str(e).split())[:100]})"}
    try:
        record = json.loads((meta.metadata or {})[PART_KEY.encode()])
        if record.get("format") != FORMAT:
            raise ValueError(record.get("format"))
    except (KeyError, ValueError, TypeError, AttributeError):
        return {"identity": None, "why": "is not a part written by recvae recommend (its footer has no "
                                         f"{PART_KEY} record)"}
    return {"identity": {key: record.get(key) for key in IDENTITY}, "shard": record.get("shard"),
            "user_range": record.get("user_range"), "run_dir": record.get("run_dir"), "rows": meta.num_rows}


class PartitionedOutput:
    """The folder ``output`` as ``shard`` writes its part of it: :meth:`prepare`, then
    :meth:`writer` (unless the part is written already), then :meth:`finish`.

    ``ident``: :func:`identity`; ``run_dir``: recorded with the part and in the manifest;
    ``overwrite``: rewrite this shard's part, and remove the parts written from anything else.
    """

    def __init__(self, output: str, shard: Shard, ident: dict, run_dir, overwrite: bool = False):
        self.output, self.shard, self.identity = output, shard, dict(ident)
        self.folder = check_dataset_output(output)
        self.run_dir, self.overwrite = str(Path(run_dir).resolve()), overwrite
        self.part = self.folder / shard.file_name
        self.user_range = shard.user_range(self.identity["users"], self.identity["batch_size"])

    @contextlib.contextmanager
    def _locked(self):
        with locking.hold(self.folder, LOCK_FILE, param="output", wait=True):
            yield

    def prepare(self) -> int | None:
        """Create the folder and check what it holds. Returns the number of rows of this shard's
        part when it is written already from the same run and options (nothing to do), else None,
        once the manifest (no longer true) and, with ``overwrite``, the parts written from
        anything else are removed. Without ``overwrite`` such a part is an error naming it."""
        try:
            ensure_writable_dir(self.folder)
        except PermissionError as e:
            raise UnwritablePathError("output", str(e), given=self.output) from e
        with self._locked():
            parts = self._parts()
            others = [(name, info) for name, info in parts.items() if info["identity"] != self.identity]
            if others and not self.overwrite:
                raise self._conflict(*others[0])
            mine = parts.get(self.part.name)
            if mine is not None and mine["identity"] == self.identity and not self.overwrite:
                return mine["rows"]
            for name, _ in others:
                (self.folder / name).unlink(missing_ok=True)
            (self.folder / MANIFEST_FILE).unlink(missing_ok=True)
        return None

    @contextlib.contextmanager
    def writer(self, like: pd.DataFrame | None = None):
        """``write(frame)`` appending to this shard's part, renamed into place at the end
        (:func:`recvae.recommend_files.table_writer`); ``like``: a frame whose column types a part
        without rows takes."""
        record = {"format": FORMAT, **self.identity, "shard": self.shard.index, "user_range": list(self.user_range),
                  "run_dir": self.run_dir, "recvae": __version__}
        with table_writer(str(self.part), metadata={PART_KEY: json.dumps(record)}, like=like) as write:
            yield write

    def finish(self) -> tuple[dict | None, list[str], bool]:
        """``(manifest, [], written)`` once every part of the N is there, from the same run and
        options: the manifest is written (atomically, under the folder's lock) unless it is there
        already as it would be (``written`` False); else ``(None, missing, False)``, the names of
        the parts not there yet."""
        with self._locked():
            parts = {name: info for name, info in self._parts().items() if info["identity"] == self.identity}
            names = [Shard(k, self.shard.count).file_name for k in range(1, self.shard.count + 1)]
            missing = [name for name in names if name not in parts]
            if missing:
                return None, missing, False
            listed = [{"file": name, "shard": k, "user_range": parts[name]["user_range"], "rows": parts[name]["rows"]}
                      for k, name in enumerate(names, start=1)]
            manifest = {"format": FORMAT, "run_dir": self.run_dir, **self.identity,
                        "rows": sum(p["rows"] for p in listed), "columns": COLUMNS, "parts": listed,
                        "recvae": __version__}
            path = self.folder / MANIFEST_FILE
            try:
                written = json.loads(path.read_text()) != manifest
            except (OSError, ValueError):
                written = True
            if written:
                write_json(path, manifest)
        return manifest, [], written

    def _parts(self) -> dict[str, dict]:
        """Every part in the folder by name, with its record (:func:`read_part`); a file or folder
        readers would take for data that is no part's name is an error naming it."""
        found = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith(("_", ".")):
                continue
            path = self.folder / name
            if _part_shard(name) is None or path.is_dir() or path.is_symlink():
                raise ParameterError("output", f"holds {name}, which is not a part of recommendations; readers take "
                                     "every file of the directory for part of the table (but names starting with '_' "
                                     "or '.'): remove it, or choose a new or empty directory", given=self.output)
            info = read_part(path)
            if info is not None:
                found[name] = info
        return found

    def _conflict(self, name: str, info: dict) -> ParameterError:
        theirs, ours = info["identity"], self.identity
        if theirs is None:
            what = info["why"]
        elif theirs["shards"] != ours["shards"]:
            what = (f"is a part of {theirs['shards']} shards, and this is {self.shard}: a directory holds the parts of "
                    "one number of shards")
        elif (theirs["model_sha256"], theirs["users"]) != (ours["model_sha256"], ours["users"]):
            what = (f"was written from another model (the run {info['run_dir']}, model SHA-256 "
                    f"{str(theirs['model_sha256'])[:12]}...; this run's is {ours['model_sha256'][:12]}...)")
        else:
            keys = [key for key in ("k", "batch_size", "precision", "include_seen") if theirs[key] != ours[key]]
            what = f"was written with {_options(theirs, keys)}, and this shard has {_options(ours, keys)}"
        return ParameterError("output", f"{name} {what}; remove it, choose another directory, or give {{overwrite}} to "
                              "replace it", given=self.output,
                              names=("overwrite", "k", "batch_size", "precision", "include_seen"))


def _options(values: dict, keys: list[str]) -> str:
    return ", ".join((("" if values[key] else "no ") + "{include_seen}") if key == "include_seen"
                     else f"{{{key}}} {values[key]}" for key in keys)
