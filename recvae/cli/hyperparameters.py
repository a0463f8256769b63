"""The hyperparameter flags of ``train`` and ``tune``, made from the registered models' tables
(:mod:`recvae.models.params`): a row added to a model's table is a flag here, with its help,
its default per model and its parser, and nothing is written twice.

Reading the tables imports the models (torch, ~2 s), which no other command's start-up needs:
the flags are added when ``train`` or ``tune`` parses or shows its help
(:class:`ModelOptionsParser`), not when the command line is built.
"""

from __future__ import annotations

import argparse

from recvae.cli.common import CLIError
from recvae.errors import ParameterError

class ModelOptionsParser(argparse.ArgumentParser):
    """A command's parser whose hyperparameter flags are added on first use. ``dests``: each
    hyperparameter's option dest (``random_state`` -> ``seed``); the parsed arguments carry it as
    ``hyperparameter_dests``."""

    dests: dict[str, str] | None = None

    def add_hyperparameters(self) -> dict[str, str]:
        if self.dests is None:
            self.dests = add_hyperparameter_options(self)
            self.set_defaults(hyperparameter_dests=self.dests)
        return self.dests

    def parse_known_args(self, args=None, namespace=None):
        self.add_hyperparameters()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self.add_hyperparameters()
        return super().format_help()

    def format_usage(self):
        self.add_hyperparameters()
        return super().format_usage()


def _rows() -> dict[str, list]:
    """Hyperparameter name -> ``[(model, Param), ...]`` over the registered models, in order."""
    from recvae.models import model_class, model_names

    rows: dict[str, list] = {}
    for name in model_names():
        for p in model_class(name).PARAMETERS:
            rows.setdefault(p.name, []).append((name, p))
    return rows


def _parser_of(entries):
    """The flag's ``type``: the first model's parser of the text (choices: the union of every
    model's), raising argparse's error with what was expected; the model checks the value."""
    param = entries[0][1]
    options = [o for _, p in entries for o in getattr(p.kind, "options", ())]

    def parse(text: str):
        if options and not param.optional:
            if text not in options:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(dict.fromkeys(options))}, got {text!r}")
            return text
        try:
            return param.parse(text)
        except ParameterError as e:
            raise argparse.ArgumentTypeError(e.message) from None

    parse.__name__ = param.name
    return parse


def _help(entries, n_models: int) -> str:
    param = entries[0][1]
    defaults: dict[str, list[str]] = {}
    for model, p in entries:
        defaults.setdefault(p.kind.describe(p.default) if p.default is not None else "none", []).append(model)
    if len(defaults) == 1:
        default = f"default {next(iter(defaults))}"
    else:
        default = "default " + "; ".join(f"{', '.join(models)}: {value}" for value, models in defaults.items())
    who = "" if len(entries) == n_models else f"[{', '.join(m for m, _ in entries)}] "
    return f"{who}{param.help} ({default})".replace("%", "%%")


def add_hyperparameter_options(p: argparse.ArgumentParser) -> dict[str, str]:
    """One flag per hyperparameter of the registered models; returns name -> the flag's dest."""
    from recvae.models import model_names

    rows = _rows()
    dests = {}
    group = p.add_argument_group("hyperparameters (from each model's table; a model refuses those it does not take)")
    for name, entries in rows.items():
        param = entries[0][1]
        dest = param.option.lstrip("-").replace("-", "_")
        dests[name] = dest
        group.add_argument(param.option, dest=dest, type=_parser_of(entries), default=argparse.SUPPRESS,
                           metavar=_metavar(param), help=_help(entries, len(model_names())))
    return dests


def _metavar(param) -> str:
    options = getattr(param.kind, "options", None)
    if options:
        return "{" + ",".join(options) + "}"
    return {"Int": "N", "Float": "X", "Widths": "W[,W...]", "Floats": "X,X,..."}.get(type(param.kind).__name__, "VALUE")


def model_params_from_args(args) -> dict:
    """Hyperparameters for the chosen model from the flags given; a flag the model does not take
    is an error rather than silently ignored."""
    from recvae.models import model_class

    accepted = set(model_class(model_name(args))._param_names())
    dests = args.hyperparameter_dests
    given = {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}
    unused = [name for name in given if name not in accepted]
    if unused:
        flags = ", ".join("--" + dests[u].replace("_", "-") for u in unused)
        raise CLIError(f"--model {args.model}{latent_note(args)}: does not take {flags}")
    return given


def model_name(args) -> str:
    """The model ``--model`` and ``--latent`` name together: ``--model multvae --latent bernoulli``
    is ``binary-multvae``; another model with ``--latent`` is an error."""
    latent = getattr(args, "latent", None)
    if latent is None or (latent == "gaussian" and args.model == "multvae"):
        return args.model
    if args.model == "multvae":
        return "binary-multvae"
    raise CLIError(f"--model {args.model}: does not take --latent (only multvae has a choice of latent)")


def latent_note(args) -> str:
    return " --latent bernoulli" if model_name(args) == "binary-multvae" and args.model == "multvae" else ""
