"""A prepared dataset directory: preprocessed interactions as uncompressed ``.npy`` arrays.

Written once (``recvae prepare``), then memory-mapped by every reader (``np.load(mmap_mode="r")``),
so N training processes on one machine share one copy through the page cache instead of each
parsing the interaction file. Layout::

    prepared.json   format version, shape, how the interactions were preprocessed, and the
                    SHA-256 of each array (checked by every reader, as a model's files are)
    indptr.npy      CSR row pointers (n_users + 1,)
    indices.npy     CSR item index of each interaction (nnz,)
    data.npy        CSR values (nnz,), float32 ones
    user_ids.npy    original user id of each row (ints, or fixed-width unicode)
    item_ids.npy    original item id of each column

The directory is written under a temporary name and renamed into place, so a reader never
sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae.data.interactions import Interactions, _as_id_array
from recvae.errors import RecvaeError
from recvae.fileio import atomic_dir, atomic_write, sha256_file, write_json
from recvae.locking import check_not_link

logger = logging.getLogger(__name__)

PREPARED_FILE = "prepared.json"
PREPARED_FORMAT_VERSION = 1
_ARRAYS = ("indptr", "indices", "data", "user_ids", "item_ids")


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / PREPARED_FILE).is_file()


def write_prepared(interactions: Interactions, path: str | os.PathLike, preprocessing: dict | None = None) -> Path:
    """Write ``interactions`` as a prepared directory at ``path`` (replacing one already there);
    ``preprocessing`` (JSON-ready) records where the data came from and how it was filtered."""
    path = Path(path)
    check_not_link(path, "out", "give the directory it points to")  # its rename would replace the link
    if path.exists() and not is_prepared(path) and any(path.iterdir()):
        raise FileExistsError(f"{path}: exists and is not a prepared dataset (no {PREPARED_FILE}); not replacing it")
    m = interactions.matrix
    arrays = {"indptr": m.indptr, "indices": m.indices, "data": m.data,
              "user_ids": _as_id_array(interactions.user_ids, "user_ids"),
              "item_ids": _as_id_array(interactions.item_ids, "item_ids")}
    with atomic_dir(path) as tmp:
        for name, array in arrays.items():
            atomic_write(tmp / f"{name}.npy", lambda f, a=array: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        write_json(tmp / PREPARED_FILE, {"format_version": PREPARED_FORMAT_VERSION, "n_users": int(m.shape[0]),
                                         "n_items": int(m.shape[1]), "nnz": int(m.nnz),
                                         "preprocessing": preprocessing or {},
                                         "files": {f"{n}.npy": sha256_file(tmp / f"{n}.npy") for n in arrays}})
    logger.debug("prepared %r in %s", interactions, path)
    return path


def _rewrite_hint(path: Path, description: dict | None = None) -> str:
    """What to do about a damaged prepared directory: the `recvae prepare` command that writes it
    again, from the source its prepared.json records when that can be read."""
    recorded = (description or {}).get("preprocessing")
    recorded = recorded if isinstance(recorded, dict) else {}
    if isinstance(recorded.get("dataset"), str):
        source = f"--dataset {recorded['dataset']}"
    elif isinstance(recorded.get("path"), str):
        source = f"--data {recorded['path']}"
    else:
        source = "--data FILE"
    return f"write it again with `recvae prepare {source} --out {path}`"


class PreparedDataError(RecvaeError, ValueError):
    """A prepared directory's file is damaged: one line naming it and how to write it again."""


def _damaged(path: Path, file: str, problem: str, description: dict | None = None) -> PreparedDataError:
    return PreparedDataError(f"{path / file}: {problem}; {_rewrite_hint(path, description)}")


#: prepared.json's keys that are counts
_COUNTS = ("n_users", "n_items", "nnz")


def read_prepared_description(path: str | os.PathLike) -> dict:
    """The ``prepared.json`` of a prepared directory, checked: FileNotFoundError naming it when
    absent; ValueError naming it when it is not JSON, not this format, or lacks a key."""
    path = Path(path)
    if not is_prepared(path):
        raise FileNotFoundError(f"{path}: not a prepared dataset (no {PREPARED_FILE}); "
                                f"write one with `recvae prepare --data FILE --out {path}`")
    try:
        description = json.loads((path / PREPARED_FILE).read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, PREPARED_FILE, f"not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(description, dict):
        raise _damaged(path, PREPARED_FILE, f"expected a JSON object, got a {type(description).__name__}")
    if description.get("format_version") != PREPARED_FORMAT_VERSION:
        raise _damaged(path, PREPARED_FILE, f"format version {description.get('format_version')!r}, expected "
                       f"{PREPARED_FORMAT_VERSION}", description)
    for key in (*_COUNTS, "preprocessing"):
        if key not in description:
            raise _damaged(path, PREPARED_FILE, f"no {key!r} key", description)
    for key in _COUNTS:
        value = description[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _damaged(path, PREPARED_FILE, f"{key!r} is {value!r}, expected a whole number >= 0", description)
    if not isinstance(description["preprocessing"], dict):
        raise _damaged(path, PREPARED_FILE, f"'preprocessing' is {description['preprocessing']!r}, expected a "
                       "JSON object", description)
    return description


#: elements per step when scanning a memory-mapped array (bounds the temporaries to a few MiB)
_CHUNK = 1 << 22


def load_prepared(path: str | os.PathLike) -> Interactions:
    """The interactions of a prepared directory; the CSR arrays are memory-mapped (read-only).

    What is read is checked first, so a damaged directory is a ValueError naming the file and
    how to write it again rather than an IndexError deep in training: prepared.json (see
    :func:`read_prepared_description`), every array readable and of the shape and kind
    prepared.json implies, the row pointers starting at 0, never decreasing and ending at nnz,
    every item index in ``[0, n_items)``. The scans are vectorised over the memory-mapped
    arrays, a chunk at a time: one pass over ``indptr`` and ``indices``, nothing densified.
    """
    path = Path(path)
    d = read_prepared_description(path)
    n_users, n_items, nnz = (d[k] for k in _COUNTS)
    expected = {"indptr": (n_users + 1,), "indices": (nnz,), "data": (nnz,), "user_ids": (n_users,),
                "item_ids": (n_items,)}
    a = {}
    digests = d.get("files")
    if digests is None:  # written before the digests were recorded
        logger.warning("%s: records no SHA-256 of its arrays (an older recvae wrote it): not verified; "
                       "%s to record them", path / PREPARED_FILE, _rewrite_hint(path, d))
    elif not isinstance(digests, dict):
        raise _damaged(path, PREPARED_FILE, f"'files' is {digests!r}, expected an object of file name -> SHA-256", d)
    for name in _ARRAYS:
        file = f"{name}.npy"
        try:
            a[name] = np.load(path / file, mmap_mode="r" if name in ("indptr", "indices", "data") else None,
                              allow_pickle=False)
        except FileNotFoundError:
            raise _damaged(path, file, "missing", d) from None
        except (OSError, ValueError, EOFError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise _damaged(path, file, f"cannot be read ({reason})", d) from None
        if a[name].shape != expected[name]:
            raise _damaged(path, file, f"shape {a[name].shape}, expected {expected[name]} as {PREPARED_FILE} says", d)
        kinds = "iu" if name in ("indptr", "indices") else "f" if name == "data" else "iuUb"
        if a[name].dtype.kind not in kinds:
            what = {"iu": "integers", "f": "floats", "iuUb": "integer or text ids"}[kinds]
            raise _damaged(path, f"{name}.npy", f"{a[name].dtype} values, expected {what}", d)
    _check_indptr(path, a["indptr"], nnz, d)
    _check_indices(path, a["indices"], n_items, d)
    _check_values(path, a["data"], d)
    for name in _ARRAYS if digests is not None else ():  # last: the checks above say more of what is wrong
        _check_digest(path, f"{name}.npy", digests, d)
    matrix = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=(n_users, n_items), copy=False)
    return Interactions(matrix, a["user_ids"], a["item_ids"])


def _check_digest(path: Path, file: str, digests: dict, d: dict) -> None:
    """A reversed ``item_ids.npy`` is a valid array of the right shape: only its digest tells."""
    if file not in digests:
        raise _damaged(path, PREPARED_FILE, f"files: no SHA-256 recorded for {file}", d)
    actual = sha256_file(path / file)
    if actual != digests[file]:
        raise _damaged(path, file, f"damaged or replaced: its SHA-256 {actual[:16]}... differs from the "
                       f"{str(digests[file])[:16]}... recorded in {PREPARED_FILE}", d)


def _check_indptr(path: Path, indptr: np.ndarray, nnz: int, d: dict) -> None:
    if indptr[0] != 0:
        raise _damaged(path, "indptr.npy", f"the row pointers start at {indptr[0]}, not 0", d)
    if indptr[-1] != nnz:
        raise _damaged(path, "indptr.npy", f"the row pointers end at {indptr[-1]}, not at nnz = {nnz}", d)
    for start in range(0, len(indptr) - 1, _CHUNK):
        chunk = indptr[start:start + _CHUNK + 1]  # overlapping by one: every neighbour pair is seen
        drops = np.flatnonzero(chunk[1:] < chunk[:-1])
        if drops.size:
            row = start + int(drops[0])
            raise _damaged(path, "indptr.npy", f"the row pointers decrease at row {row} "
                           f"({chunk[drops[0]]} then {chunk[drops[0] + 1]})", d)


def _check_values(path: Path, data: np.ndarray, d: dict) -> None:
    """Finite values: a NaN said 'train: contains non-finite values', naming no file."""
    for start in range(0, len(data), _CHUNK):
        bad = np.flatnonzero(~np.isfinite(data[start:start + _CHUNK]))
        if bad.size:
            at = start + int(bad[0])
            raise _damaged(path, "data.npy", f"value {data[at]} at interaction {at}, expected a finite number", d)


def _check_indices(path: Path, indices: np.ndarray, n_items: int, d: dict) -> None:
    for start in range(0, len(indices), _CHUNK):
        chunk = indices[start:start + _CHUNK]
        lo, hi = chunk.min(), chunk.max()
        if lo < 0 or hi >= n_items:
            bad = int(lo) if lo < 0 else int(hi)
            at = start + int(np.flatnonzero(chunk == bad)[0])
            raise _damaged(path, "indices.npy", f"item index {bad} out of range [0, {n_items}) "
                           f"at interaction {at}", d)
