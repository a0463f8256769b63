"""The compiled CPU loops (recvae/models/cpu_kernels.c): their results against eager PyTorch and
by hand, and the eager fallback where they are switched off or cannot be built."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.models import cpu_kernels
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch, Workspace

needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The loader forgets its library before and after; its cache is this test's folder."""
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernels.SWITCH_ENV, raising=False)
    cpu_kernels.reset()
    yield tmp_path / "cache"
    cpu_kernels.reset()


def batch_of(rows: list[list[tuple[int, float]]], n_items: int) -> SparseBatch:
    data, ind, ptr = [], [], [0]
    for r in rows:
        for i, v in r:
            ind.append(i)
            data.append(v)
        ptr.append(len(ind))
    return SparseBatch.from_csr(sp.csr_matrix((data, ind, ptr), shape=(len(rows), n_items)))


@needs_compiler
def test_softmax_nll_by_hand(fresh):
    lib = cpu_kernels.library()
    assert lib is not None and list(fresh.glob("cpu_kernels-*.so"))
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0], [0.5, 0.0, 0.0, 0.0]])
    # user 0: items 1 (x=1) and 2 (x=2), n = 3; user 1: item 0, n = 1; user 2: no items, n = 0
    batch = batch_of([[(1, 1.0), (2, 2.0)], [(0, 1.0)], []], 4)
    out = logits.bfloat16()
    lse, dot = cpu_kernels.softmax_nll_bf16(lib, out, batch.crow, batch.cols, batch.values, batch.row_sums)
    e = [1.0, math.e, math.e ** 2, math.exp(-1)]
    assert float(lse[0]) == pytest.approx(math.log(sum(e)), abs=1e-5)
    assert float(lse[1]) == pytest.approx(3.0 + math.log(4.0), abs=1e-5)
    assert dot.tolist() == pytest.approx([1.0 * 1.0 + 2.0 * 2.0, 3.0, 0.0])
    soft = torch.softmax(logits, 1)
    want = soft.clone()
    want[0, 1] -= 1 / 3
    want[0, 2] -= 2 / 3
    want[1, 0] -= 1.0
    # row 2 has no items: its softmax stays (the caller weighs the row by n = 0)
    torch.testing.assert_close(out.float(), want, atol=4e-3, rtol=0)


@needs_compiler
def test_a_row_with_an_infinite_or_nan_logit_gives_nan(fresh):
    lib = cpu_kernels.library()
    logits = torch.tensor([[0.0, float("inf"), 1.0], [0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]]).bfloat16()
    batch = batch_of([[(0, 1.0)], [(0, 1.0)], [(0, 1.0)]], 3)
    lse, _ = cpu_kernels.softmax_nll_bf16(lib, logits, batch.crow, batch.cols, batch.values, batch.row_sums)
    assert math.isnan(lse[0]) and math.isnan(lse[1]) and math.isfinite(lse[2])
    assert torch.isnan(logits[:2].float()).all() and torch.isfinite(logits[2].float()).all()


def _nll_and_grads(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, I, H = 40, 300, 24
    X = sp.random(B, I, density=0.05, random_state=np.random.default_rng(seed), format="csr", dtype=np.float32)
    X.data[:] = np.random.default_rng(seed).integers(1, 4, X.nnz)
    X = X.tolil()
    X[3, :] = 0  # a user without items
    batch = SparseBatch.from_csr(X.tocsr())
    h = (torch.randn(B, H, generator=g) * 2).requires_grad_()
    w = (torch.randn(I, H, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(I, generator=g) * 0.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = output_layer_nll(h, w, b, batch, Workspace(), fold_bias=True)
    nll.backward()
    return float(nll.detach()), h.grad, w.grad, b.grad


@needs_compiler
def test_the_output_layer_gives_the_eager_codes_loss_and_gradients_with_the_loop(fresh, monkeypatch):
    assert cpu_kernels.library() is not None
    fused = _nll_and_grads()
    monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "0")
    cpu_kernels.reset()
    assert cpu_kernels.library() is None
    eager = _nll_and_grads()
    assert fused[0] == pytest.approx(eager[0], rel=1e-4)  # the eager lse reads bf16 softmax values
    for a, e in zip(fused[1:], eager[1:]):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3 * float(e.abs().max()))


def test_without_a_compiler_the_library_is_none_and_says_why(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="recvae.models.cpu_kernels"):
        assert cpu_kernels.library() is None
        assert cpu_kernels.library() is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fused CPU kernels not used (no C compiler found (/nonexistent/cc)): RecVAE's step runs eager "
                     "PyTorch code, slower"]
    _nll_and_grads()  # the eager code runs


def test_a_failing_compile_falls_back_and_leaves_no_file(fresh, monkeypatch, tmp_path, caplog):
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bad 1.0; exit 0; fi\necho 'bad: no' >&2\nexit 3\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with caplog.at_level(logging.INFO, logger="recvae.models.cpu_kernels"):
        assert cpu_kernels.library() is None
    assert "exited with 3: bad: no" in caplog.text
    assert sorted(p.name for p in fresh.iterdir()) == []  # no half-written library


@needs_compiler
def test_a_cache_folder_others_may_write_is_not_used(fresh):
    fresh.mkdir(parents=True)
    fresh.chmod(0o777)
    assert cpu_kernels.library() is not None
    assert sorted(fresh.iterdir()) == []  # built in a private folder instead


def test_the_switch_takes_0_or_1_and_refuses_anything_else(fresh, monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "off")
    with pytest.raises(ValueError, match=r"^RECVAE_CPU_KERNELS must be 0 \(PyTorch code only\) or 1 .*got 'off'$"):
        cpu_kernels.library()


@needs_compiler
def test_loading_the_library_leaves_subnormal_numbers_to_the_rest_of_the_process(fresh):
    # linked with -ffast-math, the library's constructor would set flush-to-zero process-wide
    tiny = torch.tensor([1e-38])
    before = float(tiny / 1000)
    assert cpu_kernels.library() is not None
    assert float(tiny / 1000) == before != 0.0
