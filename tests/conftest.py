"""Shared fixtures. Real MovieLens checks read the data directory resolved like the library does:
$RECVAE_DATA (CI points it at ../shared/data), else ../shared/data beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    candidates = [os.environ.get("RECVAE_DATA"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "ml-100k" / "u.data").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder holding real MovieLens files; skips the test with the reason when absent."""
    d = _real_data_dir()
    if d is None:
        pytest.skip("real MovieLens data not found: set RECVAE_DATA or place ../shared/data beside the repo")
    return d
