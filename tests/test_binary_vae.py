"""BinaryMultVAE: the Bernoulli KL, straight-through and relaxed samples, learning, codes, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recvae.cli import main
from recvae.evaluation import evaluate
from recvae.models import BinaryMultVAE, load_model
from recvae.models.networks import MultBernoulliNetwork, NetworkConfig, bernoulli_kl
from recvae.models.sparse_layers import SparseBatch

from test_cli import train_args

SMALL = dict(hidden_dims=(16,), latent_dim=12, batch_size=50, random_state=0, device="cpu")


def test_bernoulli_kl_hand_values_and_stability():
    # p = 0.5: 0; certainty: log 2 per bit; p = 0.8: 0.8 log 0.8 + 0.2 log 0.2 + log 2
    assert float(bernoulli_kl(torch.zeros(2, 5))) == pytest.approx(0.0, abs=1e-7)
    extreme = torch.tensor([[100.0, -100.0, 100.0], [-100.0, -100.0, 100.0]])
    assert float(bernoulli_kl(extreme)) == pytest.approx(3 * math.log(2), rel=1e-6)
    l = torch.tensor([[math.log(4.0)]])  # sigmoid = 0.8
    want = 0.8 * math.log(0.8) + 0.2 * math.log(0.2) + math.log(2)
    assert float(bernoulli_kl(l)) == pytest.approx(want, rel=1e-5)
    # users weighted, then averaged: (2 * log 2 + 0) / 2
    w = bernoulli_kl(torch.tensor([[100.0], [0.0]]), weights=torch.tensor([2.0, 5.0]))
    assert float(w) == pytest.approx(math.log(2), rel=1e-6)
    big = torch.tensor([[1e4, -1e4, 88.0, -88.0]], requires_grad=True)
    value = bernoulli_kl(big)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.grad).all()


def _network(temperature=None):
    net = MultBernoulliNetwork(NetworkConfig(n_items=60, hidden_dims=(16,), latent_dim=12, latent="bernoulli"),
                               torch.Generator().manual_seed(0))
    net.temperature = temperature
    return net


def test_straight_through_bits_forward_and_probability_gradient_backward(data):
    net = _network()
    batch = SparseBatch.from_csr(data[0][:20])
    net.train()
    z, (logits,) = net._latent(batch, torch.Generator().manual_seed(1))
    assert set(torch.unique(z.detach()).tolist()) <= {0.0, 1.0}  # forward: hard bits
    p = torch.sigmoid(logits)
    (grad_z_via_p,) = torch.autograd.grad((z * torch.arange(12.0)).sum(), logits)
    torch.testing.assert_close(grad_z_via_p, torch.arange(12.0) * p * (1 - p))  # d bit / d p := 1
    terms = net.loss(batch, beta=0.5, generator=torch.Generator().manual_seed(1))
    terms.loss.backward()
    for w in [net.input_weight, net.encoder[0].weight]:  # gradients reach the encoder
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_relaxed_sample_lies_in_0_1_and_sharpens_as_temperature_falls(data):
    batch = SparseBatch.from_csr(data[0][:50])
    spread = []
    for t in (5.0, 0.1):
        net = _network(temperature=t).train()
        z = net._latent(batch, torch.Generator().manual_seed(2))[0].detach()
        assert ((z >= 0) & (z <= 1)).all()  # float32 saturates to exactly 0 or 1 at low temperature
        spread.append(float((z - 0.5).abs().mean()))
    assert spread[1] > spread[0] + 0.2
    m = BinaryMultVAE(**SMALL, temperature=2.0, temperature_decay=1.0, min_temperature=0.5)
    assert [m._epoch_temperature(e) for e in (0, 1, 5)] == pytest.approx([2.0, 2.0 / math.e, 0.5])


def test_eval_reads_probabilities_or_bits(data):
    net = _network().eval()
    batch = SparseBatch.from_csr(data[0][:10])
    p = torch.sigmoid(net.encode(batch))
    torch.testing.assert_close(net._latent(batch, None)[0], p)
    net.binary_inference = "bits"
    torch.testing.assert_close(net._latent(batch, None)[0], (p > 0.5).float())


@pytest.mark.slow  # 30 epochs to learn the clusters well: 3-11 s (fewer epochs miss the recall bar on some seeds)
def test_planted_clusters_are_recovered(data):
    train, (fi, ho) = data
    m = BinaryMultVAE(**{**SMALL, "batch_size": 100, "lr": 3e-3}, epochs=30, total_anneal_steps=60).fit(train)
    recall = evaluate(m, fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean
    assert recall > 0.9, recall
    m.set_params(binary_inference="bits")  # the code alone also ranks the cluster first
    assert evaluate(m, fi, ho, ks=(11,), metrics=("recall",))["recall@11"].mean > 0.8


def test_relaxed_training_learns(data):
    m = BinaryMultVAE(**{**SMALL, "batch_size": 100, "lr": 1e-2}, epochs=6, total_anneal_steps=60, temperature=1.0,
                      temperature_decay=0.2).fit(data[0])
    assert m.history_[-1]["nll"] < m.history_[0]["nll"] - 1.0


def test_codes_are_packed_bits_of_the_probabilities(data, tmp_path):
    train, (fi, _) = data
    m = BinaryMultVAE(**SMALL, epochs=1).fit(train)
    codes = m.codes(fi)
    assert codes.dtype == np.uint8 and codes.shape == (fi.shape[0], 2)  # 12 bits -> 2 bytes
    net = m.module_.eval()
    with torch.no_grad():
        bits = (torch.sigmoid(net.encode(SparseBatch.from_csr(fi))) > 0.5).numpy()
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1, count=12), bits)
    assert (np.unpackbits(codes, axis=1)[:, 12:] == 0).all()  # padding bits are 0
    m.save(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert type(back) is BinaryMultVAE
    np.testing.assert_array_equal(back.codes(fi), codes)
    np.testing.assert_array_equal(back.score(fi), m.score(fi))


@pytest.mark.parametrize("params, name", [
    (dict(temperature=0.0), "temperature"), (dict(min_temperature=-1.0), "min_temperature"),
    (dict(binary_inference="logits"), "binary_inference"), (dict(temperature_decay=-0.1), "temperature_decay"),
])
def test_bad_hyperparameters_raise_naming_them(data, params, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        BinaryMultVAE(**{**SMALL, **params}).fit(data[0])


def test_cli_latent_bernoulli(log_csv, tmp_path, capsys):
    out = tmp_path / "bin"
    extra = ["--epochs", "1", "--latent", "bernoulli", "--latent-dim", "16", "--temperature", "1.0"]
    assert main(train_args(log_csv, out, extra=extra)) == 0
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["class"] == "BinaryMultVAE" and meta["params"]["temperature"] == 1.0
    assert main(train_args(log_csv, tmp_path / "bad", model="ease", extra=["--latent", "bernoulli"])) == 2
    assert "--model ease: does not take --latent" in capsys.readouterr().err
    assert main(train_args(log_csv, tmp_path / "bad", extra=["--temperature", "1.0"])) == 2
    assert "--model multvae: does not take --temperature" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
