"""The ``recvae`` command line: one module per command, each a thin layer over the library.

``main`` parses, runs the command and turns a user error into one line (exit 2); the library's
errors carry their parameter (:class:`recvae.errors.RecvaeError`), which becomes the flag the
user typed through the parser (:func:`command_flags`). Any other exception is a bug: its
traceback and a line asking to report it (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from recvae import __version__
from recvae.cli.common import CLIError, add_data_options, data_spec_from_args
from recvae.cli.parser import build_parser, command_flags, spelling, untyped_notes
from recvae.errors import RecvaeError
from recvae.signals import Terminated, received, sigterm_raises, stopped_by

__all__ = ["main", "build_parser", "CLIError", "add_data_options", "data_spec_from_args"]

logger = logging.getLogger("recvae")

#: file-system errors: a path the user gave is missing, of the wrong kind or not writable
FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(error: BaseException) -> bool:
    """What a user gets wrong: the library's family of errors (bad arguments, bad or damaged
    input files, wrong settings, a missing optional package) and file-system errors naming a
    path. Printed as one line (the traceback only with --debug); anything else is a bug."""
    return isinstance(error, RecvaeError) or (
        isinstance(error, OSError) and (error.filename is not None or isinstance(error, FILE_ERRORS)))


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error is one line and exit 2, SIGINT / SIGTERM one line and
    exit 130 / 143 in every command (``train`` and ``tune`` say more: what is on disk)."""
    try:
        with sigterm_raises():
            return _run(argv)
    except (KeyboardInterrupt, Terminated, ImportError) as e:
        if isinstance(e, ImportError) and received() is None:
            raise  # a real import failure (a bug or a broken install): its traceback
        name, code = stopped_by(e)
        print(f"recvae: stopped by {name}; no output was left half-written", file=sys.stderr)
        if argv is None:  # the program itself: leave now, before any library's exit hooks talk
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command it prints
    args.prog = sys.argv[0] if argv is None and Path(sys.argv[0]).name == "recvae" else "recvae"
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    args.flags = command_flags(parser, args.command)  # a library parameter -> the flag the user types
    try:
        return args.func(args) or 0
    except Exception as e:
        if isinstance(e, ImportError) and not isinstance(e, RecvaeError) and received() is not None:
            raise  # a signal cut an import short: main says so
        if not is_user_error(e):
            traceback.print_exc()
            print(f"recvae: this is a bug in recvae {__version__}; please report it with the traceback above",
                  file=sys.stderr)
            return 1
        if args.debug:
            raise
        print(f"recvae: error: {user_message(e, parser, args.command, args.argv)}", file=sys.stderr)
        return 2


def user_message(error: BaseException, parser: argparse.ArgumentParser, command: str,
                 argv: list[str] | None = None) -> str:
    """The one line a user error prints. A :class:`~recvae.errors.RecvaeError` names its
    parameters as data: each becomes the flag the user typed (``latent_dim`` -> ``--latent-dim``),
    found through the parser. An error of an option ``argv`` does not give does not start with
    it, as if the user had given a bad value: it says the flag was not given and its default
    (:func:`untyped_notes`). Other messages are printed as they are, on one line."""
    if isinstance(error, RecvaeError):
        msg = error.text(spelling(parser, command), None if argv is None else untyped_notes(parser, command, argv))
    else:
        msg = str(error)
    return " ".join(str(msg).split())  # one line, whatever the parser (pandas, torch) put in it


