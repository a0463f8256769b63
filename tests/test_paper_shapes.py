"""benchmarks/paper_shapes.py: the paper's shapes, the cost analysis, and a tiny end-to-end run
(its generation and measuring processes, stopped in every outcome)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

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
