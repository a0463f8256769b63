"""One preprocessing definition (recvae.data.Preprocessing): the same defaults in every entry
point, and one warning when a model is fitted on values that are not 1."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recvae.data import Interactions, Preprocessing, load_movielens, read_interactions
from recvae.data.preprocessing import PAPER
from recvae.experiment import DataSpec
from recvae.models import EASE, MultDAE, Popularity

RULES = ("rating_threshold", "min_user_interactions", "min_item_interactions")


def _log(tmp_path):
    """User 1: 5 ratings > 3.5 and one 0.5; user 2: 4 ratings > 3.5 and a 3.5; user 3: five 0.5s."""
    rows = [(1, i, 4.0) for i in range(5)] + [(1, 9, 0.5)]
    rows += [(2, i, 5.0) for i in range(4)] + [(2, 8, 3.5)]
    rows += [(3, i, 0.5) for i in range(5)]
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def test_read_interactions_with_a_rating_column_keeps_the_papers_positives(tmp_path):
    it = read_interactions(_log(tmp_path), rating_col="rating")
    # ratings > 3.5 (not the 0.5s, not the 3.5), then users with >= 5 of them: user 1 alone
    assert it.user_ids.tolist() == [1] and it.item_ids.tolist() == [0, 1, 2, 3, 4]
    assert it.nnz == 5 and set(it.matrix.data) == {1.0}


def test_keep_all_keeps_every_row(tmp_path):
    it = read_interactions(_log(tmp_path), rating_col="rating", **Preprocessing.keep_all().kwargs())
    assert it.user_ids.tolist() == [1, 2, 3] and it.nnz == 6 + 5 + 5
    custom = Preprocessing(rating_threshold=3.0, min_user_interactions=5)
    it = read_interactions(_log(tmp_path), rating_col="rating", **custom.kwargs())
    assert it.user_ids.tolist() == [1, 2] and it.nnz == 10  # 3.5 > 3.0 now counts


def test_without_a_rating_column_every_row_is_a_positive():
    df = pd.DataFrame({"user": [1] * 5 + [2] * 4, "item": list(range(5)) + list(range(4))})
    it = Interactions.from_dataframe(df)  # the default threshold needs ratings; the user minimum applies
    assert it.user_ids.tolist() == [1] and it.nnz == 5


def test_every_entry_point_has_the_papers_defaults():
    assert (PAPER.rating_threshold, PAPER.min_user_interactions, PAPER.min_item_interactions) == (3.5, 5, 0)
    for function in (Interactions.from_dataframe, read_interactions, load_movielens):
        params = inspect.signature(function).parameters
        assert {r: params[r].default for r in RULES} == PAPER.kwargs(), function.__name__
    assert DataSpec(path="x.csv").preprocessing == PAPER
    from recvae.cli import build_parser
    from recvae.cli.common import data_spec_from_args

    args = build_parser().parse_args(["train", "--dataset", "ml-100k"])
    assert data_spec_from_args(args).preprocessing == PAPER
    args = build_parser().parse_args(["train", "--dataset", "ml-100k", "--min-user-interactions", "2"])
    assert data_spec_from_args(args).preprocessing == Preprocessing(min_user_interactions=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rating_threshold="4"), "rating_threshold: expected a finite number or None, got '4'"),
    (dict(rating_threshold=float("nan")), "rating_threshold: expected a finite number or None, got nan"),
    (dict(min_user_interactions=-1), "min_user_interactions: expected a non-negative integer, got -1"),
    (dict(min_item_interactions=1.5), "min_item_interactions: expected a non-negative integer, got 1.5"),
])
def test_bad_rules_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError) as e:
        Preprocessing(**kwargs)
    assert str(e.value) == message


RATINGS = sp.csr_matrix(np.array([[4.0, 0.5, 0, 5.0], [0, 3.0, 1.0, 0], [1.0, 1.0, 0, 1.0]], dtype=np.float32))


@pytest.mark.parametrize("model, use", [
    (EASE(l2=1.0), "EASE uses them as weights"),
    (MultDAE(epochs=1, hidden_dims=(), batch_size=3, random_state=0, device="cpu"),
     "MultDAE uses them as counts"),
])
def test_fitting_on_non_binary_values_warns_once(caplog, model, use):
    with caplog.at_level(logging.WARNING, logger="recvae"):
        model.fit(RATINGS)
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert message.startswith(f"train: 4 of 8 values are not 1 (from 0.5 to 5): {use}")
    assert "recvae.data.Preprocessing" in message and "X.sign()" in message


def test_binary_values_fit_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="recvae"):
        EASE(l2=1.0).fit(RATINGS.sign())
        Popularity().fit(RATINGS)  # counts users per item: the values do not matter
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
