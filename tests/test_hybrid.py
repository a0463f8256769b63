"""Mult-VAE with a linear item-item path (``multvae-linear``): the combined logits by hand, the fused
layer's offset against the dense likelihood, w = 0 is Mult-VAE, a planted structure that neither
part recovers alone, the memory bound, save/load, the command line and tune. (The contract tests,
resume included, are tests/test_model_contract.py's; two processes: tests/test_distributed.py.)"""

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
from recvae.models import EASE, EDLAE, MultVAE, MultVAELinear, load_model, make_model
from recvae.models.hybrid import LINEAR_FILE, check_linear_memory
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch
from synthetic import planted_pairs_and_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_dims=(8,), latent_dim=4, epochs=3, batch_size=50, random_state=0, device="cpu", precision="fp32",
            total_anneal_steps=10)
#: users (1,1) twice, (1,0) once, (0,1) twice: X^T X = [[3, 2], [2, 4]] (tests/test_edlae.py's case)
TWO_ITEMS = sp.csr_matrix(np.array([[1, 1], [1, 1], [1, 0], [0, 1], [0, 1]], dtype=np.float32))


def vae_logits(model, x: sp.csr_matrix) -> np.ndarray:
    """The VAE path alone, written out: z = mu, the decoder, the output layer."""
    net = model.module_
    with torch.no_grad():
        mu, _ = net.encode(SparseBatch.from_csr(x))
        h = net._hidden(mu)
        return (h @ net.output_weight.T + net.output_bias).numpy()


def test_the_logits_are_the_vaes_plus_w_times_the_linear_paths_by_hand():
    # p 0.25, l2 1: EDLAE's B = [[0, 2/5], [6/19, 0]] (by hand in tests/test_edlae.py); a user with
    # item 0 alone gets x B = [0, 2/5], so the linear path adds w * 2/5 to item 1 and nothing to item 0
    model = make_model("multvae-linear", **{**TINY, "batch_size": 5}, l2=1.0, p=0.25, linear_weight=3.0,
                       linear_weight_mode="fixed")
    model.fit(TWO_ITEMS, show_progress=False)
    np.testing.assert_allclose(model.module_.linear.numpy(), [[0.0, 2 / 5], [6 / 19, 0.0]], rtol=1e-6)
    x = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32))
    linear = np.array([[0.0, 2 / 5], [6 / 19, 0.0], [6 / 19, 2 / 5]])
    np.testing.assert_allclose(model.score(x), vae_logits(model, x) + 3.0 * linear, rtol=1e-6, atol=1e-6)
    # p = 0: EASE's B, here G_ij / (G_ii + l2): [[0, 2/4], [2/5, 0]]
    ease = make_model("multvae-linear", **{**TINY, "batch_size": 5}, l2=1.0, p=0.0).fit(TWO_ITEMS, show_progress=False)
    np.testing.assert_allclose(ease.module_.linear.numpy(), [[0.0, 0.5], [0.4, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(ease.module_.linear.numpy(), EASE(l2=1.0).fit(TWO_ITEMS).B_.astype(np.float32))


def test_the_fused_likelihood_with_an_offset_is_the_dense_one_with_its_gradients():
    rng = np.random.default_rng(0)
    dense = (rng.random((6, 9)) < 0.4).astype(np.float32)
    dense[5] = 0  # a user without items weighs nothing
    x = sp.csr_matrix(dense)
    batch = SparseBatch.from_csr(x)
    gen = torch.Generator().manual_seed(0)
    h0, W0, b0 = (torch.randn(*s, generator=gen) for s in ((6, 4), (9, 4), (9,)))
    L = torch.randn(6, 9, generator=gen)
    grads = []
    for fused in ("offset", "offset_weight", False):  # w * L given, or w given apart (its gradient in the layer)
        h, W, b = (t.clone().requires_grad_(True) for t in (h0, W0, b0))
        w = torch.tensor(2.5, requires_grad=True)
        if fused == "offset":
            nll = output_layer_nll(h, W, b, batch, offset=w * L)
        elif fused:
            nll = output_layer_nll(h, W, b, batch, offset=L, offset_weight=w)
        else:
            logp = torch.log_softmax(h @ W.T + b + w * L, dim=1)
            nll = -(batch.to_dense() * logp).sum() / 6
        nll.backward()
        grads.append([nll.detach(), h.grad, W.grad, b.grad, w.grad])
    for fused in grads[:2]:
        for a, b in zip(fused, grads[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads[1][4] is not None and abs(float(grads[1][4])) > 1e-3  # w's gradient is there, not zero


def test_bf16_logits_take_a_float32_offset_with_the_mixed_adds_bits():
    """add_offset: bf16 logits + a float32 offset through its float32 buffer round exactly as the
    mixed-dtype add_ does (bf16(float(l) + o)), and a buffer kept from a larger batch serves a smaller one."""
    from recvae.models.output_layer import add_offset
    from recvae.models.sparse_layers import Workspace

    gen = torch.Generator().manual_seed(3)
    ws = Workspace()
    for rows in (7, 5):
        logits = (torch.randn(rows, 33, generator=gen) * 4).bfloat16()
        offset = torch.randn(rows, 33, generator=gen) * 0.37
        expected = (logits.float() + offset).bfloat16()
        got = logits.clone()
        add_offset(got, offset, ws)
        assert torch.equal(got, expected) and torch.equal(got, logits.clone().add_(offset))
        same = offset.clone()
        add_offset(same, offset, ws)  # one dtype: a plain add
        assert torch.equal(same, offset * 2)


def test_with_w_zero_it_is_mult_vae_bit_for_bit(data):
    train, validation = data
    hybrid = make_model("multvae-linear", **TINY, linear_weight=0.0).fit(train, validation, show_progress=False)
    vae = MultVAE(**TINY).fit(train, validation, show_progress=False)
    assert [h["loss"] for h in hybrid.history_] == [h["loss"] for h in vae.history_]
    np.testing.assert_array_equal(hybrid.score(validation[0]), vae.score(validation[0]))


def test_added_when_scoring_the_vae_trains_alone(data):
    # linear_weight_mode="scoring": training is Mult-VAE's (the same updates), the scores add w * x B
    train, validation = data
    hybrid = make_model("multvae-linear", **TINY, linear_weight=4.0, linear_weight_mode="scoring").fit(
        train, show_progress=False)
    vae = MultVAE(**TINY).fit(train, show_progress=False)
    assert [h["loss"] for h in hybrid.history_] == [h["loss"] for h in vae.history_]
    x = validation[0]
    expected = vae.score(x) + 4.0 * (x @ EDLAE(l2=200.0, p=0.25).fit(train).B_)
    np.testing.assert_allclose(hybrid.score(x), expected, rtol=1e-5, atol=1e-5)


def test_the_linear_path_reads_the_dropped_out_input_in_training_when_asked(data):
    train, validation = data
    fits = {inp: make_model("multvae-linear", **TINY, linear_weight_mode="fixed", linear_input=inp).fit(
        train, show_progress=False) for inp in ("full", "dropout")}
    losses = {inp: [h["loss"] for h in m.history_] for inp, m in fits.items()}
    assert losses["full"] != losses["dropout"] and np.isfinite(losses["dropout"]).all()
    # the encoder's own dropout mask (no second draw), the kept raw values scaled by 1/(1-p)
    net = fits["dropout"].module_
    batch = SparseBatch.from_csr(train[:5])
    net.train()
    net._input_values(batch, torch.Generator().manual_seed(0))
    kept = net._kept
    dropped = kept == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(kept[~dropped], batch.values[~dropped] / (1 - TINY.get("dropout", 0.5)))
    net.eval()


@pytest.mark.parametrize("mode", ["fixed", "scoring"])
def test_a_planted_structure_is_recovered_better_than_by_either_part_alone(mode):
    train, _ = planted_pairs_and_groups(400, seed=0)
    _, validation = planted_pairs_and_groups(100, seed=1)
    _, test = planted_pairs_and_groups(100, seed=2)
    net = dict(hidden_dims=(32,), latent_dim=4, epochs=100, lr=3e-3, batch_size=100, random_state=0, device="cpu",
               precision="fp32", patience=None)

    def ndcg(model, part=None):
        fold_in, heldout = test
        if part is not None:  # the group items' or the pair items' share of the held-out items
            heldout = heldout.multiply(sp.csr_matrix(part[None, :].astype(np.float32))).tocsr()
        return evaluate(model, fold_in, heldout, ks=(100,), warn_few=False)["ndcg@100"].mean

    ease = EASE(l2=10.0).fit(train)
    vae = MultVAE(**net).fit(train, validation, show_progress=False)
    hybrid = make_model("multvae-linear", **net, l2=10.0, p=0.0, linear_weight=10.0, linear_weight_mode=mode).fit(
        train, validation, show_progress=False)
    groups = np.arange(train.shape[1]) < 200
    scores = {name: (ndcg(m), ndcg(m, groups), ndcg(m, ~groups)) for name, m in
              (("ease", ease), ("vae", vae), ("hybrid", hybrid))}
    # measured (fixed w): EASE 0.624 (groups 0.20, pairs 1.0), VAE 0.383 (0.22, 0.46), hybrid 0.694 (0.30, 0.98)
    assert scores["hybrid"][0] > scores["ease"][0] + 0.03 and scores["hybrid"][0] > scores["vae"][0] + 0.2, scores
    assert scores["ease"][2] > 0.95 > scores["vae"][2]  # the pairs: the linear path's part
    assert scores["hybrid"][2] > 0.9 and scores["hybrid"][1] > max(scores["ease"][1], scores["vae"][1]), scores


def test_a_learned_weight_moves_and_keeps_its_own_learning_rate(data):
    train, validation = data
    model = make_model("multvae-linear", **TINY, linear_weight=2.0, linear_weight_mode="learned",
                       linear_weight_lr=0.1).fit(train, validation, show_progress=False)
    w = model.module_.linear_weight
    assert isinstance(w, torch.nn.Parameter)
    w = float(w.detach())
    # 6 updates of Adam at lr 0.1 move w by at most 0.6; at the network's lr 1e-3 it would stay near 2
    assert 0.05 < abs(w - 2.0) <= 0.6 + 1e-6
    fixed = make_model("multvae-linear", **TINY, linear_weight=2.0, linear_weight_mode="fixed").fit(
        train, validation, show_progress=False)
    assert float(fixed.module_.linear_weight) == 2.0 and "linear_weight" in fixed.module_.state_dict()


def test_a_learned_weight_scales_the_path_in_every_mode_with_or_without_gradients(data):
    """A learned w reaches the output layer apart from the scores in a training loss; every
    forward, in training or eval mode and with or without gradients, adds w * x B all the same."""
    train, validation = data
    model = make_model("multvae-linear", **TINY, linear_weight=3.0, linear_weight_mode="learned").fit(
        train, validation, show_progress=False)
    net = model.module_
    batch = SparseBatch.from_csr(sp.csr_matrix(train[:20], dtype=np.float32))
    for training in (True, False):
        net.train(training)
        scores, w = net._offset(batch)
        assert w is net.linear_weight  # with gradients: w apart
        with torch.no_grad():
            scaled, none = net._offset(batch)
            outs = [net(batch, torch.Generator().manual_seed(0)) for _ in range(2)]
        assert none is None
        torch.testing.assert_close(scaled, w.detach() * scores.detach())
        grad_out = net(batch, torch.Generator().manual_seed(0))
        torch.testing.assert_close(grad_out.detach(), outs[0])
        torch.testing.assert_close(outs[1], outs[0])


def test_bf16_training_runs_the_offset_through_autocast(data):
    train, validation = data
    runs = [make_model("multvae-linear", **{**TINY, "precision": precision}, linear_weight_mode="learned").fit(
        train, validation, show_progress=False) for precision in ("fp32", "bf16")]
    assert runs[1].precision_ == "bf16"
    for a, b in zip(*(r.history_ for r in runs)):
        assert np.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert float(runs[1].module_.linear_weight.detach()) == pytest.approx(float(runs[0].module_.linear_weight.detach()),
                                                                         abs=0.05)


def test_a_catalogue_beyond_the_memory_bound_is_refused_in_one_line(data):
    with pytest.raises(ParameterError) as info:
        check_linear_memory(41_140, 8.0)
    assert str(info.value) == (
        "max_linear_gb: the linear path's dense item-item matrix for 41,140 items needs about 20.3 GB while "
        "fitting (41,140^2 entries x 12 bytes), above max_linear_gb = 8; use the model multvae (no item-item "
        "matrix), or raise max_linear_gb where the memory is there (the model ease alone needs about 13.5 GB)")
    check_linear_memory(20_108, 8.0)  # ML-20M: 4.9 GB
    with pytest.raises(ParameterError, match=r"^max_linear_gb: the linear path's dense item-item matrix for 60 items"):
        make_model("multvae-linear", **TINY, max_linear_gb=1e-6).fit(data[0], show_progress=False)


def test_save_and_load_keep_the_linear_path_verified(data, tmp_path):
    train, validation = data
    model = make_model("multvae-linear", **TINY, linear_weight_mode="learned").fit(train, validation,
                                                                                   show_progress=False)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert sorted(meta["files"]) == [LINEAR_FILE, "weights.pt"] and meta["class"] == "MultVAELinear"
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is MultVAELinear and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.module_.linear, model.module_.linear)
    np.testing.assert_array_equal(loaded.score(validation[0]), model.score(validation[0]))
    np.savez(tmp_path / "m" / LINEAR_FILE, B=np.zeros((60, 60), np.float32))  # replaced: its digest differs
    with pytest.raises(InputError, match=r"linear\.npz: damaged or replaced: its SHA-256"):
        load_model(tmp_path / "m")


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """300 users in 6 taste clusters over 120 items, all positives (default column names)."""
    rng = np.random.default_rng(11)
    rows = [(u, int(i), 5) for u in range(300)
            for i in rng.choice(np.arange(u % 6 * 20, u % 6 * 20 + 20), size=12, replace=False)]
    path = tmp_path_factory.mktemp("hybrid") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def test_the_command_line_trains_refuses_and_tunes_it(log_csv, tmp_path, capsys):
    argv = ["-q", "train", "--data", str(log_csv), "--n-heldout-users", "30", "--model", "multvae-linear",
            "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "4", "--precision", "fp32", "--device", "cpu"]
    assert main([*argv, "--max-linear-gb", "1e-9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recvae: error: --max-linear-gb: the linear path's dense item-item matrix for 120 items")
    assert "raise --max-linear-gb where the memory is there" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--l2", "50", "--p", "0", "--linear-weight", "5", "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"] == "multvae-linear"
    assert {k: run["params"][k] for k in ("l2", "p", "linear_weight")} == {"l2": 50.0, "p": 0.0, "linear_weight": 5.0}
    assert main(["-q", "recommend", str(tmp_path / "run"), "--all-users", "--k", "3",
                 "--output", str(tmp_path / "r.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == 3 * 300
    assert tuning.parse_grid(None, "multvae-linear") == {"latent_dim": (50, 200), "linear_weight": (3.0, 10.0, 30.0, 100.0, 300.0)}
    assert main(["-q", "tune", "--data", str(log_csv), "--n-heldout-users", "30", "--model", "multvae-linear",
                 "--grid", "linear_weight=1,10", "--epochs", "2", "--hidden-dims", "16", "--latent-dim", "4",
                 "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "tune")]) == 0
    table = pd.read_csv(tmp_path / "tune" / "tuning.csv")
    assert list(table["trial"]) == ["linear_weight=1", "linear_weight=10"] and table["selected"].sum() == 1


def test_bad_hyperparameters_name_themselves():
    for params, message in (({"p": 1.0}, "p: expected a probability in [0, 1), got 1.0"),
                            ({"l2": 0.0}, "l2: expected a finite number > 0, got 0.0"),
                            ({"linear_weight_mode": "both"}, "linear_weight_mode: expected one of 'fixed', 'learned'"),
                            ({"linear_weight": -1.0}, "linear_weight: expected a finite number >= 0, got -1.0")):
        with pytest.raises(ParameterError, match=re.escape(message)):
            make_model("multvae-linear", **params)
    assert issubclass(MultVAELinear, MultVAE) and not issubclass(MultVAELinear, EDLAE)
