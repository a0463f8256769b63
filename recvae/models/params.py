"""Hyperparameters declared once: each model's table of :class:`Param` rows.

A row says everything the library knows of one hyperparameter: its name, kind (what values it
takes, how its text is read), default, role, help and tuning range. Everything else is derived
from the table, as scikit-learn derives checks from ``_parameter_constraints``:

- the estimator's ``__init__`` (its signature is the table's names and defaults; ``__init__``
  only stores them) and its value checks (:meth:`Recommender._check_params`);
- the command line's flags and their help (``recvae train --help``);
- ``tune``'s grids and study ranges (:attr:`Param.tune`);
- what a resumed run may change (:data:`ROLES`): ``architecture`` is forced, as nanoGPT forces
  its model keys; ``training`` and ``runtime`` may change;
- what ``run.json`` and ``model.json`` record (:meth:`Kind.to_json`).

A model class declares ``PARAMETERS = (Param(...), ...)``; a subclass derives its table from its
parent's with :func:`table` (added rows, other defaults, rows dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from recvae.errors import ParameterError, shown

#: ``architecture``: what the model is and how it is optimised (network, objective, schedule,
#: batch size, seed): a resumed run must keep it, or it would be another run. ``training``: how
#: long and how fast it learns (epochs, patience, lr): may change on resume. ``runtime``: where and
#: in what precision it computes: may change on resume and says nothing of the model.
ROLES = ("architecture", "training", "runtime")


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


class Kind:
    """What values a hyperparameter takes. ``expected``: the phrase error messages use;
    ``tune_kind``: how a study samples it (``int``, ``float`` or ``cat``; None: not sampled)."""

    expected = "a value"
    tune_kind: str | None = None

    def parse(self, text: str):
        """The value of ``text`` (a flag's or a grid's); ``ValueError`` when it is not one."""
        return text

    def check(self, name: str, value):
        """``value`` as the model stores it; :class:`ParameterError` naming ``name`` otherwise."""
        return value

    def to_json(self, value):
        return value

    def from_json(self, value):
        return value

    def describe(self, value) -> str:
        """A value as help texts and trial tables show it."""
        return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Int(Kind):
    """An integer ``>= low``."""

    low: int = 1
    tune_kind = "int"

    @property
    def expected(self) -> str:
        return {1: "a positive integer", 0: "a non-negative integer"}.get(self.low, f"an integer >= {self.low}")

    def parse(self, text: str):
        return int(str(text).strip())

    def check(self, name: str, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < self.low:
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}")
        return int(value)


@dataclass(frozen=True)
class Float(Kind):
    """A finite number in a range: ``low``/``high`` bounds, each closed unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    tune_kind = "float"

    @property
    def expected(self) -> str:
        if (self.low, self.high, self.low_open, self.high_open) == (0.0, 1.0, False, True):
            return "a probability in [0, 1)"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(self, text: str):
        return float(str(text).strip())

    def check(self, name: str, value):
        ok = _is_number(value) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}")
        return value


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few strings."""

    options: tuple = ()
    tune_kind = "cat"

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(map(repr, self.options))

    def parse(self, text: str):
        text = str(text).strip()
        if text not in self.options:
            raise ValueError(text)
        return text

    def check(self, name: str, value):
        if value not in self.options:
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}")
        return value


@dataclass(frozen=True)
class Widths(Kind):
    """Layer widths: a tuple of positive integers, written ``600,300`` (``none`` for no layer)."""

    expected = "comma-separated positive integers such as 600 or 600,300 ('none' for no layer)"

    def parse(self, text: str):
        text = str(text).strip()
        if text.lower() in ("", "none"):
            return ()
        dims = tuple(int(t) for t in text.split(",") if t.strip())
        if any(d < 1 for d in dims):
            raise ValueError(text)
        return dims

    def check(self, name: str, value):
        try:
            dims = tuple(value)
        except TypeError:
            raise ParameterError(name, f"expected a tuple of positive integers, got {shown(value)}") from None
        if not all(not isinstance(d, bool) and isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
            raise ParameterError(name, f"expected positive integer widths, got {shown(value)}")
        return tuple(int(d) for d in dims)

    def to_json(self, value):
        return [int(d) for d in value]

    def from_json(self, value):
        return tuple(value)

    def describe(self, value) -> str:
        return "-".join(map(str, value)) if value else "none"


@dataclass(frozen=True)
class Floats(Kind):
    """A tuple of ``length`` finite numbers, written ``0.15,0.75,0.1``."""

    length: int = 3

    @property
    def expected(self) -> str:
        return f"{self.length} comma-separated numbers such as 0.15,0.75,0.1"

    def parse(self, text: str):
        values = tuple(float(t) for t in str(text).split(",") if t.strip())
        if len(values) != self.length:
            raise ValueError(text)
        return values

    def check(self, name: str, value):
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}") from None
        if len(values) != self.length or not all(math.isfinite(v) for v in values):
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}")
        return value

    def to_json(self, value):
        return [float(v) for v in value]

    def from_json(self, value):
        return tuple(value)

    def describe(self, value) -> str:
        return ",".join(f"{v:g}" for v in value)


@dataclass(frozen=True)
class Text(Kind):
    """Any string (a device name: its meaning is checked where it is used)."""

    expected = "a string"

    def check(self, name: str, value):
        if not isinstance(value, str) and type(value).__name__ != "device":
            raise ParameterError(name, f"expected {self.expected}, got {shown(value)}")
        return value

    def to_json(self, value):
        return str(value)


@dataclass(frozen=True)
class Tune:
    """How ``tune`` varies a hyperparameter. ``space``: its default study range, written as
    ``--space`` takes it (``int:25:300``, ``float:0.3:0.7``, ``log:3e-4:3e-3``, ``cat:a,b``);
    None: tunable, but a study varies it only when asked. ``grid``: its values in the default
    grid (empty: not in it). ``name`` and ``kind``: the name and kind it is tuned under when not
    its own, with ``to_param`` making the parameter's value (``hidden_dims`` is tuned as
    ``hidden_dim``, one hidden layer's width)."""

    space: str | None = None
    grid: tuple = ()
    name: str | None = None
    kind: Kind | None = None
    to_param: Callable | None = None


@dataclass(frozen=True)
class Param:
    """One hyperparameter: see the module's docstring. ``optional``: None is a value too (its
    meaning in ``help``). ``flag``: the command line's option (default ``--name-with-dashes``)."""

    name: str
    kind: Kind
    default: object
    role: str
    help: str
    optional: bool = False
    flag: str | None = None
    tune: Tune | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role {self.role!r}, expected one of {ROLES}")

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value):
        if value is None and self.optional:
            return None
        try:
            return self.kind.check(self.name, value)
        except ParameterError as e:
            if not self.optional:
                raise
            raise ParameterError(self.name, e.message.replace("expected ", "expected None or ", 1)) from None

    def parse(self, text: str):
        """The value of a flag's text; ``ParameterError`` saying what was expected."""
        if self.optional and str(text).strip().lower() == "none":
            return None
        try:
            return self.kind.parse(text)
        except (TypeError, ValueError):
            raise ParameterError(self.name, f"expected {self.kind.expected}{' or none' if self.optional else ''}, "
                                            f"got {text!r}") from None

    def to_json(self, value):
        return None if value is None else self.kind.to_json(value)

    def from_json(self, value):
        return None if value is None else self.kind.from_json(value)

    # -- tuning ------------------------------------------------------------------------------
    @property
    def tune_name(self) -> str:
        return (self.tune.name if self.tune and self.tune.name else None) or self.name

    @property
    def tune_kind(self) -> Kind:
        return (self.tune.kind if self.tune and self.tune.kind else None) or self.kind

    def tuned_value(self, value):
        """The parameter's value for a tuned ``value`` (``hidden_dim`` 600 -> ``hidden_dims`` (600,))."""
        return self.tune.to_param(value) if self.tune and self.tune.to_param else value


def table(base: tuple = (), add: tuple = (), drop: tuple = (), changes: dict | None = None,
          **defaults) -> tuple[Param, ...]:
    """A model's table from a parent's: ``base``'s rows less ``drop``, with other ``defaults``
    (``lam=2e-5``) and other fields (``changes={"lr": {"tune": Tune(...)}}``), then the rows of
    ``add``. The order is the ``__init__`` signature's."""
    changes = {name: dict(fields) for name, fields in (changes or {}).items()}
    for name, value in defaults.items():
        changes.setdefault(name, {})["default"] = value
    unknown = sorted(set(changes) - {p.name for p in base})
    if unknown:
        raise ValueError(f"table: no parameter {unknown[0]!r} to change")
    rows = [replace(p, **changes[p.name]) if p.name in changes else p for p in base if p.name not in drop]
    clash = sorted({p.name for p in add} & {p.name for p in rows})
    if clash:
        raise ValueError(f"table: {clash[0]!r} is declared twice")
    return (*rows, *add)


def by_name(params: tuple[Param, ...]) -> dict[str, Param]:
    return {p.name: p for p in params}


def check_table(params: tuple[Param, ...], owner: str) -> None:
    """A table's own consistency: unique names, each default a value of its kind."""
    seen = set()
    for p in params:
        if p.name in seen:
            raise ValueError(f"{owner}: parameter {p.name!r} declared twice")
        seen.add(p.name)
        try:
            p.check(p.default)
        except ParameterError as e:
            raise ValueError(f"{owner}: the default of {p.name} is not a value of its kind ({e.message})") from None


def make_init(params: tuple[Param, ...], qualname: str):
    """An ``__init__`` that only stores the hyperparameters (scikit-learn's rule), with the table's
    names and defaults as its real signature (so ``inspect``, ``get_params`` and ``clone`` see them)."""
    args = ", ".join(f"{p.name}=_defaults[{i}]" for i, p in enumerate(params))
    body = "\n".join(f"    self.{p.name} = {p.name}" for p in params) or "    pass"
    source = f"def __init__(self{', ' if args else ''}{args}):\n{body}\n"
    namespace: dict = {}
    exec(source, {"_defaults": [p.default for p in params]}, namespace)  # noqa: S102 - the table's own names
    init = namespace["__init__"]
    init.__qualname__ = f"{qualname}.__init__"
    init.__doc__ = "Store the hyperparameters (see the class's Parameters); ``fit`` checks them."
    return init


def parameters_doc(params: tuple[Param, ...]) -> str:
    """A numpy-style "Parameters" section made from the table (appended to the class docstring)."""
    lines = ["Parameters", "----------"]
    for p in params:
        kind = p.kind.expected + (" or None" if p.optional else "")
        lines.append(f"{p.name} : {kind}, default {p.default!r}")
        lines.append(f"    {p.help} (role: {p.role}; flag ``{p.option}``)")
    return "\n".join(lines)


def json_params(params: tuple[Param, ...], values: dict) -> dict:
    """Every hyperparameter of the table, ``values`` over the defaults, as JSON stores them."""
    rows = by_name(params)
    unknown = sorted(set(values) - set(rows))
    if unknown:
        raise ParameterError(unknown[0], f"not a parameter; expected one of {', '.join(rows)}")
    return {p.name: p.to_json(values.get(p.name, p.default)) for p in params}


def forced(params: tuple[Param, ...]) -> tuple[str, ...]:
    """The names a resume must keep: the ``architecture`` role's."""
    return tuple(p.name for p in params if p.role == "architecture")
