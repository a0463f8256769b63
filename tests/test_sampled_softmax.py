"""Sampled softmax (``softmax="sampled"``): the log-Q corrected loss by hand, the whole catalogue
as the full softmax, the proposals, the gradient on average, training, resume, save/load and a
run through the command line (run.json, recommend, serve)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from checkpoints import ckpt, resume
from recvae.cli import main
from recvae.evaluation import evaluate
from recvae.models.sampled_softmax import Negatives, NegativeSampler, sampled_output_nll
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch
from recvae.models.recvae import RecVAE
from recvae.models.vae import MultDAE, MultVAE
from recvae.recommend import RunRecommender
from test_recommend_cli import make_log

SMALL = dict(hidden_dims=(16,), latent_dim=4, batch_size=50, random_state=0, device="cpu", precision="fp32")
SAMPLED = dict(softmax="sampled", n_negatives=12)


def leaf(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def grads(loss, *tensors):
    for t in tensors:
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in tensors]


# -- the loss ----------------------------------------------------------------------------------
def test_log_q_corrected_loss_equals_the_hand_computed_value():
    # 5 items, logits l_ui = h_u * w_i (H = 1, no bias). User 0 holds item 1 once and item 3 twice,
    # user 1 item 2 once, user 2 nothing. Negatives 0, 3, 4 drawn 1, 2, 1 times, expected 0.6, 1.2, 0.3.
    w = [0.5, 1.0, -1.0, 2.0, 0.0]
    X = sp.csr_matrix(np.array([[0, 1, 0, 2, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    h = torch.tensor([[1.0], [-1.0], [3.0]])
    weight, bias = torch.tensor(w)[:, None], torch.zeros(5)
    neg = Negatives(torch.tensor([0, 3, 4]), torch.tensor([math.log(1 / 0.6), math.log(2 / 1.2), math.log(1 / 0.3)]))
    loss = sampled_output_nll(h, weight, bias, SparseBatch.from_csr(X), neg)
    # user 0: its items exactly, negative 3 is its own (counted once, uncorrected), 0 and 4 corrected
    z0 = math.exp(1.0) + math.exp(2.0) + math.exp(0.5) / 0.6 + math.exp(0.0) / 0.3
    nll0 = 3 * math.log(z0) - (1 * 1.0 + 2 * 2.0)
    # user 1 (h = -1): item 2 exactly, every negative corrected (item 3 drawn twice: 2 / 1.2)
    z1 = math.exp(1.0) + math.exp(-0.5) / 0.6 + math.exp(-2.0) * 2 / 1.2 + math.exp(0.0) / 0.3
    nll1 = 1 * math.log(z1) - (-1.0) * (-1.0)
    assert float(loss) == pytest.approx((nll0 + nll1 + 0.0) / 3, rel=1e-6)


@pytest.mark.parametrize("n_negatives", [10, 11, 1000])
def test_the_whole_catalogue_uniformly_is_the_full_softmax_loss_and_gradients(n_negatives):
    """n_negatives >= I with the uniform proposal: every item once, expected count 1, no correction:
    the sampled loss is the full multinomial NLL, and so are its gradients."""
    X = sp.random(7, 10, density=0.3, format="csr", random_state=1, dtype=np.float32)
    X.data[:] = np.arange(1, X.nnz + 1) % 3 + 1  # counts, not only ones
    batch = SparseBatch.from_csr(X)
    h, weight, bias = leaf(7, 4, seed=0), leaf(10, 4, seed=1), leaf(10, seed=2)
    neg = NegativeSampler(10, n_negatives, "uniform").draw(torch.Generator().manual_seed(0))
    assert neg.items.tolist() == list(range(10)) and neg.log_weight.abs().max() == 0
    full = output_layer_nll(h, weight, bias, batch)
    expected = grads(full, h, weight, bias)
    sampled = sampled_output_nll(h, weight, bias, batch, neg)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(grads(sampled, h, weight, bias), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_loss_is_a_mean_over_users_so_shares_of_a_batch_add_up():
    """What data parallelism relies on: each process's users see the same shared negatives, and
    the batch's loss is the users' mean, so shares weighted by their size give the whole."""
    X = sp.random(9, 30, density=0.2, format="csr", random_state=4, dtype=np.float32)
    h, weight, bias = leaf(9, 5), leaf(30, 5, seed=1), leaf(30, seed=2)
    neg = NegativeSampler(30, 8, "uniform").draw(torch.Generator().manual_seed(3))
    whole = sampled_output_nll(h, weight, bias, SparseBatch.from_csr(X), neg)
    parts = [sampled_output_nll(h[a:b], weight, bias, SparseBatch.from_csr(X[a:b]), neg) * (b - a) / 9
             for a, b in ((0, 4), (4, 9))]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)


# -- the proposals -------------------------------------------------------------------------------
def test_uniform_draws_distinct_items_with_the_correction_log_i_over_s():
    sampler = NegativeSampler(50, 8, "uniform")
    a = sampler.draw(torch.Generator().manual_seed(7))
    assert a.items.tolist() == sorted(set(a.items.tolist())) and len(a.items) == 8
    torch.testing.assert_close(a.log_weight, torch.full((8,), math.log(50 / 8)))
    assert torch.equal(a.items, sampler.draw(torch.Generator().manual_seed(7)).items)  # the generator's only
    assert not torch.equal(a.items, sampler.draw(torch.Generator().manual_seed(8)).items)


def test_popularity_proposal_is_count_to_the_alpha_and_merges_repeated_draws():
    X = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=np.float32))
    sampler = NegativeSampler.from_matrix(X, 400, "popularity", 0.5)
    # counts 4, 2, 1, 0 -> weights 2, sqrt 2, 1 and 1 (an unseen item weighs as one count)
    w = np.array([2.0, math.sqrt(2), 1.0, 1.0])
    np.testing.assert_allclose(sampler.probabilities, w / w.sum())
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(4)
    for _ in range(50):
        neg = sampler.draw(gen)
        c = torch.exp(neg.log_weight.double()) * 400 * torch.as_tensor(sampler.probabilities)[neg.items]
        np.testing.assert_allclose(c.numpy(), np.round(c.numpy()), atol=1e-3)  # log c_j - log(S q_j): c_j whole
        counts[neg.items.numpy()] += c.numpy()
    assert counts.sum() == pytest.approx(50 * 400)
    np.testing.assert_allclose(counts / counts.sum(), w / w.sum(), atol=0.01)  # 20,000 draws: sd ~0.003


def test_a_bad_proposal_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"proposal: expected one of 'uniform', 'popularity', got 'zipf'"):
        NegativeSampler(10, 3, "zipf")
    with pytest.raises(ValueError, match="proposal: expected one of 'uniform', 'popularity', got 'zipf'"):
        MultDAE(**SMALL, softmax="sampled", proposal="zipf", epochs=1).fit(sp.eye(5, format="csr"))
    with pytest.raises(ValueError, match="n_negatives: expected a positive integer, got 0"):
        MultDAE(**SMALL, softmax="sampled", n_negatives=0, epochs=1).fit(sp.eye(5, format="csr"))


@pytest.mark.parametrize("proposal", ["uniform", "popularity"])
def test_the_sampled_gradient_points_as_the_full_one_on_average(proposal):
    """Averaged over draws (fixed seed), the sampled gradients w.r.t. the output weight and the
    decoder's input h point as the full softmax's; a single draw does less well. Logits of sd ~1.1
    (bias sd 1), as in training: measured cosines 0.998-0.999 for the mean of 300 draws of 40 of
    200 items, 0.80-0.91 for one draw. (With very peaked logits, sd 2.8, the mean stays at
    0.93-0.94 for h and ~0.8 for the weight however many draws: the bias of log Z's estimate.)"""
    n_items, n_users = 200, 20
    rng = np.random.default_rng(0)
    pop = rng.zipf(1.5, n_items).astype(np.float64)
    rows = np.repeat(np.arange(n_users), 6)
    cols = np.concatenate([rng.choice(n_items, 6, replace=False, p=pop / pop.sum()) for _ in range(n_users)])
    X = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    batch = SparseBatch.from_csr(X)
    h, weight = (leaf(n_users, 8) * 0.4).detach().requires_grad_(), (leaf(n_items, 8, seed=1) * 0.4).detach().requires_grad_()
    bias = leaf(n_items, seed=2)
    full = grads(output_layer_nll(h, weight, bias, batch), h, weight)
    sampler = NegativeSampler.from_matrix(X, 40, proposal, 0.75)
    gen = torch.Generator().manual_seed(0)
    draws = [grads(sampled_output_nll(h, weight, bias, batch, sampler.draw(gen)), h, weight) for _ in range(300)]

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    for k, name in enumerate(("h", "weight")):
        mean = torch.stack([d[k] for d in draws]).mean(0)
        one = cosine(draws[0][k], full[k])
        print(f"{proposal} {name}: cos(mean of 300 draws, full) {cosine(mean, full[k]):.4f}, one draw {one:.4f}")
        assert cosine(mean, full[k]) > 0.99 and one < 0.95


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("proposal", ["uniform", "popularity"])
def test_training_with_sampled_softmax_learns_the_planted_clusters_as_the_full_one(data, proposal, one_thread):
    """60 items, 12 negatives a batch: NDCG@20 of the held-out items within 0.05 of the full softmax's
    (measured: see the printed values)."""
    train, (fi, ho) = data
    params = {**SMALL, "epochs": 30, "batch_size": 100, "lr": 3e-3, "hidden_dims": (), "latent_dim": 16}
    full = MultDAE(**params).fit(train, show_progress=False)
    sampled = MultDAE(**params, **SAMPLED, proposal=proposal).fit(train, show_progress=False)
    a, b = (evaluate(m, fi, ho, ks=(20,), metrics=("ndcg",))["ndcg@20"].mean for m in (full, sampled))
    print(f"NDCG@20 full {a:.4f}, sampled ({proposal}) {b:.4f}")
    assert b > a - 0.05 and b > 0.6


def test_full_and_sampled_runs_differ_and_scoring_stays_full(data):
    train, (fi, _) = data
    full = MultDAE(**SMALL, epochs=2).fit(train, show_progress=False)
    sampled = MultDAE(**SMALL, **SAMPLED, epochs=2).fit(train, show_progress=False)
    assert not torch.equal(full.module_.output_weight, sampled.module_.output_weight)
    assert sampled.score(fi).shape == (fi.shape[0], train.shape[1])  # every item scored
    assert sampled.module_.sampler is not None and full.module_.sampler is None


def test_sampled_resume_is_bit_identical_and_the_option_is_forced(data, tmp_path):
    train, val = data
    params = {**SMALL, **SAMPLED, "proposal": "popularity"}
    MultVAE(**params, epochs=2).fit(train, val, callbacks=[ckpt(tmp_path)], show_progress=False)
    resumed = MultVAE(**params, epochs=3).fit(train, val, callbacks=[ckpt(tmp_path)], resume_from=resume(tmp_path),
                                              show_progress=False)
    straight = MultVAE(**params, epochs=3).fit(train, val, show_progress=False)
    for (name, a), b in zip(resumed.module_.state_dict().items(), straight.module_.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in resumed.history_] == [h["loss"] for h in straight.history_]
    with pytest.raises(ValueError, match="softmax: checkpoint 'sampled' vs now 'full'"):
        MultVAE(**SMALL, epochs=4).fit(train, resume_from=resume(tmp_path), show_progress=False)
    with pytest.raises(ValueError, match="n_negatives: checkpoint 12 vs now 13"):
        MultVAE(**{**params, "n_negatives": 13}, epochs=4).fit(train, resume_from=resume(tmp_path), show_progress=False)


def test_a_checkpoint_from_before_the_option_resumes_as_full_softmax(data, tmp_path):
    train, _ = data
    MultDAE(**SMALL, epochs=1).fit(train, callbacks=[ckpt(tmp_path)], show_progress=False)
    old = resume(tmp_path)
    params = json.loads(old["params"])
    for key in ("softmax", "n_negatives", "proposal", "proposal_alpha"):
        del params[key]
    old["params"] = json.dumps(params)
    resumed = MultDAE(**SMALL, epochs=2).fit(train, resume_from=old, show_progress=False)
    assert resumed.best_epoch_ == 2
    with pytest.raises(ValueError, match="softmax: checkpoint 'full' vs now 'sampled'"):
        MultDAE(**SMALL, **SAMPLED, epochs=2).fit(train, resume_from=old, show_progress=False)


def test_save_and_load_keep_the_option_and_the_scores(data, tmp_path):
    train, (fi, _) = data
    m = MultDAE(**SMALL, **SAMPLED, proposal="popularity", epochs=2).fit(train, show_progress=False)
    m.save(tmp_path / "m")
    params = json.loads((tmp_path / "m" / "model.json").read_text())["params"]
    assert (params["softmax"], params["n_negatives"], params["proposal"]) == ("sampled", 12, "popularity")
    loaded = MultDAE.load(tmp_path / "m")
    assert loaded.get_params() == m.get_params()
    np.testing.assert_array_equal(loaded.score(fi), m.score(fi))


# -- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampled")
    log = folder / "log.csv"
    make_log(int_ids=False).to_csv(log, index=False)
    out = folder / "run"
    argv = ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", "multdae", "--epochs", "3", "--batch-size", "30", "--out", str(out), "--n-heldout-users", "10",
            "--show", "0", "--softmax", "sampled", "--n-negatives", "25", "--proposal", "popularity",
            "--proposal-alpha", "0.5"]
    assert main(argv) == 0
    return out


def test_a_run_records_the_option_and_recommend_and_serve_work(sampled_run, capsys):
    params = json.loads((sampled_run / "run.json").read_text())["params"]
    assert {k: params[k] for k in ("softmax", "n_negatives", "proposal", "proposal_alpha")} == {
        "softmax": "sampled", "n_negatives": 25, "proposal": "popularity", "proposal_alpha": 0.5}
    out = sampled_run.parent / "all.csv"
    assert main(["-q", "recommend", str(sampled_run), "--all-users", "--k", "5", "--output", str(out)]) == 0
    recs = pd.read_csv(out)
    assert recs.groupby("user").size().eq(5).all() and recs.user.nunique() == 90 and set(recs.source) == {"model"}
    testclient = pytest.importorskip("fastapi.testclient")
    from recvae.serve.app import create_app

    run = RunRecommender(sampled_run)
    with testclient.TestClient(create_app(sampled_run, run=run)) as client:
        r = client.post("/recommend", json={"items": ["m1", "m2", "m5"], "k": 4})
    assert r.status_code == 200 and r.json()["source"] == "model"
    codes = run.items.get_indexer(["m1", "m2", "m5"])
    ids, _ = run.model.recommend(sp.csr_matrix((np.ones(3), (np.zeros(3, int), codes)), shape=(1, run.n_items)), N=4)
    assert r.json()["items"] == run.item_ids[ids[0]].tolist()


def test_the_command_line_refuses_sampled_softmax_for_recvae_and_bad_values(sampled_run, capsys):
    log = sampled_run.parent / "log.csv"
    base = ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--out",
            str(sampled_run.parent / "never")]
    assert main([*base, "--model", "recvae", "--softmax", "sampled"]) == 2
    assert "--model recvae: does not take --softmax" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unexpected keyword argument 'softmax'"):  # its decoder: full softmax only
        RecVAE(softmax="sampled")
    with pytest.raises(SystemExit):
        main([*base, "--model", "multdae", "--softmax", "approximate"])
    assert "argument --softmax: expected one of full, sampled, got 'approximate'" in capsys.readouterr().err
    assert not (sampled_run.parent / "never").exists()


def test_a_resume_may_not_change_the_softmax(sampled_run, capsys):
    log = sampled_run.parent / "log.csv"
    argv = ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", "multdae", "--epochs", "3", "--batch-size", "30", "--out", str(sampled_run),
            "--n-heldout-users", "10", "--show", "0", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was made with other settings (--softmax: 'sampled' in the run, now 'full'; --n-negatives: 25 in the run, " \
           "now 1000;" in err, err
