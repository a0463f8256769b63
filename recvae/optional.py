"""Optional dependencies (plots, Parquet, the HTTP service, tuning studies): checked by name before long work starts,
so a job never computes for an hour and then dies on an import."""

from __future__ import annotations

import importlib
import importlib.util

from recvae.errors import RecvaeError


class MissingDependencyError(RecvaeError, ImportError):
    """An optional package is not installed; the message names it and the extra that brings it."""


#: import name -> (pip extra of recvae that installs it, what it is needed for)
EXTRAS = {
    "matplotlib": ("plot", "plots"),
    "pyarrow": ("parquet", "Parquet files"),
    "fastapi": ("serve", "the HTTP service (recvae serve)"),
    "uvicorn": ("serve", "the HTTP service (recvae serve)"),
    "orjson": ("serve", "the HTTP service (recvae serve)"),
    "httpx": ("serve", "the service's tests"),
    "optuna": ("tune", "a tuning study (recvae tune --trials, --space, --storage, --resume)"),
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str | None = None):
    """Import and return ``module``; :class:`MissingDependencyError` with one line saying what
    needs it and how to install it when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, what = EXTRAS.get(module, (None, module))
        hint = f"pip install 'recvae[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(
            f"{purpose or what} need(s) the optional package {module}, which is not installed ({hint})"
        ) from None
