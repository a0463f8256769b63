"""What each model may tune, and how: the one module of recvae.tuning that knows models by name.

Everything else asks through small functions (:func:`tunable`, :func:`parse_value`,
:func:`default_grid`, :func:`default_space`, :func:`is_int`, :func:`is_categorical`,
:func:`family`, ...), which read each model's declared parameters (a row's ``tune``:
:mod:`recvae.models.params`); only the per-family plans are named here. Also the parsers of ``--grid NAME=V1,V2`` and
``--space NAME=KIND:...``, whose errors name the entry and what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from recvae.errors import ParameterError
from recvae.models import make_model, model_class, model_names
from recvae.models.ease import EASE_GRID  # noqa: F401  (re-exported: EASE's default grid, from its table)
from recvae.models.params import Param
from recvae.tuning.candidates import describe, grid_points

# The heuristic runs' network, chosen on ML-1M validation NDCG@100 (anneal-1 schedule; split
# seed 0, then seeds 1 and 2). The paper's I-600-200-600-I: 0.409 on seed 0. Latent 100: 0.413,
# 50: 0.418, 25: 0.414; latent 50 with hidden 1000: 0.421, 1500: 0.424. Each user's KL weighted
# by activity: latent 50 0.420; with hidden 1000 / 1500 / 2500: 0.425 / 0.429 / 0.424 (seeds
# 0-2, hidden 1000 vs 1500: 0.416 vs 0.418 on average; 1000 kept: 0.54 vs 0.74 s per epoch keeps
# the ML-1M table under 20 minutes). No gain from weight decay (lam 1e-5..1e-4), dropout 0.3 /
# 0.6 / 0.7, batch 100 / 250, relu, lr 3e-4 / 3e-3 or a constant beta (see the closing notes).
HEURISTIC_NETWORK = {"hidden_dims": (1000,), "latent_dim": 50, "kl_weighting": "activity"}
#: what the paper's trial of ``multvae`` takes from the user's settings: how it is trained and
#: where, not what it is (its network, objective and lr are the paper's)
RUN_SETTINGS = ("epochs", "patience", "batch_size", "device", "precision", "random_state", "eval_batch_size")
#: how each family's trial is fit (recvae.tuning.plans): EASE's and EDLAE's grids share one Gram
#: matrix, Mult-VAE runs the paper's beta heuristic (two runs); any other model one plain fit
FAMILIES = {"ease": "gram", "edlae": "gram", "multvae": "beta-heuristic"}
SPACE_KINDS = ("int", "float", "log", "cat")
SPACE_FORMS = "NAME=int:LOW:HIGH, NAME=float:LOW:HIGH, NAME=log:LOW:HIGH or NAME=cat:V1,V2,..."


# -- what the engine asks: each model's table (recvae.models.params) says ------------------------

def _tunes(model: str) -> dict[str, Param]:
    """The rows of ``model``'s table that tune may vary, by the name they are tuned under."""
    return {p.tune_name: p for p in model_class(model).PARAMETERS if p.tune is not None}


def _row(name: str) -> Param | None:
    """The row tuned as ``name`` in any registered model (``hidden_dim`` -> ``hidden_dims``'s row)."""
    return next((p for m in model_names() for n, p in _tunes(m).items() if n == name), None)


def tunable_models() -> tuple[str, ...]:
    """The registered models with something to tune, in registration order."""
    return tuple(m for m in model_names() if _tunes(m))


def tunable(model: str) -> tuple[str, ...]:
    return tuple(_tunes(model))


def expected(model: str, name: str) -> str:
    """What a value of ``name`` must be, with examples from its default grid or range."""
    p = _tunes(model)[name]
    examples = p.tune.grid[:2] or tuple(v for v in (p.tune.space or "").split(":")[1:] if v)[:2]
    kind = p.tune_kind
    shown = ",".join(kind.describe(v) if not isinstance(v, str) else v for v in examples)
    return f"{kind.expected} each" + (f", such as {shown}" if shown else "")


def parse_value(model: str, name: str, text: str):
    """One value of ``name`` for ``model`` from its text, checked as the estimator checks it
    (its table row's kind); ``ValueError`` otherwise."""
    kind = _tunes(model)[name].tune_kind
    try:
        value = kind.parse(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {text!r}") from None
    return kind.check(name, value)


def default_grid(model: str) -> dict:
    return {n: p.tune.grid for n, p in _tunes(model).items() if p.tune.grid}


def default_space(model: str) -> tuple[str, ...]:
    return tuple(f"{n}={p.tune.space}" for n, p in _tunes(model).items() if p.tune.space)


def is_int(model: str, name: str) -> bool:
    return _tunes(model)[name].tune_kind.tune_kind == "int"


def is_categorical(model: str, name: str) -> bool:
    return _tunes(model)[name].tune_kind.tune_kind == "cat"


def is_beta_model(model: str) -> bool:
    """Whether ``model``'s KL weight beta is annealed (its trials report beta at the best epoch)."""
    return "anneal_cap" in model_class(model)._param_names()


def family(model: str) -> str:
    """``gram``, ``beta-heuristic`` or ``fit``: the plan that fits ``model``'s trials."""
    return FAMILIES.get(model, "fit")


def base_params(model: str) -> dict:
    """What a trial of ``model`` starts from before its values (the heuristic's network)."""
    return dict(HEURISTIC_NETWORK) if family(model) == "beta-heuristic" else {}


def first_candidates(model: str) -> tuple[str, ...]:
    """Plans tried before a plain grid's points: Mult-VAE as published."""
    return ("paper",) if family(model) == "beta-heuristic" else ()


def model_values(values: dict) -> dict:
    """Tuned values as the model's parameters (``hidden_dim`` 600 is ``hidden_dims`` (600,))."""
    out = {}
    for name, value in values.items():
        row = _row(name)
        out[row.name if row else name] = row.tuned_value(value) if row else value
    return out


def fixed(name: str, params: dict) -> bool:
    """Whether ``params`` fixes the tuned value ``name``."""
    return name in params or shown(name) in params


def shown(name: str) -> str:
    """The estimator attribute a table column ``name`` shows."""
    row = _row(name)
    return row.name if row else name


def table_columns(models) -> tuple[str, ...]:
    """Columns a trial table adds for ``models`` (Mult-VAE: the heuristic's beta cap)."""
    return ("anneal_cap",) if any(family(m) == "beta-heuristic" for m in models) else ()


# -- parsing -------------------------------------------------------------------------------------

def parse_models(text: str | list | tuple) -> tuple[str, ...]:
    """``"multvae,recvae"`` -> ``("multvae", "recvae")``; each must be tunable."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    unknown = [n for n in names if n not in tunable_models()]
    if not names or unknown:
        raise ParameterError("model", f"tune takes {', '.join(tunable_models())} (one, or several separated by commas), "
                                      f"got {text!r}")
    return tuple(dict.fromkeys(names))


def parse_grid(specs, model: str) -> dict:
    """``["latent_dim=50,200", "dropout=0.5"]`` -> ``{"latent_dim": (50, 200), "dropout": (0.5,)}``;
    no specs: the model's default grid. Errors name the grid entry and what it expects."""
    if model not in tunable_models():
        raise ParameterError("model", f"tune takes {', '.join(tunable_models())}, got {model!r}")
    if not specs:
        return default_grid(model)
    names = tunable(model)
    grid = {}
    for spec in specs:
        name, sep, values = str(spec).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            first = names[0]
            raise ParameterError("grid", f"expected NAME=V1,V2,... such as {first}="
                             f"{','.join(f'{v:g}' for v in default_grid(model).get(first, ())[:2])}", given=repr(spec))
        if name not in names:
            raise ParameterError("grid", f"{name!r} is not tunable for {model}; tunable: {', '.join(names)}", given=spec)
        if name in grid:
            raise ParameterError("grid", f"{name!r} given twice; list all its values in one NAME=V1,V2", given=spec)
        texts = [t.strip() for t in values.split(",") if t.strip()]
        if not texts:
            raise ParameterError("grid", f"no values; expected {expected(model, name)}", given=f"{name}={values}")
        parsed = []
        for text in texts:
            try:
                parsed.append(parse_value(model, name, text))
            except ValueError:
                raise ParameterError("grid", f"expected {expected(model, name)}", given=f"{name}={text}") from None
        grid[name] = tuple(dict.fromkeys(parsed))  # a value repeated is one trial
    return grid


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter's range in a study: ``int``/``float`` uniform, ``log`` log-uniform
    (integers for an integer parameter), ``cat`` a list of values."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()
    integer: bool = False

    def describe(self) -> str:
        if self.kind == "cat":
            return "cat:" + ",".join(_text(v) for v in self.choices)
        return f"{self.kind}:{_text(self.low)}:{_text(self.high)}"


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dimension(spec: str, models) -> Dimension:
    name, sep, rest = str(spec).partition("=")
    name = name.strip().replace("-", "_")
    kind, sep2, bounds = rest.partition(":")
    kind = kind.strip().lower()
    if not sep or not name or not sep2 or kind not in SPACE_KINDS:
        raise ParameterError("space", f"expected {SPACE_FORMS}, such as latent_dim=int:50:400", given=repr(spec))
    takers = [m for m in models if name in tunable(m)]
    if not takers:
        names = list(dict.fromkeys(n for m in models for n in tunable(m)))
        raise ParameterError("space", f"{name!r} is not tunable for {', '.join(models)}; tunable: {', '.join(names)}",
                             given=spec)
    model = takers[0]
    what = expected(model, name)
    if kind == "cat":
        texts = [t.strip() for t in bounds.split(",") if t.strip()]
        if not texts:
            raise ParameterError("space", f"no values; expected {name}=cat:V1,V2,... with {what}", given=spec)
        try:
            values = [parse_value(model, name, t) for t in texts]
        except ValueError:
            raise ParameterError("space", f"expected {name}=cat:V1,V2,... with {what}", given=spec) from None
        return Dimension(name, "cat", choices=tuple(dict.fromkeys(values)))
    integer = is_int(model, name)
    if is_categorical(model, name):
        raise ParameterError("space", f"{name} takes a list: {name}=cat:V1,V2,... with {what}", given=spec)
    if kind == "float" and integer:
        raise ParameterError("space", f"{name} takes integers: int:LOW:HIGH, log:LOW:HIGH or cat:V1,V2,...", given=spec)
    if kind == "int" and not integer:
        raise ParameterError("space", f"{name} takes real numbers: float:LOW:HIGH, log:LOW:HIGH or cat:V1,V2,...",
                             given=spec)
    parts = bounds.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = (parse_value(model, name, p.strip()) for p in parts)
    except ValueError:
        raise ParameterError("space", f"expected {name}={kind}:LOW:HIGH with LOW and HIGH {what}", given=spec) from None
    if not low < high:
        raise ParameterError("space", "LOW must be below HIGH", given=spec)
    if kind == "log" and low <= 0:
        raise ParameterError("space", "log:LOW:HIGH needs LOW above 0", given=spec)
    return Dimension(name, kind, low, high, integer=integer)


def parse_space(specs, models, params: dict | None = None) -> dict[str, dict[str, Dimension]]:
    """Each model's ranges: its default space less what ``params[model]`` fixes, with the
    ``--space`` entries (``["lr=log:1e-4:1e-2", "latent_dim=int:50:400"]``) over them, each for
    every model that tunes that name. Errors name the entry and the form it expects."""
    models = parse_models(models)
    params = params or {}
    given: dict[str, Dimension] = {}
    for spec in specs or ():
        dim = _dimension(spec, models)
        if dim.name in given:
            raise ParameterError("space", f"{dim.name!r} given twice; give its range once", given=spec)
        given[dim.name] = dim
    space = {}
    for model in models:
        held = params.get(model, {})
        dims = {d.name: d for d in (_dimension(s, (model,)) for s in default_space(model)) if not fixed(d.name, held)}
        for name, dim in given.items():
            if name in tunable(model):
                if fixed(name, held):
                    raise ParameterError("space", f"{name} is also given as a fixed value; give it in one place",
                                         given=f"{name}=...")
                dims[name] = dim
        if not dims:
            raise ParameterError("space", f"nothing of {model} is left to tune (its default range is fixed: "
                                          f"{', '.join(tunable(model))}); give a {{space}}", names=("space",))
        space[model] = dims
    return space


# -- checks before any data is read ----------------------------------------------------------------

def check_fixed(model: str, params: dict) -> None:
    """Fixed parameters tune must choose itself: Mult-VAE's beta schedule (the heuristic's)."""
    if family(model) == "beta-heuristic":
        chosen = [k for k in ("anneal_cap", "total_anneal_steps", "beta") if k in params]
        if chosen:
            raise ParameterError(chosen[0], "tune chooses Mult-VAE's beta schedule by the paper's heuristic; "
                                            "leave it out (train takes it)")


def check_grid(model: str, grid: dict, params: dict) -> list[dict]:
    """The grid's points, each checked by building its model (before any data is read).
    A hyperparameter both fixed in ``params`` and varied by the grid is an error."""
    both = [n for n in grid if fixed(n, params)]
    if both:
        raise ParameterError("grid", f"{both[0]} is also given as a fixed value; give it in one place",
                             given=f"{both[0]}=...")
    check_fixed(model, params)
    points = grid_points(grid)
    for point in points:
        try:
            make_model(model, **{**base_params(model), **params, **model_values(point)})
        except (TypeError, ValueError) as e:
            if isinstance(e, ParameterError):
                raise ParameterError("grid", f"{{{e.param}}}: {e.message}", given=describe(point), names=(e.param,)) from None
            raise ParameterError("grid", str(e), given=describe(point)) from None
    return points


def check_study(models, space: dict | None, grid: dict | None, params: dict) -> None:
    """What a search will build, checked before any data is read: each model's fixed
    parameters (a model built from them), Mult-VAE's schedule left to the heuristic."""
    for model in models:
        held = params.get(model, {})
        if grid is not None:
            check_grid(model, grid, held)
            continue
        check_fixed(model, held)
        try:
            make_model(model, **{**base_params(model), **held})
        except (TypeError, ValueError) as e:
            if isinstance(e, ParameterError):
                raise
            raise ParameterError("model", str(e), given=model) from None
