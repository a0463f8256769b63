"""Candidate generators: what trial k tries. One interface, as scikit-learn's searches differ
only in their candidates: ``len(generator)`` trials at most, and ``generator.candidate(k,
history)`` the values of trial k, ``history`` being the finished trials numbered below k (a grid
ignores it; Optuna's TPE, in :mod:`recvae.tuning.study`, draws from it)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: ``model`` with ``values`` (the tuned hyperparameters, as the
    tables name them: ``hidden_dim`` is one hidden layer's width); ``plan``: how it is fit, when
    not its family's usual way (``"paper"``: Mult-VAE as published)."""

    model: str
    values: dict = field(default_factory=dict)
    plan: str | None = None

    @property
    def name(self) -> str:
        return self.plan or describe(self.values)

    def record(self) -> dict:
        """What a store keeps of it (JSON)."""
        return {"model": self.model, "values": dict(self.values), "plan": self.plan}

    @classmethod
    def from_record(cls, record: dict) -> "Candidate":
        return cls(record["model"], dict(record.get("values") or {}), record.get("plan"))


class Points:
    """A list of candidates, tried in order."""

    def __init__(self, candidates):
        self.candidates = list(candidates)

    def __len__(self) -> int:
        return len(self.candidates)

    def candidate(self, k: int, history=()) -> Candidate:
        return self.candidates[k]


class Grid(Points):
    """Every combination of a grid's values (``{"latent_dim": (50, 200), ...}``) for ``model``,
    in the order declared; ``first``: candidates tried before the grid's (Mult-VAE's paper trial)."""

    def __init__(self, model: str, grid: dict, first=()):
        self.grid = grid
        super().__init__([*first, *(Candidate(model, point) for point in grid_points(grid))])


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, in the order declared."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def describe(point: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def describe_grid(grid: dict) -> str:
    return " x ".join(f"{k}={','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
                      for k, vs in grid.items())
