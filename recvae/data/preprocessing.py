"""The one definition of how raw interactions become implicit feedback, and its defaults.

:class:`Preprocessing` holds the three rules the Mult-VAE paper applies (keep ratings > 3.5,
users with >= 5 of them, no item minimum). Its defaults are the defaults of
:meth:`~recvae.data.Interactions.from_dataframe`, :func:`~recvae.data.read_interactions`,
:func:`~recvae.data.load_movielens`, :class:`recvae.experiment.DataSpec` and the command line's
``--rating-threshold``, ``--min-user-interactions`` and ``--min-item-interactions``: one set of
defaults everywhere. Those functions take the three values as keyword arguments;
``**Preprocessing(...).kwargs()`` passes a whole definition at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from recvae.errors import ParameterError, shown


@dataclass(frozen=True)
class Preprocessing:
    """How a table of (user, item[, rating]) rows becomes binary implicit feedback.

    ``rating_threshold``: keep rows rated strictly above it (the paper: 3.5, i.e. 4 and 5 stars
    on MovieLens); ``None`` keeps every rating. It applies only to data with a rating column:
    without one every row is a positive. ``min_user_interactions``: drop users with fewer
    interactions, counted after the threshold and after merging repeated (user, item) pairs (the
    paper: 5). ``min_item_interactions``: then drop items with fewer (the paper: 0, none).
    See :meth:`~recvae.data.Interactions.from_dataframe` for the order of the steps.
    """

    rating_threshold: float | None = 3.5
    min_user_interactions: int = 5
    min_item_interactions: int = 0

    def __post_init__(self) -> None:
        t = self.rating_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating))
                              or not math.isfinite(t)):
            raise ParameterError("rating_threshold", f"expected a finite number or None, got {shown(t)}")
        for name in ("min_user_interactions", "min_item_interactions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ParameterError(name, f"expected a non-negative integer, got {shown(v)}")

    @classmethod
    def keep_all(cls) -> "Preprocessing":
        """No rule: every row is a positive, every user and item kept."""
        return cls(rating_threshold=None, min_user_interactions=0, min_item_interactions=0)

    def kwargs(self) -> dict:
        """The three values as keyword arguments (``read_interactions(path, **p.kwargs())``)."""
        return asdict(self)


#: the paper's preprocessing, the default everywhere
PAPER = Preprocessing()
