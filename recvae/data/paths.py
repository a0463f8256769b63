"""The one place where the data directory is resolved."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RECVAE_DATA"


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
