"""Train / validation / test splits of the Mult-VAE paper (strong generalization) and a weak one;
the containers every split returns.

Strong generalization (Liang et al. 2018, Sec. 4.2; their preprocessing notebook): users are
split into disjoint training, validation and test sets. Models learn from the training users
only; a held-out user is scored from a random 80% of their items (*fold-in*) and evaluated on
the other 20% (*held-out*). The splits in time, and :func:`~recvae.data.time_splits.make_split`
that chooses among them and this one, are :mod:`recvae.data.time_splits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from recvae.data.interactions import Interactions
from recvae.errors import InputError, ParameterError, shown
from recvae.fileio import atomic_write, read_npz

#: the paper holds out 10,000 validation and 10,000 test users on ML-20M (136,677 users)
PAPER_N_HELDOUT_USERS = 10_000
#: below this many items a held-out user keeps everything in fold-in (the notebook's ``>= 5``)
MIN_ITEMS_TO_SPLIT = 5
#: the fewest users a held-out-user split can be made of: one to train on, one to validate, one to test
MIN_USERS_TO_SPLIT = 3


@dataclass(frozen=True, eq=False)
class HeldOutUsers:
    """Users evaluated by fold-in: score from ``fold_in`` rows, rank against ``heldout`` rows.

    Both are binary CSR matrices of the same shape (users x training items); row ``u`` is the
    user with original id ``user_ids[u]``. Every row has at least one held-out item.
    """

    fold_in: sp.csr_matrix
    heldout: sp.csr_matrix
    user_ids: np.ndarray

    def __post_init__(self) -> None:
        if self.fold_in.shape != self.heldout.shape:
            raise ParameterError("heldout", f"shape {self.heldout.shape} differs from fold_in's {self.fold_in.shape}")
        if len(self.user_ids) != self.fold_in.shape[0]:
            raise ParameterError("user_ids", f"{len(self.user_ids)} ids for {self.fold_in.shape[0]} rows")

    @property
    def n_users(self) -> int:
        return self.fold_in.shape[0]

    @property
    def n_items(self) -> int:
        return self.fold_in.shape[1]

    def __repr__(self) -> str:
        return f"HeldOutUsers(n_users={self.n_users}, fold_in={self.fold_in.nnz}, heldout={self.heldout.nnz})"

    def _describe(self) -> dict:
        return {
            "n_users": int(self.n_users),
            "n_fold_in_interactions": int(self.fold_in.nnz),
            "n_heldout_interactions": int(self.heldout.nnz),
        }

    def save(self, path) -> None:
        """Write the users to ``path`` (a compressed ``.npz``, no pickle), atomically."""
        arrays = {"user_ids": np.asarray(self.user_ids)}
        for name in ("fold_in", "heldout"):
            m = getattr(self, name).tocsr()
            arrays.update({f"{name}_indptr": m.indptr, f"{name}_indices": m.indices, f"{name}_shape": np.array(m.shape)})
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path) -> "HeldOutUsers":
        """Users written by :meth:`save`; ``InputError`` naming ``path`` when it is not such a file."""
        z = read_npz(path, "held-out users")
        try:
            mats = {}
            for name in ("fold_in", "heldout"):
                indptr, indices = z[f"{name}_indptr"], z[f"{name}_indices"]
                mats[name] = sp.csr_matrix(
                    (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=tuple(z[f"{name}_shape"])
                )
            return cls(fold_in=mats["fold_in"], heldout=mats["heldout"], user_ids=z["user_ids"])
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise InputError(path, f"not a valid held-out users file ({e})") from e


@dataclass(frozen=True, eq=False)
class StrongSplit:
    """Result of :func:`strong_generalization_split`; ``describe()`` summarises it for run dirs."""

    train: Interactions
    validation: HeldOutUsers
    test: HeldOutUsers
    item_ids: np.ndarray  # == train.item_ids: the columns of every matrix here
    seed: int
    n_heldout_users: int  # users drawn for validation and for test (before dropping)
    heldout_fraction: float
    min_items_to_split: int
    n_heldout_users_rule: str
    _stats: dict = field(default_factory=dict, repr=False)
    #: "strong_generalization" (random fold-in), or the time splits' "cutoff" / "leave_last",
    #: whose ``heldout_fraction`` and ``min_items_to_split`` are None and whose settings are in
    #: ``parameters`` (e.g. ``{"cutoff": 1451606400.0, "cutoff_utc": "2016-01-01 00:00:00"}``)
    protocol: str = "strong_generalization"
    parameters: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-ready counts, seed, rule, and the split's kind and parameters (what a run
        directory records)."""
        kind = ({"heldout_fraction": float(self.heldout_fraction), "min_items_to_split": int(self.min_items_to_split)}
                if self.protocol == "strong_generalization" else dict(self.parameters))
        return {
            "protocol": self.protocol,
            "seed": int(self.seed),
            "n_heldout_users": int(self.n_heldout_users),
            "n_heldout_users_rule": self.n_heldout_users_rule,
            **kind,
            "n_items": int(len(self.item_ids)),
            "train": {"n_users": int(self.train.n_users), "n_interactions": int(self.train.nnz),
                      **self._stats.get("train", {})},
            "validation": {**self.validation._describe(), **self._stats.get("validation", {})},
            "test": {**self.test._describe(), **self._stats.get("test", {})},
        }


@dataclass(frozen=True, eq=False)
class WeakSplit:
    """Result of :func:`weak_generalization_split`."""

    train: Interactions
    test: HeldOutUsers
    item_ids: np.ndarray
    seed: int
    heldout_fraction: float
    min_items_to_split: int

    def describe(self) -> dict:
        return {
            "protocol": "weak_generalization",
            "seed": int(self.seed),
            "heldout_fraction": float(self.heldout_fraction),
            "min_items_to_split": int(self.min_items_to_split),
            "n_items": int(len(self.item_ids)),
            "train": {"n_users": int(self.train.n_users), "n_interactions": int(self.train.nnz)},
            "test": self.test._describe(),
        }


@dataclass(frozen=True, eq=False)
class NoHoldout:
    """Every user trains, none is held out (a run with ``holdout="none"``, e.g. a refit on all
    the data): ``validation`` and ``test`` are empty (0 users over the training items), so
    nothing is evaluated. The result of :func:`no_holdout`."""

    train: Interactions
    validation: HeldOutUsers
    test: HeldOutUsers
    item_ids: np.ndarray

    def describe(self) -> dict:
        return {
            "protocol": "none",
            "n_items": int(len(self.item_ids)),
            "train": {"n_users": int(self.train.n_users), "n_interactions": int(self.train.nnz)},
            "validation": self.validation._describe(),
            "test": self.test._describe(),
        }


def no_holdout(interactions: Interactions) -> NoHoldout:
    """Every user of ``interactions`` in training, no validation or test user."""
    _check_interactions(interactions)
    empty = sp.csr_matrix((0, interactions.n_items), dtype=np.float32)
    none = HeldOutUsers(empty, empty.copy(), interactions.user_ids[:0])
    return NoHoldout(interactions, none, none, interactions.item_ids)


def default_n_heldout_users(n_users: int) -> int:
    """Validation users (and as many test users) for a dataset of ``n_users`` users.

    10% of the users each, capped at the paper's 10,000 (ML-20M: 136,677 users -> 10,000),
    and rounded to the nearest hundred from 1,000 users up, so ML-1M (6,034 users after
    preprocessing) gets the 600 + 600 common for ML-1M under this protocol; ML-100K (938)
    gets 94; never fewer than 1.
    """
    n = max(1, int(round(0.1 * n_users)))
    if n_users >= 1000:
        n = int(round(n, -2))
    return min(PAPER_N_HELDOUT_USERS, n)


def strong_generalization_split(
    interactions: Interactions,
    n_heldout_users: int | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    *,
    min_items_to_split: int = MIN_ITEMS_TO_SPLIT,
) -> StrongSplit:
    """Split users into train / validation / test, as in the Mult-VAE paper's notebook.

    1. Shuffle the users with ``seed``; the last ``N`` are test users, the ``N`` before them
       validation users, the rest training users (rows keep their original order within
       each set). ``N = n_heldout_users``, or when None :func:`default_n_heldout_users`:
       10% of the users, rounded to hundreds from 1,000 users, capped at the paper's 10,000
       (ML-20M 10,000; ML-1M 600; ML-100K 94).
    2. Training users keep all their items. The item index is the items with at least one
       training interaction (the columns of ``train``, ``item_ids``); validation and test
       interactions on other items are discarded.
    3. Each validation/test user with ``>= min_items_to_split`` (5) remaining items has
       ``floor(heldout_fraction * n_items_u)`` of them, drawn uniformly at random, held out;
       the rest is fold-in. Users with fewer items keep everything in fold-in in the
       notebook, which leaves them without a held-out item: they are dropped here (their
       Recall/NDCG is undefined), as are users whose ``floor(heldout_fraction * n_items_u)``
       is 0 (only with a fraction below 0.2); ``describe()`` reports how many.

    Every random choice comes from ``np.random.default_rng`` streams spawned from ``seed``
    (one for the user permutation, one per held-out set), so a seed gives one split.
    """
    _check_interactions(interactions)
    _check_fraction(heldout_fraction)
    _check_min_items(min_items_to_split)
    n_users = interactions.n_users
    check_enough_users(n_users)
    if n_heldout_users is None:
        n = default_n_heldout_users(n_users)
        rule = "10% of users, rounded to hundreds from 1,000 users, at most 10,000"
    else:
        if not isinstance(n_heldout_users, (int, np.integer)) or isinstance(n_heldout_users, bool) or n_heldout_users < 1:
            raise ParameterError("n_heldout_users", f"expected a positive integer or None, got {shown(n_heldout_users)}")
        n = int(n_heldout_users)
        rule = "given"
    if 2 * n >= n_users:
        raise ParameterError(
            "n_heldout_users",
            f"{n} validation + {n} test users leave no training user out of {n_users}; expected fewer than {n_users / 2:g}",
        )
    users_rng, vad_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    perm = users_rng.permutation(n_users)
    train_rows = np.sort(perm[: n_users - 2 * n])
    vad_rows = np.sort(perm[n_users - 2 * n : n_users - n])
    test_rows = np.sort(perm[n_users - n :])

    X = interactions.matrix
    train_X = X[train_rows]
    items = np.flatnonzero(np.bincount(train_X.indices, minlength=X.shape[1]))
    train = Interactions(_sorted(_columns(train_X, items)), interactions.user_ids[train_rows],
                         interactions.item_ids[items])

    stats = {}
    held = {}
    for name, rows, rng in (("validation", vad_rows, vad_rng), ("test", test_rows, test_rng)):
        sub_all = X[rows]
        sub = _sorted(_columns(sub_all, items))
        fold_in, heldout, keep = _split_rows(sub, heldout_fraction, min_items_to_split, rng)
        held[name] = HeldOutUsers(fold_in[keep], heldout[keep], interactions.user_ids[rows][keep])
        stats[name] = {
            "n_users_drawn": int(len(rows)),
            "n_users_dropped": int(len(rows) - keep.sum()),
            "n_interactions_on_items_not_in_train": int(sub_all.nnz - sub.nnz),
        }
    return StrongSplit(
        train=train,
        validation=held["validation"],
        test=held["test"],
        item_ids=train.item_ids,
        seed=seed,
        n_heldout_users=n,
        heldout_fraction=heldout_fraction,
        min_items_to_split=min_items_to_split,
        n_heldout_users_rule=rule,
        _stats=stats,
    )


def check_evaluable(split: StrongSplit) -> None:
    """A run's split must leave validation and test users to evaluate: when the users drawn
    for either all have too few items to hold any out, that is the data's fault (too few
    interactions per user), an :class:`~recvae.errors.InputError` saying so before any training."""
    for name in ("validation", "test"):
        drawn = split._stats.get(name, {})
        if getattr(split, name).n_users == 0 and split.protocol == "strong_generalization":
            needed = max(split.min_items_to_split, math.ceil(round(1 / split.heldout_fraction, 9)))
            raise InputError(None, f"none of the {drawn.get('n_users_drawn')} {name} user(s) drawn has an interaction "
                                   f"to hold out, which needs {needed} or more on the training items: more users, or "
                                   "more interactions per user")


# ---------------------------------------------------------------------- splits in time

#: how leave_last_split orders a user's interactions with the same time
def check_enough_users(n_users: int) -> None:
    """Too few users to split is the data's fault, whatever the settings: an
    :class:`~recvae.errors.InputError` (a caller that knows the file names it), not an error of
    ``n_heldout_users``, which the user may never have given."""
    if n_users < MIN_USERS_TO_SPLIT:
        raise InputError(None, f"{n_users} user{'s' if n_users != 1 else ''} after preprocessing; a split needs at "
                               f"least {MIN_USERS_TO_SPLIT}: one to train on, one to validate and one to test")


def _n_heldout(n_heldout_users, n_users: int, n_eligible: int, who: str, param: str) -> tuple[int, str]:
    """Validation (and test) users of a split in time, and the rule that gave the number."""
    check_enough_users(n_users)
    if n_eligible < 2:
        raise ParameterError(param, f"{n_eligible} user(s) {who}; a validation and a test user need at least 2")
    if n_heldout_users is None:
        n = min(default_n_heldout_users(n_users), n_eligible // 2)
        rule = ("10% of users, rounded to hundreds from 1,000 users, at most 10,000, and at most half "
                f"the {n_eligible} users who can be held out ({who})")
    else:
        if not isinstance(n_heldout_users, (int, np.integer)) or isinstance(n_heldout_users, bool) or n_heldout_users < 1:
            raise ParameterError("n_heldout_users", f"expected a positive integer or None, got {shown(n_heldout_users)}")
        n = int(n_heldout_users)
        rule = "given"
        if 2 * n > n_eligible:
            raise ParameterError("n_heldout_users", f"{n} validation + {n} test users, but only {n_eligible} users "
                                                    f"{who} can be held out; expected at most {n_eligible // 2}")
    if 2 * n >= n_users:
        raise ParameterError("n_heldout_users", f"{n} validation + {n} test users leave no training user out of "
                                                f"{n_users}; expected fewer than {n_users / 2:g}")
    return n, rule


def _draw_users(n_users: int, eligible: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Training, validation and test rows: a permutation of the ``eligible`` rows drawn with
    ``seed`` gives the last ``n`` as test users and the ``n`` before them as validation users."""
    users_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0])
    perm = users_rng.permutation(eligible)
    vad_rows = np.sort(perm[len(perm) - 2 * n : len(perm) - n])
    test_rows = np.sort(perm[len(perm) - n :])
    heldout = np.zeros(n_users, dtype=bool)
    heldout[vad_rows] = heldout[test_rows] = True
    return np.flatnonzero(~heldout), vad_rows, test_rows


def weak_generalization_split(
    interactions: Interactions,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    *,
    min_items_to_split: int = MIN_ITEMS_TO_SPLIT,
) -> WeakSplit:
    """Per-user random holdout: every user is in training, with part of their items hidden.

    Each user with ``>= min_items_to_split`` items has ``floor(heldout_fraction * n_items_u)``
    random items held out (same rule as the strong split); ``train`` holds every user's other
    items, with the original user and item index (no row or column is removed, so an item
    seen only in held-out data is an all-zero column). ``test`` holds the users with at least
    one held-out item: ``fold_in`` is their ``train`` row, ``heldout`` the hidden items.
    """
    _check_interactions(interactions)
    _check_fraction(heldout_fraction)
    _check_min_items(min_items_to_split)
    rng = np.random.default_rng(seed)
    fold_in, heldout, keep = _split_rows(_sorted(interactions.matrix), heldout_fraction, min_items_to_split, rng)
    train = Interactions(fold_in, interactions.user_ids, interactions.item_ids)
    test = HeldOutUsers(fold_in[keep], heldout[keep], interactions.user_ids[keep])
    return WeakSplit(train, test, interactions.item_ids, seed, heldout_fraction, min_items_to_split)


def _split_rows(
    X: sp.csr_matrix, fraction: float, min_items: int, rng: np.random.Generator
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Per row, hold out ``floor(fraction * n)`` uniformly random entries when ``n >= min_items``.

    Vectorised: each entry gets a uniform key; within a row the entries with the smallest
    keys are held out, which picks a uniformly random subset of the required size.
    Returns ``(fold_in, heldout, rows_with_heldout)``.
    """
    n_rows = X.shape[0]
    counts = np.diff(X.indptr)
    n_hold = np.where(counts >= min_items, np.floor(fraction * counts).astype(np.int64), 0)
    rows = np.repeat(np.arange(n_rows), counts)
    keys = rng.random(X.nnz)
    is_held = _rank_in_row(X.indptr, rows, keys) < n_hold[rows]
    return _masked(X, rows, ~is_held), _masked(X, rows, is_held), n_hold > 0


#: entries sorted at a time by :func:`_rank_in_row` (whole rows; a longer row is one block)
RANK_BLOCK = 4096


def _rank_in_row(indptr: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each entry's rank among its row's entries by ``keys``, ties by position: exactly what one
    ``np.lexsort((keys, rows))`` over all entries gives. Sorted in blocks of whole rows of about
    :data:`RANK_BLOCK` entries, which stay in cache, so the cost grows as the entries do (one
    sort of 9M entries took 3.5x as long per entry as these blocks)."""
    n = keys.size
    rank = np.empty(n, dtype=np.int64)
    starts = np.unique(np.append(indptr[np.searchsorted(indptr, np.arange(0, n, RANK_BLOCK))], n))
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        rank[a + np.lexsort((keys[a:b], rows[a:b]))] = np.arange(a, b)
    rank -= indptr[rows]
    return rank


def _masked(X: sp.csr_matrix, rows: np.ndarray, mask: np.ndarray) -> sp.csr_matrix:
    indptr = np.zeros(X.shape[0] + 1, dtype=X.indptr.dtype)
    np.cumsum(np.bincount(rows[mask], minlength=X.shape[0]), out=indptr[1:])
    out = sp.csr_matrix((X.data[mask], X.indices[mask], indptr), shape=X.shape)
    out.has_sorted_indices = X.has_sorted_indices
    return out


def _columns(X: sp.csr_matrix, items: np.ndarray) -> sp.csr_matrix:
    """``X[:, items]`` for sorted ``items``; ``X`` itself when they are every column (the usual
    case: a copy of every training entry less)."""
    return X if len(items) == X.shape[1] else X[:, items]


def _sorted(X: sp.csr_matrix) -> sp.csr_matrix:
    if not X.has_sorted_indices:
        X = X.sorted_indices()
    return X


def _check_interactions(interactions) -> None:
    if not isinstance(interactions, Interactions):
        raise TypeError(f"interactions: expected recvae.data.Interactions, got {type(interactions).__name__}")


def _check_fraction(fraction) -> None:
    if not isinstance(fraction, (float, int)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ParameterError("heldout_fraction", f"expected a number in (0, 1), got {fraction!r}")


def _check_min_items(min_items) -> None:
    if not isinstance(min_items, (int, np.integer)) or isinstance(min_items, bool) or min_items < 1:
        raise ParameterError("min_items_to_split", f"expected a positive integer, got {min_items!r}")
