"""recvae.tuning and `recvae tune`: grids, the beta heuristic, selection on validation users only,
the chosen model's run directory, and bad grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from repo_scripts import load_script
import torch

from recvae import tuning
from recvae.cli import main
from recvae.data.splits import strong_generalization_split
from recvae.experiment import DataSpec, RunConfig, load_run, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """300 users in 6 taste clusters over 120 items, all positives (default column names)."""
    rng = np.random.default_rng(11)
    rows = [(u, int(i), 5) for u in range(300)
            for i in rng.choice(np.arange(u % 6 * 20, u % 6 * 20 + 20), size=12, replace=False)]
    path = tmp_path_factory.mktemp("tune") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def tune_argv(log_csv, out, *extra):
    return ["-q", "tune", "--data", str(log_csv), "--n-heldout-users", "30", "--out", str(out), *extra]


SMALL = ("--epochs", "4", "--batch-size", "50", "--hidden-dims", "16", "--device", "cpu", "--precision", "fp32")


# -- grids ---------------------------------------------------------------------------------------

def test_parse_grid_types_order_and_defaults():
    assert tuning.parse_grid(None, "recvae") == {"gamma": (0.0025, 0.005, 0.01)}
    assert tuning.parse_grid([], "ease") == {"l2": tuning.EASE_GRID}
    grid = tuning.parse_grid(["latent-dim=50, 200,50", "kl_weighting=activity", "dropout=0.3"], "multvae")
    assert grid == {"latent_dim": (50, 200), "kl_weighting": ("activity",), "dropout": (0.3,)}
    assert all(isinstance(v, int) for v in grid["latent_dim"])
    assert tuning.grid_points({"a": (1, 2), "b": ("x", "y")}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize("spec, model, message", [
    ("l2=", "ease", "grid l2=: no values; expected a finite number > 0 each, such as 50,100"),
    ("l2= , ", "ease", "no values"),
    ("l2=abc", "ease", "grid l2=abc: expected a finite number > 0 each, such as 50,100"),
    ("l2=0", "ease", "grid l2=0: expected a finite number > 0 each"),
    ("latent_dim=1.5", "multvae", "grid latent_dim=1.5: expected a positive integer each, such as 50,200"),
    ("kl_weighting=none", "multvae", "grid kl_weighting=none: expected one of 'uniform', 'activity' each"),
    ("dropout=1", "recvae", "grid dropout=1: expected a probability in [0, 1) each, such as 0.3,0.7"),
    ("gamma=0.1", "multvae", "'gamma' is not tunable for multvae; tunable: hidden_dim, latent_dim, dropout, "
                             "kl_weighting, lr"),
    ("l2", "ease", "grid 'l2': expected NAME=V1,V2,... such as l2=50,100"),
])
def test_parse_grid_errors_name_the_entry(spec, model, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tuning.parse_grid([spec], model)


def test_check_grid_refuses_a_value_fixed_twice_and_a_chosen_schedule():
    with pytest.raises(ValueError, match=r"grid gamma=\.\.\.: gamma is also given as a fixed value"):
        tuning.check_grid("recvae", {"gamma": (0.1,)}, {"gamma": 0.2})
    with pytest.raises(ValueError, match="anneal_cap: tune chooses Mult-VAE's beta schedule"):
        tuning.check_grid("multvae", {"latent_dim": (8,)}, {"anneal_cap": 0.2})
    with pytest.raises(ValueError, match=r"grid latent_dim=8 hidden_dim=4: .*lr"):  # the model's own check
        tuning.check_grid("multvae", {"latent_dim": (8,), "hidden_dim": (4,)}, {"lr": -1.0})


# -- selection -----------------------------------------------------------------------------------

def test_select_takes_the_best_validation_and_the_first_of_ties():
    trials = [tuning.Trial(n, "ease", {}, v, 0.0) for n, v in [("a", 0.3), ("b", 0.5), ("c", 0.5), ("d", 0.1)]]
    assert tuning.select(trials).name == "b"


def _split(log_csv):
    data = DataSpec(path=str(log_csv)).load()
    return strong_generalization_split(data, n_heldout_users=30, seed=0)


@pytest.mark.slow
def test_beta_heuristic_caps_run_2_at_run_1s_best_beta_with_another_seed(log_csv):
    split = _split(log_csv)
    seen = []
    trials = tuning.Trials(split.train, split.validation, on_trial=lambda t: seen.append((t.name, t.estimator)))
    params = dict(epochs=5, batch_size=60, hidden_dims=(16,), latent_dim=4, random_state=3, device="cpu",
                  precision="fp32")
    run1, run2 = tuning.beta_heuristic(trials, "multvae", params, suffix=" x")
    slope = 5 * math.ceil(split.train.n_users / 60)
    assert (run1.name, run2.name) == ("anneal-1 x", "heuristic x")
    assert run1.params["anneal_cap"] == 1.0 and run1.params["total_anneal_steps"] == slope
    assert run2.params["total_anneal_steps"] == slope
    assert run2.params["anneal_cap"] == run1.beta == seen[0][1].best_beta_  # run 1's beta at its best epoch
    assert run2.params["random_state"] == 3 + tuning.HEURISTIC_SEED_OFFSET
    assert run1.validation == seen[0][1].best_score_ and run1.best_epoch == seen[0][1].best_epoch_
    # every trial was seen fitted; afterwards only the best keeps its model
    assert all(est is not None for _, est in seen)
    best = trials.best
    assert [t.estimator is not None for t in trials.trials] == [t is best for t in trials.trials]


def test_a_search_prints_its_best_parameters_score_users_and_candidates(log_csv):
    from recvae.evaluation import evaluate
    from recvae.models import EASE

    split = _split(log_csv)
    trials = tuning.search("ease", split.train, split.validation, {"l2": (1.0, 30.0, 1000.0)})
    best = max(trials.trials, key=lambda t: t.validation)
    score = evaluate(EASE(l2=best.params["l2"]).fit(split.train), split.validation, ks=(100,))["ndcg@100"].mean
    users = split.validation.n_users  # each has held-out items
    assert users == 30
    expected = (f"Trials(ease: 3 candidates; best {{'l2': {best.params['l2']!r}}}: validation ndcg@100 "
                f"{score:.4f} over 30 users)")
    assert repr(trials) == str(trials) == expected
    # trials of several models name the best one's; none yet says so
    mixed = tuning.Trials(split.train, split.validation, log=False)
    assert repr(mixed) == "Trials(no candidate tried yet; validation ndcg@100 over 30 users)"
    mixed.add(tuning.Trial("a", "ease", {"l2": 5.0}, 0.25, 0.0))
    mixed.add(tuning.Trial("b", "popularity", {}, 0.5, 0.0))
    assert repr(mixed) == "Trials(ease, popularity: 2 candidates; best popularity {}: validation ndcg@100 0.5000 over 30 users)"


def test_before_trial_stops_between_trials(log_csv):
    split = _split(log_csv)
    answers = iter([False, True])
    trials = tuning.Trials(split.train, split.validation, before_trial=lambda: next(answers))
    trials.run("popularity", "popularity", {})
    with pytest.raises(tuning.TuningStopped):
        trials.run("popularity again", "popularity", {})
    assert [t.name for t in trials.trials] == ["popularity"]


@pytest.mark.slow
def test_ease_trials_equal_plain_fits(log_csv):
    from recvae.evaluation import evaluate
    from recvae.models import EASE

    split = _split(log_csv)
    trials = tuning.search("ease", split.train, split.validation, {"l2": (1.0, 30.0, 1000.0)})
    assert [t.name for t in trials.trials] == ["l2=1", "l2=30", "l2=1000"]
    for t in trials.trials:
        plain = evaluate(EASE(l2=t.params["l2"]).fit(split.train), split.validation, ks=(100,))
        assert t.validation == pytest.approx(plain["ndcg@100"].mean, rel=1e-9)
    assert trials.best.validation == max(t.validation for t in trials.trials)


# -- recvae tune ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_tune_multvae_writes_the_chosen_run_and_its_trial_table(log_csv, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(tune_argv(log_csv, out, *SMALL, "--grid", "latent_dim=4,8")) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "tuning.csv")
    # the paper's run, then the heuristic's two runs per latent size
    assert list(table["trial"]) == ["paper", "anneal-1 latent_dim=4", "heuristic latent_dim=4",
                                    "anneal-1 latent_dim=8", "heuristic latent_dim=8"]
    assert list(table["latent_dim"]) == [200, 4, 4, 8, 8]
    assert table["selected"].sum() == 1
    chosen = table[table["selected"]].iloc[0]
    assert chosen["validation_ndcg@100"] == table["validation_ndcg@100"].max()
    assert f"* {chosen['trial']}" in printed
    # a normal run directory whose model is the chosen trial's, scored as its validation said
    model, description = load_run(out)
    assert description["model"] == "multvae" and "show_progress" not in description["params"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["metrics"]["ndcg@100"]["mean"] == pytest.approx(chosen["validation_ndcg@100"], abs=1e-6)
    assert model.best_score_ == pytest.approx(chosen["validation_ndcg@100"], abs=1e-6)
    # run.json's parameters retrain the same model (what `recvae train` with them does)
    config = RunConfig(data=DataSpec(**description["data"]), model="multvae", params=description["params"],
                       split_seed=0, n_heldout_users=30)
    again = run(config).model
    for name, tensor in model.module_.state_dict().items():
        assert torch.equal(tensor, again.module_.state_dict()[name]), name
    # evaluate and recommend take it as any run
    assert main(["-q", "evaluate", str(out)]) == 0


@pytest.mark.slow
def test_tune_ease_and_recvae_defaults_through_the_library(log_csv, tmp_path):
    tuned = tuning.tune(DataSpec(path=str(log_csv)), "ease", out=tmp_path / "ease", n_heldout_users=30)
    assert [t.params["l2"] for t in tuned.trials] == list(tuning.EASE_GRID)
    model, description = load_run(tmp_path / "ease")
    assert model.l2 == tuned.best.params["l2"] == description["params"]["l2"]
    assert tuned.run.validation["ndcg@100"].mean == pytest.approx(tuned.best.validation, rel=1e-9)
    tuned = tuning.tune(DataSpec(path=str(log_csv)), "recvae", params=dict(epochs=1, hidden_dims=(8,), latent_dim=4,
                                                                           device="cpu"), n_heldout_users=30)
    assert [t.name for t in tuned.trials] == ["gamma=0.0025", "gamma=0.005", "gamma=0.01"]
    assert [t.params["gamma"] for t in tuned.trials] == [0.0025, 0.005, 0.01]


@pytest.mark.parametrize("extra, message", [
    (("--model", "ease", "--grid", "l2="), "--grid l2=: no values; expected a finite number > 0 each, such as 50,100"),
    (("--model", "ease", "--grid", "l2=abc"), "--grid l2=abc: expected a finite number > 0 each, such as 50,100"),
    (("--grid", "latent_dim=50.5"), "--grid latent_dim=50.5: expected a positive integer each, such as 50,200"),
    (("--model", "ease", "--n-heldout-users", "200"), "--n-heldout-users: 200 validation + 200 test users"),
    (("--model", "popularity",), "--model popularity: tune takes multvae, multdae, binary-multvae, recvae, multvae-linear, "
     "recvae-linear, ease, edlae"),
    (("--model", "recvae", "--gamma", "0.1", "--grid", "gamma=0.2"), "--grid gamma=...: gamma is also given"),
    (("--anneal-cap", "0.2",), "--anneal-cap: tune chooses Mult-VAE's beta schedule"),
])
def test_bad_input_one_line_exit_2_no_run_directory(log_csv, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("recvae: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_existing_out_refused_unless_overwrite(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert main(tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=10")) == 2
    assert "pass --overwrite to replace them\n" in capsys.readouterr().err
    assert main(tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=10", "--overwrite")) == 0
    assert list(pd.read_csv(out / "tuning.csv")["l2"]) == [10.0]


@pytest.mark.slow
def test_a_grid_stopped_after_some_trials_resumes_without_running_them_again(log_csv, tmp_path, capsys,
                                                                           monkeypatch):
    from recvae.tuning.plans import Plan

    fit, fits, stop_at = Plan.fit, [], [2]

    def counted(self, candidate):
        if len(fits) in stop_at:  # SIGINT as the third fit starts
            stop_at.clear()
            raise KeyboardInterrupt
        fits.append(candidate.name)
        return fit(self, candidate)

    monkeypatch.setattr(Plan, "fit", counted)
    out, whole = tmp_path / "run", tmp_path / "whole"
    argv = tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=1,10,100,1000")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"recvae: stopped by SIGINT during the trials; --out {out} holds the study with 2 finished "
                        f"trial(s); continue with: recvae {' '.join(argv)} --resume\n"), err
    assert fits == ["l2=1", "l2=10"] and sorted(p.name for p in out.iterdir()) == ["study.db"]
    assert main([*argv, "--resume"]) == 0
    assert fits == ["l2=1", "l2=10", "l2=100", "l2=1000"]  # the finished two were not fit again
    assert main(tune_argv(log_csv, whole, "--model", "ease", "--grid", "l2=1,10,100,1000")) == 0
    resumed, uninterrupted = (pd.read_csv(d / "tuning.csv").drop(columns="seconds") for d in (out, whole))
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    assert list(resumed["trial"]) == ["l2=1", "l2=10", "l2=100", "l2=1000"]
    assert json.loads((out / "run.json").read_text())["params"] == json.loads((whole / "run.json").read_text())["params"]
    # resumed once more: the grid has its trials and the run is written
    assert main([*argv, "--resume"]) == 0
    assert "the grid has its 4 trials and the run is written: nothing to resume\n" in capsys.readouterr().err
    assert len(fits) == 8  # the uninterrupted run's four, none since


def test_a_plain_grid_without_optuna_says_which_extra(log_csv, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=10")) == 2
    assert capsys.readouterr().err == (
        "recvae: error: a tuning grid kept for --resume (recvae tune --out) need(s) the optional package optuna, "
        "which is not installed (pip install 'recvae[tune]')\n")
    assert not out.exists()
    # the Python API without a run directory keeps its trials in memory: no optuna needed
    trials = tuning.search("ease", *_split_parts(log_csv), {"l2": (10.0, 100.0)})
    assert [t.name for t in trials.trials] == ["l2=10", "l2=100"]


def _split_parts(log_csv):
    split = _split(log_csv)
    return split.train, split.validation


def test_paper_table_chooses_through_recvae_tuning():
    paper_table = load_script("benchmarks/paper_table.py", "paper_table_t")
    assert paper_table.HEURISTIC_NETWORK is tuning.HEURISTIC_NETWORK
    assert paper_table.EASE_GRID is tuning.EASE_GRID
    source = (ROOT / "benchmarks" / "paper_table.py").read_text()
    assert "tuning.multvae_trials(" in source and "tuning.ease_trials(" in source
    assert "anneal_cap\": cap" not in source  # no copy of the heuristic's second run


@pytest.mark.slow
def test_tune_help_lists_the_grid():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "recvae.cli", "tune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "NAME=V1,V2" in proc.stdout and "kl_weighting" in proc.stdout


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_and_the_search_goes_on(log_csv, tmp_path, capsys):
    split = _split(log_csv)
    trials = tuning.Trials(split.train, split.validation)
    small = dict(epochs=2, batch_size=60, hidden_dims=(16,), latent_dim=4, device="cpu", precision="fp32")
    bad = trials.run("huge lr", "multvae", {**small, "lr": 1e30})
    good = trials.run("paper lr", "multvae", small)
    assert bad.validation == float("-inf") and bad.note.startswith("non-finite loss at epoch 1")
    assert trials.best is good and good.note is None and good.validation > 0
    # every trial diverging: one line, exit 2, no run written (the trials stay, as any stop's)
    out = tmp_path / "diverged"
    assert main(tune_argv(log_csv, out, *SMALL, "--model", "recvae", "--grid", "lr=1e30,1e31")) == 2
    err = capsys.readouterr().err
    assert "every trial's training loss became non-finite before an epoch finished (2 trials)" in err
    assert err.count("\n") == 1 and sorted(p.name for p in out.iterdir()) == ["study.db"]
    out = tmp_path / "run"
    # Mult-VAE: run 1 of the heuristic diverging leaves no cap, so no run 2; the paper's trial wins
    assert main(tune_argv(log_csv, out, *SMALL, "--grid", "lr=1e30")) == 0
    table = pd.read_csv(out / "tuning.csv")
    assert list(table["trial"]) == ["paper", "anneal-1 lr=1e+30"] and list(table["selected"]) == [True, False]
    assert table["note"][1].startswith("non-finite loss at epoch 1")


def test_tune_refit_retrains_the_chosen_model_on_every_user(log_csv, tmp_path, capsys):
    out, final = tmp_path / "run", tmp_path / "final"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=10,1000", "--refit", str(final))) == 0
    text = capsys.readouterr().out
    assert f"refit of the chosen model on every user into {final}:" in text
    assert "ease refit on all 300 users" in text
    chosen, refit = (json.loads((d / "run.json").read_text()) for d in (out, final))
    assert refit["params"] == chosen["params"] and refit["model"] == "ease"
    assert refit["split_settings"]["holdout"] == "none" and refit["refit_of"]["run"] == str(out)
    # the tuned run lists its dropped users, as a trained one does (none here: every user has 12 positives)
    assert pd.read_csv(out / "dropped_users.csv").empty


def test_tune_refit_into_a_used_directory_is_refused_before_the_trials(log_csv, tmp_path, capsys):
    out, final = tmp_path / "run", tmp_path / "final"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    assert main(tune_argv(log_csv, out, "--model", "ease", "--refit", str(final))) == 2
    assert capsys.readouterr().err == (f"recvae: error: --refit {final}: exists and is not an empty directory; "
                                       "choose a new or empty one\n")
    assert not out.exists()
    assert main(tune_argv(log_csv, out, "--model", "ease", "--refit", str(out))) == 2
    assert "is --out itself" in capsys.readouterr().err
