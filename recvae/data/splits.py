"""Train / validation / test splits of the Mult-VAE paper (strong generalization), two in time,
and a weak one.

Strong generalization (Liang et al. 2018, Sec. 4.2; their preprocessing notebook): users are
split into disjoint training, validation and test sets. Models learn from the training users
only; a held-out user is scored from a random 80% of their items (*fold-in*) and evaluated on
the other 20% (*held-out*).

The time-aware splits keep those disjoint user sets and the :class:`StrongSplit` they return
(so fit, evaluate and recommend take them unchanged) but cut each held-out user's history in
time rather than at random; they need :attr:`Interactions.timestamps` (read with a
``timestamp_col``):

- :func:`cutoff_split`: one global time T. Training is the training users' interactions
  strictly before T; validation and test users are drawn among the users with interactions
  both before T and at or after T; their fold-in is before T, their targets at or after T (a
  time equal to T is the future). It measures predicting what users do next from what was
  known at T, without training on the future.
- :func:`leave_last_split`: each held-out user's last N interactions by time are the targets,
  the earlier ones the fold-in (ties: the source file's row order); training users keep all.
  It measures predicting each user's next N items from their past.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datetime
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recvae.data.interactions import Interactions
from recvae.errors import ParameterError, shown

#: the paper holds out 10,000 validation and 10,000 test users on ML-20M (136,677 users)
PAPER_N_HELDOUT_USERS = 10_000
#: below this many items a held-out user keeps everything in fold-in (the notebook's ``>= 5``)
MIN_ITEMS_TO_SPLIT = 5


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


# ---------------------------------------------------------------------- splits in time

#: how leave_last_split orders a user's interactions with the same time
TIE_RULE = "equal times in the order of their rows in the source"


def parse_cutoff(value) -> float:
    """A cutoff time as Unix seconds: a number (Unix seconds, as GroupLens's timestamps), a
    numeric string, an ISO date or datetime string (``2016-01-01``, ``2016-01-01T12:30:00``,
    with or without a zone; without one it is UTC) or a datetime / pandas Timestamp."""
    expected = "expected an ISO date or datetime (2016-01-01, 2016-01-01T12:00:00) or Unix seconds"
    if isinstance(value, bool):
        raise ParameterError("cutoff", f"{expected}, got {shown(value)}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
        if seconds is None:
            try:
                stamp = pd.Timestamp(value.strip())
            except (ValueError, TypeError, OverflowError):
                raise ParameterError("cutoff", f"{expected}, got {value!r}") from None
            if pd.isna(stamp):
                raise ParameterError("cutoff", f"{expected}, got {value!r}")
            seconds = _seconds(stamp)
    elif hasattr(value, "timestamp"):  # datetime.datetime, pandas.Timestamp
        seconds = _seconds(pd.Timestamp(value))
    else:
        raise ParameterError("cutoff", f"{expected}, got {shown(value)}")
    if not math.isfinite(seconds):
        raise ParameterError("cutoff", f"{expected}, got {shown(value)}")
    return seconds


def _seconds(stamp: pd.Timestamp) -> float:
    # .timestamp(), not a difference of Timestamps: that is cast to nanoseconds, which overflow
    # past the year 2262 (--cutoff 3000-01-01 said "Cannot cast ... without overflow")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.timestamp()


def format_time(seconds: float) -> str:
    """Unix seconds as a UTC date and time, ``2016-01-01 00:00:00`` (as messages show them);
    a time beyond the calendar (years 1 to 9999) as its number of seconds."""
    try:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{seconds:g} Unix seconds"


def cutoff_split(interactions: Interactions, cutoff, n_heldout_users: int | None = None, seed: int = 0) -> StrongSplit:
    """Split at one global time ``cutoff`` (:func:`parse_cutoff`: Unix seconds, or an ISO date
    or datetime, UTC without a zone).

    1. Users with at least one interaction before the cutoff and one at or after it can be held
       out; ``N`` validation and ``N`` test users are drawn among them with ``seed`` (a
       permutation of those users: the last ``N`` are test users, the ``N`` before validation).
       ``N = n_heldout_users``, or when None the rule of :func:`strong_generalization_split`
       (:func:`default_n_heldout_users` of all users), at most half the users who can be held out.
    2. Every other user is a training user, with their interactions strictly before the cutoff;
       their later ones are dropped (they are the future), and a training user with none before
       it is left out. The item index is the items of those training interactions.
    3. A held-out user's fold-in is their interactions before the cutoff, their targets those at
       or after it (a time equal to the cutoff is the future), both on the training items; a user
       left with no fold-in or no target is dropped (``describe()`` counts them).

    Errors (:class:`~recvae.errors.ParameterError` of ``cutoff``) when the cutoff leaves no
    training interaction, nothing to test, or fewer than two users who can be held out.
    """
    _check_interactions(interactions)
    times, _ = _timestamps(interactions)
    t = parse_cutoff(cutoff)
    when = format_time(t) + " UTC"
    X = interactions.matrix
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    before = times < t
    if not before.any():
        raise ParameterError("cutoff", f"{when} is before every interaction (the first is at "
                                       f"{format_time(times.min())} UTC): no training interaction")
    if before.all():
        raise ParameterError("cutoff", f"{when} is after every interaction (the last is at "
                                       f"{format_time(times.max())} UTC): nothing to test")
    n_before = np.bincount(rows[before], minlength=X.shape[0])
    n_after = np.bincount(rows[~before], minlength=X.shape[0])
    eligible = np.flatnonzero((n_before > 0) & (n_after > 0))
    who = f"with interactions both before and at or after {when}"
    n, rule = _n_heldout(n_heldout_users, X.shape[0], len(eligible), who, "cutoff")
    train_rows, vad_rows, test_rows = _draw_users(X.shape[0], eligible, n, seed)
    return _time_split(interactions, rows, train_entries=before, fold_in=before, n=n, rule=rule, seed=seed,
                       sets=(train_rows, vad_rows, test_rows), protocol="cutoff", param="cutoff",
                       parameters={"cutoff": t, "cutoff_utc": format_time(t)})


def leave_last_split(interactions: Interactions, leave_last: int, n_heldout_users: int | None = None,
                     seed: int = 0) -> StrongSplit:
    """Hold out each held-out user's last ``leave_last`` interactions by time.

    1. Users with more than ``leave_last`` interactions can be held out (a user with
       ``leave_last`` or fewer would have no fold-in); ``N`` validation and ``N`` test users are
       drawn among them as :func:`cutoff_split` draws them.
    2. Every other user is a training user with all their interactions (as the paper's split);
       the item index is the items of the training users.
    3. A held-out user's interactions on the training items are ordered by time, equal times in
       the order of their rows in the source (``Interactions.sequence``); the last
       ``leave_last`` are the targets, the earlier ones the fold-in. A user left with
       ``leave_last`` or fewer on the training items is dropped (``describe()`` counts them),
       so every kept user has exactly ``leave_last`` targets.
    """
    _check_interactions(interactions)
    check_time_split(leave_last=leave_last)
    times, sequence = _timestamps(interactions)
    X = interactions.matrix
    counts = np.diff(X.indptr)
    rows = np.repeat(np.arange(X.shape[0]), counts)
    eligible = np.flatnonzero(counts > leave_last)
    who = f"with more than {leave_last} interactions"
    n, rule = _n_heldout(n_heldout_users, X.shape[0], len(eligible), who, "leave_last")
    sets = _draw_users(X.shape[0], eligible, n, seed)

    def fold_in(in_catalogue: np.ndarray) -> np.ndarray:
        """Per entry: not among its user's last ``leave_last`` on the catalogue."""
        keep = np.flatnonzero(in_catalogue)
        order = keep[np.lexsort((sequence[keep], times[keep], rows[keep]))]  # by user, time, row
        n_u = np.bincount(rows[keep], minlength=X.shape[0])
        start = np.zeros(X.shape[0] + 1, dtype=np.int64)
        np.cumsum(n_u, out=start[1:])
        rank = np.empty(X.nnz, dtype=np.int64)
        rank[order] = np.arange(len(order)) - start[rows[order]]
        return rank < (n_u - leave_last)[rows]

    return _time_split(interactions, rows, train_entries=np.ones(X.nnz, dtype=bool), fold_in=fold_in, n=n,
                       rule=rule, seed=seed, sets=sets, protocol="leave_last", param="leave_last",
                       parameters={"leave_last": int(leave_last), "ties": TIE_RULE})


def make_split(interactions: Interactions, seed: int = 0, n_heldout_users: int | None = None, *,
               cutoff=None, leave_last: int | None = None) -> StrongSplit:
    """The held-out-user split a run uses: :func:`cutoff_split` with ``cutoff``,
    :func:`leave_last_split` with ``leave_last``, else the paper's
    :func:`strong_generalization_split` (not both: one split in time)."""
    check_time_split(cutoff, leave_last)
    if cutoff is not None:
        return cutoff_split(interactions, cutoff, n_heldout_users=n_heldout_users, seed=seed)
    if leave_last is not None:
        return leave_last_split(interactions, leave_last, n_heldout_users=n_heldout_users, seed=seed)
    return strong_generalization_split(interactions, n_heldout_users=n_heldout_users, seed=seed)


def check_time_split(cutoff=None, leave_last=None) -> None:
    """The settings of a split in time, checked before any data is read."""
    if cutoff is not None and leave_last is not None:
        raise ParameterError("leave_last", "cannot be combined with {cutoff}; choose one split in time",
                             names=("cutoff",))
    if cutoff is not None:
        parse_cutoff(cutoff)
    if leave_last is not None and (isinstance(leave_last, bool) or not isinstance(leave_last, (int, np.integer))
                                   or leave_last < 1):
        raise ParameterError("leave_last", f"expected a positive integer (targets per held-out user), got "
                                           f"{shown(leave_last)}")


def _timestamps(interactions: Interactions) -> tuple[np.ndarray, np.ndarray]:
    if interactions.timestamps is None:
        raise ParameterError("timestamp_col", "a split in time needs each interaction's time: read the data "
                                              "with its timestamp column (timestamp_col=...)")
    return np.asarray(interactions.timestamps, dtype=np.float64), np.asarray(interactions.sequence)


def _n_heldout(n_heldout_users, n_users: int, n_eligible: int, who: str, param: str) -> tuple[int, str]:
    """Validation (and test) users of a split in time, and the rule that gave the number."""
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


def _time_split(interactions: Interactions, rows: np.ndarray, train_entries: np.ndarray, fold_in, n: int, rule: str,
                seed: int, sets: tuple, protocol: str, param: str, parameters: dict) -> StrongSplit:
    """The :class:`StrongSplit` of a split in time: ``train_entries`` (per stored entry) says
    which of a training user's interactions train; ``fold_in`` (per entry, or a function of the
    entries on the training items giving it) which of a held-out user's are fold-in, the others
    of them being targets."""
    X = interactions.matrix
    train_rows, vad_rows, test_rows = sets
    is_train_user = np.zeros(X.shape[0], dtype=bool)
    is_train_user[train_rows] = True
    train_mask = is_train_user[rows] & train_entries
    item_count = np.bincount(X.indices[train_mask], minlength=X.shape[1])
    items = np.flatnonzero(item_count)
    if not len(items):
        raise ParameterError(param, "the training users have no interaction to train on")
    column = np.full(X.shape[1], -1, dtype=np.int64)
    column[items] = np.arange(len(items))
    users_with = np.flatnonzero(np.bincount(rows[train_mask], minlength=X.shape[0]))
    train = Interactions(_entries(X, rows, train_mask, users_with, column, len(items)),
                         interactions.user_ids[users_with], interactions.item_ids[items])
    in_catalogue = column[X.indices] >= 0
    fold = fold_in(in_catalogue) if callable(fold_in) else fold_in
    stats = {"train": {"n_users_without_training_interactions": int(len(train_rows) - len(users_with)),
                       "n_interactions_not_trained_on": int((is_train_user[rows] & ~train_entries).sum())}}
    held = {}
    for name, users in (("validation", vad_rows), ("test", test_rows)):
        mine = np.zeros(X.shape[0], dtype=bool)
        mine[users] = True
        entries = mine[rows] & in_catalogue
        part_in = _entries(X, rows, entries & fold, users, column, len(items))
        part_out = _entries(X, rows, entries & ~fold, users, column, len(items))
        keep = (np.diff(part_in.indptr) > 0) & (np.diff(part_out.indptr) > 0)
        held[name] = HeldOutUsers(part_in[keep], part_out[keep], interactions.user_ids[users][keep])
        stats[name] = {"n_users_drawn": int(len(users)), "n_users_dropped": int(len(users) - keep.sum()),
                       "n_interactions_on_items_not_in_train": int((mine[rows] & ~in_catalogue).sum())}
        if not keep.any():
            raise ParameterError(param, f"none of the {len(users)} {name} user(s) keeps both a fold-in and a "
                                        "target interaction on the training items")
    return StrongSplit(train=train, validation=held["validation"], test=held["test"], item_ids=train.item_ids,
                       seed=seed, n_heldout_users=n, heldout_fraction=None, min_items_to_split=None,
                       n_heldout_users_rule=rule, _stats=stats, protocol=protocol, parameters=parameters)


def _entries(X: sp.csr_matrix, rows: np.ndarray, mask: np.ndarray, users: np.ndarray, column: np.ndarray,
             n_items: int) -> sp.csr_matrix:
    """The entries ``mask`` of the rows ``users`` (sorted), columns renumbered by ``column``, as
    a binary CSR matrix with sorted indices (entries off the catalogue must not be in ``mask``)."""
    position = np.full(X.shape[0], -1, dtype=np.int64)
    position[users] = np.arange(len(users))
    r = position[rows[mask]]
    c = column[X.indices[mask]]
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=len(users)), out=indptr[1:])
    order = np.lexsort((c, r))  # CSR order: by row, then column
    out = sp.csr_matrix((np.ones(len(c), dtype=np.float32), c[order].astype(np.int32), indptr),
                        shape=(len(users), n_items))
    out.has_sorted_indices = True
    return out


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
