"""The ``recvae`` command line: one module per command, each a thin layer over the library.

``main`` parses, runs the command and turns a user error into one line (exit 2); the library's
errors carry their parameter (:class:`recvae.errors.ParameterError`), which becomes the flag the
user typed through the parser (:func:`command_flags`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from recvae.cli.common import CLIError, add_data_options, data_spec_from_args
from recvae.cli.parser import build_parser, command_flags
from recvae.errors import ParameterError
from recvae.optional import MissingDependencyError
from recvae.signals import Terminated, received, sigterm_raises, stopped_by

__all__ = ["main", "build_parser", "CLIError", "add_data_options", "data_spec_from_args"]

logger = logging.getLogger("recvae")

#: what a user gets wrong: bad input files, arguments, missing optional packages. Printed as one
#: line (the traceback only with --debug); any other exception is a bug and shows its traceback.
USER_ERRORS = (CLIError, ValueError, OSError, KeyError, MissingDependencyError)


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
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"recvae: error: {user_message(e, parser, args.command)}", file=sys.stderr)
        return 2


def user_message(error: BaseException, parser: argparse.ArgumentParser, command: str) -> str:
    """The one line a user error prints. A :class:`~recvae.errors.ParameterError` names its
    parameter as data: it becomes the flag the user typed (``latent_dim`` -> ``--latent-dim``),
    found through the parser. Other messages are printed as they are, on one line."""
    if isinstance(error, ParameterError):
        flags = command_flags(parser, command)
        msg = error.text(lambda name: flags.get(name, name))
    else:
        msg = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(msg).split())  # one line, whatever the parser (pandas, torch) put in it


