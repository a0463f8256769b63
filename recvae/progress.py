"""Progress for people and for log files: a tqdm bar where stderr is a terminal; where it is
not (``recvae train ... > log 2>&1``), no bar at all (its carriage returns and cursor codes
would fill the file) and the callers log one plain line per step instead."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether stderr is a terminal (where a redrawn bar reads well)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(iterable=None, show: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, drawn only when ``show`` and stderr is a terminal."""
    return tqdm(iterable, disable=not (show and interactive()), file=sys.stderr, **kwargs)
