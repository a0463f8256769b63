"""RecVAE: composite prior, one-sample KL, alternating phases, learning, save/load, resume, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from checkpoints import ckpt, resume
from recvae.cli import main
from recvae.evaluation import evaluate
from recvae.models import RecVAE, load_model
from recvae.models.training_loop import TrainingLoop
from recvae.models.recvae_network import (
    RecVAENetwork,
    composite_prior_log_density,
    log_normal,
    one_sample_kl,
    sample_with_kl,
)
from recvae.models import load_model as load

from test_cli import train_args
from test_vae import assert_same_weights, weights

SMALL = dict(hidden_dims=(16, 16, 16), latent_dim=4, batch_size=50, random_state=0, device="cpu")


def normal_pdf(x, mu, var):
    return math.exp(-((x - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


# -- prior and KL --------------------------------------------------------------------------------
def test_composite_prior_log_density_matches_the_mixture_by_hand():
    z = torch.tensor([[0.0, 1.0, -3.0]])
    old_mu = torch.tensor([[0.0, 1.0, 2.0]])
    old_logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.5)]])
    got = composite_prior_log_density(z, old_mu, old_logvar)
    want = []
    for x, m, v in [(0.0, 0.0, 1.0), (1.0, 1.0, 4.0), (-3.0, 2.0, 0.5)]:
        want.append(math.log(0.15 * normal_pdf(x, 0, 1) + 0.75 * normal_pdf(x, m, v)
                             + 0.10 * normal_pdf(x, 0, math.exp(10))))
    torch.testing.assert_close(got, torch.tensor([want]), rtol=1e-6, atol=1e-6)
    # z = 0, q_old = N(0, 1): (0.15 + 0.75) N(0; 0, 1) + 0.1 e^-5 N(0; 0, 1)
    assert float(got[0, 0]) == pytest.approx(math.log(0.9 + 0.1 * math.exp(-5)) - 0.5 * math.log(2 * math.pi))
    # far in the tail the wide component dominates: log(0.1 N(50; 0, e^10))
    far = composite_prior_log_density(torch.tensor([[50.0]]), torch.zeros(1, 1), torch.zeros(1, 1))
    assert float(far) == pytest.approx(math.log(0.1) - 0.5 * (10 + math.log(2 * math.pi) + 2500 * math.exp(-10)),
                                       rel=1e-6)


def test_one_sample_kl_by_hand_and_its_mean_is_the_gaussian_kl():
    z = torch.tensor([[1.0, 2.0]])
    mu = torch.tensor([[0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    log_prior = torch.tensor([[-1.0, -2.0]])
    want = (math.log(normal_pdf(1.0, 0, 1)) + 1.0) + (math.log(normal_pdf(2.0, 0, 4)) + 2.0)
    assert float(one_sample_kl(z, mu, logvar, log_prior)) == pytest.approx(want, rel=1e-6)
    # unbiased: with a N(0, 1) prior the mean over samples is KL(N(mu, s^2) || N(0, 1))
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.full((200_000, 1), 0.5), torch.full((200_000, 1), math.log(0.25))
    z = mu + torch.randn(mu.shape, generator=g) * 0.5
    est = float(one_sample_kl(z, mu, logvar, log_normal(z, 0.0, 0.0)).double().mean())
    exact = 0.5 * (-math.log(0.25) + 0.25 + 0.25 - 1)
    assert est == pytest.approx(exact, abs=5e-3)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: z far out, one mixture term holds all the mass
def test_sample_with_kl_gives_autograd_values_and_gradients_of_the_reference_functions(scale):
    g = torch.Generator().manual_seed(0)
    B, K = 7, 5
    mu0 = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    logvar0 = torch.randn(B, K, generator=g, dtype=torch.float64) * 0.5 - 1
    eps = torch.randn(B, K, generator=g, dtype=torch.float64)
    old_mu = torch.randn(B, K, generator=g, dtype=torch.float64)
    old_logvar = torch.randn(B, K, generator=g, dtype=torch.float64) * 0.5
    n = torch.tensor([3.0, 1, 0, 8, 2, 5, 1], dtype=torch.float64)  # a user without items weighs 0
    upstream = torch.randn(B, K, generator=g, dtype=torch.float64)  # the NLL's gradient w.r.t. z
    weights = (0.2, 0.7, 0.1)

    def run(fn):
        mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
        z, kl = fn(mu, logvar)
        ((z * upstream).sum() + 3.0 * kl).backward()
        return z.detach(), kl.detach(), mu.grad, logvar.grad

    def reference(mu, logvar):
        z = mu + eps * torch.exp(0.5 * logvar)
        log_prior = composite_prior_log_density(z, old_mu, old_logvar, weights, 8.0)
        return z, (one_sample_kl(z, mu, logvar, log_prior) * n).mean()

    want = run(reference)
    got = run(lambda mu, logvar: sample_with_kl(mu, logvar, eps, old_mu, old_logvar, n, weights, 8.0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert float(want[2].abs().max()) > 0.1  # the KL moves mu: not a vacuous comparison


def test_encoder_loss_weights_each_users_kl_by_its_interactions(data):
    from recvae.models.sparse_layers import SparseBatch

    net = RecVAENetwork(RecVAE(**SMALL)._config(60), torch.Generator().manual_seed(0))
    X = data[0][:5].copy()
    X.data[: X.indptr[1]] = 3.0  # user 0 counts 3 per item: n_0 = 24, others 8
    batch = SparseBatch.from_csr(X)
    terms = net.encoder_loss(batch, gamma=0.01, generator=torch.Generator().manual_seed(1))
    # the same draws by hand: dropout mask, then eps
    g = torch.Generator().manual_seed(1)
    keep = torch.empty_like(batch.normalized).bernoulli_(0.5, generator=g)
    mu, logvar = net.encoder(batch.normalized * keep / 0.5, batch, net.workspace)
    z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
    old_mu, old_logvar = net.old_encoder(batch.normalized, batch, net.workspace)
    kl_u = one_sample_kl(z, mu, logvar, composite_prior_log_density(z, old_mu, old_logvar))
    n = torch.tensor([24.0, 8, 8, 8, 8])
    torch.testing.assert_close(terms.kl, (n * kl_u).mean())
    torch.testing.assert_close(terms.loss, terms.nll + 0.01 * terms.kl)
    dense = batch.to_dense()
    nll = -(dense * torch.log_softmax(z @ net.decoder.output_weight.T + net.decoder.output_bias, 1)).sum(1).mean()
    torch.testing.assert_close(terms.nll, nll, rtol=1e-5, atol=1e-5)


# -- alternating schedule -----------------------------------------------------------------------
@pytest.mark.slow
def test_each_phase_changes_only_its_half_and_q_old_is_refreshed_between_phases(data, monkeypatch):
    train = data[0]
    snapshots = []  # (desc, state before the pass, state after)
    original = TrainingLoop.pass_over_users

    def spy(self, order, update, epoch, desc):
        before = {k: v.clone() for k, v in self.network.state_dict().items()}
        out = original(self, order, update, epoch, desc)
        snapshots.append((desc, before, {k: v.clone() for k, v in self.network.state_dict().items()}))
        return out

    monkeypatch.setattr(TrainingLoop, "pass_over_users", spy)
    m = RecVAE(**SMALL, epochs=2).fit(train)
    assert [d for d, _, _ in snapshots] == [f"epoch {e} {p}" for e in (1, 2) for p in
                                            ("encoder 1", "encoder 2", "encoder 3", "decoder 4")]

    def part(state, prefix):
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def as_old(state):  # the encoder's tensors under q_old's names
        return {k.replace("encoder.", "old_encoder.", 1): v for k, v in part(state, "encoder.").items()}

    for desc, before, after in snapshots:
        changed, fixed = ("encoder.", "decoder.") if "encoder" in desc else ("decoder.", "encoder.")
        assert same(part(before, fixed), part(after, fixed)), desc  # bit-identical
        assert not any(torch.equal(before[k], after[k]) for k in part(before, changed) if "weight" in k), desc
        assert same(part(before, "old_encoder."), part(after, "old_encoder.")), desc  # never trained
    # q_old is the encoder as it was at the end of the previous encoder phase
    first_decoder, second_encoder = snapshots[3], snapshots[4]
    assert same(part(first_decoder[1], "old_encoder."), as_old(snapshots[2][2]))
    assert same(part(second_encoder[1], "old_encoder."), as_old(snapshots[2][2]))
    assert same(part(snapshots[0][1], "old_encoder."), as_old(snapshots[0][1]))  # at init: a copy
    assert not same(part(snapshots[1][1], "old_encoder."), as_old(snapshots[1][1]))  # not within a phase
    assert m.history_[0]["step"] == 4 * 6 and m.history_[0]["beta"] == 0.005
    assert all(p.requires_grad for p in m.module_.encoder.parameters())


def test_q_olds_posteriors_are_computed_once_per_phase_and_serve_the_decoder_phase(data, monkeypatch):
    """One pass of q_old over the users per phase: at the start of the first epoch, then once after
    each refresh, which serves the decoder phase (q_old is then the frozen encoder) and the next
    epoch's encoder phase; a change of q_old's weights between epochs makes a new pass. The
    decoder phase's posteriors are the encoder's own forward pass of its batch."""
    train = data[0]
    passes, checked = [], []
    original_old, original_dec = RecVAENetwork.old_posterior, RecVAENetwork.decoder_loss

    def old_posterior(self, batch):
        passes.append(batch.n_rows)
        return original_old(self, batch)

    def decoder_loss(self, batch, generator=None, posterior=None):
        assert posterior is not None
        with torch.no_grad():
            mu, logvar = self._encode(batch, None)
        torch.testing.assert_close(posterior[0], mu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior[1], logvar, rtol=1e-5, atol=1e-5)
        checked.append(batch.n_rows)
        return original_dec(self, batch, generator, posterior)

    monkeypatch.setattr(RecVAENetwork, "old_posterior", old_posterior)
    monkeypatch.setattr(RecVAENetwork, "decoder_loss", decoder_loss)
    n = train.shape[0]
    RecVAE(**SMALL, epochs=3).fit(train)
    assert sum(passes) == (2 + 1 + 1) * n  # epoch 1: before and after its refresh; then once per epoch
    assert sum(checked) == 3 * n  # every decoder update read them

    class Nudge:  # changes q_old in place after each epoch: its kept posteriors are stale
        def on_epoch_end(self, info):
            with torch.no_grad():
                info.estimator.module_.old_encoder.head.bias.add_(0.01)

    passes.clear()
    RecVAE(**SMALL, epochs=3).fit(train, callbacks=[Nudge()])
    assert sum(passes) == (2 + 2 + 2) * n


# -- learning -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_planted_clusters_are_recovered(data):
    train, (fi, ho) = data
    m = RecVAE(**{**SMALL, "batch_size": 100, "lr": 1e-2}, epochs=10).fit(train)
    # as in test_vae: 4 held-out items among the 11 unseen items of the user's cluster, 56 unseen
    recall = evaluate(m, fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean
    assert recall > 0.9, recall


@pytest.mark.slow
def test_validation_picks_the_best_outer_epoch_and_early_stops(data, monkeypatch):
    train, val = data
    scores = iter([0.3, 0.5, 0.4, 0.2])
    m = RecVAE(**SMALL, epochs=5, patience=2).fit(train, validation=lambda model: next(scores))
    assert len(m.history_) == 4 and m.stopped_early_ and m.best_epoch_ == 2 and m.best_score_ == 0.5
    assert_same_weights(m, RecVAE(**SMALL, epochs=2).fit(train))


@pytest.mark.parametrize("params, name", [
    (dict(gamma=-1.0), "gamma"), (dict(mixture_weights=(0.5, 0.5)), "mixture_weights"),
    (dict(mixture_weights=(0.2, 0.7, 0.2)), "mixture_weights"), (dict(hidden_dims=(16, 8)), "hidden_dims"),
    (dict(encoder_epochs=0), "encoder_epochs"), (dict(activation="tanh"), "activation"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_bad_hyperparameters_raise_naming_them(data, params, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        RecVAE(**{**SMALL, **params}).fit(data[0])


def test_bf16_runs(data):
    m = RecVAE(**SMALL, epochs=1, precision="bf16").fit(data[0])
    assert math.isfinite(m.history_[0]["loss"])


# -- save / load / resume -----------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_scores(data, tmp_path):
    train, (fi, _) = data
    m = RecVAE(**SMALL, epochs=1, mixture_weights=(0.2, 0.7, 0.1)).fit(train)
    m.save(tmp_path / "m")
    for back in (RecVAE.load(tmp_path / "m"), load(tmp_path / "m"), load_model(tmp_path / "m")):
        assert type(back) is RecVAE
        np.testing.assert_array_equal(back.score(fi), m.score(fi))
        assert back.get_params() == m.get_params() and back.history_ == m.history_
    ids, _ = m.recommend(fi, N=5)
    assert ids.shape == (fi.shape[0], 5) and (ids >= 0).all()


@pytest.mark.slow
def test_resume_continues_to_identical_weights(data, tmp_path):
    train, val = data
    # a finished run removes its checkpoint unless asked to keep it
    RecVAE(**SMALL, epochs=1).fit(train, val, callbacks=[ckpt(tmp_path)])
    resumed = RecVAE(**SMALL, epochs=2).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    straight = RecVAE(**SMALL, epochs=2).fit(train, val)
    assert_same_weights(resumed, straight)
    assert [h["val_ndcg@100"] for h in resumed.history_] == [h["val_ndcg@100"] for h in straight.history_]
    with pytest.raises(ValueError, match="gamma: checkpoint 0.005 vs now 0.01"):
        RecVAE(**SMALL, epochs=3, gamma=0.01).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path))
    assert weights(resumed).keys() == weights(straight).keys()


# -- command line -------------------------------------------------------------------------------
def test_cli_trains_recvae_with_its_flags(log_csv, tmp_path, capsys):
    out = tmp_path / "rv"
    extra = ["--epochs", "1", "--hidden-dims", "16,16", "--latent-dim", "8", "--gamma", "0.01",
             "--encoder-epochs", "2", "--mixture-weights", "0.2,0.7,0.1"]
    assert main(train_args(log_csv, out, model="recvae", extra=extra)) == 0
    params = json.loads((out / "model" / "model.json").read_text())["params"]
    assert params["gamma"] == 0.01 and params["encoder_epochs"] == 2 and params["mixture_weights"] == [0.2, 0.7, 0.1]
    assert params["hidden_dims"] == [16, 16]
    assert main(train_args(log_csv, tmp_path / "bad", model="multvae", extra=["--gamma", "0.1"])) == 2
    assert "--model multvae: does not take --gamma" in capsys.readouterr().err
    assert main(train_args(log_csv, tmp_path / "bad", model="recvae", extra=["--beta", "0.1"])) == 2
    assert "--model recvae: does not take --beta" in capsys.readouterr().err
