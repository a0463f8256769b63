"""Hyperparameters declared once (recvae.models.params): the kinds' checks and parsers, tables
derived from tables, the generated __init__, and a toy model whose one new table row reaches
the command line's help, run.json and the resume rules."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest

from recvae.cli import main
from recvae.errors import ParameterError
from recvae.models import EASE, MultDAE, MultVAE, RecVAE, model_class, model_names
from recvae.models.base import Recommender
from recvae.models.params import Choice, Float, Floats, Int, Param, Tune, Widths, forced, table
from recvae.models.popularity import load_baseline, save_baseline
from recvae.models.registry import register, unregister
from recvae.settings import resumable


# -- kinds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, good, bad, message", [
    (Int(1), 3, 0, "expected a positive integer, got 0"),
    (Int(0), 0, -1, "expected a non-negative integer, got -1"),
    (Int(1), 2, True, "expected a positive integer, got True"),
    (Float(0.0, 1.0, high_open=True), 0.0, 1.0, "expected a probability in [0, 1), got 1.0"),
    (Float(0.0, low_open=True), 1e-9, 0.0, "expected a finite number > 0, got 0.0"),
    (Float(), -3.0, float("nan"), "expected a finite number, got nan"),
    (Choice(("a", "b")), "b", "c", "expected one of 'a', 'b', got 'c'"),
    (Widths(), (), (600, 0), "expected positive integer widths, got (600, 0)"),
    (Floats(3), (0.1, 0.2, 0.7), (0.5, 0.5), "expected 3 comma-separated numbers such as 0.15,0.75,0.1, got (0.5, 0.5)"),
])
def test_each_kind_accepts_its_values_and_names_the_parameter_otherwise(kind, good, bad, message):
    kind.check("x", good)
    with pytest.raises(ParameterError) as e:
        kind.check("x", bad)
    assert (e.value.param, e.value.message) == ("x", message)


def test_a_flag_text_is_read_by_its_kind():
    widths = Param("hidden_dims", Widths(), (600,), "architecture", "h")
    assert widths.parse("600,300") == (600, 300) and widths.parse("none") == ()
    with pytest.raises(ValueError, match=r"expected comma-separated positive integers .* got '600,x'"):
        widths.parse("600,x")
    patience = Param("patience", Int(1), None, "training", "p", optional=True)
    assert patience.parse("none") is None and patience.parse("3") == 3
    with pytest.raises(ValueError, match="expected a positive integer or none, got 'x'"):
        patience.parse("x")
    with pytest.raises(ParameterError, match="patience: expected None or a positive integer, got 0"):
        patience.check(0)


def test_a_table_derives_from_another_by_defaults_rows_and_drops():
    base = (Param("a", Int(1), 1, "architecture", "a"), Param("b", Int(1), 2, "training", "b"))
    child = table(base, add=(Param("c", Int(1), 3, "runtime", "c"),), drop=("b",), a=5,
                  changes={"a": {"tune": Tune(space="int:1:9")}})
    assert [(p.name, p.default) for p in child] == [("a", 5), ("c", 3)]
    assert child[0].tune.space == "int:1:9" and base[0].tune is None
    with pytest.raises(ValueError, match="'a' is declared twice"):
        table(base, add=(Param("a", Int(1), 1, "architecture", "a"),))
    with pytest.raises(ValueError, match="no parameter 'z' to change"):
        table(base, z=1)
    with pytest.raises(ValueError, match="role 'model'"):
        Param("d", Int(1), 1, "model", "d")


def test_the_init_is_the_tables_signature_and_only_stores():
    for name in model_names():
        cls = model_class(name)
        if not cls.PARAMETERS:
            continue  # popularity: no hyperparameters
        sig = inspect.signature(cls.__init__)
        declared = [(p.name, p.default) for p in cls.PARAMETERS]
        assert [(n, p.default) for n, p in sig.parameters.items() if n != "self"] == declared, name
        assert cls().get_params() == dict(declared)
    assert MultDAE().hidden_dims == () and MultDAE().lam == pytest.approx(2e-5)
    assert "latent_dim : a positive integer, default 200" in MultVAE.__doc__  # the docstring's Parameters


def test_sklearn_clone_sees_every_hyperparameter():
    base = pytest.importorskip("sklearn.base")
    model = RecVAE(gamma=0.01, latent_dim=7)
    copy = base.clone(model)
    assert copy is not model and copy.get_params() == model.get_params()


def test_what_a_resume_keeps_is_the_architecture_role():
    # the list the estimators and run.json's resume checks once kept by hand, now the role's
    assert forced(MultVAE.PARAMETERS) == ("hidden_dims", "latent_dim", "dropout", "activation", "lam", "anneal_cap",
                                          "total_anneal_steps", "beta", "kl_weighting", "batch_size", "random_state",
                                          "softmax", "n_negatives", "proposal", "proposal_alpha")
    assert set(resumable("multvae")) == {"epochs", "lr", "patience", "device", "precision", "eval_batch_size",
                                         "parallel"}
    assert resumable("ease") == ("dtype",)
    assert MultVAE._resume_keys() == forced(MultVAE.PARAMETERS)
    assert "binary_inference" in model_class("binary-multvae")._resume_keys()


# -- a toy model: one new row of its table reaches everything ------------------------------------

class Toy(Recommender):
    """A toy: every user gets the items ranked by popularity times ``weight`` plus ``shift``."""

    PARAMETERS = (
        Param("weight", Float(0.0, low_open=True), 1.0, "architecture", "scale of the counts",
              tune=Tune(space="float:0.5:2", grid=(1.0, 2.0))),
        Param("shift", Float(), 0.0, "training", "added to every score"),
        # the one line this test adds: a hyperparameter of the toy, with its tuning range
        Param("toy_knob", Int(1), 3, "architecture", "a toy knob", tune=Tune(space="int:1:8", grid=(2, 4))),
    )

    def fit(self, train, validation=None):
        self._check_params()
        X = train.matrix if hasattr(train, "matrix") else train
        self.counts_ = np.asarray((X > 0).sum(axis=0), dtype=np.float32).ravel()
        self.n_items_ = X.shape[1]
        if getattr(train, "item_ids", None) is not None:
            self.item_ids_ = np.asarray(train.item_ids)
        return self

    def _score_batch(self, user_items):
        scores = self.counts_ * float(self.weight) + float(self.shift) + 0.001 * self.toy_knob
        return np.tile(scores, (user_items.shape[0], 1))

    def save(self, path):
        return save_baseline(self, path, self._json_params(), {"counts": self.counts_})

    @classmethod
    def load(cls, path, device=None):
        meta, arrays = load_baseline(cls, path, lambda n: {"counts": (n,)})
        model = cls(**cls._params_from_json(meta["params"]))
        model.counts_, model.n_items_ = arrays["counts"], int(meta["n_items"])
        if meta["item_ids"] is not None:
            model.item_ids_ = np.asarray(meta["item_ids"])
        return model


@pytest.fixture
def toy():
    register("toy", Toy)
    yield Toy
    unregister("toy")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{i}") for u in range(120) for i in rng.choice(150, 12, replace=False)]
    path = tmp_path_factory.mktemp("toy") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item"]).to_csv(path, index=False)
    return path


def test_a_new_row_is_a_flag_with_its_help_and_default(toy, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--toy-knob N [toy] a toy knob (default 3)" in help_text


def test_a_new_row_reaches_the_model_run_json_and_the_resume_rules(toy, log, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["-q", "train", "--data", str(log), "--rating-col", "none", "--model", "toy", "--n-heldout-users", "20",
            "--show", "0", "--out", str(out)]
    assert main([*base, "--toy-knob", "5"]) == 0
    recorded = json.loads((out / "run.json").read_text())["params"]
    assert recorded == {"weight": 1.0, "shift": 0.0, "toy_knob": 5}  # every hyperparameter, defaults too
    assert json.loads((out / "model" / "model.json").read_text())["params"]["toy_knob"] == 5
    capsys.readouterr()
    # architecture: refused on resume, named by its flag
    assert main([*base, "--toy-knob", "6", "--resume"]) == 2
    assert "--toy-knob: 5 in the run, now 6" in capsys.readouterr().err
    # training: a resume may change it (the run is finished: nothing to resume, and no mismatch)
    assert main([*base, "--toy-knob", "5", "--shift", "1", "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().err
    # its kind judges a bad value before anything is read or written
    assert main([*base[:-1], str(tmp_path / "other"), "--toy-knob", "0"]) == 2
    assert "--toy-knob: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_ease_takes_its_dtype_as_a_name_or_a_numpy_dtype():
    assert EASE(dtype=np.float32)._json_params() == {"l2": 500.0, "dtype": "float32"}
    with pytest.raises(ParameterError, match="dtype: expected float32 or float64, got 'float16'"):
        EASE(dtype="float16")._check_params()


def test_a_new_row_is_tuned_by_its_declared_range(toy, log, tmp_path, capsys):
    from recvae import tuning

    assert tuning.tunable("toy") == ("weight", "toy_knob")
    assert tuning.default_grid("toy") == {"weight": (1.0, 2.0), "toy_knob": (2, 4)}
    assert tuning.default_space("toy") == ("weight=float:0.5:2", "toy_knob=int:1:8")
    with pytest.raises(ValueError, match="grid toy_knob=0: expected a positive integer each, such as 2,4"):
        tuning.parse_grid(["toy_knob=0"], "toy")
    base = ["-q", "tune", "--data", str(log), "--rating-col", "none", "--model", "toy", "--n-heldout-users", "20"]
    assert main([*base, "--grid", "toy_knob=2,4", "--out", str(tmp_path / "grid")]) == 0
    table = pd.read_csv(tmp_path / "grid" / "tuning.csv")
    # the knob shifts every score alike: equal rankings, and ties go to the first trial
    assert table["toy_knob"].tolist() == [2, 4] and table["selected"].tolist() == [True, False]
    assert json.loads((tmp_path / "grid" / "run.json").read_text())["params"]["toy_knob"] == 2
    assert main([*base, "--space", "toy_knob=int:1:8", "--trials", "3", "--out", str(tmp_path / "study")]) == 0
    knobs = pd.read_csv(tmp_path / "study" / "tuning.csv")["toy_knob"]
    assert len(knobs) == 3 and knobs.between(1, 8).all()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert "toy weight, toy_knob" in " ".join(capsys.readouterr().out.split())
