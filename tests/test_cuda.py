"""CUDA: the sparse layers against the CPU reference, bf16 autocast, a run trained on CUDA and
evaluated on the CPU, 1-GPU torchrun with NCCL, and `recvae serve --device cuda`.

Every test is skipped where torch has no CUDA device; `benchmarks/gpu.sh` runs them on a GPU
machine (then the benchmark). Tolerances: the same float32 arithmetic on two devices differs
only in summation order (~1e-6 relative); bf16 products carry ~1e-2 relative rounding.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.cli import main
from recvae.models.networks import MultDAENetwork, MultVAENetwork, NetworkConfig
from recvae.models.recvae_network import RecVAEConfig, RecVAENetwork
from recvae.models.output_layer import output_layer_nll
from recvae.models.sparse_layers import SparseBatch, sparse_input_linear
from recvae.models.training_loop import make_optimizer, training_step
from recvae.models.vae import MultVAE

from test_recommend_cli import make_log

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per subprocess: torch's CUDA start-up and NCCL's take a while on a cold machine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda"  # the device under test; the CPU is the reference
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"  # what torchrun's processes must join with

# float32 on two devices: summation order only
F32 = {"rtol": 1e-4, "atol": 1e-5}


def random_csr(n_users: int, n_items: int, density: float, seed: int, counts: bool = True) -> sp.csr_matrix:
    """Random users x items matrix with counts 1..3 (or 1s) and an empty row (row 1)."""
    X = sp.random(n_users, n_items, density=density, format="lil", random_state=seed, dtype=np.float32)
    X[1, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    X.data = np.ceil(X.data * 3).astype(np.float32) if counts else np.ones_like(X.data)
    return X


def params(*tensors, device) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(t.detach().clone().to(device)) for t in tensors]


# -- the two sparse layers, CUDA against the CPU ------------------------------------------------
@needs_cuda
def test_sparse_input_linear_on_cuda_equals_cpu_forward_and_gradients():
    X = random_csr(64, 500, density=0.05, seed=1)
    g = torch.Generator().manual_seed(0)
    weight, bias, upstream = torch.randn(500, 32, generator=g), torch.randn(32, generator=g), torch.randn(64, 32, generator=g)
    results = []
    for dev in ("cpu", DEVICE):
        b = SparseBatch.from_csr(X, dev)
        w, bi = params(weight, bias, device=dev)
        out = sparse_input_linear(b.values, w, bi, b)
        (out * upstream.to(dev)).sum().backward()
        once = w.grad.clone()
        # a second backward adds to the kept gradient (the beta=1 path of the CSR product)
        (sparse_input_linear(b.values, w, bi, b) * upstream.to(dev)).sum().backward()
        results.append([t.detach().cpu() for t in (out, once, w.grad, bi.grad)])
    for name, cpu, cuda in zip(("output", "weight grad", "weight grad x2", "bias grad x2"), *results):
        torch.testing.assert_close(cuda, cpu, **F32, msg=name)
    untouched = np.setdiff1d(np.arange(500), X.indices)
    assert (results[1][1][untouched] == 0).all()


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_output_layer_nll_on_cuda_equals_cpu_loss_and_gradients(bf16):
    X = random_csr(48, 700, density=0.03, seed=2)
    g = torch.Generator().manual_seed(1)
    h0, w0, b0 = torch.randn(48, 24, generator=g), torch.randn(700, 24, generator=g) * 0.3, torch.randn(700, generator=g)
    results = []
    for i, dev in enumerate(("cpu", DEVICE)):
        b = SparseBatch.from_csr(X, dev)
        h, w, bi = params(h0, w0, b0, device=dev)
        # the CPU is the float32 reference; bf16 autocast only on the device under test
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16 and i == 1):
            nll = output_layer_nll(h, w, bi, b)
        nll.backward()
        results.append([t.detach().cpu() for t in (nll, h.grad, w.grad, bi.grad)])
    # the dense formula on the CPU, to tie the reference down
    x = torch.from_numpy(X.toarray())
    dense = -(torch.log_softmax(h0 @ w0.t() + b0, 1) * x).sum(1).mean()
    torch.testing.assert_close(results[0][0], dense, rtol=1e-5, atol=1e-5)
    for name, cpu, cuda in zip(("nll", "h grad", "weight grad", "bias grad"), *results):
        if not bf16:
            torch.testing.assert_close(cuda, cpu, **F32, msg=name)
        elif name == "nll":
            assert float(cuda) == pytest.approx(float(cpu), rel=1e-2)
        else:
            assert torch.isfinite(cuda).all(), name
            assert float((cuda - cpu).norm() / cpu.norm()) < 0.05, name


def _networks():
    cfg = NetworkConfig(400, hidden_dims=(40,), latent_dim=12)
    dae = NetworkConfig(400, hidden_dims=(), latent_dim=12, variational=False)
    return {
        "multvae": MultVAENetwork(cfg, torch.Generator().manual_seed(3)),
        "multdae": MultDAENetwork(dae, torch.Generator().manual_seed(3)),
        "recvae": RecVAENetwork(RecVAEConfig(400, hidden_dims=(32, 32), latent_dim=12), torch.Generator().manual_seed(3)),
    }


@needs_cuda
@pytest.mark.parametrize("name", ["multvae", "multdae", "recvae"])
def test_networks_on_cuda_equal_cpu_logits_loss_and_gradients(name):
    """Eval mode (no dropout, z = mu): logits and, for the Mult networks, loss and every gradient."""
    X = random_csr(30, 400, density=0.04, seed=4)
    net_cpu = _networks()[name].eval()
    net_cuda = copy.deepcopy(net_cpu).to(DEVICE)
    b_cpu, b_cuda = SparseBatch.from_csr(X), SparseBatch.from_csr(X, DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(net_cuda(b_cuda).cpu(), net_cpu(b_cpu), **F32)
    if name == "recvae":
        return
    losses = []
    for net, b in ((net_cpu, b_cpu), (net_cuda, b_cuda)):
        terms = net.loss(b, beta=0.3)
        terms.loss.backward()
        losses.append(terms.loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], **F32)
    grads = dict(net_cpu.named_parameters())
    for k, p in net_cuda.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[k].grad, **F32, msg=k)


# -- bf16 autocast on CUDA ---------------------------------------------------------------------
@needs_cuda
def test_bf16_autocast_loss_and_gradients_on_cuda_stay_close_to_fp32():
    """Eval mode (deterministic): the same network's loss and gradients with and without autocast."""
    X = random_csr(200, 2000, density=0.01, seed=5, counts=False)
    batch = SparseBatch.from_csr(X, DEVICE)
    net = MultVAENetwork(NetworkConfig(2000, hidden_dims=(64,), latent_dim=16), torch.Generator().manual_seed(0))
    net = net.to(DEVICE).eval()
    out = {}
    for bf16 in (False, True):
        net.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            terms = net.loss(batch, beta=0.2)
        terms.loss.backward()
        out[bf16] = (float(terms.loss.detach()), {k: p.grad.detach().clone() for k, p in net.named_parameters()})
    (l32, g32), (l16, g16) = out[False], out[True]
    assert np.isfinite(l16) and l16 == pytest.approx(l32, rel=5e-3)
    for k in ("output_weight", "output_bias", "input_weight"):
        assert torch.isfinite(g16[k]).all(), k
        assert float((g16[k] - g32[k]).norm() / g32[k].norm()) < 0.05, k


@needs_cuda
def test_a_bf16_training_step_on_cuda_is_finite_and_close_to_fp32():
    """Training mode: the same dropout and noise draws (same generator seed), one update each."""
    X = random_csr(200, 2000, density=0.01, seed=5, counts=False)
    batch = SparseBatch.from_csr(X, DEVICE)
    base = MultVAENetwork(NetworkConfig(2000, hidden_dims=(64,), latent_dim=16), torch.Generator().manual_seed(0))
    before = {k: p.detach().to(DEVICE) for k, p in base.named_parameters()}
    values = {}
    for bf16 in (False, True):
        net = copy.deepcopy(base).to(DEVICE).train()
        opt = make_optimizer(net, lr=1e-3)
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        values[bf16] = training_step(net, opt, batch, beta=0.2, generator=gen, bf16=bf16)
        assert np.isfinite(values[bf16]).all(), values[bf16]
        for k, p in net.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), k  # weights stay float32
        assert not torch.equal(net.output_weight.detach(), before["output_weight"]), "no update was made"
    np.testing.assert_allclose(values[True], values[False], rtol=2e-2, atol=1e-3)


@needs_cuda
def test_bf16_and_fp32_fits_on_cuda_reach_similar_losses():
    X = random_csr(600, 1500, density=0.02, seed=6, counts=False)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = MultVAE(hidden_dims=(64,), latent_dim=16, epochs=3, batch_size=100, random_state=0, device=DEVICE,
                        precision=precision).fit(X)
        assert model.precision_ == precision and model.device_.type == DEVICE
        hist = model.history_
        assert all(np.isfinite([h["loss"], h["nll"], h["kl"]]).all() for h in hist)
        losses[precision] = hist[-1]["loss"]
        assert np.isfinite(model.score(X[:50])).all()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    if DEVICE == "cuda" and torch.cuda.is_bf16_supported():
        assert MultVAE(epochs=1, device=DEVICE).fit(X[:100]).precision_ == "bf16"  # "auto" on a bf16 GPU


# -- a run trained on CUDA, evaluated and loaded on the CPU -------------------------------------
@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "log.csv"
    make_log(int_ids=False).to_csv(path, index=False)
    return path


def _train_argv(log_csv, out, device, model="multvae", extra=()):
    return ["-q", "train", "--data", str(log_csv), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", model, "--epochs", "3", "--batch-size", "30", "--n-heldout-users", "10", "--show", "0",
            "--device", device, "--out", str(out), *extra]


def _table_means(text: str, split: str) -> list[float]:
    """The means of a `| split | users | m ± s | ... |` row of the printed table."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {split} |"))
    return [float(v) for v in re.findall(r"([0-9.]+) ± ", row)]


@needs_cuda
@pytest.mark.parametrize("model", ["multvae", "recvae", "multvae-linear", "recvae-linear"])
def test_a_run_trained_on_cuda_evaluates_on_the_cpu_with_the_same_metrics(model, log_csv, tmp_path, capsys):
    from recvae.experiment import REPORT_METRICS
    from recvae.rundir import RunDir

    out = tmp_path / "run"
    extra = ("--hidden-dims", "32,32") if model in ("recvae", "recvae-linear") else ()
    assert main(_train_argv(log_csv, out, DEVICE, model, extra)) == 0
    saved = json.loads((out / "metrics.json").read_text())["test"]["metrics"]
    assert json.loads((out / "model" / "model.json").read_text())["params"]["device"] == DEVICE
    capsys.readouterr()
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    printed = _table_means(capsys.readouterr().out, "test")
    assert len(printed) == len(REPORT_METRICS)
    for m, value in zip(REPORT_METRICS, printed):
        assert value == pytest.approx(saved[m]["mean"], abs=2e-3), m
    # the weights themselves: the CPU copy scores as the CUDA model does
    run = RunDir(out)
    cpu, _ = run.load_finished(device="cpu")
    cuda, _ = run.load_finished(device=DEVICE)
    assert cpu.device_.type == "cpu" and cuda.device_.type == DEVICE
    users = run.load_users("test", cpu)
    np.testing.assert_allclose(cpu.score(users.fold_in), cuda.score(users.fold_in), rtol=1e-4, atol=1e-4)


# -- subprocesses: torchrun with NCCL, the service ------------------------------------------------
@contextlib.contextmanager
def started(cmd, **kw):
    """A subprocess in its own process group, killed (the whole group) when the block ends."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                RECVAE_DIST_TIMEOUT="120", OMP_NUM_THREADS="2")


@needs_cuda
@pytest.mark.slow
def test_torchrun_one_gpu_with_nccl_trains_a_run(log_csv, tmp_path):
    out = tmp_path / "torchrun"
    argv = [a for a in _train_argv(log_csv, out, DEVICE) if a != "-q"]  # INFO names the backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "recvae.cli",
           *argv]
    with started(cmd, env=_env()) as proc:
        text, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, text
    assert f"({BACKEND})" in text, f"the process group's backend is not {BACKEND}:\n{text}"
    assert (out / "model" / "weights.pt").is_file() and (out / "metrics.json").is_file()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)


@needs_cuda
@pytest.mark.slow
def test_serve_on_cuda_answers_as_the_cpu_model(log_csv, tmp_path):
    httpx = pytest.importorskip("httpx")
    from test_serve import free_port

    from recvae.serve.server import wait_until_ready
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from recvae.recommend import RunRecommender, user_items_csr

    out = tmp_path / "run"
    assert main(_train_argv(log_csv, out, "cpu", "multdae", ("--precision", "fp32"))) == 0
    run = RunRecommender(out, device="cpu")  # the reference: the same run on the CPU
    assert run.model.device_.type == "cpu"
    history = [str(i) for i in run.item_ids[[0, 1, 4, 40]]]
    excluded = [str(run.item_ids[2])]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "recvae.cli", "-q", "serve", str(out), "--port", str(port), "--device", DEVICE]
    with started(cmd, env=_env()) as proc:
        try:
            wait_until_ready(base, proc, TIMEOUT_S)
        except RuntimeError as e:  # it exited: its whole output can be read now
            raise RuntimeError(f"{e}: {proc.stdout.read().decode(errors='replace')}") from None
        body = {"items": history, "k": 10, "exclude": excluded}
        answers = [httpx.post(f"{base}/recommend", json=body, timeout=60) for _ in range(2)]
    for r in answers:
        assert r.status_code == 200, r.text
    first, second = (r.json() for r in answers)
    assert first == second
    codes, extra = run.items.get_indexer(history), run.items.get_indexer(excluded)
    x = user_items_csr(np.zeros(len(codes), int), codes, 1, run.n_items)
    ex = user_items_csr(np.zeros(len(extra), int), extra, 1, run.n_items)
    ids, scores = run.model.recommend(x, N=10, exclude=ex)
    assert first["source"] == "model"
    assert first["items"] == run.item_ids[ids[0]].tolist()
    np.testing.assert_allclose(first["scores"], scores[0], rtol=1e-4, atol=1e-4)
