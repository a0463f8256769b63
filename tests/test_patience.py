"""Early stopping by default (issue 28): the default patience per model, where it applies (with
validation users) and where not (no validation, `--holdout none`, refits), how to turn it off in
the library and on the command line, resume (runs written before it keep training every epoch,
a run resumed without --patience keeps its own), and the paper's protocol, which it never reaches
(benchmarks/paper_table.py, `tune`'s paper trial)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from recvae.cli import main
from recvae.models import BinaryMultVAE, MultDAE, MultVAE, RecVAE
from recvae.models.vae import PATIENCE
from recvae.rundir import RunDir
from recvae.tuning import Trial, Trials
from recvae.tuning.plans import paper_params

from synthetic import fold_in_split, planted
from test_paper_table import paper_table  # noqa: F401  (the fixture, shared)
from test_runs import log_csv, train_argv, weights  # noqa: F401  (log_csv: the fixture, shared)
from test_vae import assert_same_weights

ROOT = Path(__file__).resolve().parents[1]
#: a network so small that an epoch costs little more than the loop's own work
TINY = dict(hidden_dims=(), latent_dim=2, batch_size=40, random_state=0, device="cpu", precision="fp32")


def tiny_log():
    return planted(n_users=40, n_items=12, n_clusters=2, per_user=3)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the default --------------------------------------------------------------------------------

def test_default_patience_per_model():
    assert PATIENCE == 50
    assert MultVAE().patience == MultDAE().patience == BinaryMultVAE().patience == 50
    assert RecVAE().patience == 20  # of its 50 outer epochs


def test_the_default_stops_50_epochs_after_the_best_and_keeps_the_best_epochs_weights():
    X = tiny_log()
    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5] + [0.4] * 50)  # a peak at epoch 5, then no gain; 55 epochs at most
    m = MultVAE(**TINY, epochs=200).fit(X, validation=lambda model: next(scores), show_progress=False)
    assert len(m.history_) == 55 and m.stopped_early_ and (m.best_epoch_, m.best_score_) == (5, 0.5)
    assert_same_weights(m, MultVAE(**TINY, epochs=5).fit(X, show_progress=False))  # epoch 5's weights, not 55's


def test_patience_none_trains_every_epoch():
    X = tiny_log()
    for patience, epochs_run in ((2, 3), (None, 6)):
        scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
        m = MultVAE(**TINY, epochs=6, patience=patience).fit(X, validation=lambda model: next(scores),
                                                             show_progress=False)
        assert (len(m.history_), m.stopped_early_, m.best_epoch_) == (epochs_run, patience is not None, 1)


def test_without_validation_the_default_does_not_apply_and_says_nothing(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = MultVAE(**TINY, epochs=3).fit(tiny_log(), show_progress=False)
    assert len(m.history_) == 3 and not m.stopped_early_ and m.best_epoch_ == 3
    assert [r for r in caplog.records if r.levelno >= 30] == []


# -- the command line ---------------------------------------------------------------------------

def test_help_shows_the_defaults_and_how_to_turn_it_off(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text.replace("multvae- linear", "multvae-linear").replace("recvae- linear", "recvae-linear")  # wrapped names
    assert ("--patience N [multvae, multdae, binary-multvae, recvae, multvae-linear, recvae-linear] early stopping: "
            "stop after this many epochs without a validation NDCG@100 gain, keeping the best epoch's weights; none: train every epoch (the "
            "paper); without validation users it does not apply (default multvae, multdae, binary-multvae, "
            "multvae-linear: 50; recvae, recvae-linear: 20)") in text


@pytest.mark.parametrize("flags, recorded", [((), 50), (("--patience", "none"), None), (("--patience", "7"), 7)])
def test_train_records_the_patience_it_trains_with(log_csv, tmp_path, flags, recorded):  # noqa: F811
    out = tmp_path / "run"
    assert main(train_argv(log_csv, out, *flags, epochs=2)) == 0
    assert read(out / "run.json")["params"]["patience"] == recorded
    assert RunDir(out).load_model().patience == recorded


def test_patience_zero_is_refused_naming_the_flag(log_csv, tmp_path, capsys):  # noqa: F811
    assert main(train_argv(log_csv, tmp_path / "run", "--patience", "0", epochs=2)) == 2
    assert capsys.readouterr().err.strip() == "recvae: error: --patience: expected None or a positive integer, got 0"
    assert not (tmp_path / "run").exists()


def test_holdout_none_without_patience_trains_every_epoch_quietly(log_csv, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "all"
    argv = [a for a in train_argv(log_csv, out, "--holdout", "none", epochs=2) if a != "-q"]
    argv[argv.index("--n-heldout-users"):argv.index("--n-heldout-users") + 2] = []  # holdout none holds none out
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "patience" not in err and "warning" not in err.lower()
    assert read(out / "run.json")["params"]["patience"] is None  # the default does not apply: no validation
    model = RunDir(out).load_model()
    assert model.patience is None and len(model.history_) == 2


# -- resume -------------------------------------------------------------------------------------

def _first_segment(log_csv, out, *flags):
    """A run of 2 epochs that keeps its checkpoint (to go on with more --epochs)."""
    assert main(train_argv(log_csv, out, *flags, "--keep-checkpoint", epochs=2)) == 0


@pytest.mark.parametrize("recorded", ["null", "absent"])
def test_a_run_written_before_the_default_resumes_without_early_stopping(log_csv, tmp_path, recorded):  # noqa: F811
    """run.json as the versions before wrote it: ``patience: null`` (every default recorded) or no
    patience at all; resumed without --patience it keeps training every epoch."""
    out = tmp_path / "old"
    _first_segment(log_csv, out)
    description = read(out / "run.json")
    if recorded == "null":
        description["params"]["patience"] = None
    else:
        del description["params"]["patience"]
    (out / "run.json").write_text(json.dumps(description))
    assert main(train_argv(log_csv, out, "--resume", epochs=3)) == 0
    model = RunDir(out).load_model()
    assert model.patience is None and len(model.history_) == 3 and not model.stopped_early_


def test_a_run_resumed_with_patience_given_again_takes_it(log_csv, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _first_segment(log_csv, out, "--patience", "none")
    assert main(train_argv(log_csv, out, "--resume", "--patience", "4", epochs=3)) == 0
    assert RunDir(out).load_model().patience == 4


#: a run that stops early: validation peaks at epoch 3 and falls at epochs 4 and 5
STOPS = ("--lr", "0.03", "--seed", "1", "--patience", "2")


def test_resume_of_a_run_that_stops_early_is_the_uninterrupted_run(log_csv, tmp_path):  # noqa: F811
    """Interrupted after epoch 4 (one epoch without a gain), resumed without --patience: the run's
    own patience 2 goes on counting, and it stops at epoch 5 as the run never interrupted did."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(train_argv(log_csv, straight, *STOPS, epochs=12)) == 0
    reference = RunDir(straight).load_model()
    assert reference.stopped_early_ and (len(reference.history_), reference.best_epoch_) == (5, 3)
    assert main(train_argv(log_csv, cut, *STOPS, "--keep-checkpoint", epochs=4)) == 0
    argv = train_argv(log_csv, cut, *STOPS, "--resume", epochs=12)
    argv[argv.index("--patience"):argv.index("--patience") + 2] = []
    assert main(argv) == 0
    resumed = RunDir(cut).load_model()
    assert resumed.patience == 2 and resumed.stopped_early_ and resumed.best_epoch_ == 3
    assert resumed.history_ == [{**row, "seconds": h["seconds"], "val_seconds": h["val_seconds"]}
                                for row, h in zip(reference.history_, resumed.history_)]
    a, b = weights(cut), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read(cut / "metrics.json")["test"]["metrics"] == read(straight / "metrics.json")["test"]["metrics"]


# -- the paper's protocol -----------------------------------------------------------------------

def test_tunes_paper_trial_trains_every_epoch_unless_given_a_patience():
    assert paper_params({"epochs": 10, "lr": 0.1}) == {"patience": None, "epochs": 10}
    assert paper_params({"patience": 7}) == {"patience": 7}


def test_a_trial_records_the_patience_it_ran_with_and_an_older_record_reads_as_none():
    X = planted(n_users=60, n_items=12, n_clusters=2, per_user=3)
    trials = Trials(X[:40], fold_in_split(X[40:], n_fold_in=1), log=False)
    trial = trials.run("t", "multdae", {**TINY, "epochs": 1})
    assert trial.params["patience"] == 50  # refitted later (a resume, another process) as it ran
    old = {"name": "t", "model": "multdae", "params": {"epochs": 1}, "validation": 0.5}
    assert Trial.from_record(old).params == {"patience": None, "epochs": 1}
    assert Trial.from_record(trial.record()).params == trial.params
    ease = {"name": "e", "model": "ease", "params": {"l2": 5.0}, "validation": 0.5}
    assert Trial.from_record(ease).params == {"l2": 5.0}


def test_paper_table_passes_its_own_patience_to_every_neural_run(paper_table, log_csv, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    """Every committed table was made with --patience 50 and the paper's epochs; each neural run
    gets that patience explicitly (the library's default never reaches it), the precision
    timing rerun none. Each run is then cut to 1 epoch here, after its settings were noted."""
    from recvae.tuning import trials as trials_module

    for name in ("ml-100k", "ml-1m", "ml-latest-small"):
        report = read(ROOT / "benchmarks" / "results" / f"{name}.json")
        assert (report["patience"], report["epochs"]) == (50, 200)
        assert {r[k]["params"]["patience"] for r in report["per_seed"] for k in r
                if isinstance(r[k], dict) and "curve" in r[k]} == {50}
    made, real = [], trials_module.make_model

    def noting(model, **params):
        estimator = real(model, **params)
        if "patience" not in estimator.get_params():
            return estimator
        made.append((model, estimator.patience, estimator.epochs))
        return real(model, **{**params, "epochs": 1})

    monkeypatch.setattr(trials_module, "make_model", noting)
    assert paper_table.build_parser().get_default("patience") == 50
    argv = ["--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--out-dir", str(tmp_path), "--n-heldout-users", "30", "--seeds", "1", "--precision", "fp32",
            "--models", "multvae,multdae,recvae,binary-multvae", "--compare-precision", "timing"]
    assert paper_table.main(argv) == 0
    assert made == [("multvae", 50, 200)] * 3 + [("multvae", None, 5), ("multdae", 50, 200), ("recvae", 50, 50),
                                                  ("binary-multvae", 50, 200)]
    assert read(tmp_path / "log.json")["patience"] == 50
