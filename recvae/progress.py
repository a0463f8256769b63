"""Progress for people and for log files: a tqdm bar where stderr is a terminal; where it is
not (``recvae train ... > log 2>&1``), no bar at all (its carriage returns and cursor codes
would fill the file) and the callers write one plain line per step instead (:func:`say`).

Those lines go through :mod:`logging` wherever the application configured it, and reach stderr
where it configured nothing (as implicit's progress does): the library never configures logging
itself (no handler added, no level set), so nothing it does can double a line or override an
application's choice later on.
"""

from __future__ import annotations

import logging
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


def say(logger: logging.Logger, show: bool, message: str, *args) -> None:
    """One INFO line of progress (``message % args``).

    Where the application configured logging (a handler on ``logger``, one of its parents such as
    ``recvae``, or the root: ``basicConfig``, ``dictConfig``), it is ``logger.info``: the
    application's handlers, levels and format decide, and it is printed once. Where it configured
    nothing, logging would drop an INFO line (the root's default level is WARNING), so with
    ``show`` the line goes to stderr itself, unless a level set on the library's loggers
    (``logging.getLogger("recvae").setLevel(logging.WARNING)``) or ``logging.disable`` hides INFO.
    """
    if not show or logger.hasHandlers():
        logger.info(message, *args)
    elif _info_wanted(logger):
        tqdm.write(message % args if args else message, file=sys.stderr)  # above a bar that is drawn


def _info_wanted(logger: logging.Logger) -> bool:
    """Whether INFO passes ``logging.disable`` and the first level set on ``logger`` or a parent
    (the root's WARNING counts as unset: it is logging's default, not a choice)."""
    if logger.manager.disable >= logging.INFO or logger.disabled:
        return False
    node = logger
    while node is not None:
        if node.level and not (node is logging.root and node.level == logging.WARNING):
            return node.level <= logging.INFO
        node = node.parent
    return True
