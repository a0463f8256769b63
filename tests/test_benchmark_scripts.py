"""The benchmark scripts import against the library as it is (a renamed function would otherwise
surface only when someone runs a long benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repo_scripts import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    module = load_script(f"benchmarks/{script}", f"_bench_{script[:-3]}", monkeypatch)  # imports and definitions
    assert callable(getattr(module, "main", None)), f"{script}: no main()"


@pytest.mark.slow
def test_train_speed_reports_each_step_against_its_gemms_plus_optimizer_pass(tmp_path, monkeypatch):
    """A tiny run of benchmarks/train_speed.py: every library step has both floor parts measured in
    the same run, its ratio is step / (GEMMs + optimizer pass), and the results name the machine."""
    import json

    import torch

    module = load_script("benchmarks/train_speed.py", "_bench_train_speed_run", monkeypatch)
    threads = torch.get_num_threads()
    try:  # one thread: a few seconds even on a loaded machine
        report = module.main(["--tiny", "--batches", "1", "--warmup", "1", "--threads", "1", "--out", str(tmp_path / "ts")])
    finally:
        torch.set_num_threads(threads)
    results = report["results"]
    steps = ["multvae_fp32", "multvae_bf16", "recvae_encoder_bf16", "recvae_decoder_bf16"]
    for name in steps:
        r = results[name]
        gemm, optim = (results[r["floor_parts"][k]]["median_ms"] for k in ("gemm", "optim"))
        assert gemm > 0 and optim > 0
        assert r["ratio_to_floor"] == pytest.approx(r["median_ms"] / (gemm + optim))
        assert r["ratio_to_gemm"] == pytest.approx(r["median_ms"] / gemm)
    sizes = report["optimizer_floor_parameters"]
    assert sizes["multvae"] == sum(p.numel() for p in module.MultVAENetwork(module.NetworkConfig(2000)).parameters())
    assert sizes["recvae_decoder"] == 2000 * 200 + 2000  # the decoder: I x 200 weight and I bias
    assert {"cpu", "amx_bf16", "avx512_bf16", "cores", "load_average_before"} <= set(report["machine"])
    assert report["command"].startswith("python benchmarks/train_speed.py --tiny")
    assert set(report["profiles"]) == {"multvae_bf16", "recvae_encoder_bf16", "recvae_decoder_bf16"}
    # the posterior pass is a forward: its floor is its products alone
    post = results["recvae_posterior_bf16"]
    assert post["floor_parts"]["optim"] is None
    assert post["ratio_to_floor"] == pytest.approx(post["median_ms"] / results[post["floor_parts"]["gemm"]]["median_ms"])
    # an outer epoch per batch of users: 3 encoder updates, 1 decoder update, 1 posterior pass
    outer = results["recvae_outer_epoch_bf16"]
    e, d = results["recvae_encoder_bf16"], results["recvae_decoder_bf16"]
    assert outer["median_ms"] == pytest.approx(3 * e["median_ms"] + d["median_ms"] + post["median_ms"])
    assert outer["floor_ms"] == pytest.approx(3 * e["floor_ms"] + d["floor_ms"] + post["floor_ms"])
    for phase in ("encoder", "decoder"):
        assert report["targets_met"][f"recvae_{phase}_ratio_to_floor_bf16"] == (results[f"recvae_{phase}_bf16"]
                                                                                 ["ratio_to_floor"] <= 1.3)
    assert json.loads((tmp_path / "ts.json").read_text())["summary"] == report["summary"]
    md = (tmp_path / "ts.md").read_text()
    assert report["machine"]["cpu"] in md and "x floor (GEMMs + optimizer)" in md and "optimizer step" in md


def test_the_gemm_floor_runs_each_product_in_its_fastest_layout(monkeypatch):
    """The floor times each product in the operand layout that runs fastest here: with one layout
    made artificially slow, it is never chosen, and the floor's operands have the chosen strides."""
    import time

    import torch

    module = load_script("benchmarks/train_speed.py", "_bench_train_speed_layouts", monkeypatch)
    products = [("a", 64, 48, 32), ("b", 16, 96, 8)]
    real_mm = torch.mm

    def slow_when_nn(a, b, **kw):  # the NN layout: both operands row-major
        if a.stride(1) == 1 and b.stride(1) == 1:
            time.sleep(0.005)  # far beyond these products' microseconds
        return real_mm(a, b, **kw)

    monkeypatch.setattr(module.torch, "mm", slow_when_nn)
    layouts = module.best_layouts(products, torch.float32, reps=3)
    assert len(layouts) == 2 and set(layouts) <= set(module.LAYOUTS) and "NN" not in layouts
    step = module.gemm_floor(products, torch.float32, layouts=["TN", "NT"])
    assert step.layouts == ["TN", "NT"]
    step(None)


@pytest.mark.slow
def test_hybrid_speed_reports_each_joint_step_against_gemms_plus_x_b_plus_optimizer(tmp_path, monkeypatch):
    """A tiny run of benchmarks/hybrid_speed.py: each joint step's floor is Mult-VAE's products +
    the faster of the two forms of x B + its optimizer pass, the learned mode's optimizer covers
    one more parameter (w), and the files say what the report says."""
    import json

    import torch

    module = load_script("benchmarks/hybrid_speed.py", "_bench_hybrid_speed_run", monkeypatch)
    threads = torch.get_num_threads()
    try:
        report = module.main(["--tiny", "--batches", "1", "--warmup", "1", "--threads", "1", "--no-profile",
                              "--out", str(tmp_path / "hs")])
    finally:
        torch.set_num_threads(threads)
    r = report["results"]
    forms = {f: r[f"linear_{f}"]["median_ms"] for f in ("embedding_bag", "csr_mm")}
    assert report["linear_product_form"] == min(forms, key=forms.get)
    for mode in ("fixed", "learned"):
        s = r[f"hybrid_{mode}_bf16"]
        assert s["floor_parts_ms"] == {"gemm": r["gemm_bf16"]["median_ms"], "linear": min(forms.values()),
                                       "optim": r[f"optim_{mode}"]["median_ms"]}
        assert s["ratio_to_floor"] == pytest.approx(s["median_ms"] / sum(s["floor_parts_ms"].values()))
        assert report["targets_met"][f"hybrid_{mode}_bf16"] == (s["ratio_to_floor"] <= 1.3)
    assert r["multvae_bf16"]["floor_parts_ms"]["linear"] == 0.0
    sizes = report["optimizer_floor_parameters"]
    assert sizes["learned"] == sizes["fixed"] + 1 == sizes["multvae"] + 1  # w learned: one scalar more
    assert json.loads((tmp_path / "hs.json").read_text())["results"] == r
    md = (tmp_path / "hs.md").read_text()
    assert report["machine"]["cpu"] in md and "| hybrid_learned_bf16 |" in md


def test_the_linear_path_product_forms_agree(monkeypatch):
    """The two forms of x B that hybrid_speed.py times compute the same product, x B."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    module = load_script("benchmarks/hybrid_speed.py", "_bench_hybrid_speed_forms", monkeypatch)
    X = sp.random(module.BATCH, 40, density=0.1, format="csr", random_state=0, dtype=np.float32)
    B = torch.from_numpy(module.random_linear(40, seed=3))
    assert torch.count_nonzero(torch.diagonal(B)) == 0 and torch.count_nonzero(B) == 40 * 39
    captured = {}
    real_addmm, real_bag = torch.addmm, module.F.embedding_bag
    monkeypatch.setattr(module.torch, "addmm", lambda *a, **k: captured.setdefault("csr_mm", real_addmm(*a, **k)))
    monkeypatch.setattr(module.F, "embedding_bag", lambda *a, **k: captured.setdefault("embedding_bag",
                                                                                      real_bag(*a, **k)))
    rows = np.arange(module.BATCH)
    for step in module.linear_product_forms(X, B).values():
        step(rows)
    monkeypatch.undo()
    expected = torch.from_numpy(X.toarray()) @ B
    assert set(captured) == {"csr_mm", "embedding_bag"}
    for form, got in captured.items():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=form)


@pytest.mark.slow
def test_sampled_softmax_times_each_shape_and_writes_both_files(tmp_path, monkeypatch):
    """A tiny run of benchmarks/sampled_softmax.py's speed part: every shape (ML-20M's, MSD's, a
    million items, scaled down) has the full softmax and the three sampled ones, each measured in
    its own process; the files say the same as the report and name the machine."""
    import json

    module = load_script("benchmarks/sampled_softmax.py", "_bench_sampled_softmax_run", monkeypatch)
    report = module.main(["--tiny", "--skip-accuracy", "--batches", "1", "--out", str(tmp_path / "ss")])
    rows = {(r["n_items"], r["config"]): r for r in report["speed"]}
    assert set(rows) == {(n, c) for n in (2000, 4000, 20000) for c in module.CONFIGS}
    for (n, config), r in rows.items():
        assert r["ms_per_batch"] > 0 and r["peak_rss_steps_gb"] > 0
        # a sampled step touches the batch's items and its negatives, never more than the catalogue
        assert (r["touched_items"] == n) if config == "full" else (0 < r["touched_items"] <= n)
    assert json.loads((tmp_path / "ss.json").read_text())["speed"] == report["speed"]
    md = (tmp_path / "ss.md").read_text()
    assert report["machine"]["cpu"] in md and "| 4,000 | sampled-8k-popularity |" in md
