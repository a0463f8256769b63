"""The one model registry: the name a user types (``--model multvae``) -> the estimator class.

The command line's ``--model`` choices, ``tune``, loading a saved model (by the class name in
its ``model.json``) and the service all read it. Adding a model is one class and one
:func:`register` call (the library's own are registered in :mod:`recvae.models`)."""

from __future__ import annotations

from recvae.errors import ParameterError

_BY_NAME: dict[str, type] = {}


def register(name: str, cls: type) -> type:
    """Make ``cls`` (a :class:`~recvae.models.base.Recommender` with ``fit``, ``_score_batch``,
    ``save`` and ``load``) known as ``name``. Its class name must be unique: a saved model is
    found again by it."""
    other = next((n for n, c in _BY_NAME.items() if c.__name__ == cls.__name__ and c is not cls), None)
    if other is not None:
        raise ValueError(f"register: a model class named {cls.__name__} is already registered as {other!r}")
    _BY_NAME[name] = cls
    return cls


def unregister(name: str) -> None:
    _BY_NAME.pop(name, None)


def model_names() -> list[str]:
    """The registered names, in registration order."""
    return list(_BY_NAME)


def model_class(name: str) -> type:
    if name not in _BY_NAME:
        raise ParameterError("model", f"unknown model {name!r}; expected one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def name_of(cls_name: str) -> str | None:
    """The registered name of the class called ``cls_name`` (as ``model.json`` stores it)."""
    return next((n for n, c in _BY_NAME.items() if c.__name__ == cls_name), None)


def default_params(name: str) -> dict:
    """The model's hyperparameters at their defaults (``__init__`` only stores them, so a fresh
    instance's ``get_params`` is its signature's defaults)."""
    return model_class(name)().get_params()


def is_neural(name: str) -> bool:
    """Whether the model trains by epochs (takes a seed, a device, progress, checkpoints)."""
    return trains_by_epochs(model_class(name))


def trains_by_epochs(cls: type) -> bool:
    """Whether the class trains by epochs: its ``fit`` takes progress, callbacks and a checkpoint."""
    return "epochs" in cls._param_names()


def make_model(name: str, **params):
    """A model by name, its hyperparameters checked (so a bad value fails before any data is
    read or written)."""
    cls = model_class(name)
    unknown = sorted(set(params) - set(cls._param_names()))
    if unknown:
        raise ParameterError(unknown[0], f"not a parameter of {name}; it takes {', '.join(cls._param_names())}")
    model = cls(**params)
    model._check_params()
    return model
