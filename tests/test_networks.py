"""Networks and the two sparse layers: shapes, hand-computed losses, equivalence with dense references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recvae.models.networks import (
    BIAS_INIT_STD,
    MultDAENetwork,
    MultVAENetwork,
    NetworkConfig,
    build_network,
    gaussian_kl,
)
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch, Workspace, sparse_input_linear


def random_csr(n_users, n_items, density=0.2, seed=0, binary=True, empty_rows=(1,)):
    X = sp.random(n_users, n_items, density=density, format="lil", random_state=seed, dtype=np.float32)
    for r in empty_rows:
        if r < n_users:
            X[r, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    if binary:
        X.data[:] = 1.0
    else:
        X.data = np.ceil(X.data * 3).astype(np.float32)
    return X


def dense_reference(net, X: sp.csr_matrix, beta: float):
    """The notebook's graph written densely (eval mode: no dropout, z = mu)."""
    x = torch.from_numpy(X.toarray())
    h = x / x.pow(2).sum(1, keepdim=True).clamp_min(1e-12).sqrt()
    lin = torch.nn.functional.linear
    h = lin(h, net.input_weight.t(), net.input_bias)
    for layer in net.encoder:
        h = layer(torch.tanh(h))
    if isinstance(net, MultVAENetwork):
        d = net.config.latent_dim
        mu, logvar = h[:, :d], h[:, d:]
        z = mu
        kl = (0.5 * (-logvar + logvar.exp() + mu**2 - 1)).sum(1).mean()
    else:
        z, kl = torch.tanh(h), torch.zeros(())
    for layer in net.decoder:
        z = torch.tanh(layer(z))
    logits = lin(z, net.output_weight, net.output_bias)
    nll = -(torch.log_softmax(logits, 1) * x).sum(1).mean()
    return logits, nll, kl, nll + beta * kl


# -- configuration and defaults ---------------------------------------------------------------
def test_config_defaults_are_the_notebooks():
    c = NetworkConfig(n_items=10)
    assert (c.hidden_dims, c.latent_dim, c.dropout, c.activation, c.variational) == ((600,), 200, 0.5, "tanh", True)
    assert BIAS_INIT_STD == 0.001


@pytest.mark.parametrize(
    "kwargs, name",
    [({"n_items": 0}, "n_items"), ({"n_items": 5, "hidden_dims": (0,)}, "hidden_dims"),
     ({"n_items": 5, "latent_dim": 0}, "latent_dim"), ({"n_items": 5, "dropout": 1.0}, "dropout"),
     ({"n_items": 5, "activation": "gelu"}, "activation")],
)
def test_config_rejects_bad_values_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NetworkConfig(**kwargs)


def test_network_kind_must_match_config():
    with pytest.raises(ValueError, match="variational"):
        MultDAENetwork(NetworkConfig(5, variational=True))


# -- shapes and architecture ----------------------------------------------------------------
def test_vae_shapes_and_layers():
    net = MultVAENetwork(NetworkConfig(n_items=30, hidden_dims=(16, 8), latent_dim=4))
    b = SparseBatch.from_csr(random_csr(7, 30))
    net.eval()
    mu, logvar = net.encode(b)
    assert mu.shape == logvar.shape == (7, 4)
    assert net(b).shape == (7, 30) and net(b).dtype == torch.float32
    assert net.input_weight.shape == (30, 16)
    assert [tuple(l.weight.shape) for l in net.encoder] == [(8, 16), (8, 8)]  # 8 -> 2 x latent
    assert [tuple(l.weight.shape) for l in net.decoder] == [(8, 4), (16, 8)]
    assert net.output_weight.shape == (30, 16)


def test_dae_default_is_notebook_I_200_I():
    net = build_network(NetworkConfig(n_items=30, hidden_dims=(), latent_dim=200, variational=False))
    assert isinstance(net, MultDAENetwork)
    assert net.input_weight.shape == (30, 200) and len(net.encoder) == 0 and len(net.decoder) == 0
    assert net.output_weight.shape == (30, 200)
    code = net.eval().encode(SparseBatch.from_csr(random_csr(3, 30)))
    assert code.shape == (3, 200) and code.abs().max() < 1  # tanh on the code


def test_initialisation_follows_the_notebook():
    g = torch.Generator().manual_seed(0)
    net = MultVAENetwork(NetworkConfig(n_items=500, hidden_dims=(60,), latent_dim=20), g)
    limit = math.sqrt(6 / (500 + 60))  # Glorot uniform
    w = net.input_weight.detach()
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
    assert abs(float(w.std()) - limit / math.sqrt(3)) < 0.05 * limit
    b = net.output_bias.detach()  # truncated normal, std 0.001, cut at 2 std
    assert b.abs().max() <= 0.002 and 0.0006 < float(b.std()) < 0.001


def test_same_generator_seed_same_weights():
    a = MultVAENetwork(NetworkConfig(40, hidden_dims=(8,), latent_dim=3), torch.Generator().manual_seed(3))
    b = MultVAENetwork(NetworkConfig(40, hidden_dims=(8,), latent_dim=3), torch.Generator().manual_seed(3))
    c = MultVAENetwork(NetworkConfig(40, hidden_dims=(8,), latent_dim=3), torch.Generator().manual_seed(4))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert not torch.equal(a.input_weight, c.input_weight)


# -- losses -----------------------------------------------------------------------------------
def test_dae_loss_equals_hand_computed_value():
    # I = 3, code of size 1, identity activation: code = x_normalised . w_in, logits = code * w_out
    net = MultDAENetwork(NetworkConfig(3, hidden_dims=(), latent_dim=1, activation="identity", variational=False))
    with torch.no_grad():
        net.input_weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
        net.output_weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
        net.input_bias.zero_()
        net.output_bias.zero_()
    X = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0]], dtype=np.float32))
    net.eval()
    # user 1: code 1, logits (1, 0, -1): NLL = log(e + 1 + 1/e) - 1
    nll1 = math.log(math.e + 1 + 1 / math.e) - 1
    # user 2: x normalised (1/sqrt2, 1/sqrt2, 0): code a = 1/sqrt2, logits (a, 0, -a): NLL = 2 lse - a
    a = 1 / math.sqrt(2)
    nll2 = 2 * math.log(math.exp(a) + 1 + math.exp(-a)) - a
    terms = net.loss(SparseBatch.from_csr(X), beta=0.7)
    assert terms.nll.item() == pytest.approx((nll1 + nll2) / 2, rel=1e-6)
    assert terms.kl.item() == 0 and terms.loss.item() == pytest.approx(terms.nll.item())


def test_gaussian_kl_matches_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert gaussian_kl(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0  # q = prior


def test_gaussian_kl_weights_scale_each_users_term():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # per-user KL with logvar 0: |mu|^2 / 2 = 0.5 and 2.0
    logvar = torch.zeros(2, 2)
    assert gaussian_kl(mu, logvar).item() == pytest.approx((0.5 + 2.0) / 2)
    assert gaussian_kl(mu, logvar, weights=torch.tensor([2.0, 0.5])).item() == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(AssertionError, match="weights"):
        gaussian_kl(mu, logvar, weights=torch.ones(3))


@pytest.mark.parametrize("variational", [True, False])
def test_loss_logits_and_all_gradients_equal_the_dense_reference(variational):
    cfg = NetworkConfig(25, hidden_dims=(9,), latent_dim=4, variational=variational)
    net = build_network(cfg, torch.Generator().manual_seed(1)).eval()
    X = random_csr(8, 25, seed=2, binary=False)  # counts, and an empty row
    b = SparseBatch.from_csr(X)
    ref_logits, ref_nll, ref_kl, ref_loss = dense_reference(net, X, beta=0.3)
    torch.testing.assert_close(net(b), ref_logits, rtol=1e-5, atol=1e-5)
    terms = net.loss(b, beta=0.3)
    torch.testing.assert_close(terms.nll, ref_nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.kl, ref_kl.float(), rtol=1e-5, atol=1e-6)
    terms.loss.backward()
    ours = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    ref_loss.backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_autocast_stays_close_to_fp32():
    net = MultVAENetwork(NetworkConfig(300, hidden_dims=(32,), latent_dim=8), torch.Generator().manual_seed(0)).eval()
    b = SparseBatch.from_csr(random_csr(20, 300, density=0.05, seed=3))
    t32 = net.loss(b, beta=0.2)
    t32.loss.backward()
    g32, b32 = net.output_weight.grad.clone(), net.output_bias.grad.clone()
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t16 = net.loss(b, beta=0.2)
    t16.loss.backward()
    assert t16.loss.item() == pytest.approx(t32.loss.item(), rel=2e-3)
    assert float((net.output_weight.grad - g32).norm() / g32.norm()) < 0.02
    assert float((net.output_bias.grad - b32).norm() / b32.norm()) < 0.02  # a column of the weight's product


def test_bf16_gradients_accumulate_over_two_backward_calls_and_smaller_batches():
    net = MultVAENetwork(NetworkConfig(300, hidden_dims=(32,), latent_dim=8), torch.Generator().manual_seed(0)).eval()
    X = random_csr(20, 300, density=0.05, seed=3)
    grads = {}
    for rows in (20, 7, 20):  # the kept buffers are sliced for the smaller batch, then reused
        b = SparseBatch.from_csr(X[:rows])
        net.zero_grad(set_to_none=True)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t = net.loss(b, beta=0.2)
            t.loss.backward()
            if _ == 0:
                once = {k: p.grad.clone() for k, p in net.named_parameters()}
        for k, p in net.named_parameters():
            torch.testing.assert_close(p.grad, 2 * once[k], rtol=0, atol=0, msg=k)
        grads.setdefault(rows, []).append(once)
    for k in grads[20][0]:  # the same batch gives the same gradients after the smaller one
        assert torch.equal(grads[20][0][k], grads[20][1][k]), k


def test_folded_bias_product_equals_addmm_and_a_frozen_layer_keeps_its_factors():
    """output_product with the bias folded into the product ([h, 1] [W, b]^T) gives addmm's logits
    (to bf16's rounding); a frozen layer's low-precision factors are made once and made again only
    after the weight or the bias changes in place; its transposed copy gives the same g W."""
    from recvae.models.output_layer import output_product

    g = torch.Generator().manual_seed(0)
    I, H, B = 300, 20, 7
    w, bias, h = torch.randn(I, H, generator=g), torch.randn(I, generator=g), torch.randn(B, H, generator=g)
    ws = Workspace()
    out = torch.empty(B, I, dtype=torch.bfloat16)
    reference = torch.addmm(bias.bfloat16(), h.bfloat16(), w.bfloat16().t()).float()
    f = output_product(h, w, bias, ws, torch.bfloat16, out, fold_bias=True)
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=2e-2)
    assert f.w_t is not None and f.w.shape == (I, H) and f.h.shape == (B, H)
    calls = []
    for key in (1, 1, 2, 2, 1):
        ws.kept("counted", key, lambda: calls.append(key) or len(calls))
    assert calls == [1, 2, 1]  # made again exactly when the key changes
    f1 = output_product(h, w, bias, ws, torch.bfloat16, out, fold_bias=True)
    f2 = output_product(h, w, bias, ws, torch.bfloat16, out, fold_bias=True)
    assert f2.w_t.data_ptr() == f1.w_t.data_ptr()  # unchanged weights: the kept copy
    with torch.no_grad():
        bias.add_(1.0)  # an in-place update (as an optimizer step): made again
    f3 = output_product(h, w, bias, ws, torch.bfloat16, out, fold_bias=True)
    torch.testing.assert_close(out.float(), reference + 1.0, rtol=1e-2, atol=3e-2)
    grad = torch.randn(B, I, generator=g).bfloat16()
    assert torch.equal(f3.grad_input(grad), torch.mm(grad, w.bfloat16()))
    # a trainable layer casts each step and keeps no transposed copy
    w.requires_grad_(True)
    f4 = output_product(h, w, bias, ws, torch.bfloat16, out, fold_bias=True)
    assert f4.w_t is None and torch.equal(f4.grad_input(grad), torch.mm(grad, w.detach().bfloat16()))
    # without folding (Mult-VAE's path) and in float32: addmm itself
    f5 = output_product(h, w.detach(), bias, ws, torch.bfloat16, out)
    assert torch.equal(out, torch.addmm(bias.bfloat16(), h.bfloat16(), w.detach().bfloat16().t())) and f5.w_t is None
    out32 = torch.empty(B, I)
    output_product(h, w.detach(), bias, ws, torch.float32, out32, fold_bias=True)
    assert torch.equal(out32, torch.addmm(bias, h, w.detach().t()))


# -- the two sparse layers ----------------------------------------------------------------------
def test_sparse_input_linear_equals_dense_linear_forward_and_grads():
    X = random_csr(9, 40, seed=5, binary=False)
    b = SparseBatch.from_csr(X)
    lin = torch.nn.Linear(40, 6)
    weight = torch.nn.Parameter(lin.weight.detach().t().contiguous())
    bias = torch.nn.Parameter(lin.bias.detach().clone())
    upstream = torch.randn(9, 6)
    out = sparse_input_linear(b.values, weight, bias, b)
    (out * upstream).sum().backward()
    ref = lin(torch.from_numpy(X.toarray()))
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weight.grad, lin.weight.grad.t())
    torch.testing.assert_close(bias.grad, lin.bias.grad)
    assert (weight.grad[np.setdiff1d(np.arange(40), X.indices)] == 0).all()  # untouched rows


def test_gradients_accumulate_over_two_backward_calls():
    net = MultDAENetwork(NetworkConfig(20, hidden_dims=(), latent_dim=3, variational=False)).eval()
    b = SparseBatch.from_csr(random_csr(4, 20, seed=1))
    net.loss(b).loss.backward()
    once = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.loss(b).loss.backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[k], msg=k)


@settings(max_examples=25, deadline=None)
@given(n_users=st.integers(1, 6), n_items=st.integers(2, 12), density=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_nll_via_gather_equals_dense_formula(n_users, n_items, density, seed):
    X = random_csr(n_users, n_items, density=density, seed=seed % 1000, binary=False, empty_rows=())
    b = SparseBatch.from_csr(X)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_users, 3, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(n_items, 3, generator=g) * 3)
    bias = torch.nn.Parameter(torch.randn(n_items, generator=g))
    nll = output_layer_nll(h, w, bias, b)
    x = torch.from_numpy(X.toarray())
    dense = -(torch.log_softmax(h @ w.t() + bias, 1) * x).sum(1).mean()
    torch.testing.assert_close(nll, dense, rtol=1e-5, atol=1e-5)
    gh, = torch.autograd.grad(dense, h, retain_graph=True)
    gw_ref, gb_ref = torch.autograd.grad(dense, (w, bias))
    nll.backward()
    torch.testing.assert_close(h.grad, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias.grad, gb_ref, rtol=1e-4, atol=1e-5)


def test_nll_stays_exact_when_the_users_items_are_far_below_the_maximum():
    # item 0 has a logit 150 above the user's item: its softmax underflows, the fallback is exact
    X = sp.csr_matrix(np.array([[0, 1, 0]], dtype=np.float32))
    h = torch.ones(1, 1)
    w = torch.nn.Parameter(torch.tensor([[150.0], [0.0], [1.0]]))
    bias = torch.nn.Parameter(torch.zeros(3))
    nll = output_layer_nll(h, w, bias, SparseBatch.from_csr(X))
    assert nll.item() == pytest.approx(float(torch.logsumexp(torch.tensor([150.0, 0.0, 1.0]), 0)), rel=1e-6)


def test_workspace_reuse_before_backward_is_caught():
    net = MultDAENetwork(NetworkConfig(10, hidden_dims=(), latent_dim=2, variational=False))
    b = SparseBatch.from_csr(random_csr(3, 10))
    first = net.loss(b).loss
    net.loss(b)  # overwrites the shared softmax buffer
    with pytest.raises(RuntimeError, match="backward"):
        first.backward()


def test_dropout_acts_on_nonzeros_with_inverse_keep_scaling():
    net = MultVAENetwork(NetworkConfig(200, hidden_dims=(4,), latent_dim=2, dropout=0.5)).train()
    b = SparseBatch.from_csr(sp.csr_matrix(np.ones((50, 200), dtype=np.float32)))
    v = net._input_values(b, torch.Generator().manual_seed(0))
    kept = v[v > 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2 / math.sqrt(200)))  # x/||x|| / keep
    assert 0.45 < kept.numel() / v.numel() < 0.55
    v2 = net._input_values(b, torch.Generator().manual_seed(0))
    assert torch.equal(v, v2)
    assert torch.equal(net.eval()._input_values(b, None), b.normalized)  # no dropout in eval


def test_sparse_batch_normalises_like_tf_l2_normalize():
    X = sp.csr_matrix(np.array([[3, 4, 0], [0, 0, 0], [0, 2, 0]], dtype=np.float32))
    b = SparseBatch.from_csr(X)
    torch.testing.assert_close(b.normalized, torch.tensor([0.6, 0.8, 1.0]))
    torch.testing.assert_close(b.row_sums, torch.tensor([7.0, 0.0, 2.0]))
    torch.testing.assert_close(b.to_dense(), torch.from_numpy(X.toarray()))


def test_workspace_slices_one_buffer():
    ws = Workspace()
    a = ws.get("x", (5, 3), torch.float32, torch.device("cpu"))
    b = ws.get("x", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.is_contiguous()


@settings(max_examples=25, deadline=None)
@given(n_users=st.integers(0, 8), n_items=st.integers(1, 15), density=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_batch_transpose_is_the_stable_item_major_order(n_users, n_items, density, seed):
    """t_perm / t_crow (from a CSR -> CSC conversion) are the stable argsort of the items and the
    transpose's row pointers, also for an unsorted input with duplicates and for empty batches."""
    ref = sp.random(n_users, n_items, density=density, format="csr", random_state=seed, dtype=np.float32)
    rows = [ref.indices[ref.indptr[u]:ref.indptr[u + 1]][::-1] for u in range(n_users)]  # unsorted
    rows = [np.r_[r, r[:1]] for r in rows]  # and one repeated entry per row: from_csr sums and sorts
    vals = [np.r_[ref[u, r[:-1]].toarray().ravel(), 0.0][:len(r)] for u, r in enumerate(rows)]
    X = sp.csr_matrix((np.concatenate(vals or [[]]).astype(np.float32), np.concatenate(rows or [[]]).astype(np.int32),
                       np.r_[0, np.cumsum([len(r) for r in rows])]), shape=ref.shape)
    assert X.nnz == 0 or not X.has_canonical_format
    b = SparseBatch.from_csr(X)
    cols = b.cols.numpy()
    np.testing.assert_array_equal(b.t_perm.numpy(), np.argsort(cols, kind="stable"))
    np.testing.assert_array_equal(b.t_crow.numpy(), np.r_[0, np.cumsum(np.bincount(cols, minlength=n_items))])
    assert b.t_perm.dtype == b.t_crow.dtype == torch.int64
    np.testing.assert_array_equal(b.to_dense().numpy(), ref.toarray())
