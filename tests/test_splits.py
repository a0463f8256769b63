"""Strong- and weak-generalization splits: disjointness, completeness, sizes, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recvae.data import Interactions, load_movielens, strong_generalization_split, weak_generalization_split
from recvae.data import splits
from recvae.data.splits import _rank_in_row, _split_rows, default_n_heldout_users


def random_interactions(n_users=60, n_items=30, density=0.25, seed=0, str_ids=False) -> Interactions:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < density
    dense[:, -1] = False
    dense[0, -1] = True  # item seen by one user only: not in train when that user is held out
    m = sp.csr_matrix(dense.astype(np.float32))
    users = np.array([f"u{i:03d}" for i in range(n_users)]) if str_ids else np.arange(100, 100 + n_users)
    return Interactions(m, users, np.arange(1000, 1000 + n_items))


def pairs(matrix, user_ids, item_ids) -> set:
    coo = matrix.tocoo()
    return set(zip(user_ids[coo.row].tolist(), item_ids[coo.col].tolist()))


def check_strong(data: Interactions, split, fraction=0.2, min_items=5) -> None:
    train, vad, test = split.train, split.validation, split.test
    # item index = items with a training interaction, in the original order
    assert np.array_equal(split.item_ids, train.item_ids)
    assert (np.bincount(train.matrix.indices, minlength=train.n_items) > 0).all()
    assert list(train.item_ids) == sorted(train.item_ids, key=list(data.item_ids).index)
    for h in (vad, test):
        assert h.fold_in.shape == h.heldout.shape == (h.n_users, train.n_items)
        assert h.fold_in.multiply(h.heldout).nnz == 0  # fold-in and held-out disjoint
    # users disjoint
    sets = [set(train.user_ids.tolist()), set(vad.user_ids.tolist()), set(test.user_ids.tolist())]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    n = split.n_heldout_users
    assert train.n_users == data.n_users - 2 * n
    # complete: train keeps all its users' items; held-out users' rows on train items are
    # exactly fold-in + held-out, and a user is dropped only when nothing could be held out
    all_pairs = pairs(data.matrix, data.user_ids, data.item_ids)
    assert pairs(train.matrix, train.user_ids, train.item_ids) == {p for p in all_pairs if p[0] in sets[0]}
    train_items = set(train.item_ids.tolist())
    dropped_total = 0
    for h, name in ((vad, "validation"), (test, "test")):
        got = pairs(h.fold_in, h.user_ids, split.item_ids) | pairs(h.heldout, h.user_ids, split.item_ids)
        assert got == {p for p in all_pairs if p[0] in set(h.user_ids.tolist()) and p[1] in train_items}
        fold_n = np.diff(h.fold_in.indptr)
        held_n = np.diff(h.heldout.indptr)
        total = fold_n + held_n
        assert (total >= min_items).all() and (held_n >= 1).all()
        np.testing.assert_array_equal(held_n, np.floor(fraction * total).astype(int))
        info = split.describe()[name]
        assert info["n_users"] == h.n_users and info["n_users_drawn"] == n
        assert info["n_users_dropped"] == n - h.n_users
        dropped_total += info["n_users_dropped"]
    drawn = set(data.user_ids.tolist()) - sets[0]
    kept = sets[1] | sets[2]
    assert len(drawn) == 2 * n and len(drawn - kept) == dropped_total
    for user in drawn - kept:  # dropped: < min_items items on train items, or 20% of them < 1
        n_u = sum(1 for p in all_pairs if p[0] == user and p[1] in train_items)
        assert n_u < min_items or int(fraction * n_u) == 0


# ---------------------------------------------------------------- the rule for N
def test_default_number_of_heldout_users():
    assert default_n_heldout_users(136_677) == 10_000  # the paper on ML-20M
    assert default_n_heldout_users(938) == 94  # ML-100K after preprocessing
    assert default_n_heldout_users(6_034) == 600  # ML-1M: the common 600 + 600
    assert default_n_heldout_users(659) == 66  # ml-latest-small
    assert default_n_heldout_users(1_049) == 100
    assert default_n_heldout_users(100_001) == 10_000
    assert default_n_heldout_users(5) == 1  # never zero


def test_strong_split_default_and_override():
    data = random_interactions()
    split = strong_generalization_split(data, seed=3)
    assert split.n_heldout_users == 6 and split.n_heldout_users_rule.startswith("10% of users")
    check_strong(data, split)
    split = strong_generalization_split(data, n_heldout_users=20, seed=3)
    assert split.n_heldout_users == 20 and split.train.n_users == 20 and split.n_heldout_users_rule == "given"
    check_strong(data, split)


def test_strong_split_string_ids_and_describe_is_json():
    data = random_interactions(str_ids=True)
    split = strong_generalization_split(data, n_heldout_users=10, seed=1)
    check_strong(data, split)
    d = json.loads(json.dumps(split.describe()))
    assert d["seed"] == 1 and d["protocol"] == "strong_generalization" and d["n_items"] == split.train.n_items
    assert d["train"] == {"n_users": 40, "n_interactions": split.train.nnz}
    assert d["test"]["n_heldout_interactions"] == split.test.heldout.nnz


def test_seed_determines_the_split():
    data = random_interactions()
    a = strong_generalization_split(data, seed=7)
    b = strong_generalization_split(data, seed=7)
    c = strong_generalization_split(data, seed=8)
    for x, y in ((a.validation, b.validation), (a.test, b.test)):
        assert np.array_equal(x.user_ids, y.user_ids)
        assert (x.fold_in != y.fold_in).nnz == 0 and (x.heldout != y.heldout).nnz == 0
    assert not np.array_equal(a.test.user_ids, c.test.user_ids)


def test_users_with_few_items_are_dropped_and_counted():
    # 20 users: users 0-9 have 2 items each (never split), users 10-19 have 10 items
    rows = [[0, 1]] * 10 + [list(range(10))] * 10
    m = sp.csr_matrix(
        (np.ones(sum(map(len, rows)), np.float32), np.concatenate(rows), np.cumsum([0] + [len(r) for r in rows])),
        shape=(20, 10),
    )
    data = Interactions(m, np.arange(20), np.arange(10))
    split = strong_generalization_split(data, n_heldout_users=5, seed=0)
    check_strong(data, split)
    for h in (split.validation, split.test):
        assert (h.user_ids >= 10).all()
        assert (np.diff(h.heldout.indptr) == 2).all()  # floor(0.2 * 10)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(n_heldout_users=30), r"n_heldout_users: 30 validation \+ 30 test users leave no training user out of 60"),
        (dict(n_heldout_users=0), r"n_heldout_users: expected a positive integer or None, got 0"),
        (dict(n_heldout_users=2.5), r"n_heldout_users: expected a positive integer or None, got 2.5"),
        (dict(heldout_fraction=1.0), r"heldout_fraction: expected a number in \(0, 1\), got 1.0"),
        (dict(heldout_fraction=0), r"heldout_fraction: expected a number in \(0, 1\), got 0"),
        (dict(min_items_to_split=0), r"min_items_to_split: expected a positive integer, got 0"),
    ],
)
def test_strong_split_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        strong_generalization_split(random_interactions(), **kwargs)


def test_split_needs_interactions():
    with pytest.raises(TypeError, match=r"interactions: expected recvae.data.Interactions, got csr_matrix"):
        strong_generalization_split(sp.csr_matrix((3, 3)))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(8, 40),
    st.integers(3, 15),
    st.floats(0.05, 0.6),
    st.floats(0.1, 0.9),
    st.integers(0, 2**31),
)
def test_strong_split_properties(n_users, n_items, density, fraction, seed):
    data = random_interactions(n_users, n_items, density, seed)
    split = strong_generalization_split(data, heldout_fraction=fraction, seed=seed, n_heldout_users=max(1, n_users // 5))
    check_strong(data, split, fraction)


# ---------------------------------------------------------------- the within-user draw
def test_heldout_items_are_uniformly_random():
    # 4000 identical users with 10 items: each item must be held out ~20% of the time
    n = 4000
    m = sp.csr_matrix(np.ones((n, 10), dtype=np.float32))
    fold_in, heldout, keep = _split_rows(m, 0.2, 5, np.random.default_rng(0))
    assert keep.all() and (np.diff(heldout.indptr) == 2).all() and (np.diff(fold_in.indptr) == 8).all()
    freq = np.asarray(heldout.sum(axis=0)).ravel() / n
    assert np.abs(freq - 0.2).max() < 0.03, freq


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30), block=st.integers(1, 64),
       n_values=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_rank_in_row_is_the_whole_lexsort(lengths, block, n_values, seed):
    """Blocks of whole rows give each entry exactly the rank one lexsort by (row, key) over all
    entries gives: empty rows, rows longer than a block and tied keys (few distinct values:
    ties go by position) included."""
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    keys = np.random.default_rng(seed).integers(0, n_values, rows.size) / n_values
    order = np.lexsort((keys, rows))
    want = np.empty(rows.size, dtype=np.int64)
    want[order] = np.arange(rows.size)
    want -= indptr[rows]
    old, splits.RANK_BLOCK = splits.RANK_BLOCK, block
    try:
        np.testing.assert_array_equal(_rank_in_row(indptr, rows, keys), want)
    finally:
        splits.RANK_BLOCK = old


def test_the_held_out_draw_is_the_one_of_earlier_versions():
    """The entries held out for a seed are pinned (they were drawn by one lexsort over all
    entries before the blocked sort): earlier runs' splits stay the same."""
    m = sp.random(300, 50, density=0.3, format="csr", random_state=1, dtype=np.float32)
    fold_in, heldout, keep = _split_rows(m, 0.2, 5, np.random.default_rng(11))
    counts = np.diff(m.indptr)
    rows = np.repeat(np.arange(300), counts)
    keys = np.random.default_rng(11).random(m.nnz)
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[np.lexsort((keys, rows))] = np.arange(m.nnz)
    held = (rank - m.indptr[rows]) < np.where(counts >= 5, np.floor(0.2 * counts), 0)[rows]
    coo = m.tocoo()
    assert set(zip(*heldout.nonzero())) == set(zip(coo.row[held].tolist(), coo.col[held].tolist()))
    assert heldout.nnz + fold_in.nnz == m.nnz and keep.sum() == (counts >= 5).sum()


# ---------------------------------------------------------------- weak generalization
def test_weak_split():
    data = random_interactions(seed=5)
    split = weak_generalization_split(data, seed=2)
    assert np.array_equal(split.train.user_ids, data.user_ids) and np.array_equal(split.item_ids, data.item_ids)
    test = split.test
    rows = data.user_index(test.user_ids)
    assert (test.fold_in != split.train.matrix[rows]).nnz == 0
    # train + held-out = everything, no overlap
    selector = sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(data.n_users, len(rows)))
    assert (split.train.matrix + selector @ test.heldout != data.matrix).nnz == 0
    assert test.fold_in.multiply(test.heldout).nnz == 0
    counts = np.diff(data.matrix.indptr)
    assert set(test.user_ids.tolist()) == set(data.user_ids[counts >= 5].tolist())
    np.testing.assert_array_equal(np.diff(test.heldout.indptr), np.floor(0.2 * counts[rows]).astype(int))
    assert split.describe()["test"]["n_users"] == test.n_users
    again = weak_generalization_split(data, seed=2)
    assert (again.test.heldout != test.heldout).nnz == 0


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_ml100k_strong_split(real_data_dir):
    data = load_movielens("ml-100k", real_data_dir, download=False)
    split = strong_generalization_split(data, seed=0)
    assert split.n_heldout_users == 94 and split.train.n_users == 938 - 188
    check_strong(data, split)
    again = strong_generalization_split(data, seed=0)
    assert np.array_equal(again.test.user_ids, split.test.user_ids)
    assert (again.test.heldout != split.test.heldout).nnz == 0
    assert (again.validation.fold_in != split.validation.fold_in).nnz == 0
    other = strong_generalization_split(data, seed=1)
    assert set(other.test.user_ids.tolist()) != set(split.test.user_ids.tolist())
