"""Splits in time, and :func:`make_split`, the held-out-user split a run uses.

They keep the paper's disjoint training, validation and test users and the :class:`StrongSplit`
they return (so fit, evaluate and recommend take them unchanged) but cut each held-out user's
history in time rather than at random; they need :attr:`Interactions.timestamps` (read with a
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

import datetime
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recvae.data.interactions import Interactions
from recvae.data.splits import (
    HeldOutUsers, StrongSplit, _check_interactions, _draw_users, _n_heldout, strong_generalization_split,
)
from recvae.errors import ParameterError, shown

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
