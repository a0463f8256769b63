"""Item parallelism (``parallel="items"``, recvae/models/item_parallel.py) on CPU with gloo: the
sharded layers against the one-process ones, the shards' initialisation, training, resume,
the refusals and a torchrun run through the command line."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from checkpoints import ckpt, resume
from test_distributed import TORCHRUN, _Procs, _env, _init, _spawned
from recvae import distributed
from recvae.cli import main
from recvae.errors import ParameterError
from recvae.models import item_parallel
from recvae.models.hybrid import MultVAELinear
from recvae.models.item_parallel import ItemShard
from recvae.models.networks import NetworkConfig, build_network
from recvae.models.recvae import RecVAE
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch, Workspace, sparse_input_linear
from recvae.models.vae import MultDAE, MultVAE
from recvae.ranking import top_k

REPO = Path(__file__).resolve().parents[1]


# -- the layers: sharded against one process ----------------------------------------------------
def _layer_batches(n_items: int) -> list[sp.csr_matrix]:
    """Two tiny batches: in the first, user 0 has items in the first range only and user 3 none
    at all; in the second every nonzero is in the first 3 items, so the other ranges have none."""
    rng = np.random.default_rng(4)
    a = (rng.random((6, n_items)) < 0.3).astype(np.float32) * rng.integers(1, 3, (6, n_items))
    a[0] = 0
    a[0, [0, 2]] = [1, 2]
    a[3] = 0
    b = np.zeros((4, n_items), dtype=np.float32)
    b[:, :3] = rng.integers(0, 2, (4, 3))
    b[1, 1] = 1
    return [sp.csr_matrix(a), sp.csr_matrix(b)]


def _layers_worker(rank, world, port):
    _init(rank, world, port)
    try:
        n_items, d0, H = 11, 5, 4
        shard = ItemShard.of(n_items, distributed.current())
        a, b = shard.start, shard.stop
        for X in _layer_batches(n_items):
            g = torch.Generator().manual_seed(7)
            batch = SparseBatch.from_csr(X)
            w_in, b_in = torch.randn(n_items, d0, generator=g), torch.randn(d0, generator=g)
            h = torch.randn(X.shape[0], H, generator=g)
            w_out, b_out = torch.randn(n_items, H, generator=g), torch.randn(n_items, generator=g)
            r = torch.randn(X.shape[0], d0, generator=g)
            values = batch.normalized * torch.rand(batch.values.shape, generator=g)  # as dropout leaves them

            def leaves(*ts):
                return [t.clone().requires_grad_() for t in ts]

            # input layer
            w1, b1 = leaves(w_in, b_in)
            ref = sparse_input_linear(values, w1, b1, batch, Workspace())
            (ref * r).sum().backward()
            w2, b2 = leaves(w_in[a:b], b_in)
            out = item_parallel.input_linear(values, w2, b2, batch, shard, Workspace())
            (out * r).sum().backward()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w2.grad, w1.grad[a:b], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b2.grad, b1.grad, rtol=1e-5, atol=1e-6)

            # output layer and NLL, fp32 and under bf16 autocast
            for bf16, tol in ((False, dict(rtol=1e-5, atol=1e-6)), (True, dict(rtol=3e-2, atol=3e-2))):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    h1, wo1, bo1 = leaves(h, w_out, b_out)
                    nll_ref = output_layer_nll(h1, wo1, bo1, batch, Workspace())
                    nll_ref.backward()
                    h2, wo2, bo2 = leaves(h, w_out[a:b], b_out[a:b])
                    nll = item_parallel.output_nll(h2, wo2, bo2, batch, shard, Workspace())
                    nll.backward()
                torch.testing.assert_close(nll, nll_ref, **tol)
                torch.testing.assert_close(h2.grad, h1.grad, **tol)
                torch.testing.assert_close(wo2.grad, wo1.grad[a:b], **tol)
                torch.testing.assert_close(bo2.grad, bo1.grad[a:b], **tol)
                assert h2.grad.dtype == h2.dtype

        # the merged top-K, with ties and -inf, is the one-process top_k
        g = np.random.default_rng(5)
        scores = g.integers(0, 4, (9, n_items)).astype(np.float32)  # many ties
        scores[g.random(scores.shape) < 0.3] = -np.inf
        scores[2] = -np.inf  # a row with every item masked
        for k in (1, 4, n_items):
            merged = item_parallel.top_k_merged(np.ascontiguousarray(scores[:, a:b]), shard, k)
            np.testing.assert_array_equal(merged, top_k(scores, k))

        # rows gathered everywhere and into rank 0 alone
        full = torch.arange(n_items * 3, dtype=torch.float32).reshape(n_items, 3)
        assert torch.equal(distributed.gather_rows(full[a:b], n_items), full)
        into_0 = distributed.gather_rows(full[a:b], n_items, dst=0)
        assert torch.equal(into_0, full) if rank == 0 else into_0 is None
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_layers_equal_the_one_process_layers(world):
    _spawned(_layers_worker, world)


# -- initialisation --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [item_parallel.INIT_CHUNK_ELEMENTS, 7])
def test_the_shards_hold_the_one_process_initialisation(monkeypatch, chunk):
    """Rows drawn chunk by chunk (7 elements: chunks end inside rows and shards) equal the full draw."""
    monkeypatch.setattr(item_parallel, "INIT_CHUNK_ELEMENTS", chunk)
    config = NetworkConfig(n_items=13, hidden_dims=(6,), latent_dim=3)
    full = build_network(config, torch.Generator().manual_seed(3)).state_dict()
    for world in (2, 3):
        shards = [build_network(config, torch.Generator().manual_seed(3),
                                ItemShard.of(13, distributed.Group(r, world))).state_dict() for r in range(world)]
        for name, value in full.items():
            if name in item_parallel.SHARDED:
                assert all(s[name].shape[0] == b - a for s, (a, b) in
                           zip(shards, (distributed.shard_bounds(13, r, world) for r in range(world))))
                assert torch.equal(torch.cat([s[name] for s in shards]), value), name
            else:
                assert all(torch.equal(s[name], value) for s in shards), name


# -- training, validation, recommendations and resume in a gloo group --------------------------
def _csr(n_users, n_items, seed, density=0.15) -> sp.csr_matrix:
    X = sp.random(n_users, n_items, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data[:] = 1.0
    X = X.tolil()
    X[np.arange(n_users), np.arange(n_users) % n_items] = 1.0  # nobody empty
    return X.tocsr()


def _training_data():
    train = _csr(60, 40, seed=2)
    other = _csr(12, 40, seed=3)
    fold_in = _csr(12, 40, seed=4, density=0.1)
    heldout = (other - other.multiply(fold_in)).tocsr()
    heldout.eliminate_zeros()
    return train, (fold_in, heldout)


SMALL = dict(hidden_dims=(8,), latent_dim=4, batch_size=16, random_state=0, device="cpu", precision="fp32",
             parallel="items", lam=1e-3)


def _fit_all(out: Path, is_main: bool) -> None:
    """The runs compared by the tests below: written by rank 0 (or the single process) into ``out``."""
    train, val = _training_data()
    results = {}
    for name, cls, epochs in (("vae", MultVAE, 4), ("dae", MultDAE, 3)):
        model = cls(**SMALL, epochs=epochs).fit(train, val, show_progress=False)
        ids, _ = model.recommend(train, N=5)
        results[name] = dict(history=model.history_, state={k: v.clone() for k, v in model.module_.state_dict().items()},
                             recs=ids, best_epoch=model.best_epoch_)
    # resume at an epoch boundary: 2 epochs, then on to 4 from the checkpoint (the vae above: 4 straight)
    run = out / "resume-run"
    MultVAE(**SMALL, epochs=2).fit(train, val, callbacks=[ckpt(run)], show_progress=False)
    resumed = MultVAE(**SMALL, epochs=4).fit(train, val, callbacks=[ckpt(run)], resume_from=resume(run),
                                             show_progress=False)
    results["resumed"] = dict(state=resumed.module_.state_dict(), history=resumed.history_)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)  # the full model, resumable anywhere
    results["checkpoint_shapes"] = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
    if is_main:
        (out / "results.pkl").write_bytes(pickle.dumps(results))


def _training_worker(rank, world, port):
    _init(rank, world, port)
    try:
        out = Path(os.environ["ITEMPAR_TEST_TMP"]) / "two"
        _fit_all(out, rank == 0)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs of :func:`_fit_all` as one process (this one) and as 2 gloo processes."""
    tmp = tmp_path_factory.mktemp("itempar")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit_all(tmp / "one", True)
    finally:
        torch.set_num_threads(before)
    os.environ["ITEMPAR_TEST_TMP"] = str(tmp)
    try:
        _spawned(_training_worker, 2)
    finally:
        del os.environ["ITEMPAR_TEST_TMP"]
    return {name: pickle.loads((tmp / name / "results.pkl").read_bytes()) for name in ("one", "two")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "dae"])
def test_two_processes_train_the_one_process_model(runs, model):
    one, two = runs["one"][model], runs["two"][model]
    assert len(one["history"]) == len(two["history"]) == {"vae": 4, "dae": 3}[model]
    for a, b in zip(one["history"], two["history"]):
        for key in ("step", "loss", "nll", "kl", "beta", "l2", "val_ndcg@100"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert one["best_epoch"] == two["best_epoch"]
    assert one["state"].keys() == two["state"].keys()
    diff = max(float((one["state"][k] - two["state"][k]).abs().max()) for k in one["state"])
    print(f"{model}: max |w_items2 - w_1proc| = {diff:.2e}")
    assert diff < 1e-5
    assert two["state"]["output_weight"].shape == (40, 8)  # every process holds the full model after fit
    np.testing.assert_array_equal(two["recs"], one["recs"])


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_is_bit_identical(runs):
    """2 processes: 2 epochs, a checkpoint (the full model), then on to 4: the weights and history
    of 4 epochs straight, bit for bit."""
    two = runs["two"]
    straight, resumed = two["vae"], two["resumed"]
    assert two["checkpoint_shapes"]["output_weight"] == (40, 8)
    assert straight["state"].keys() == resumed["state"].keys()
    for name, value in straight["state"].items():
        assert torch.equal(resumed["state"][name], value), name
    for a, b in zip(straight["history"], resumed["history"]):
        assert [a[k] for k in ("step", "loss", "nll", "kl", "l2", "val_ndcg@100")] == \
            [b[k] for k in ("step", "loss", "nll", "kl", "l2", "val_ndcg@100")]


# -- what refuses it -----------------------------------------------------------------------------
@pytest.mark.parametrize("model, message", [
    (RecVAE(parallel="items"), "parallel: RecVAE trains data-parallel only: use parallel='data'"),
    (MultVAELinear(parallel="items"), "parallel: the hybrid (multvae-linear) trains data-parallel only: use "
                                      "parallel='data'"),
    (MultVAE(parallel="items", softmax="sampled"), "parallel: 'items' splits the full softmax over the processes; "
                                                    "the sampled softmax trains data-parallel: use parallel='data' "
                                                    "or softmax='full'"),
    (MultVAE(parallel="vocab"), "parallel: expected one of 'data', 'items', got 'vocab'"),
])
def test_what_cannot_train_item_parallel_says_so(model, message):
    train, _ = _training_data()
    with pytest.raises(ParameterError) as e:
        model.fit(train)
    assert str(e.value).startswith(message), str(e.value)


def test_one_process_items_is_the_ordinary_run():
    train, _ = _training_data()
    small = {**SMALL, "epochs": 1}
    a = MultVAE(**small).fit(train, show_progress=False).module_.state_dict()
    b = MultVAE(**{**small, "parallel": "data"}).fit(train, show_progress=False).module_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_command_line_has_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--parallel {data,items}" in text and "under torchrun: data" in text


# -- torchrun through the command line ---------------------------------------------------------
@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """150 users x 120 items (a run needs 100: the largest K of the metrics)."""
    rng = np.random.default_rng(8)
    rows = [(u, int(i), 5) for u in range(150) for i in rng.choice(120, size=rng.integers(5, 20), replace=False)]
    path = tmp_path_factory.mktemp("itempar-cli") / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating"]).to_csv(path, index=False)
    return path


def _cli_args(log_csv, out) -> list[str]:
    return ["-q", "train", "--data", str(log_csv), "--epochs", "2", "--batch-size", "16", "--hidden-dims", "12",
            "--latent-dim", "4", "--n-heldout-users", "15", "--precision", "fp32", "--device", "cpu", "--show", "0",
            "--parallel", "items", "--out", str(out)]


@pytest.mark.slow
def test_torchrun_items_gives_the_one_process_recommendations(log_csv, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_cli_args(log_csv, one)) == 0
    with _Procs() as procs:
        procs.start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "recvae", *_cli_args(log_csv, two)],
                    env=_env())
        [(rc, text)] = procs.wait()
    assert rc == 0, text
    assert json.loads((two / "run.json").read_text())["params"]["parallel"] == "items"
    a, b = (json.loads((run / "history.json").read_text()) for run in (one, two))
    assert [h["val_ndcg@100"] for h in b] == pytest.approx([h["val_ndcg@100"] for h in a], rel=1e-4)
    recs = []
    for run in (one, two):
        out = tmp_path / f"{run.name}.csv"
        assert main(["-q", "recommend", str(run), "--all-users", "--k", "5", "--output", str(out)]) == 0
        recs.append(pd.read_csv(out))
    assert len(recs[0]) == 5 * 150
    assert recs[1][["user", "rank", "item"]].equals(recs[0][["user", "rank", "item"]])
    # and served: the two-process run's service answers a known user and a new history as its twin's
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import start_server

    user = str(recs[0]["user"].iloc[0])
    history = [str(i) for i in recs[0]["item"].iloc[5:8]]
    answers = []
    for run in (one, two):
        with start_server(run) as (base, _):
            answers.append([httpx.post(f"{base}/recommend", json=body, timeout=30).json()["items"]
                            for body in ({"user": user, "k": 5}, {"items": history, "k": 5})])
    assert answers[1] == answers[0] and len(answers[0][0]) == 5
