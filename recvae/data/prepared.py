"""A prepared dataset directory: preprocessed interactions as uncompressed ``.npy`` arrays.

Written once (``recvae prepare``), then memory-mapped by every reader (``np.load(mmap_mode="r")``),
so N training processes on one machine share one copy through the page cache instead of each
parsing the interaction file. Layout::

    prepared.json   format version, shape, and how the interactions were preprocessed
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
from recvae.fileio import atomic_dir, atomic_write, write_json

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
                                         "preprocessing": preprocessing or {}})
    logger.debug("prepared %r in %s", interactions, path)
    return path


def read_prepared_description(path: str | os.PathLike) -> dict:
    """The ``prepared.json`` of a prepared directory; FileNotFoundError naming it when absent."""
    path = Path(path)
    if not is_prepared(path):
        raise FileNotFoundError(f"{path}: not a prepared dataset (no {PREPARED_FILE}); "
                                f"write one with `recvae prepare --data FILE --out {path}`")
    description = json.loads((path / PREPARED_FILE).read_text())
    if description.get("format_version") != PREPARED_FORMAT_VERSION:
        raise ValueError(f"{path / PREPARED_FILE}: format version {description.get('format_version')}, expected "
                         f"{PREPARED_FORMAT_VERSION}; prepare it again")
    return description


def load_prepared(path: str | os.PathLike) -> Interactions:
    """The interactions of a prepared directory; the CSR arrays are memory-mapped (read-only)."""
    path = Path(path)
    d = read_prepared_description(path)
    try:
        a = {name: np.load(path / f"{name}.npy", mmap_mode="r" if name in ("indptr", "indices", "data") else None,
                           allow_pickle=False) for name in _ARRAYS}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: damaged prepared dataset ({e}); prepare it again") from e
    shape = (int(d["n_users"]), int(d["n_items"]))
    if a["indptr"].shape != (shape[0] + 1,) or a["indices"].shape != (int(d["nnz"]),):
        raise ValueError(f"{path}: arrays do not match {PREPARED_FILE} (shape {shape}, nnz {d['nnz']}); prepare it again")
    matrix = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=shape, copy=False)
    return Interactions(matrix, a["user_ids"], a["item_ids"])
