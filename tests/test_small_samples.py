"""Honest small samples: a result resting on fewer than MIN_RELIABLE_USERS held-out users says so
in one warning line (evaluate, train, tune), and tune says when its choice sits on the edge of its
grid or of its range; nothing is said at or above the minimum."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.evaluation import MIN_RELIABLE_USERS, evaluate
from recvae.experiment import DataSpec
from recvae.models.popularity import Popularity
from recvae.tuning import plans, tune
from recvae.tuning.candidates import Candidate
from recvae.tuning.caveats import edges
from recvae.tuning.spaces import parse_space

from synthetic import fold_in_split, planted

ROOT = Path(__file__).resolve().parents[1]
FEW = ("(fewer than 50): the metrics and their standard errors say little; hold out more users "
       "(n_heldout_users) or use more data")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """300 users in 6 taste clusters over 120 items, all positives."""
    rng = np.random.default_rng(5)
    rows = [(u, int(i), 5) for u in range(300)
            for i in rng.choice(np.arange(u % 6 * 20, u % 6 * 20 + 20), size=12, replace=False)]
    path = tmp_path_factory.mktemp("small") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


# -- evaluate (the library) -------------------------------------------------------------------------

def test_minimum_is_the_stated_floor():
    assert MIN_RELIABLE_USERS == 50


@pytest.mark.parametrize("n, expected", [
    (1, [f"evaluate: 1 held-out user {FEW}"]),
    (3, [f"evaluate: 3 held-out users {FEW}"]),
    (49, [f"evaluate: 49 held-out users {FEW}"]),
    (50, []),
    (100, []),
])
def test_evaluate_warns_once_below_the_minimum(n, expected, caplog):
    X = planted(n_users=300)
    fold_in, heldout = fold_in_split(X[200:])
    model = Popularity().fit(X[:200])
    with caplog.at_level(logging.INFO, logger="recvae"):
        result = evaluate(model, fold_in[:n], heldout[:n], ks=(5, 10, 20), metrics=("recall", "ndcg", "mrr"))
    assert result.n_users == n
    assert warnings_of(caplog) == expected  # one line for nine metrics, not one per metric
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recvae"):
        evaluate(model, fold_in[:n], heldout[:n], ks=10, warn_few=False)
    assert warnings_of(caplog) == []


def test_skipped_users_do_not_count(caplog):
    X = planted(n_users=300)
    fold_in, heldout = fold_in_split(X[200:])
    heldout = heldout.tolil()
    heldout[2:, :] = 0  # 98 of 100 users have nothing held out: 2 are evaluated
    with caplog.at_level(logging.WARNING, logger="recvae"):
        evaluate(Popularity().fit(X[:200]), fold_in, heldout.tocsr(), ks=10)
    assert warnings_of(caplog) == ["evaluate: skipping 98 of 100 user(s) with no held-out items",
                                   f"evaluate: 2 held-out users {FEW}"]


# -- train and evaluate (the command) ---------------------------------------------------------------

def test_train_and_evaluate_commands_warn_once_per_table(log_csv, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["-q", "train", "--data", str(log_csv), "--model", "popularity", "--n-heldout-users", "3",
                     "--show", "0", "--out", str(out)]) == 0
    assert warnings_of(caplog) == [f"evaluate: 3 held-out users {FEW}"] * 2  # validation, then test
    table = capsys.readouterr().out
    assert "| split | users |" in table and "| validation | 3 |" in table and "| test | 3 |" in table
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", str(out)]) == 0
    assert warnings_of(caplog) == [f"evaluate: 3 held-out users {FEW}"]
    assert "| test | 3 |" in capsys.readouterr().out


def test_train_command_at_the_minimum_says_nothing(log_csv, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["-q", "train", "--data", str(log_csv), "--model", "popularity", "--n-heldout-users", "50",
                     "--show", "0", "--out", str(tmp_path / "run")]) == 0
    assert warnings_of(caplog) == []
    assert "| test | 50 |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_warning_reaches_stderr_once(log_csv, tmp_path):
    """The real program (its own logging set-up): one line on stderr, beside the table on stdout."""
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(log_csv), "--model", "popularity", "--n-heldout-users", "4",
                 "--show", "0", "--out", str(out)]) == 0
    done = subprocess.run([sys.executable, "-m", "recvae", "evaluate", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"evaluate: 4 held-out users {FEW}"]
    assert "| test | 4 |" in done.stdout


# -- tune -------------------------------------------------------------------------------------------

def by_l2(monkeypatch, score):
    """Trials scored by ``score(l2)`` instead of their validation NDCG: the choice is known."""
    monkeypatch.setattr(plans, "validation_score", lambda model, validation: float(score(model.l2)))


@pytest.mark.slow  # a kept search imports optuna
def test_tune_command_warns_on_few_validation_users_and_the_grid_edge(log_csv, tmp_path, monkeypatch, caplog):
    by_l2(monkeypatch, lambda l2: -l2)  # the lowest l2 wins
    with caplog.at_level(logging.INFO):
        assert main(["-q", "tune", "--data", str(log_csv), "--model", "ease", "--grid", "l2=10,100,1000",
                     "--n-heldout-users", "30", "--out", str(tmp_path / "run")]) == 0
    assert warnings_of(caplog) == [
        "tune: 30 validation users (fewer than 50): its choice among the trials may rest on noise; hold out "
        "more users (n_heldout_users) or use more data",
        "tune: the chosen l2=10 is the lowest of the 3 values of its grid tried: the best may lie below; "
        "extend the grid",
        f"evaluate: 30 held-out users {FEW}",  # the test users; the validation users were said once
    ]


def tune_ease(log_csv, n_heldout_users, caplog):
    with caplog.at_level(logging.INFO):
        return tune(DataSpec(path=str(log_csv)), "ease", grid={"l2": (10.0, 100.0, 1000.0)},
                    n_heldout_users=n_heldout_users)


def test_tune_inside_its_grid_with_enough_users_says_nothing(log_csv, monkeypatch, caplog):
    by_l2(monkeypatch, lambda l2: -abs(np.log10(l2) - 2))  # the middle value wins
    assert tune_ease(log_csv, MIN_RELIABLE_USERS, caplog).best.params["l2"] == 100
    assert warnings_of(caplog) == []


def test_tune_highest_of_the_grid(log_csv, monkeypatch, caplog):
    by_l2(monkeypatch, lambda l2: l2)
    assert tune_ease(log_csv, MIN_RELIABLE_USERS, caplog).best.params["l2"] == 1000
    assert warnings_of(caplog) == ["tune: the chosen l2=1000 is the highest of the 3 values of its grid tried: "
                                   "the best may lie above; extend the grid"]


def test_tune_few_validation_users_said_once(log_csv, monkeypatch, caplog):
    by_l2(monkeypatch, lambda l2: -abs(np.log10(l2) - 2))
    tune_ease(log_csv, 49, caplog)
    assert warnings_of(caplog) == [
        "tune: 49 validation users (fewer than 50): its choice among the trials may rest on noise; hold out "
        "more users (n_heldout_users) or use more data",
        f"evaluate: 49 held-out users {FEW}"]


def grid_of(model, name, values):
    return [Candidate(model, {name: v}) for v in values]


def test_edges_of_a_grid_need_three_values_and_skip_the_paper_trial():
    tried = [Candidate("multvae", {}, "paper"), *grid_of("multvae", "latent_dim", (50, 100))]
    assert edges(Candidate("multvae", {"latent_dim": 50}), tried, None) == []  # two values: every choice an edge
    tried.append(Candidate("multvae", {"latent_dim": 200}))
    assert edges(Candidate("multvae", {"latent_dim": 100}), tried, None) == []
    assert edges(Candidate("multvae", {"latent_dim": 200}), tried, None) == [
        "tune: the chosen latent_dim=200 is the highest of the 3 values of its grid tried: the best may lie "
        "above; extend the grid"]
    assert edges(Candidate("multvae", {}, "paper"), tried, None) == []
    assert edges(Candidate("multvae", {"kl_weighting": "activity"}),
                 grid_of("multvae", "kl_weighting", ("uniform", "activity", "activity")), None) == []


def test_edges_of_a_study_range_in_log_or_linear_terms():
    space = parse_space(["lr=log:1e-4:1e-2", "latent_dim=int:50:400", "hidden_dim=cat:100,200,400"], ("multvae",))
    edge = lambda **values: edges(Candidate("multvae", values), [], space)  # noqa: E731
    # log range: 1.2e-4 is log(1.2)/log(100) = 4.0% of the way up; 1.3e-4 is 5.7%
    assert edge(lr=1.2e-4) == ["tune: the chosen lr=0.00012 lies at the low end of its range log:0.0001:0.01: "
                               "the best may lie below; widen the range"]
    assert edge(lr=1.3e-4) == []
    assert edge(lr=9.5e-3) == ["tune: the chosen lr=0.0095 lies at the high end of its range log:0.0001:0.01: "
                               "the best may lie above; widen the range"]
    # linear range: 390 is 340/350 = 97.1% up; 380 is 94.3%
    assert edge(latent_dim=390) == ["tune: the chosen latent_dim=390 lies at the high end of its range "
                                    "int:50:400: the best may lie above; widen the range"]
    assert edge(latent_dim=380) == []
    tried = grid_of("multvae", "hidden_dim", (100, 200, 400))
    assert edges(Candidate("multvae", {"hidden_dim": 100}), tried, space) == [
        "tune: the chosen hidden_dim=100 is the lowest of the 3 values of its list tried: the best may lie "
        "below; extend its list (cat:100,200,400)"]
