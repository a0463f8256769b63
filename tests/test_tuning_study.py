"""`recvae tune` as an Optuna study: --trials, --space, several --model, the study kept in the run
directory (--resume after a kill keeps every finished trial), --storage shared by processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recvae import tuning
from recvae.cli import main
from recvae.experiment import DataSpec, RunConfig, load_run, run
from recvae.settings import model_params
from recvae.optional import available

ROOT = Path(__file__).resolve().parents[1]
needs_optuna = pytest.mark.skipif(not available("optuna"),
                                  reason="optuna is not installed: recvae tune's studies need pip install 'recvae[tune]'")
SMALL = ("--epochs", "3", "--batch-size", "50", "--hidden-dims", "16", "--latent-dim", "8", "--device", "cpu",
         "--precision", "fp32")


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """300 users in 6 taste clusters over 120 items, all positives (default column names)."""
    rng = np.random.default_rng(11)
    rows = [(u, int(i), 5) for u in range(300)
            for i in rng.choice(np.arange(u % 6 * 20, u % 6 * 20 + 20), size=12, replace=False)]
    path = tmp_path_factory.mktemp("study") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def tune_argv(log_csv, out, *extra):
    return ["-q", "tune", "--data", str(log_csv), "--n-heldout-users", "30", "--out", str(out), *extra]


def load_study(url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=tuning.STUDY_NAME, storage=url)


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def complete(study) -> dict[int, tuple]:
    """number -> (params, value) of the complete trials."""
    return {t.number: (t.params, t.value) for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}


# -- ranges --------------------------------------------------------------------------------------

def test_parse_space_forms_defaults_and_fixed_values():
    space = tuning.parse_space(["latent-dim=int:50:400", "lr=log:1e-4:1e-2", "dropout=float:0.2:0.6",
                                "kl_weighting=cat:uniform,activity"], ["multvae"])
    assert {n: d.describe() for n, d in space["multvae"].items()} == {
        "latent_dim": "int:50:400", "dropout": "float:0.2:0.6", "lr": "log:0.0001:0.01",
        "kl_weighting": "cat:uniform,activity"}
    assert isinstance(space["multvae"]["latent_dim"].low, int)
    # no --space: each model's default ranges, less what a fixed option sets
    default = tuning.parse_space(None, ["recvae", "ease"], {"recvae": {"lr": 1e-3}})
    assert {m: {n: d.describe() for n, d in dims.items()} for m, dims in default.items()} == {
        "recvae": {"gamma": "log:0.001:0.02", "dropout": "float:0.3:0.7"}, "ease": {"l2": "log:10:10000"}}
    # a range goes to every listed model that tunes the name; the others keep their defaults
    both = tuning.parse_space(["dropout=cat:0.4,0.5"], ["multvae", "recvae", "ease"])
    assert both["multvae"]["dropout"].choices == both["recvae"]["dropout"].choices == (0.4, 0.5)
    assert list(both["ease"]) == ["l2"]


@pytest.mark.parametrize("spec, models, message", [
    ("latent_dim", ("multvae",), "space 'latent_dim': expected NAME=int:LOW:HIGH, NAME=float:LOW:HIGH, "
                                 "NAME=log:LOW:HIGH or NAME=cat:V1,V2,..., such as latent_dim=int:50:400"),
    ("latent_dim=50:400", ("multvae",), "space 'latent_dim=50:400': expected NAME=int:LOW:HIGH"),
    ("latent_dim=uniform:1:2", ("multvae",), "space 'latent_dim=uniform:1:2': expected NAME=int:LOW:HIGH"),
    ("latent_dim=int:50", ("multvae",), "space latent_dim=int:50: expected latent_dim=int:LOW:HIGH with LOW and "
                                        "HIGH a positive integer each, such as 50,200"),
    ("latent_dim=int:50:x", ("multvae",), "space latent_dim=int:50:x: expected latent_dim=int:LOW:HIGH"),
    ("latent_dim=float:50:400", ("multvae",), "space latent_dim=float:50:400: latent_dim takes integers: "
                                              "int:LOW:HIGH, log:LOW:HIGH or cat:V1,V2,..."),
    ("lr=int:1:2", ("recvae",), "space lr=int:1:2: lr takes real numbers: float:LOW:HIGH, log:LOW:HIGH"),
    ("lr=log:1e-2:1e-4", ("recvae",), "space lr=log:1e-2:1e-4: LOW must be below HIGH"),
    ("dropout=log:0:0.5", ("recvae",), "space dropout=log:0:0.5: log:LOW:HIGH needs LOW above 0"),
    ("dropout=float:0.1:1", ("recvae",), "space dropout=float:0.1:1: expected dropout=float:LOW:HIGH with LOW "
                                         "and HIGH a probability in [0, 1) each"),
    ("kl_weighting=float:0:1", ("multvae",), "space kl_weighting=float:0:1: kl_weighting takes a list: "
                                             "kl_weighting=cat:V1,V2,... with one of 'uniform', 'activity' each"),
    ("kl_weighting=cat:", ("multvae",), "space kl_weighting=cat:: no values"),
    ("gamma=log:0.001:0.01", ("multvae", "ease"), "space gamma=log:0.001:0.01: 'gamma' is not tunable for "
                                                  "multvae, ease; tunable: hidden_dim, latent_dim, dropout, "
                                                  "kl_weighting, lr, n_negatives, proposal, l2"),
])
def test_parse_space_errors_name_the_entry_and_the_form(spec, models, message):
    with pytest.raises(ValueError) as info:
        tuning.parse_space([spec], models)
    assert str(info.value).startswith(message), str(info.value)


def test_parse_space_refuses_a_name_twice_and_a_fixed_one():
    with pytest.raises(ValueError, match="space lr=log:1e-3:1e-2: 'lr' given twice"):
        tuning.parse_space(["lr=log:1e-4:1e-3", "lr=log:1e-3:1e-2"], ["recvae"])
    with pytest.raises(ValueError, match=r"space lr=\.\.\.: lr is also given as a fixed value"):
        tuning.parse_space(["lr=log:1e-4:1e-3"], ["recvae"], {"recvae": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="space: nothing of ease is left to tune"):
        tuning.parse_space(None, ["ease"], {"ease": {"l2": 10.0}})


# -- bad input: one line, exit 2, nothing written ------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (("--trials", "3", "--space", "latent_dim=int:50"), "--space latent_dim=int:50: expected latent_dim=int:LOW:HIGH"),
    (("--trials", "3", "--space", "lr"), "--space 'lr': expected NAME=int:LOW:HIGH, NAME=float:LOW:HIGH"),
    (("--trials", "0", "--model", "ease"), "--trials: expected a positive number of trials, got 0"),
    (("--space", "l2=log:1:10", "--model", "ease"), "--trials: a study needs its number of trials"),
    (("--model", "ease", "--grid", "l2=1,2", "--trials", "3"), "--trials: the grid has 2 point(s), fewer than 3"),
    (("--model", "ease", "--grid", "l2=1,2", "--space", "l2=log:1:10"), "--grid: a search is a grid or ranges (--space), not both"),
    (("--model", "ease,recvae", "--grid", "l2=1,2"), "--grid: a grid tunes one model"),
    (("--model", "ease,popularity", "--trials", "2"), "--model ease,popularity: tune takes multvae, multdae, binary-multvae, recvae, multvae-linear, "
     "recvae-linear, ease, edlae"),
    (("--model", "ease,recvae", "--trials", "2", "--anneal-cap", "0.2"), "--model ease,recvae: none of them "
                                                                         "takes --anneal-cap"),
    (("--model", "multvae,ease", "--trials", "2", "--anneal-cap", "0.2"), "--anneal-cap: tune chooses Mult-VAE's"),
])
def test_bad_study_input_one_line_exit_2_no_run_directory(log_csv, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("recvae: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@needs_optuna
@pytest.mark.parametrize("storage, message", [
    ("nosuchdb://host/x", "--storage: cannot open the study storage 'nosuchdb://host/x': "),
    ("not a url", "--storage: cannot open the study storage 'not a url': "),
    ("sqlite:////nonexistent-dir/sub/study.db", "--storage: cannot open the study storage "
                                                "'sqlite:////nonexistent-dir/sub/study.db': "),
])
def test_unreachable_or_invalid_storage_one_line_exit_2_nothing_written(log_csv, tmp_path, capsys, storage, message):
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "2", "--storage", storage)) == 2
    err = capsys.readouterr().err
    assert err.startswith("recvae: error: " + message) and err.count("\n") == 1, err
    assert not out.exists()


@needs_optuna
def test_resume_without_a_study_is_one_line(log_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert err == f"recvae: error: --resume: {out} holds no study (study.db) to continue; start the tuning " \
                  "without --resume\n"
    assert not out.exists()
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "2", "--resume", "--storage",
                          f"sqlite:///{tmp_path / 's.db'}")) == 2
    assert "--resume: continues the study in --out; a study at --storage is continued by running the same " \
           "command again" in capsys.readouterr().err


def test_a_study_without_optuna_says_which_extra(log_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "2")) == 2
    err = capsys.readouterr().err
    assert err == ("recvae: error: a tuning study (recvae tune --trials, --space, --storage, --resume) need(s) the "
                   "optional package optuna, which is not installed (pip install 'recvae[tune]')\n")
    assert not out.exists()


# -- studies -------------------------------------------------------------------------------------

@needs_optuna
@pytest.mark.slow
def test_ease_study_keeps_its_trials_and_writes_the_chosen_run(log_csv, tmp_path, capsys):
    from recvae.data.splits import strong_generalization_split
    from recvae.evaluation import evaluate
    from recvae.models import EASE

    out = tmp_path / "tuned"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "4", "--space", "l2=log:1:1000")) == 0
    printed = capsys.readouterr().out
    study = load_study(f"sqlite:///{out / 'study.db'}")
    trials = complete(study)
    assert states(study) == {"COMPLETE": 4} and sorted(trials) == [0, 1, 2, 3]
    assert all(1 <= p["l2"] <= 1000 for p, _ in trials.values())
    table = pd.read_csv(out / "tuning.csv")
    assert list(table["trial"]) == [0, 1, 2, 3] and list(table["model"]) == ["ease"] * 4
    assert list(table["l2"]) == [trials[n][0]["l2"] for n in range(4)]
    # each trial's score is a plain EASE fit's on the validation users
    split = strong_generalization_split(DataSpec(path=str(log_csv)).load(), n_heldout_users=30, seed=0)
    for n, (p, value) in trials.items():
        assert value == pytest.approx(evaluate(EASE(l2=p["l2"]).fit(split.train), split.validation,
                                               ks=(100,))["ndcg@100"].mean, rel=1e-9)
    best = max(trials, key=lambda n: (trials[n][1], -n))
    assert list(table["selected"]) == [n == best for n in range(4)]
    assert f"* {best} " in printed
    model, description = load_run(out)
    # run.json records every hyperparameter: the chosen l2 and EASE's default dtype
    assert description["model"] == "ease" and description["params"] == {"l2": trials[best][0]["l2"], "dtype": "float64"}
    assert model.l2 == trials[best][0]["l2"]
    # --seed fixes the study: the same command draws the same values
    again = tmp_path / "again"
    assert main(tune_argv(log_csv, again, "--model", "ease", "--trials", "4", "--space", "l2=log:1:1000")) == 0
    assert complete(load_study(f"sqlite:///{again / 'study.db'}")) == trials
    # a finished study resumed with no more trials says so and exits 0; more trials continue it
    assert main(tune_argv(log_csv, out, "--model", "ease", "--space", "l2=log:1:1000", "--resume")) == 0
    assert "the study has its 4 trials and the run is written: nothing to resume" in capsys.readouterr().err
    assert main(tune_argv(log_csv, out, "--model", "ease", "--space", "l2=log:1:1000", "--trials", "6",
                          "--resume")) == 0
    grown = complete(load_study(f"sqlite:///{out / 'study.db'}"))
    assert sorted(grown) == list(range(6)) and {n: grown[n] for n in range(4)} == trials
    assert len(pd.read_csv(out / "tuning.csv")) == 6
    # other settings are refused by name
    assert main(tune_argv(log_csv, out, "--model", "ease", "--space", "l2=log:1:100", "--trials", "7",
                          "--resume")) == 2
    err = capsys.readouterr().err
    assert ("recvae: error: --resume: the study 'recvae-tune' was made with other settings (space: "
            "{'ease': {'l2': 'log:1:1000'}} in the study, now {'ease': {'l2': 'log:1:100'}})") in err


@needs_optuna
@pytest.mark.slow
def test_grid_study_runs_every_point_in_order_as_the_plain_grid(log_csv, tmp_path):
    out = tmp_path / "grid"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--grid", "l2=300,1,30", "--trials", "3")) == 0
    study = load_study(f"sqlite:///{out / 'study.db'}")
    table = pd.read_csv(out / "tuning.csv")
    assert list(table["l2"]) == [300.0, 1.0, 30.0] and states(study) == {"COMPLETE": 3}
    plain = tuning.tune(DataSpec(path=str(log_csv)), "ease", grid={"l2": (300.0, 1.0, 30.0)}, n_heldout_users=30)
    assert list(table["validation_ndcg@100"]) == [round(t.validation, 6) for t in plain.trials]
    assert json.loads((out / "run.json").read_text())["params"] == model_params("ease", plain.config.params)


@needs_optuna
@pytest.mark.slow
def test_study_over_model_families_keeps_a_run_that_retrains_equal(log_csv, tmp_path, one_thread):
    out = tmp_path / "families"
    assert main(tune_argv(log_csv, out, *SMALL, "--model", "recvae,multvae", "--trials", "3",
                          "--space", "lr=log:1e-3:1e-2", "--seed", "4")) == 0
    table = pd.read_csv(out / "tuning.csv")
    study = load_study(f"sqlite:///{out / 'study.db'}")
    trials = complete(study)
    assert list(table["model"]) == [trials[n][0]["model"] for n in range(3)]
    assert all(1e-3 <= p[f"{p['model']}.lr"] <= 1e-2 for p, _ in trials.values())
    chosen = table[table["selected"]].iloc[0]
    model, description = load_run(out)
    assert description["model"] == chosen["model"]
    assert model.best_score_ == pytest.approx(chosen["validation_ndcg@100"], abs=1e-6)
    assert description["params"]["lr"] == trials[int(chosen["trial"])][0][f"{chosen['model']}.lr"]
    # run.json's parameters retrain the same model (what `recvae train` with them does)
    config = RunConfig(data=DataSpec(**description["data"]), model=description["model"],
                       params=description["params"], split_seed=0, n_heldout_users=30)
    again = run(config).model
    for name, tensor in model.module_.state_dict().items():
        assert torch.equal(tensor, again.module_.state_dict()[name]), name
    assert main(["-q", "evaluate", str(out)]) == 0


@needs_optuna
@pytest.mark.slow
def test_an_interrupted_trial_runs_again_with_its_values_on_resume(log_csv, tmp_path, capsys, monkeypatch):
    calls = []
    fit_ease = tuning.Gram.model

    def interrupt_the_third(self, params, name="ease"):
        calls.append(params["l2"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit_ease(self, params, name)

    monkeypatch.setattr(tuning.Gram, "model", interrupt_the_third)
    out = tmp_path / "run"
    argv = tune_argv(log_csv, out, "--model", "ease", "--trials", "4")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"recvae: stopped by SIGINT during the trials; --out {out} holds the study with 2 finished "
                        f"trial(s); continue with: recvae {' '.join(argv)} --resume\n"), err
    before = load_study(f"sqlite:///{out / 'study.db'}")
    assert states(before) == {"COMPLETE": 2, "FAIL": 1}
    kept = complete(before)
    assert main([*argv, "--resume"]) == 0
    after = load_study(f"sqlite:///{out / 'study.db'}")
    trials = complete(after)
    assert states(after) == {"COMPLETE": 4, "FAIL": 1} and {n: trials[n] for n in kept} == kept
    retry = next(t for t in after.trials if t.user_attrs.get("retry_of") == 2)
    assert retry.params == after.trials[2].params and retry.params["l2"] == calls[2] == calls[3]


@needs_optuna
@pytest.mark.slow
def test_a_study_stopped_twice_and_resumed_ends_with_the_uninterrupted_trial_table(log_csv, tmp_path, caplog):
    """A cut trial keeps its number and values; later trials draw what they would have drawn
    (12 trials: past TPE's 10 random startup ones, so the last draw from the history)."""
    import logging

    data, options = DataSpec(path=str(log_csv)), dict(n_trials=12, n_heldout_users=30, seed=3)
    whole = tuning.tune(data, "ease", out=tmp_path / "whole", **options)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="recvae.tuning")
    for cut in (2, 3, 11):
        def stop(number, candidate, cut=cut):
            if number == cut:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            tuning.tune(data, "ease", out=out, resume=cut != 2, before_trial=stop, **options)
    resumed = tuning.tune(data, "ease", out=out, resume=True, **options)

    def table(tuned):
        return [(r["trial"], r["l2"], r["validation_ndcg@100"], r["selected"]) for r in tuned.table()]

    assert table(resumed) == table(whole) and [r[0] for r in table(whole)] == [str(k) for k in range(12)]
    assert resumed.config.params == whole.config.params
    # each cut attempt ran again under its number with its values
    study = load_study(f"sqlite:///{out / 'study.db'}")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.user_attrs["trial"] for t in failed] == [2, 3, 11]
    for t in failed:
        retry = next(r for r in study.trials if r.user_attrs.get("retry_of") == t.number)
        assert retry.state.name == "COMPLETE" and retry.params == t.params
        assert retry.user_attrs["trial"] == t.user_attrs["trial"]
    # the log counts right: each trial once, "trial k of 12"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ") and " of " in
             r.getMessage()]
    assert sorted(int(line.split()[1]) for line in lines) == list(range(12))
    assert all(line.split(":")[0].endswith(" of 12") for line in lines)


@needs_optuna
@pytest.mark.slow
def test_resume_without_search_options_continues_the_search_out_holds(log_csv, tmp_path, capsys, monkeypatch):
    from recvae.tuning.plans import Plan

    fit, fits = Plan.fit, []

    def stop_the_second(self, candidate):
        fits.append(candidate)
        if len(fits) == 2:
            raise KeyboardInterrupt
        return fit(self, candidate)

    monkeypatch.setattr(Plan, "fit", stop_the_second)
    out = tmp_path / "run"
    assert main(tune_argv(log_csv, out, "--model", "ease", "--trials", "3")) == 130
    assert "holds the study with 1 finished trial(s)" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(tune_argv(log_csv, out, "--model", "ease", "--resume")) == 0  # a study of 3, as it was made
    assert capsys.readouterr().err == ""
    table = pd.read_csv(out / "tuning.csv")
    assert list(table["trial"]) == [0, 1, 2] and table["l2"][1] == fits[1].values["l2"]


def _tune_process(log_csv, out, *extra, stderr=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # two processes on the machine's cores
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "recvae", "tune", "--data", str(log_csv), "--n-heldout-users", "30",
                             "--out", str(out), *extra], stdout=subprocess.DEVNULL, stderr=stderr, env=env)


@needs_optuna
@pytest.mark.slow
def test_sigkill_then_resume_keeps_every_finished_trial(log_csv, tmp_path, one_thread):
    out = tmp_path / "run"
    n, k = 5, 2
    options = ("--model", "recvae", *SMALL[2:], "--epochs", "10", "--trials", str(n))
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = _tune_process(log_csv, out, *options, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "study.db").is_file():
                try:
                    if len(complete(load_study(f"sqlite:///{out / 'study.db'}"))) >= k:
                        break
                except Exception:  # the study is still being set up
                    pass
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = load_study(f"sqlite:///{out / 'study.db'}")
    kept = complete(killed)
    assert k <= len(kept) < n, f"{len(kept)} trials finished before the kill: make each trial slower"
    running = [t.number for t in killed.trials if t.state.name == "RUNNING"]
    assert len(running) <= 1
    # a log file gets one plain line per finished trial, no bars or control characters
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("trial ")]
    assert [line.split(":")[0] for line in lines] == [f"trial {i} of {n}" for i in sorted(kept)]
    assert all(f"validation NDCG@100 {kept[i][1]:.4f} (" in line for i, line in zip(sorted(kept), lines))
    assert "\r" not in text and "\x1b" not in text
    # --resume keeps the finished trials, runs the one cut short again, and ends with n in all
    assert main(["-q", "tune", "--data", str(log_csv), "--n-heldout-users", "30", "--out", str(out), *options,
                 "--resume"]) == 0
    study = load_study(f"sqlite:///{out / 'study.db'}")
    trials = complete(study)
    assert len(trials) == n and {i: trials[i] for i in kept} == kept
    assert states(study) == {"COMPLETE": n, **({"FAIL": 1} if running else {})}
    for number in running:  # the trial in progress ran again with its values (drawn anew when the
        # kill came before it had drawn any)
        place = study.trials[number].user_attrs["trial"]  # its place in the search, kept by the retry
        retry = next(t for t in study.trials if t.user_attrs.get("trial") == place and t.state.name == "COMPLETE")
        # the values a trial takes are its "candidate" record, written in one step before the fit;
        # Optuna's params are copied after it one by one, so a kill may leave some of them only
        cut = study.trials[number].user_attrs.get("candidate")
        assert retry.state.name == "COMPLETE" and (retry.user_attrs["candidate"] == cut or not cut), (retry, cut)
        assert set(study.trials[number].params.items()) <= set(retry.params.items())
    assert len(pd.read_csv(out / "tuning.csv")) == n
    assert main(["-q", "evaluate", str(out)]) == 0


@needs_optuna
@pytest.mark.slow
def test_two_processes_share_one_study_and_do_no_trial_twice(log_csv, tmp_path):
    n = 6
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    options = ("--model", "recvae", *SMALL[2:], "--epochs", "8", "--trials", str(n), "--storage", url)
    procs = [_tune_process(log_csv, tmp_path / name, *options, stderr=subprocess.PIPE) for name in ("a", "b")]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    study = load_study(url)
    trials = complete(study)
    assert sorted(trials) == [t.number for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == n and set(states(study)) <= {"COMPLETE", "PRUNED"}
    values = [tuple(sorted(p.items())) for p, _ in trials.values()]
    assert len(set(values)) == n  # no configuration ran twice
    # each worker wrote the study's best trial as its run
    best = max(trials, key=lambda i: (trials[i][1], -i))
    for name in ("a", "b"):
        description = json.loads((tmp_path / name / "run.json").read_text())
        assert {k: description["params"][k] for k in ("gamma", "dropout", "lr")} == trials[best][0]
        assert not (tmp_path / name / "study.db").exists()
    # each trial logged once, under its recvae number (Optuna's count an attempt two workers took at once)
    lines = [line for e in errors for line in e.splitlines() if line.startswith("trial ") and " of " in line]
    numbers = [t.user_attrs["trial"] for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(int(line.split()[1]) for line in lines) == sorted(numbers) == list(range(n))


@needs_optuna
@pytest.mark.slow
def test_train_and_the_parser_do_not_import_optuna():
    code = ("import sys, recvae.cli, recvae.tuning, recvae.experiment; recvae.cli.build_parser(); "
            "print('optuna' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_the_tune_extra_brings_optuna_and_the_setup_installs_it():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [str(Requirement(r)) for r in extras["tune"]] == ["optuna>=3.1"]
    installed = re.search(r'-e "\.\[([a-z,]+)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    assert installed and "tune" in installed.group(1).split(",")
    if available("optuna"):
        import optuna

        assert Requirement(extras["tune"][0]).specifier.contains(optuna.__version__)


@needs_optuna
def test_a_study_splits_in_time_as_train_does(tmp_path, capsys):
    """--leave-last reaches the study's split: held-out users' last interaction is their target,
    and run.json and the study record the setting."""
    log = tmp_path / "log.csv"
    rows = [f"u{u},i{(u + 13 * k) % 110},5,{1_450_000_000 + 100 * u + k}" for u in range(200) for k in range(10)]
    log.write_text("user,item,rating,timestamp\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["-q", "tune", "--data", str(log), "--model", "ease", "--trials", "2", "--leave-last", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "run.json").read_text())["split_settings"]["leave_last"] == 1
    assert load_study(f"sqlite:///{out / 'study.db'}").user_attrs["recvae"]["leave_last"] == 1
    from recvae.data.splits import HeldOutUsers

    test = HeldOutUsers.load(out / "test.npz")
    assert test.heldout.nnz == test.n_users > 0  # one target each: the last interaction
    assert test.fold_in.nnz == 9 * test.n_users
