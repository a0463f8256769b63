"""MultVAE / MultDAE estimators: defaults, schedules, training, determinism, checkpoints, save/load."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from checkpoints import ckpt, resume
from recvae.data import Interactions
from recvae.evaluation import evaluate
from recvae.models.annealing import ConstantBeta, LinearAnnealing, cap_from_history, make_schedule
from recvae.models.networks import MultNetwork
from recvae.models import load_model as load
from recvae.models.training_loop import CheckpointMismatch
from recvae.models.vae import MultDAE, MultVAE, NonFiniteLossError
from recvae.rundir import RunDir
from synthetic import planted

SMALL = dict(hidden_dims=(16,), latent_dim=4, batch_size=50, random_state=0, device="cpu")


def weights(model):
    return {k: v.detach().clone() for k, v in model.module_.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- defaults and parameters ----------------------------------------------------------------------
def test_vae_defaults_are_the_notebooks():
    # but early stopping: the notebook trains every epoch (patience=None), the library stops after 50
    # epochs without a validation gain (recvae.models.vae.PATIENCE)
    assert MultVAE().get_params() == dict(
        hidden_dims=(600,), latent_dim=200, dropout=0.5, activation="tanh", lam=0.0, anneal_cap=0.2,
        total_anneal_steps=200_000, beta=None, kl_weighting="uniform", epochs=200, batch_size=500, lr=1e-3, patience=50,
        random_state=0, device="auto", precision="auto", eval_batch_size=2000, parallel="data",
        softmax="full", n_negatives=1000, proposal="uniform", proposal_alpha=0.75)  # the paper's full softmax


def test_dae_defaults_are_the_notebooks():
    p = MultDAE().get_params()
    # notebook: p_dims=[200, n_items] (I-200-I) and lam=0.01/batch_size
    assert p["hidden_dims"] == () and p["latent_dim"] == 200 and p["lam"] == pytest.approx(2e-5)
    assert (p["dropout"], p["activation"], p["epochs"], p["batch_size"], p["lr"]) == (0.5, "tanh", 200, 500, 1e-3)
    assert "anneal_cap" not in p and "beta" not in p


def test_init_only_stores_and_set_params_checks_names():
    m = MultVAE(batch_size=-3)  # no validation before fit
    assert m.batch_size == -3
    assert m.set_params(batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="batsize"):
        m.set_params(batsize=1)


@pytest.mark.parametrize(
    "params, name",
    [({"batch_size": 0}, "batch_size"), ({"epochs": 1.5}, "epochs"), ({"dropout": 1.0}, "dropout"),
     ({"precision": "fp16"}, "precision"), ({"lr": 0}, "lr"), ({"activation": "gelu"}, "activation"),
     ({"anneal_cap": -1}, "anneal_cap"), ({"random_state": "x"}, "random_state"), ({"patience": 0}, "patience"),
     ({"device": "tpu9"}, "device"), ({"hidden_dims": (0,)}, "hidden_dims"), ({"lam": -1.0}, "lam"),
     ({"kl_weighting": "per-item"}, "kl_weighting")],
)
def test_bad_hyperparameters_raise_naming_them(data, params, name):
    with pytest.raises(ValueError, match=name):
        MultVAE(**{**SMALL, "epochs": 1, **params}).fit(data[0])


def test_bad_inputs_raise_naming_them(data):
    train, (fi, ho) = data
    with pytest.raises(TypeError, match="train"):
        MultVAE(**SMALL, epochs=1).fit(train.toarray().tolist())
    with pytest.raises(TypeError, match="validation"):
        MultVAE(**SMALL, epochs=1).fit(train, validation=fi)
    with pytest.raises(ValueError, match="validation fold_in"):
        MultVAE(**SMALL, epochs=1).fit(train, validation=(fi[:, :10], ho[:, :10]))
    neg = train.copy()
    neg.data[0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        MultVAE(**SMALL, epochs=1).fit(neg)
    with pytest.raises(CheckpointMismatch, match="is not a recvae checkpoint"):
        MultVAE(**SMALL, epochs=1).fit(train, resume_from={"epoch": 1})
    with pytest.raises(RuntimeError, match="not fitted"):
        MultVAE().score(train)


# -- beta schedules -----------------------------------------------------------------------------
def test_linear_annealing_is_min_of_cap_and_step_fraction():
    s = LinearAnnealing(cap=0.2, total_steps=1000)
    assert [s(0), s(100), s(200), s(5000)] == [0.0, 0.1, 0.2, 0.2]
    assert LinearAnnealing(cap=0.3, total_steps=0)(0) == 0.3  # no annealing: the cap throughout
    assert LinearAnnealing() == LinearAnnealing(0.2, 200_000)  # notebook values
    assert ConstantBeta(0.5)(10**9) == 0.5
    assert make_schedule(None, 0.2, 10) == LinearAnnealing(0.2, 10)
    assert make_schedule(1.0, 0.2, 10) == ConstantBeta(1.0)
    with pytest.raises(ValueError, match="total_anneal_steps"):
        LinearAnnealing(0.2, -1)


def test_beta_follows_the_schedule_per_update_and_best_beta_is_recorded(data):
    train, val = data  # 300 users / 50 = 6 updates per epoch
    m = MultVAE(**SMALL, epochs=4, anneal_cap=1.0, total_anneal_steps=10).fit(train, val)
    # beta of the last update of epoch e is min(1, (6e - 1) / 10)
    assert [h["beta"] for h in m.history_] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert [h["step"] for h in m.history_] == [6, 12, 18, 24]
    assert m.best_beta_ == m.history_[m.best_epoch_ - 1]["beta"]
    assert cap_from_history(m.history_) == m.best_beta_
    with pytest.raises(ValueError, match="history"):
        cap_from_history([{"beta": 0.1, "val_ndcg@100": None}])


# -- training -----------------------------------------------------------------------------------
def test_fit_returns_self_with_learned_attributes(data):
    train, val = data
    ids = np.array([f"item{i}" for i in range(train.shape[1])])
    inter = Interactions(train, np.arange(train.shape[0]), ids)
    m = MultVAE(**SMALL, epochs=2)
    assert m.fit(inter, val) is m
    assert isinstance(m.module_, MultNetwork) and m.n_items_ == 60
    assert m.item_ids_.tolist() == ids.tolist()
    assert len(m.history_) == 2 and set(m.history_[0]) >= {"loss", "nll", "kl", "beta", "val_ndcg@100", "seconds"}
    h = m.history_[0]
    assert h["loss"] == pytest.approx(h["nll"] + 0 * h["kl"], abs=h["kl"] * 0.01 + 1e-6)  # beta ~ 0 early
    assert m.best_epoch_ in (1, 2) and 0 < m.best_score_ <= 1
    scores = m.score(val[0])
    assert scores.shape == (100, 60) and scores.dtype == np.float32


def test_same_seed_same_weights_other_seed_differs(data):
    train, val = data
    a = MultVAE(**SMALL, epochs=2).fit(train, val)
    b = MultVAE(**SMALL, epochs=2).fit(train, val)
    assert_same_weights(a, b)
    c = MultVAE(**{**SMALL, "random_state": 1}, epochs=2).fit(train, val)
    assert not torch.equal(a.module_.input_weight, c.module_.input_weight)


@pytest.mark.parametrize("cls", [MultVAE, MultDAE])
def test_planted_clusters_are_learned_and_random_scores_fail(data, cls):
    train, (fi, ho) = data
    params = {**SMALL, "epochs": 30, "batch_size": 100, "lr": 3e-3}
    if cls is MultVAE:
        params["total_anneal_steps"] = 60
    else:
        params.update(hidden_dims=(), latent_dim=16)  # a 4-d tanh code is too narrow here
    m = cls(**params).fit(train)
    # each validation user has 4 held-out items among the 11 unseen items of its cluster (56
    # unseen in all): ranking the cluster first gives Recall@11 = 1, chance gives ~11/56
    recall = evaluate(m, fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean

    class Random:
        def score(self, X):
            return np.random.default_rng(0).random(X.shape).astype(np.float32)

    chance = evaluate(Random(), fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean
    assert recall > 0.9 and chance < 0.3, (recall, chance)


def test_bf16_training_runs_and_learns(data):
    train, (fi, ho) = data
    m = MultVAE(**{**SMALL, "batch_size": 100, "lr": 3e-3}, epochs=20, total_anneal_steps=60,
                precision="bf16").fit(train)
    assert m.history_[-1]["nll"] < m.history_[0]["nll"]
    assert evaluate(m, fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean > 0.8


def test_early_stopping_restores_the_best_epochs_weights(data, monkeypatch):
    train, val = data
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    m = MultVAE(**SMALL, epochs=5, patience=2).fit(train, validation=lambda model: next(scores))  # a function
    assert len(m.history_) == 3 and m.stopped_early_ and m.best_epoch_ == 1
    assert [h["val_ndcg@100"] for h in m.history_] == [0.5, 0.4, 0.3]
    one = MultVAE(**SMALL, epochs=1).fit(train)
    assert_same_weights(m, one)


def test_activity_kl_weighting_changes_nothing_when_every_user_has_as_many_items(data):
    train = data[0]  # planted(): every user has 8 items, so every weight n_u / mean n is 1
    uniform = MultVAE(**SMALL, epochs=2, anneal_cap=1.0, total_anneal_steps=10).fit(train)
    activity = MultVAE(**SMALL, epochs=2, anneal_cap=1.0, total_anneal_steps=10, kl_weighting="activity").fit(train)
    assert_same_weights(uniform, activity)


def test_activity_kl_weighting_passes_n_u_over_mean_n_per_user(monkeypatch):
    # half the users have 4 items, half 12: weights 0.5 and 1.5 (mean n = 8)
    X = sp.vstack([planted(n_users=100, per_user=4, seed=1), planted(n_users=100, per_user=12, seed=2)]).tocsr()
    seen = []
    original = MultNetwork.loss

    def spy(self, batch, beta=1.0, generator=None, kl_weights=None):
        seen.append((batch.row_sums.clone(), None if kl_weights is None else kl_weights.clone()))
        return original(self, batch, beta=beta, generator=generator, kl_weights=kl_weights)

    monkeypatch.setattr(MultNetwork, "loss", spy)
    kw = dict(SMALL, epochs=1, beta=1.0)
    uniform = MultVAE(**kw).fit(X)
    assert all(w is None for _, w in seen)
    seen.clear()
    activity = MultVAE(**kw, kl_weighting="activity").fit(X)
    assert len(seen) == 4  # 200 users / batches of 50
    for n, w in seen:
        torch.testing.assert_close(w, torch.where(n == 4, 0.5, 1.5))
    assert not np.allclose(weights(uniform)["input_weight"], weights(activity)["input_weight"])


def test_lam_adds_the_l2_penalty_gradient(data):
    train, _ = data
    m = MultDAE(**{**SMALL, "hidden_dims": ()}, epochs=1).fit(train)
    w = [p.detach() for p in m.module_.weight_matrices()]
    assert m.history_[0]["l2"] == pytest.approx(2e-5 * sum(float((p**2).sum()) for p in w), rel=1e-4)
    assert MultVAE(**SMALL, epochs=1).fit(train).history_[0]["l2"] == 0.0


# -- non-finite loss ----------------------------------------------------------------------------
def test_non_finite_loss_names_epoch_and_update_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    train, val = data
    MultVAE(**SMALL, epochs=1).fit(train, val, callbacks=[ckpt(tmp_path)])
    before = (tmp_path / "checkpoint.pt").read_bytes()
    original = MultNetwork.loss
    calls = {"n": 0}

    def poisoned(self, batch, beta=1.0, generator=None, kl_weights=None):
        terms = original(self, batch, beta, generator, kl_weights)
        calls["n"] += 1
        if calls["n"] == 3:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(MultNetwork, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, update 9 \(batch 3/6\)"):
        MultVAE(**SMALL, epochs=3).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 6


def test_huge_learning_rate_is_caught_as_non_finite(data):
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        MultDAE(**SMALL, epochs=2, lr=1e30).fit(data[0])


# -- checkpoints and resume -----------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_to_identical_weights(data, tmp_path):
    train, val = data
    MultVAE(**SMALL, epochs=2).fit(train, val, callbacks=[ckpt(tmp_path)])
    resumed = MultVAE(**SMALL, epochs=4).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    straight = MultVAE(**SMALL, epochs=4).fit(train, val)
    assert_same_weights(resumed, straight)
    assert [h["val_ndcg@100"] for h in resumed.history_] == [h["val_ndcg@100"] for h in straight.history_]
    assert resumed.best_epoch_ == straight.best_epoch_
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss") and len(rows) == 5
    assert len(json.loads((tmp_path / "history.json").read_text())) == 4


def test_resume_after_a_crash_mid_epoch(data, tmp_path, monkeypatch):
    train, val = data
    original = MultNetwork.loss
    calls = {"n": 0}

    def crashing(self, batch, beta=1.0, generator=None, kl_weights=None):
        calls["n"] += 1
        if calls["n"] == 16:  # epoch 3, batch 4
            raise KeyboardInterrupt
        return original(self, batch, beta, generator, kl_weights)

    monkeypatch.setattr(MultNetwork, "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        MultDAE(**SMALL, epochs=4).fit(train, val, callbacks=[ckpt(tmp_path)])
    monkeypatch.undo()
    resumed = MultDAE(**SMALL, epochs=4).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    assert_same_weights(resumed, MultDAE(**SMALL, epochs=4).fit(train, val))


def test_resume_refuses_other_hyperparameters_or_data(data, tmp_path):
    train, val = data
    MultVAE(**SMALL, epochs=1).fit(train, callbacks=[ckpt(tmp_path)])
    with pytest.raises(ValueError, match="dropout: checkpoint 0.5 vs now 0.3"):
        MultVAE(**{**SMALL, "dropout": 0.3}, epochs=2).fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    with pytest.raises(ValueError, match="other data"):
        MultVAE(**SMALL, epochs=2).fit(train[:-1], callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    with pytest.raises(ValueError, match="MultVAE checkpoint"):
        MultDAE(**SMALL, epochs=2).fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    with pytest.raises(ValueError, match="kl_weighting: checkpoint 'uniform' vs now 'activity'"):
        MultVAE(**SMALL, epochs=2, kl_weighting="activity").fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))


def test_fit_writes_no_file_and_checkpoint_callbacks_write_after_each_epoch(data, tmp_path, monkeypatch):
    train, val = data
    monkeypatch.chdir(tmp_path)
    m = MultVAE(**SMALL, epochs=2).fit(train, val)
    assert list(tmp_path.iterdir()) == [], "an estimator writes nothing"
    seen = []

    class Spy:
        def on_epoch_end(self, epoch):
            seen.append((epoch.row["epoch"], len(epoch.history), epoch.checkpoint()["epoch"]))

    kept = MultVAE(**SMALL, epochs=2).fit(train, val, callbacks=[Spy(), ckpt(tmp_path / "k")])
    assert seen == [(1, 1, 1), (2, 2, 2)]
    assert_same_weights(kept, m)
    assert RunDir(tmp_path / "k").checkpoint_epoch() == 2
    assert len(json.loads((tmp_path / "k" / "history.json").read_text())) == 2
    # the best epoch was the last: its weights are not stored twice
    state = torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)
    assert kept.best_epoch_ == 2 and state["best_epoch"] == 2 and state["best_state"] is None


def test_resume_may_lower_the_learning_rate(data, tmp_path):
    train, _ = data
    MultVAE(**SMALL, epochs=1).fit(train, callbacks=[ckpt(tmp_path)])
    slow = MultVAE(**SMALL, epochs=2, lr=1e-4).fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-4, 1e-4]
    # epoch 2 at lr 1e-3 and at 1e-4 start from the same weights; the step sizes differ tenfold
    MultVAE(**SMALL, epochs=1).fit(train, callbacks=[ckpt(tmp_path / "b")])
    fast = MultVAE(**SMALL, epochs=2).fit(train, callbacks=[ckpt(tmp_path / "b")], resume_from=resume(tmp_path / "b"))
    first = MultVAE(**SMALL, epochs=1).fit(train)
    w0, ws, wf = weights(first), weights(slow), weights(fast)
    moved_slow = sum(float((ws[k] - w0[k]).abs().sum()) for k in w0)
    moved_fast = sum(float((wf[k] - w0[k]).abs().sum()) for k in w0)
    assert 0 < moved_slow < 0.3 * moved_fast


@pytest.mark.parametrize("with_validation", [True, False])
def test_non_finite_loss_keeps_the_best_or_last_epoch_as_the_model(data, tmp_path, monkeypatch, with_validation):
    train, val = data
    val = val if with_validation else None
    reference = MultVAE(**SMALL, epochs=2).fit(train, val)
    original = MultNetwork.loss
    calls = {"n": 0}

    def poisoned(self, batch, beta=1.0, generator=None, kl_weights=None):
        terms = original(self, batch, beta, generator, kl_weights)
        calls["n"] += 1
        if calls["n"] == 14:  # epoch 3 (6 updates an epoch), update 2
            terms.loss = terms.loss * float("inf")
        return terms

    monkeypatch.setattr(MultNetwork, "loss", poisoned)
    m = MultVAE(**SMALL, epochs=5)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, update 14 .*kept the weights of epoch (\d)") as info:
        m.fit(train, val, callbacks=[ckpt(tmp_path)])
    assert (info.value.epoch, info.value.update) == (3, 14)
    # the reference ran the same two epochs and kept the same epoch
    assert info.value.kept_epoch == reference.best_epoch_ == m.best_epoch_
    assert (info.value.kept_epoch == 2) if val is None else info.value.kept_epoch in (1, 2)
    assert_same_weights(m, reference)
    assert len(m.history_) == 2 and m.stopped_early_
    assert RunDir(tmp_path).checkpoint_epoch() == 2, "the checkpoint stays for a resume with a lower lr"


def test_non_finite_loss_at_epoch_1_fits_nothing(data, tmp_path):
    m = MultDAE(**SMALL, epochs=2, lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, update 3 \(batch 3/6\) with lr 1e\+30: no epoch finished") as info:
        m.fit(data[0], callbacks=[ckpt(tmp_path)])
    assert info.value.kept_epoch is None and not hasattr(m, "history_")
    assert RunDir(tmp_path).checkpoint_epoch() is None


def test_resume_reads_a_checkpoint_from_before_kl_weighting_as_uniform(data, tmp_path):
    train, _ = data
    MultVAE(**SMALL, epochs=1).fit(train, callbacks=[ckpt(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    params = json.loads(state["params"])
    del params["kl_weighting"]
    state["params"] = json.dumps(params)
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = MultVAE(**SMALL, epochs=2).fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    assert len(resumed.history_) == 2
    with pytest.raises(ValueError, match="kl_weighting: checkpoint 'uniform' vs now 'activity'"):
        MultVAE(**SMALL, epochs=3, kl_weighting="activity").fit(train, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))


# -- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MultVAE, MultDAE])
def test_save_load_round_trip_gives_identical_scores(data, tmp_path, cls):
    train, (fi, _) = data
    ids = np.arange(100, 160)
    m = cls(**SMALL, epochs=1).fit(Interactions(train, np.arange(300), ids))
    m.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "weights.pt"]
    back = cls.load(tmp_path / "m")
    np.testing.assert_array_equal(back.score(fi), m.score(fi))
    assert back.get_params() == m.get_params()
    assert back.item_ids_.tolist() == ids.tolist() and back.history_ == m.history_
    assert type(load(tmp_path / "m")) is cls


def test_load_errors(data, tmp_path):
    MultDAE(**SMALL, epochs=1).fit(data[0]).save(tmp_path)
    with pytest.raises(ValueError, match="holds a MultDAE"):
        MultVAE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.json"):
        load(tmp_path / "nowhere")


def test_weights_file_is_a_plain_state_dict(data, tmp_path):
    m = MultVAE(**SMALL, epochs=1).fit(data[0])
    m.save(tmp_path)
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(state) == set(m.module_.state_dict())


# -- real data ----------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.slow
def test_vae_and_dae_beat_popularity_on_ml100k_validation(real_data_dir):
    from recvae.data import load_movielens, strong_generalization_split
    from recvae.models import Popularity

    data = load_movielens("ml-100k", real_data_dir, download=False, show_progress=False)
    split = strong_generalization_split(data, seed=0)
    pop = evaluate(Popularity().fit(split.train), split.validation, ks=(100,))["ndcg@100"].mean
    common = dict(random_state=0, device="cpu", epochs=40, batch_size=100)
    vae = MultVAE(**common, total_anneal_steps=1000).fit(split.train, split.validation)
    dae = MultDAE(**common).fit(split.train, split.validation)
    # measured (seed 0, 94 validation users): VAE 0.447, DAE 0.443, popularity 0.250 (stderr 0.018)
    assert vae.best_score_ > pop + 0.1, (vae.best_score_, pop)
    assert dae.best_score_ > pop + 0.1, (dae.best_score_, pop)


def test_precision_auto_resolves_by_hardware(monkeypatch):
    from recvae.models import device as vae_mod

    cpu = torch.device("cpu")
    assert vae_mod.resolve_precision("fp32", cpu) == "fp32"
    assert vae_mod.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(vae_mod, "cpu_has_fast_bf16", lambda: True)
    assert vae_mod.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(vae_mod, "cpu_has_fast_bf16", lambda: False)
    assert vae_mod.resolve_precision("auto", cpu) == "fp32"
    x = sp.random(40, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data[:] = 1
    model = MultDAE(epochs=1, batch_size=20, random_state=0, precision="auto").fit(x)
    assert model.precision_ == "fp32"


def test_recvae_cpu_bf16_overrides_what_the_cpu_says(monkeypatch):
    from recvae.models import device

    cpu = torch.device("cpu")
    monkeypatch.setenv("RECVAE_CPU_BF16", "0")
    assert not device.cpu_has_fast_bf16() and device.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("RECVAE_CPU_BF16", "1")
    assert device.cpu_has_fast_bf16() and device.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setenv("RECVAE_CPU_BF16", "yes")
    with pytest.raises(ValueError, match=r"RECVAE_CPU_BF16 must be 0 \(no fast bf16\) or 1 \(fast bf16\), got 'yes'"):
        device.cpu_has_fast_bf16()


def test_explicit_bf16_where_it_is_emulated_warns_once_with_the_slowdown(monkeypatch, caplog):
    from recvae.models import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "_warned_emulated_bf16", False)
    monkeypatch.setenv("RECVAE_CPU_BF16", "1")  # native: nothing to say
    with caplog.at_level(logging.WARNING, logger="recvae"):
        assert device.resolve_precision("bf16", cpu) == "bf16"
    assert caplog.records == []
    monkeypatch.setenv("RECVAE_CPU_BF16", "0")
    with caplog.at_level(logging.WARNING, logger="recvae"):
        assert device.resolve_precision("auto", cpu) == "fp32"  # auto avoids it: no warning
        assert device.resolve_precision("fp32", cpu) == "fp32"
        assert caplog.records == []
        assert device.resolve_precision("bf16", cpu) == "bf16"  # kept as asked, and said once
        assert device.resolve_precision("bf16", cpu) == "bf16"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].name == "recvae.models.device"
    assert caplog.messages == [
        "precision 'bf16' on a CPU without native bf16 (no AVX-512 BF16 or AMX): it is emulated and slow "
        "(measured: a Mult-VAE epoch on a 6,000 x 3,500 matrix took 16.2 s in bf16 against 0.9 s in fp32, "
        "~18x slower); use precision 'auto' or 'fp32'"
    ]


def test_the_library_reports_each_epoch_through_logging_by_default(data, caplog):
    """show_progress is on by default (as in implicit): away from a terminal, one plain INFO line
    per epoch through logging, no control characters; off, nothing."""
    train, _ = data
    with caplog.at_level("INFO", logger="recvae.models.training_loop"):
        MultVAE(**SMALL, epochs=3).fit(train)
    lines = [r.getMessage() for r in caplog.records if r.name == "recvae.models.training_loop"]
    assert [line.split(",")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], lines
    assert all("\r" not in line and "\x1b" not in line for line in lines)
    caplog.clear()
    with caplog.at_level("INFO", logger="recvae.models.training_loop"):
        MultVAE(**SMALL, epochs=3).fit(train, show_progress=False)
    assert not [r for r in caplog.records if r.name == "recvae.models.training_loop"]
