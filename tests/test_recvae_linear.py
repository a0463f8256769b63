"""RecVAE with a linear item-item path (``recvae-linear``): RecVAE's training bit for bit, the scores
RecVAE's logits plus w * x B by hand, validation on the sum, a planted structure that neither part
recovers alone, the memory bound, what it does not take, save/load and the command line. (The
contract tests, resume included, are tests/test_model_contract.py's.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recvae import tuning
from recvae.cli import main
from recvae.errors import InputError, ParameterError
from recvae.evaluation import evaluate
from recvae.models import EASE, EDLAE, MultVAELinear, RecVAE, RecVAELinear, load_model, make_model
from recvae.models.hybrid import LINEAR_FILE, LINEAR_PATH, check_linear_memory
from recvae.models.sparse_layers import SparseBatch
from synthetic import planted_pairs_and_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_dims=(8, 8), latent_dim=4, epochs=3, batch_size=50, encoder_epochs=1, random_state=0,
            device="cpu", precision="fp32")
#: users (1,1) twice, (1,0) once, (0,1) twice: X^T X = [[3, 2], [2, 4]] (tests/test_edlae.py's case)
TWO_ITEMS = sp.csr_matrix(np.array([[1, 1], [1, 1], [1, 0], [0, 1], [0, 1]], dtype=np.float32))


def recvae_logits(model, x: sp.csr_matrix) -> np.ndarray:
    """RecVAE's path alone, written out: the encoder's mu (no dropout), the decoder's linear layer."""
    net = model.module_
    with torch.no_grad():
        batch = SparseBatch.from_csr(x)
        mu, _ = net.encoder(batch.normalized, batch, net.workspace)
        return (mu @ net.decoder.output_weight.T + net.decoder.output_bias).numpy()


def test_the_scores_are_recvaes_logits_plus_w_times_the_linear_paths_by_hand():
    # p 0.25, l2 1: EDLAE's B = [[0, 2/5], [6/19, 0]] (by hand in tests/test_edlae.py)
    model = make_model("recvae-linear", **{**TINY, "batch_size": 5}, l2=1.0, p=0.25, linear_weight=3.0)
    model.fit(TWO_ITEMS, show_progress=False)
    np.testing.assert_allclose(model.module_.linear.numpy(), [[0.0, 2 / 5], [6 / 19, 0.0]], rtol=1e-6)
    x = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32))
    linear = np.array([[0.0, 2 / 5], [6 / 19, 0.0], [6 / 19, 2 / 5]])
    np.testing.assert_allclose(model.score(x), recvae_logits(model, x) + 3.0 * linear, rtol=1e-6, atol=1e-6)
    # p = 0: EASE's B
    ease = make_model("recvae-linear", **{**TINY, "batch_size": 5}, l2=1.0, p=0.0).fit(TWO_ITEMS, show_progress=False)
    np.testing.assert_array_equal(ease.module_.linear.numpy(), EASE(l2=1.0).fit(TWO_ITEMS).B_.astype(np.float32))


def test_with_w_zero_it_is_recvae_bit_for_bit(data):
    train, validation = data
    hybrid = make_model("recvae-linear", **TINY, linear_weight=0.0).fit(train, validation, show_progress=False)
    vae = RecVAE(**TINY).fit(train, validation, show_progress=False)
    assert [h["loss"] for h in hybrid.history_] == [h["loss"] for h in vae.history_]
    assert [h["val_ndcg@100"] for h in hybrid.history_] == [h["val_ndcg@100"] for h in vae.history_]
    np.testing.assert_array_equal(hybrid.score(validation[0]), vae.score(validation[0]))
    mine, theirs = hybrid.module_.state_dict(), vae.module_.state_dict()
    assert set(mine) == {*theirs, "linear_weight"}  # B is not in the state dict; w is
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())


def test_recvae_trains_alone_and_w_x_b_is_added_when_scoring_and_validating(data):
    train, validation = data
    hybrid = make_model("recvae-linear", **TINY, linear_weight=4.0).fit(train, show_progress=False)
    vae = RecVAE(**TINY).fit(train, show_progress=False)
    assert [h["loss"] for h in hybrid.history_] == [h["loss"] for h in vae.history_]
    x = validation[0]
    expected = vae.score(x) + 4.0 * (x @ EDLAE(l2=200.0, p=0.25).fit(train).B_)
    np.testing.assert_allclose(hybrid.score(x), expected, rtol=1e-5, atol=1e-5)
    # with validation users the epoch kept is chosen on the sum's NDCG@100, not RecVAE's
    hybrid = make_model("recvae-linear", **TINY, linear_weight=4.0).fit(train, validation, show_progress=False)
    vae = RecVAE(**TINY).fit(train, validation, show_progress=False)
    on_sum = evaluate(hybrid, *validation, ks=(60,), warn_few=False)["ndcg@60"].mean  # every item, as validation
    assert hybrid.best_score_ == pytest.approx(on_sum, abs=1e-6)
    assert [h["val_ndcg@100"] for h in hybrid.history_] != [h["val_ndcg@100"] for h in vae.history_]


def test_a_planted_structure_is_recovered_better_than_by_either_part_alone():
    # tests/test_hybrid.py's case: group items (low rank, the VAE's part) and item pairs (the linear path's)
    train, _ = planted_pairs_and_groups(400, seed=0)
    _, validation = planted_pairs_and_groups(100, seed=1)
    _, test = planted_pairs_and_groups(100, seed=2)
    net = dict(hidden_dims=(32, 32), latent_dim=4, epochs=60, encoder_epochs=1, lr=3e-3, batch_size=100,
               random_state=0, device="cpu", precision="fp32", patience=None)

    def ndcg(model, part=None):
        fold_in, heldout = test
        if part is not None:  # the group items' or the pair items' share of the held-out items
            heldout = heldout.multiply(sp.csr_matrix(part[None, :].astype(np.float32))).tocsr()
        return evaluate(model, fold_in, heldout, ks=(100,), warn_few=False)["ndcg@100"].mean

    linear = EDLAE(l2=10.0, p=0.0).fit(train)
    vae = RecVAE(**net).fit(train, validation, show_progress=False)
    hybrid = make_model("recvae-linear", **net, l2=10.0, p=0.0, linear_weight=10.0).fit(
        train, validation, show_progress=False)
    groups = np.arange(train.shape[1]) < 200
    scores = {name: (ndcg(m), ndcg(m, groups), ndcg(m, ~groups)) for name, m in
              (("linear", linear), ("vae", vae), ("hybrid", hybrid))}
    # measured: EDLAE (p 0) 0.628 (groups 0.21, pairs 1.0), RecVAE 0.399 (0.21, 0.50), hybrid 0.676 (0.28, 0.985)
    assert scores["hybrid"][0] > scores["linear"][0] + 0.03 and scores["hybrid"][0] > scores["vae"][0] + 0.2, scores
    assert scores["linear"][2] > 0.95 > scores["vae"][2]  # the pairs: the linear path's part
    assert scores["hybrid"][2] > 0.9 and scores["hybrid"][1] > max(scores["linear"][1], scores["vae"][1]), scores


def test_a_catalogue_beyond_the_memory_bound_is_refused_naming_recvae(data):
    with pytest.raises(ParameterError) as info:
        check_linear_memory(41_140, 8.0, "recvae")
    assert str(info.value) == (
        "max_linear_gb: the linear path's dense item-item matrix for 41,140 items needs about 20.3 GB while "
        "fitting (41,140^2 entries x 12 bytes), above max_linear_gb = 8; use the model recvae (no item-item "
        "matrix), or raise max_linear_gb where the memory is there (the model ease alone needs about 13.5 GB)")
    with pytest.raises(ParameterError, match=r"^max_linear_gb: the linear path's dense item-item matrix for 60 "
                                             r"items .* use the model recvae \(no item-item matrix\)"):
        make_model("recvae-linear", **TINY, max_linear_gb=1e-6).fit(data[0], show_progress=False)
    assert not hasattr(RecVAELinear(), "module_")


def test_only_the_scoring_mode_is_offered_and_bad_values_name_themselves():
    # RecVAE trains alone: no joint fit, so neither a mode, a learned w nor the linear path's training input
    for name in ("linear_weight_mode", "linear_weight_lr", "linear_input", "softmax"):
        with pytest.raises(ParameterError, match=rf"^{name}: not a parameter of recvae-linear"):
            make_model("recvae-linear", **{name: "fixed"})
    for params, message in (({"p": 1.0}, "p: expected a probability in [0, 1), got 1.0"),
                            ({"l2": 0.0}, "l2: expected a finite number > 0, got 0.0"),
                            ({"linear_weight": -1.0}, "linear_weight: expected a finite number >= 0, got -1.0"),
                            ({"gamma": -1.0}, "gamma: expected a finite number >= 0, got -1.0")):
        with pytest.raises(ParameterError, match=re.escape(message)):
            make_model("recvae-linear", **params)
    assert issubclass(RecVAELinear, RecVAE) and not issubclass(RecVAELinear, EDLAE)
    # RecVAE's rows, then the linear path's: the very rows of Mult-VAE's hybrid
    assert RecVAELinear.PARAMETERS == (*RecVAE.PARAMETERS, *LINEAR_PATH)
    assert set(LINEAR_PATH) <= set(MultVAELinear.PARAMETERS)


def test_save_and_load_keep_the_linear_path_verified(data, tmp_path):
    train, validation = data
    model = make_model("recvae-linear", **TINY, linear_weight=5.0).fit(train, validation, show_progress=False)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert sorted(meta["files"]) == [LINEAR_FILE, "weights.pt"] and meta["class"] == "RecVAELinear"
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is RecVAELinear and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.module_.linear, model.module_.linear) and float(loaded.module_.linear_weight) == 5.0
    np.testing.assert_array_equal(loaded.score(validation[0]), model.score(validation[0]))
    ids, scores = model.recommend(validation[0], N=10)
    ids2, scores2 = loaded.recommend(validation[0], N=10)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)
    np.savez(tmp_path / "m" / LINEAR_FILE, B=np.zeros((60, 60), np.float32))  # replaced: its digest differs
    with pytest.raises(InputError, match=r"linear\.npz: damaged or replaced: its SHA-256"):
        load_model(tmp_path / "m")


def test_the_command_line_trains_refuses_and_tunes_it(log_csv, tmp_path, capsys):
    argv = ["-q", "train", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--n-heldout-users", "30", "--model", "recvae-linear",
            "--epochs", "2", "--encoder-epochs", "1", "--hidden-dims", "16,16", "--latent-dim", "4",
            "--precision", "fp32", "--device", "cpu"]
    assert main([*argv, "--max-linear-gb", "1e-9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recvae: error: --max-linear-gb: the linear path's dense item-item matrix for ")
    assert "use the model recvae" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--linear-weight-mode", "fixed", "--out", str(tmp_path / "y")]) == 2
    assert "--linear-weight-mode" in capsys.readouterr().err
    assert main([*argv, "--l2", "50", "--p", "0", "--linear-weight", "5", "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"] == "recvae-linear"
    assert {k: run["params"][k] for k in ("l2", "p", "linear_weight")} == {"l2": 50.0, "p": 0.0, "linear_weight": 5.0}
    assert main(["-q", "recommend", str(tmp_path / "run"), "--all-users", "--k", "3",
                 "--output", str(tmp_path / "r.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) > 0
    assert tuning.parse_grid(None, "recvae-linear") == {"gamma": (0.0025, 0.005, 0.01),
                                                        "linear_weight": (3.0, 10.0, 30.0, 100.0, 300.0)}
