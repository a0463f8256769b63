"""benchmarks/paper_shapes.py: the paper's shapes, the cost analysis, and a tiny end-to-end run
(its generation and measuring processes, stopped in every outcome)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_shapes():
    return load_script("benchmarks/paper_shapes.py")


def test_the_shapes_are_the_papers_and_scale_down(paper_shapes):
    full = {n: paper_shapes.scaled(n, 1.0) for n in paper_shapes.SHAPES}
    assert [(s["n_users"], s["n_items"], s["n_interactions"], s["n_heldout_users"]) for s in full.values()] == [
        (136_677, 20_108, 10_000_000, 10_000), (463_435, 17_769, 56_900_000, 40_000),
        (571_355, 41_140, 33_600_000, 50_000)]
    quick = paper_shapes.scaled("msd", 0.01)
    assert (quick["n_users"], quick["n_items"], quick["n_heldout_users"]) == (5714, 41_140, 500)
    tiny = paper_shapes.scaled("ml-20m", 0.0001)  # floors: enough users for training + two held-out sets
    assert tiny["n_users"] == 50 and 3 * tiny["n_heldout_users"] < tiny["n_users"]


def _result(name, users, items, nnz, seconds: dict, heldout=10):
    steps = {k: {"seconds": v, "peak_rss_gb": 1.0} for k, v in seconds.items()}
    return {"name": name, "n_users": users, "n_items": items, "nnz": nnz,
            "measure": {"steps": steps, "n_items": items, "n_train_users": users - 2 * heldout,
                        "n_train_interactions": nnz, "n_heldout_users": heldout, "n_test_fold_in": 50,
                        "n_validation_fold_in": 50, "peak_rss_gb": 2.0}}


def test_growth_per_unit_of_work_and_the_targets(paper_shapes):
    steps = list(paper_shapes.STEPS)
    base = _result("a", 1020, 100, 10_000, {s: 1.0 for s in steps})
    # twice the users and items: 4x the user x item work, 2x the interactions
    big = _result("b", 2020, 200, 20_000, {s: 4.0 for s in steps} | {"generation": 2.0, "preparation": 2.0,
                                                                     "top-100": 20.0})
    a = paper_shapes.analyse([base, big])
    rows = {(r["step"], r["shape"]): r for r in a["table"]}
    assert rows[("training", "b")]["work_ratio"] == pytest.approx(2000 * 200 / (1000 * 100))
    assert rows[("preparation", "b")]["growth_per_unit"] == pytest.approx(1.0)
    assert rows[("forward", "b")]["growth_per_unit"] == pytest.approx(4.0 / (2000 * 200 / (1000 * 100)))
    assert rows[("training", "a")]["ns_per_user_item"] == pytest.approx(1e9 / (1000 * 100))
    t = a["targets"]
    assert t["growth"]["top-100"]["ok"] is False and t["growth"]["preparation"]["ok"] is True
    assert t["top_k"]["b"] == {"ratio": 5.0, "ok": False} and t["top_k"]["a"]["ok"] is True
    assert t["rss"]["a"] == {"peak_rss_gb": 2.0, "ok": True}


@pytest.mark.slow
def test_a_tiny_run_writes_both_files_with_every_step(paper_shapes, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    assert paper_shapes.main(["--shapes", "msd,ml-20m", "--scale", "0.002", "--chunk-users", "1000",
                              "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["paper_shapes.json", "paper_shapes.md"]
    report = json.loads((out / "paper_shapes.json").read_text())
    assert [r["name"] for r in report["shapes"]] == ["ml-20m", "msd"]  # smallest first, whatever the order given
    for r in report["shapes"]:
        steps = r["measure"]["steps"]
        assert list(steps) == list(paper_shapes.STEPS)
        assert all(s["seconds"] > 0 for s in steps.values())
        assert r["generation"]["peak_rss_gb"] > 0 and r["measure"]["peak_rss_gb"] > 0
        # the measuring process split what was generated (less the held-out users' items unseen in training)
        assert 0.8 * r["nnz"] < r["measure"]["n_interactions"] <= r["nnz"]
        assert r["measure"]["n_train_users"] == r["n_users"] - 2 * r["n_heldout_users"]
    assert {row["growth_per_unit"] for row in report["analysis"]["table"] if row["shape"] == "ml-20m"} == {1.0}
    md = (out / "paper_shapes.md").read_text()
    assert "## How each cost grows" in md and "## Targets" in md and "| top-100 | MSD |" in md
    assert report["command"].startswith("python benchmarks/paper_shapes.py --shapes msd,ml-20m")
    assert not any(arg.startswith("/") for arg in shlex.split(report["command"]))  # paths relative to the repository
    assert md in capsys.readouterr().out


@pytest.mark.slow
def test_a_worker_past_its_time_is_stopped(paper_shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(paper_shapes.TIMEOUT_S, "generate", 0.5)
    started = []
    real = paper_shapes.subprocess.Popen

    def popen(*a, **k):
        started.append(real(*a, **k))
        return started[-1]

    monkeypatch.setattr(paper_shapes.subprocess, "Popen", popen)
    with pytest.raises(SystemExit, match="did not finish within 0.5 s; stopped it"):
        paper_shapes.launch("generate", paper_shapes.scaled("ml-20m", 0.01), tmp_path / "p", tmp_path / "o.json",
                            1000)
    [p] = started
    assert p.returncode is not None  # waited for: gone, not a zombie
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)  # nothing of its process group is left


# ---- --models: Mult-VAE, EASE and the hybrids side by side --------------------------------------


def _model_row(name, fit=2.0, linear=None, item_item=None):
    steps = {"preparation": {"seconds": 0.1, "peak_rss_gb": 0.3},
             "fit": {"seconds": fit, "peak_rss_gb": 1.5, "parts": {} if linear is None else {"linear": linear,
                                                                                               "training": 1.0}},
             "validation": {"seconds": 0.2, "peak_rss_gb": None, "ndcg100": 0.3, "in_fit": linear is not None},
             "evaluation": {"seconds": 0.3, "peak_rss_gb": 1.0, "ndcg100": 0.25},
             "forward": {"seconds": 1.0, "peak_rss_gb": 1.0}, "top-100": {"seconds": 1.2, "peak_rss_gb": 1.1}}
    return {"model": name, "status": "ok", "steps": steps, "ndcg100": 0.25, "ndcg100_validation": 0.3,
            "item_item": item_item, "peak_rss_gb": 1.6, "torch_threads": 2}


def test_the_models_table_has_a_row_per_model_and_the_refusals_message(paper_shapes):
    env = {"cpu": "cpu", "cpu_count": 2, "amx": False, "avx512_bf16": True, "torch": "t", "numpy": "n",
           "scipy": "s", "recvae": "r"}
    shape = {**paper_shapes.scaled("msd", 1.0), "nnz": 33_000_000, "generation": {"seconds": 12.0, "peak_rss_gb": 1.8},
             "load_average_before": [1, 1, 1], "load_average_after": [2, 2, 2],
             "models": {"ease": _model_row("ease", item_item={"n_items": 41_140, "dtype": "float64", "gb": 13.54,
                                                               "float32_gb": 6.77}),
                        "recvae-linear": {"model": "recvae-linear", "status": "refused",
                                          "message": "max_linear_gb: needs about 20.3 GB | above 8"},
                        "multvae-linear": {"model": "multvae-linear", "status": "failed",
                                           "message": "paper_shapes: msd: the model process exited with 1"}}}
    report = {"scale": 1.0, "items": None, "models": {"ease": {}, "recvae-linear": {"epochs": 1},
                                                      "multvae-linear": {"epochs": 1}},
              "shapes": [shape], "environment": env, "total_seconds": 60.0,
              "command": "python benchmarks/paper_shapes.py --models ease,recvae-linear,multvae-linear"}
    md = paper_shapes.markdown_models(report)
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| 2.0 | — | — | 0.2 (after the fit) | 0.3 | 1.0 | 1.2 (1.20) | 1.50 | 1.60 | 13.54 float64 (6.77) | " \
           "0.3000 / 0.2500 |" in rows["| EASE (`ease`)"]
    refused = rows["| RecVAE + linear path (`recvae-linear`)"]
    assert "**refused**: max_linear_gb: needs about 20.3 GB \\| above 8 |" in refused  # one cell, its | escaped
    assert refused.count(" | ") == md.splitlines()[md.splitlines().index(rows["| EASE (`ease`)"]) - 2].count(" | ")
    assert "**failed**: paper_shapes: msd: the model process exited with 1" in rows[
        "| Mult-VAE + linear path (`multvae-linear`)"]
    assert "## MSD: 571,355 users x 41,140 items" in md and report["command"] in md


def _models_report(paper_shapes, rows: dict, command: str, cpu: str = "cpu") -> dict:
    env = {"cpu": cpu, "cpu_count": 2, "amx": False, "avx512_bf16": True, "torch": "t", "numpy": "n",
           "scipy": "s", "recvae": "r"}
    shape = {**paper_shapes.scaled("msd", 1.0), "nnz": 33_000_000, "generation": {"seconds": 12.0, "peak_rss_gb": 1.8},
             "load_average_before": [1, 1, 1], "load_average_after": [2, 2, 2], "models": rows}
    return {"benchmark": "paper_shapes_models", "scale": 1.0, "items": None, "seed": 0, "k": 100,
            "scoring_batch": 1000, "chunk_users": 20000, "models": {n: {} for n in rows}, "shapes": [shape],
            "environment": env, "total_seconds": 60.0, "command": command}


def test_merge_puts_the_rows_that_ran_in_place_and_keeps_each_rows_run(paper_shapes, tmp_path, capsys):
    """``--merge``: a row of a later report that ran replaces the committed one, a row left out
    (``--skip``) does not; each row names its run, and each run's command and machine are kept."""
    skipped = {"model": "ease", "status": "not run", "message": "left out of this run (`--skip msd:ease`)"}
    base = _models_report(paper_shapes, {"multvae": _model_row("multvae"), "ease": skipped},
                          "python benchmarks/paper_shapes.py --models multvae,ease --skip msd:ease")
    new = _models_report(paper_shapes, {"ease": _model_row("ease", fit=3600.0), "multvae": {**skipped, "model": "multvae"}},
                         "python benchmarks/paper_shapes.py --shapes msd --models ease,multvae", cpu="other cpu")
    (tmp_path / "paper_shapes_models.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert paper_shapes.main(["--merge", str(tmp_path / "new.json"), "--out-dir", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "paper_shapes_models.json").read_text())
    rows = merged["shapes"][0]["models"]
    assert rows["ease"]["status"] == "ok" and rows["ease"]["steps"]["fit"]["seconds"] == 3600.0 and rows["ease"]["run"] == 1
    assert rows["multvae"] == base["shapes"][0]["models"]["multvae"]  # the later run left it out: kept as it was
    assert [r["command"] for r in merged["runs"]] == [base["command"], new["command"]]
    assert merged["total_seconds"] == 120.0
    md = (tmp_path / "paper_shapes_models.md").read_text()
    assert "| EASE (`ease`), run 2 | 3600.0 |" in md and "| Mult-VAE (`multvae`), run 1 | 2.0 |" in md
    assert "Run 1. Machine: cpu," in md and "Run 2. Machine: other cpu," in md and new["command"] in md
    # a report of other data is refused, and the committed files stay as they are
    (tmp_path / "other.json").write_text(json.dumps({**new, "scale": 0.5}))
    before = (tmp_path / "paper_shapes_models.json").read_bytes()
    assert paper_shapes.main(["--merge", str(tmp_path / "other.json"), "--out-dir", str(tmp_path)]) == 2
    assert "the reports differ in scale (1.0 and 0.5)" in capsys.readouterr().err
    assert (tmp_path / "paper_shapes_models.json").read_bytes() == before


def test_models_and_their_options_are_checked_before_any_data_is_made(paper_shapes, capsys):
    assert paper_shapes.main(["--models", "ease,bpr"]) == 2
    assert "--models: unknown ['bpr']" in capsys.readouterr().err
    assert paper_shapes.main(["--max-linear-gb", "1"]) == 2  # the default models (multvae) have no linear path
    assert paper_shapes.main(["--models", "ease,multvae", "--max-linear-gb", "1"]) == 2
    assert "no model of --models has a linear path" in capsys.readouterr().err
    assert paper_shapes.main(["--models", "recvae-linear", "--max-linear-gb", "0"]) == 2  # the model's own check
    assert "recvae-linear: max_linear_gb" in capsys.readouterr().err
    assert paper_shapes.main(["--items", "1"]) == 2
    assert paper_shapes.main(["--models", "ease", "--shapes", "msd", "--skip", "ml-20m:ease"]) == 2
    assert "--skip ml-20m:ease: expected SHAPE:MODEL" in capsys.readouterr().err
    assert paper_shapes.main(["--models", "ease", "--skip", "msd:multvae"]) == 2


@pytest.mark.slow
def test_a_tiny_models_run_measures_each_model_in_its_own_process(paper_shapes, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    assert paper_shapes.main(["--models", "ease,recvae-linear", "--shapes", "ml-20m", "--scale", "0.0001",
                              "--items", "300", "--chunk-users", "1000", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["paper_shapes_models.json", "paper_shapes_models.md"]
    report = json.loads((out / "paper_shapes_models.json").read_text())
    [shape] = report["shapes"]
    assert shape["n_items"] == 300 and list(shape["models"]) == ["ease", "recvae-linear"]
    for name, m in shape["models"].items():
        assert m["status"] == "ok", m
        steps = m["steps"]
        assert list(steps) == ["preparation", "fit", "validation", "evaluation", "forward", "top-100"]
        assert all(s["seconds"] > 0 for s in steps.values()), steps
        assert np.isfinite(m["ndcg100"]) and 0 <= m["ndcg100"] <= 1 and np.isfinite(m["ndcg100_validation"])
        assert m["peak_rss_gb"] >= max(s["peak_rss_gb"] or 0 for s in steps.values()) > 0
        # the split keeps the items seen in training (here 207 of the 300)
        assert 100 < m["n_items"] <= 300 and m["n_train_users"] == shape["n_users"] - 2 * shape["n_heldout_users"]
    ease, hybrid = shape["models"]["ease"], shape["models"]["recvae-linear"]
    n = ease["n_items"]
    assert hybrid["n_items"] == n  # the same data and split in both processes
    assert ease["item_item"] == {"n_items": n, "dtype": "float64", "gb": n**2 * 8 / 1e9, "float32_gb": n**2 * 4 / 1e9}
    assert hybrid["item_item"] == {"n_items": n, "dtype": "float32", "gb": n**2 * 4 / 1e9, "float32_gb": n**2 * 4 / 1e9}
    assert ease["steps"]["validation"]["in_fit"] is False and hybrid["steps"]["validation"]["in_fit"] is True
    parts = hybrid["steps"]["fit"]["parts"]  # the linear path's fit apart from RecVAE's outer epoch
    assert parts["linear"] > 0 and parts["training"] > 0 and parts["validation"] > 0
    assert parts["linear"] + parts["training"] + parts["validation"] <= hybrid["steps"]["fit"]["seconds"]
    assert hybrid["params"]["epochs"] == 1 and hybrid["params"]["encoder_epochs"] == 3  # one outer epoch
    md = (out / "paper_shapes_models.md").read_text()
    assert "| EASE (`ease`) |" in md and "| RecVAE + linear path (`recvae-linear`) |" in md
    assert not any(arg.startswith("/") for arg in shlex.split(report["command"]))
    assert md in capsys.readouterr().out


@pytest.mark.slow
def test_a_refusal_is_a_row_with_its_message(paper_shapes, tmp_path, capsys):
    # 300 items need 300^2 x 12 bytes = 1.08 MB while fitting: above 0.0005 GB, both hybrids refuse
    assert paper_shapes.main(["--models", "recvae-linear,multvae-linear,ease", "--shapes", "msd", "--scale", "0.0001",
                              "--items", "300", "--max-linear-gb", "0.0005", "--skip", "msd:ease",
                              "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "paper_shapes_models.json").read_text())
    rows = report["shapes"][0]["models"]
    assert rows["ease"] == {"model": "ease", "status": "not run",
                            "message": "left out of this run (`--skip msd:ease`)"}  # no process started
    assert "| EASE (`ease`) | **not run**: left out of this run (`--skip msd:ease`) |" in (
        tmp_path / "paper_shapes_models.md").read_text()
    for name, vae in (("recvae-linear", "recvae"), ("multvae-linear", "multvae")):
        assert rows[name]["status"] == "refused" and "\n" not in rows[name]["message"]
        assert rows[name]["message"].startswith(
            f"max_linear_gb: the linear path's dense item-item matrix for {rows[name]['n_items']:,} items")
        assert f"use the model {vae}" in rows[name]["message"]
        assert list(rows[name]["steps"]) == ["preparation"]  # refused before fitting
        assert f"**refused**: {rows[name]['message']} |" in (tmp_path / "paper_shapes_models.md").read_text()
    assert report["models"]["recvae-linear"]["max_linear_gb"] == 0.0005
    capsys.readouterr()


@pytest.mark.slow
def test_a_failed_measuring_process_is_a_row_and_the_run_goes_on(paper_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(paper_shapes.TIMEOUT_S, "model", 0.01)
    assert paper_shapes.main(["--models", "ease,multvae", "--shapes", "ml-20m", "--scale", "0.0001", "--items", "50",
                              "--out-dir", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "paper_shapes_models.json").read_text())["shapes"][0]["models"]
    assert [(n, r["status"]) for n, r in rows.items()] == [("ease", "failed"), ("multvae", "failed")]
    assert rows["ease"]["message"] == "paper_shapes: ml-20m: the model process did not finish within 0.01 s; stopped it"
    assert "failed: ml-20m: ease; ml-20m: multvae" in capsys.readouterr().err
