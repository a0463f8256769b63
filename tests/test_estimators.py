"""Every model is a plain estimator: parameters stored by __init__, read and set by one base,
cloned by scikit-learn, printed by value; adding a model is one class and one registration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recvae.cli import main
from recvae.models import model_class, model_names, register
from recvae.models.base import Recommender
from recvae.models.registry import unregister

ROOT = Path(__file__).resolve().parents[1]
ALL = ["multvae", "multdae", "binary-multvae", "recvae", "multvae-linear", "recvae-linear", "ease", "edlae",
       "popularity"]


def test_the_library_registers_its_models_once():
    assert model_names() == ALL


@pytest.mark.parametrize("name", ALL)
def test_sklearn_clone_gives_an_unfitted_copy_with_the_same_parameters(name):
    base = pytest.importorskip("sklearn.base")
    cls = model_class(name)
    changed = {"ease": {"l2": 123.0}, "edlae": {"p": 0.2, "emphasis": "none"}, "popularity": {}}.get(
        name, {"latent_dim": 7, "epochs": 3})
    model = cls(**changed)
    model.n_items_ = 5  # a learned attribute: clone must not carry it
    copy = base.clone(model)
    assert type(copy) is cls and copy is not model
    assert copy.get_params() == model.get_params() and not hasattr(copy, "n_items_")
    for k, v in changed.items():
        assert getattr(copy, k) == v


@pytest.mark.parametrize("name", ALL)
def test_no_model_takes_a_file_setting_as_a_hyperparameter(name):
    params = model_class(name)().get_params()
    assert not {"run_dir", "keep_checkpoint", "out", "path"} & set(params)


def test_repr_shows_the_parameters_not_an_address():
    from recvae.models import EASE, Popularity

    assert repr(EASE(l2=50.0)) == "EASE(l2=50.0, dtype='float64')"
    assert repr(Popularity()) == "Popularity()"
    assert repr(model_class("multdae")(latent_dim=8)).startswith("MultDAE(hidden_dims=(), latent_dim=8, ")


class ItemMean(Recommender):
    """A toy model: every user gets the items by their mean training value."""

    def __init__(self, shrink: float = 1.0):
        self.shrink = shrink

    def fit(self, train, validation=None):
        X = sp.csr_matrix(getattr(train, "matrix", train))
        self.means_ = np.asarray(X.sum(axis=0)).ravel() / (X.shape[0] + self.shrink)
        self.n_items_ = X.shape[1]
        return self

    def _score_batch(self, user_items):
        return np.tile(self.means_.astype(np.float32), (user_items.shape[0], 1))


@pytest.fixture
def toy():
    register("item-mean", ItemMean)
    yield ItemMean
    unregister("item-mean")


def test_a_registered_model_is_one_class_and_one_line_and_the_cli_offers_it(toy, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train without --out writes its run under ./runs
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("one of multvae, multdae, binary-multvae, recvae, multvae-linear, recvae-linear, ease, edlae, popularity, "
            "item-mean") in help_text
    # the options it takes come from its __init__: others are refused by name
    log = tmp_path / "log.csv"
    log.write_text("user,item\n" + "\n".join(f"{u},{i}" for u in range(60) for i in range(u % 7, u % 7 + 110, 2)))
    assert main(["train", "--data", str(log), "--rating-col", "none", "--model", "item-mean", "--epochs", "2"]) == 2
    assert "--model item-mean: does not take --epochs" in capsys.readouterr().err
    assert main(["-q", "train", "--data", str(log), "--rating-col", "none", "--model", "item-mean",
                 "--n-heldout-users", "10", "--show", "0"]) == 0
    assert "item-mean on log: trained in" in capsys.readouterr().out


def test_an_unknown_model_lists_the_registry(capsys):
    assert main(["train", "--dataset", "ml-100k", "--model", "svd"]) == 2
    assert capsys.readouterr().err.strip() == (
        "recvae: error: --model: unknown model 'svd'; expected one of " + ", ".join(ALL))


@pytest.mark.slow
def test_models_never_import_the_layers_above_them():
    code = ("import sys, recvae.models, recvae.data, recvae.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith('recvae.') and m.split('.')[1] in "
            "('evaluation', 'experiment', 'rundir', 'tuning', 'cli', 'recommend', 'serve')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
