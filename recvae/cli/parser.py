"""The ``recvae`` command line's parser: one sub-command per module of :mod:`recvae.cli`, and the
map from a library parameter to the flag a user types (the errors' way back to the command line)."""

from __future__ import annotations

import argparse

from recvae import __version__
from recvae.cli import datasets, evaluate, prepare, recommend, refit, serve, similar, train, tune
from recvae.cli.hyperparameters import ModelOptionsParser

COMMANDS = (datasets, train, tune, refit, prepare, evaluate, recommend, similar, serve)

#: library parameter names whose flag is not the option of the same dest (settings of a run:
#: ``DataSpec.path`` is ``--data``)
PARAM_FLAGS = {"path": "--data"}


def command_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Parameter name -> flag of ``command``'s options, e.g. ``item_col`` -> ``--item-col``, and
    of its positional arguments their metavar (``run_dir`` -> ``RUN_DIR``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    dests = sub.add_hyperparameters() if isinstance(sub, ModelOptionsParser) else {}
    flags = {}
    for action in sub._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest not in PARAM_FLAGS:
            flags[action.dest] = long[0]
        elif not action.option_strings and isinstance(action.metavar, str):
            flags[action.dest] = action.metavar
    flags.update({k: v for k, v in PARAM_FLAGS.items() if v in flags.values()})
    flags.update({name: flags[dest] for name, dest in dests.items() if dest in flags})  # random_state -> --seed
    return flags


def spelling(parser: argparse.ArgumentParser, command: str):
    """How the command line writes a library parameter in ``command``'s messages: its flag there,
    else the flag another command gives it (``plus --resume`` of ``recvae train`` in a message of
    ``refit``), else the name itself."""
    flags = command_flags(parser, command)
    others: dict[str, str] = {}

    def spell(name: str) -> str:
        if name not in flags and not others:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            for other in sub.choices:
                for key, flag in command_flags(parser, other).items():
                    others.setdefault(key, flag)
        return flags.get(name) or others.get(name, name)

    return spell


def untyped_notes(parser: argparse.ArgumentParser, command: str, argv: list[str]):
    """name -> a note for each option of ``command`` with a default value that ``argv`` does not
    give (``the default, as --user-col was not given``), else None: what an error about it says
    instead of starting with the flag, which the user never typed (:meth:`RecvaeError.text`)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = command_flags(parser, command)  # also adds a model's hyperparameter options
    options = sub._option_string_actions
    typed = set()
    for token in argv:
        if token == "--":
            break
        option = token.split("=", 1)[0]
        if not option.startswith("-"):
            continue
        if option not in options and not option.startswith("--"):
            option = option[:2]  # -k5
        prefixed = [o for o in options if option.startswith("--") and o.startswith(option)]
        action = options.get(option) or (options[prefixed[0]] if len(prefixed) == 1 else None)  # --user: --user-col
        if action is not None:
            typed.add(action)

    def note(name: str) -> str | None:
        action = options.get(flags.get(name, ""))
        if action is None or action in typed or action.default is None or isinstance(action.default, bool):
            # typed; a positional argument or no option of this command; or no value by default,
            # so an error of it is of its absence ("--trials: a study needs its number of trials")
            return None
        return f"the default, as {flags[name]} was not given"

    return note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recvae",
        description="Mult-VAE / Mult-DAE collaborative filtering (Liang et al., WWW 2018) with the paper's protocol.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # also accepted after the command; SUPPRESS keeps the global value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        # train and tune take the models' hyperparameters, added from their tables when used
        sub._parser_class = ModelOptionsParser if getattr(command, "HYPERPARAMETERS", False) else argparse.ArgumentParser
        command.add_parser(sub, common)
    return p


def full_parser() -> argparse.ArgumentParser:
    """:func:`build_parser` with every command's flags added now (``train``'s and ``tune``'s
    hyperparameters too): what the documentation's command-line reference is read from."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices.values():
        if isinstance(command, ModelOptionsParser):
            command.add_hyperparameters()
    return parser
