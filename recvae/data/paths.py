"""The one place where the data directory, and the cache of preprocessed datasets, are resolved."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RECVAE_DATA"
#: where preprocessed MovieLens releases are cached, when set (else beside the data)
CACHE_ENV_VAR = "RECVAE_CACHE"
#: the cache's folder inside the data directory, by default
CACHE_FOLDER = ".recvae-cache"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$RECVAE_DATA``, else ``./data``.

    The directory is not created here; the downloader creates it when it needs to write.
    Reading never writes: a read-only directory holding GroupLens's extracted folders or zips
    (as CI's shared data) works for every loader; only a download needs write access.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("data")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the preprocessed-data cache: ``cache_dir`` if given, else
    ``$RECVAE_CACHE``, else ``<data directory>/.recvae-cache`` (beside the large files it saves
    parsing, where it always was). Point it elsewhere to leave the data directory untouched:
    a folder shared by several users, or one the test suite must not write to.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return resolve_data_dir(data_dir) / CACHE_FOLDER
