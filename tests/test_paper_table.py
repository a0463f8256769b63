"""Smoke test of benchmarks/paper_table.py on a tiny synthetic file, and its bad-input paths."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_table():
    return load_script("benchmarks/paper_table.py")


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory):
    """120 users in 4 taste clusters over 120 items, ratings 1-5 (kept when > 3.5); columns uid/iid/stars."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(120):
        c = u % 4
        for i in rng.choice(np.arange(c * 30, c * 30 + 30), size=12, replace=False):
            rows.append((u, i, 5))
        for i in rng.choice(120, size=3, replace=False):
            rows.append((u, i, int(rng.choice([1, 2]))))
    path = tmp_path_factory.mktemp("log") / "tiny.csv"
    pd.DataFrame(rows, columns=["uid", "iid", "stars"]).drop_duplicates(["uid", "iid"]).to_csv(path, index=False)
    return path


def args_for(path, out, *extra):
    return ["--data", str(path), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--out-dir", str(out), "--n-heldout-users", "20", "--epochs", "3", "--seeds", "2", *extra]


@pytest.mark.slow
def test_smoke_writes_json_md_png_with_expected_keys(paper_table, log_csv, tmp_path, capsys):
    rc = paper_table.main(args_for(log_csv, tmp_path, "--max-minutes", "5", "--precision", "fp32",
                                   "--models", "multvae,multdae,ease,popularity"))  # the others: below
    assert rc == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["complete"] is True and report["seeds_done"] == [0, 1]
    assert report["data"]["n_users"] == 120 and report["n_heldout_users"] == 20
    summary = report["summary"]
    for key in ("multvae", "multvae:paper", "multvae:anneal-1", "multvae:heuristic", "multdae", "ease", "popularity"):
        s = summary[key]
        assert s["n_seeds"] == 2
        for m in ("recall@20", "recall@50", "ndcg@100"):
            assert 0.0 <= s[m]["mean"] <= 1.0
            v = [r[key]["test"][m]["mean"] for r in report["per_seed"]]  # the two seeds' test values
            se = [r[key]["test"][m]["stderr"] for r in report["per_seed"]]
            assert s[m]["per_seed"] == v and s[m]["mean"] == pytest.approx((v[0] + v[1]) / 2)
            assert s[m]["std_over_seeds"] == pytest.approx(abs(v[0] - v[1]) / np.sqrt(2))  # np.std(v, ddof=1)
            assert s[m]["mean_stderr_within_seed"] == pytest.approx((se[0] + se[1]) / 2)
            assert len(s[m]["per_seed"]) == 2
    # the Mult-VAE row is the schedule with the best validation score, and copies its test figures
    for r in report["per_seed"]:
        best = max(("multvae:paper", "multvae:anneal-1", "multvae:heuristic"),
                   key=lambda k: r[k]["validation_ndcg@100"])
        assert r["multvae"]["selected"] == best
        assert r["multvae"]["test"] == r[best]["test"]
        # run 2's cap is run 1's beta at its best epoch; run 1 anneals to 1.0 over all updates
        assert r["multvae:heuristic"]["params"]["anneal_cap"] == r["multvae:anneal-1"]["beta_at_best_epoch"]
        assert r["multvae:anneal-1"]["params"]["total_anneal_steps"] == report["anneal_steps"]
        # run 2 is a fresh run: another model seed than run 1
        assert r["multvae:heuristic"]["params"]["random_state"] != r["multvae:anneal-1"]["params"]["random_state"]
        # the paper run keeps the paper's network; both heuristic runs use HEURISTIC_NETWORK
        assert "latent_dim" not in r["multvae:paper"]["params"]
        for key in ("multvae:anneal-1", "multvae:heuristic"):
            for name, value in paper_table.HEURISTIC_NETWORK.items():
                assert r[key]["params"][name] == (list(value) if isinstance(value, tuple) else value)
        assert r["ease"]["params"]["l2"] in report["ease_grid"]
    # the 100 training users make one batch of 500 per epoch: 3 epochs -> 3 updates
    assert report["anneal_steps"] == 3
    assert summary["popularity"]["ndcg@100"]["mean"] < summary["ease"]["ndcg@100"]["mean"]
    for key in ("torch", "numpy", "scipy", "recvae", "cpu"):
        assert report["environment"][key]
    assert report["peak_rss_gb"] > 0 and "--data" in report["command"]
    assert report["paper_table2_ml20m"] is None
    md = (tmp_path / "tiny.md").read_text()
    assert "| Mult-VAE |" in md and "| EASE |" in md and "Incomplete" not in md
    assert (tmp_path / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp"))
    assert "Both heuristic runs: hidden (1000,), latent 50, KL weighting activity" in md


def test_heuristic_network_paper_keeps_the_papers_network_for_both_runs(paper_table, log_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("RECVAE_CPU_BF16", "0")  # a CPU without native bf16: the default "auto" is fp32
    assert paper_table.build_parser().get_default("precision") == "auto"  # as `recvae train`'s
    assert paper_table.main(args_for(log_csv, tmp_path, "--models", "multvae", "--seeds", "1",
                                     "--heuristic-network", "paper")) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["precision"] == "fp32"  # the precision used, not "auto"
    assert report["heuristic_network"] == "paper"
    for key in ("multvae:anneal-1", "multvae:heuristic"):
        params = report["per_seed"][0][key]["params"]
        assert not {"hidden_dims", "latent_dim", "kl_weighting"} & set(params)
        assert params["anneal_cap"] > 0
    assert "Both heuristic runs" not in (tmp_path / "tiny.md").read_text()


def test_max_minutes_stops_between_runs_and_says_so(paper_table, log_csv, tmp_path, monkeypatch):
    # a budget that runs out after the popularity run: it is reported, nothing after it
    calls = iter([False, False] + [True] * 100)  # before seed 0, before popularity
    monkeypatch.setattr(paper_table.TimeBudget, "exhausted", lambda self: next(calls))
    rc = paper_table.main(args_for(log_csv, tmp_path, "--models", "popularity,ease", "--max-minutes", "0.01",
                                   "--name", "cut"))
    assert rc == 0
    report = json.loads((tmp_path / "cut.json").read_text())
    assert report["complete"] is False and "--max-minutes" in report["stopped_reason"]
    assert list(report["summary"]) == ["popularity"] and report["seeds_done"] == [0]
    assert "Incomplete" in (tmp_path / "cut.md").read_text()


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: d / "missing.csv", "no such file"),
        (lambda d: _write(d / "nocols.csv", "a,b,c\n1,2,5\n"), "column 'uid' not found"),
        (lambda d: _write(d / "low.csv", "uid,iid,stars\n1,2,1\n1,3,2\n2,3,3\n"), "nothing left"),
    ],
    ids=["missing-file", "missing-columns", "nothing-survives-threshold"],
)
def test_bad_input_one_line_nonzero_no_results(paper_table, tmp_path, capsys, setup, expected):
    path = setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rc = paper_table.main(args_for(path, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and str(path) in err[0] and expected in err[0]
    assert list(out.iterdir()) == []


def test_bad_options_name_the_option(paper_table, log_csv, tmp_path, capsys):
    assert paper_table.main(args_for(log_csv, tmp_path, "--models", "multvae,svd")) == 2
    assert "--models" in capsys.readouterr().err
    assert paper_table.main(args_for(log_csv, tmp_path, "--seeds", "a,b")) == 2
    assert "--seeds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_synthetic_ml20m_shape_is_long_tailed_and_seeded(paper_table):
    small = (2000, 500, 40_000)
    a = paper_table.synthetic_ml20m(seed=1, shape=small)
    b = paper_table.synthetic_ml20m(seed=1, shape=small)
    assert a.matrix.shape == (2000, 500) and (a.matrix != b.matrix).nnz == 0
    assert abs(a.nnz - 40_000) < 0.1 * 40_000  # ~6% extra draws make up for duplicates
    assert np.diff(a.matrix.indptr).min() >= 5 and a.matrix.data.max() == 1.0
    pop = np.sort(np.asarray(a.matrix.sum(axis=0)).ravel())[::-1]
    assert pop[:50].sum() > 1.5 * pop[-250:].sum()  # the top 10% of items outweigh the bottom half
    assert pop[0] > 10 * pop[-1]


def test_sorted_unique_is_np_unique_and_the_synthetic_data_is_unchanged(paper_table):
    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 50, 1000), rng.integers(0, 2**40, 5000), np.zeros(0, dtype=np.int64),
                   np.array([7])):
        np.testing.assert_array_equal(paper_table.sorted_unique(values), np.unique(values))
    # the same data as before sorted_unique replaced np.unique / np.union1d (the results files rest on it)
    m = paper_table.synthetic_ml20m(seed=0, shape=(3000, 2000, 150_000)).matrix
    digest = hashlib.sha256(m.indptr.tobytes() + m.indices.tobytes() + m.data.tobytes()).hexdigest()
    assert (m.nnz, digest[:16]) == (139_548, "79f852bd53d1d09d")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_without_matplotlib_the_results_are_written_and_the_picture_skipped(paper_table, log_csv, tmp_path,
                                                                            monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    caplog.set_level(logging.INFO, logger="paper_table")
    assert paper_table.main(args_for(log_csv, tmp_path, "--models", "popularity,multdae", "--seeds", "1",
                                     "--precision", "fp32")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.md"]
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert set(report["summary"]) == {"popularity", "multdae"}
    # no EASE in the run: no paired differences from it, so no such column and no sentence on them
    md = (tmp_path / "tiny.md").read_text()
    assert "EASE" not in md and "| model | Recall@20 | Recall@50 | NDCG@100 | train s |" in md
    warnings = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert warnings == ["matplotlib is not installed: the results will have no picture (pip install 'recvae[plot]')"]
    # said before the work started: it precedes the first seed's line
    messages = [r.getMessage() for r in caplog.records]
    assert messages.index(warnings[0]) < next(i for i, m in enumerate(messages) if m.startswith("seed 0"))


def test_parquet_without_pyarrow_fails_before_any_work(paper_table, tmp_path, monkeypatch, capsys):
    path = tmp_path / "log.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "out"
    out.mkdir()
    assert paper_table.main(args_for(path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"paper_table: error: {path}: reading Parquet need(s) the optional package pyarrow, which is "
                   "not installed (pip install 'recvae[parquet]')")
    assert list(out.iterdir()) == []


def test_paired_difference_by_hand():
    from recvae.evaluation import paired_difference

    # two seeds; differences 0.1, 0.1 | 0.1, 0.1, 0.1: mean 0.1, every resample 0.1, 2 wins
    r = paired_difference([[0.5, 0.6], [0.2, 0.3, 0.4]], [[0.4, 0.5], [0.1, 0.2, 0.3]], n_resamples=500)
    assert r["mean"] == pytest.approx(0.1) and r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)
    assert (r["wins"], r["n_splits"], r["n_users"]) == (2, 2, 5)
    # one seed, differences 0 and 1: a resample's mean is 0, 0.5 or 1 (p = 1/4, 1/2, 1/4): the
    # 95% interval is [0, 1]; the pooled mean weights users, not seeds: (0 + 1 - 0.2 * 2) / 4 = 0.15
    r = paired_difference([[0.0, 1.0]], [[0.0, 0.0]], n_resamples=4000, seed=1)
    assert (r["mean"], r["ci_low"], r["ci_high"], r["wins"]) == (0.5, 0.0, 1.0, 1)
    r = paired_difference([[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.2, 0.2]])
    assert r["mean"] == pytest.approx(0.15) and r["wins"] == 1
    # large n: the interval is about mean +- 1.96 sd / sqrt(n); seeded, so reproducible
    d = np.random.default_rng(0).normal(0.01, 0.1, size=4000)
    r = paired_difference([d], [np.zeros_like(d)], seed=3)
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * half, rel=0.1)
    assert r == paired_difference([d], [np.zeros_like(d)], seed=3)
    with pytest.raises(ValueError, match=r"^baseline: split 0: expected a non-empty per-user array of model's "
                                         r"length, got shapes \(1,\) \(baseline\) and \(2,\) \(model\)$"):
        paired_difference([[0.1, 0.2]], [[0.1]])
    with pytest.raises(ValueError, match=r"^baseline: expected per-user arrays for the same \(non-empty\) splits "
                                         r"as model, got 1 and 2$"):
        paired_difference([[0.1], [0.2]], [[0.1]])


@pytest.mark.slow
def test_recvae_and_binary_rows_with_the_paired_column(paper_table, log_csv, tmp_path):
    rc = paper_table.main(args_for(log_csv, tmp_path, "--models", "recvae,binary-multvae,ease", "--epochs", "1",
                                   "--precision", "fp32"))
    assert rc == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    summ = report["summary"]
    assert set(summ) == {"recvae", "binary-multvae", "ease"}
    for key in ("recvae", "binary-multvae"):
        p = summ[key]["vs_ease"]
        diffs = [np.subtract(r[key]["test"]["ndcg@100_per_user"], r["ease"]["test"]["ndcg@100_per_user"])
                 for r in report["per_seed"]]
        assert p["mean"] == pytest.approx(np.concatenate(diffs).mean())
        assert p["ci_low"] <= p["mean"] <= p["ci_high"] and p["n_splits"] == 2
        assert p["wins"] == sum(d.mean() > 0 for d in diffs)
    assert summ["ease"]["vs_ease"] is None
    md = (tmp_path / "tiny.md").read_text()
    assert "NDCG@100 − EASE [95% CI] (wins)" in md and "| RecVAE |" in md
    assert ("Larger than noise" in md) or ("No model's NDCG@100 differs from EASE's" in md)


@pytest.mark.slow
def test_a_split_in_time(paper_table, tmp_path):
    """--leave-last splits each seed in time: every test user's target is their last interaction."""
    rng = np.random.default_rng(5)
    rows = [(u, int(i), 5, 1000 * u + k) for u in range(150)
            for k, i in enumerate(rng.choice(np.arange((u % 3) * 40, (u % 3) * 40 + 60) % 120, 8, replace=False))]
    path = tmp_path / "timed.csv"
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_csv(path, index=False)
    assert paper_table.main(["--data", str(path), "--out-dir", str(tmp_path), "--leave-last", "1",
                             "--models", "popularity,ease", "--seeds", "2", "--ease-grid", "10"]) == 0
    report = json.loads((tmp_path / "timed.json").read_text())
    assert report["split"] == "split in time (each held-out user's last 1 interaction(s) are the targets)"
    assert report["n_heldout_users"] == 15  # the library's rule: 10% of 150 users
    for r in report["per_seed"]:
        assert (r["split"]["protocol"], r["split"]["leave_last"]) == ("leave_last", 1)
        assert r["split"]["test"]["n_heldout_interactions"] == r["split"]["test"]["n_users"]
    assert "split in time (each held-out user's last 1 interaction(s) are the targets), 15 validation" in \
        (tmp_path / "timed.md").read_text()
    assert paper_table.main(["--data", str(path), "--out-dir", str(tmp_path), "--cutoff", "5", "--leave-last", "1"]) == 2


@pytest.mark.slow
def test_edlae_is_a_row_only_when_asked(paper_table, log_csv, tmp_path):
    assert "edlae" not in paper_table.build_parser().get_default("models").split(",")  # the default rows
    assert paper_table.main(args_for(log_csv, tmp_path, "--models", "ease,edlae")) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert list(report["summary"]) == ["ease", "edlae"]
    assert report["edlae_grid"] == {"l2": [30.0, 100.0, 300.0, 1000.0], "p": [0.1, 0.25, 0.33, 0.5, 0.75]}
    s = report["summary"]["edlae"]
    assert s["n_seeds"] == 2 and s["vs_ease"]["n_splits"] == 2
    for r in report["per_seed"]:
        e = r["edlae"]
        assert len(e["validation_grid"]) == 20  # every p with every l2
        best = max(e["validation_grid"], key=lambda g: g["ndcg@100"])  # the first of equal ones
        assert e["params"] == {"l2": best["l2"], "p": best["p"]} and e["validation_ndcg@100"] == best["ndcg@100"]
    chosen = ", ".join(f"{c['p']:g} / {c['l2']:g}" for c in s["chosen"])
    assert f"| p / l2 {chosen} |" in (tmp_path / "tiny.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("hybrid, label", [("multvae-linear", "Mult-VAE + linear path (EDLAE's B)"),
                                           ("recvae-linear", "RecVAE + linear path (EDLAE's B)")])
def test_the_hybrid_is_a_row_only_when_asked_its_path_edlaes_choice(paper_table, log_csv, tmp_path, hybrid, label):
    assert hybrid not in paper_table.build_parser().get_default("models").split(",")
    assert paper_table.main(args_for(log_csv, tmp_path, "--models", f"ease,edlae,{hybrid}",
                                     "--precision", "fp32", "--device", "cpu")) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert list(report["summary"]) == ["ease", "edlae", hybrid]
    assert report["hybrid_weights"] == [3.0, 10.0, 30.0, 100.0, 300.0]
    for r in report["per_seed"]:
        runs = {w: r[f"{hybrid}:w={w}"] for w in ("3", "10", "30", "100", "300")}
        best = max(runs.values(), key=lambda t: t["validation_ndcg@100"])  # validation alone chooses
        assert r[hybrid]["validation_ndcg@100"] == best["validation_ndcg@100"]
        for t in runs.values():  # the linear path EDLAE's validation chose on the same split
            assert {k: t["params"][k] for k in ("l2", "p")} == r["edlae"]["params"]
    s = report["summary"][hybrid]
    assert s["n_seeds"] == 2 and s["vs_ease"]["n_splits"] == 2
    # against the strongest linear model too: paired by user with EDLAE's test values of the same seeds
    users = [(r[hybrid]["test"]["ndcg@100_per_user"], r["edlae"]["test"]["ndcg@100_per_user"]) for r in report["per_seed"]]
    assert s["vs_edlae"]["mean"] == pytest.approx(np.mean(np.concatenate([np.subtract(a, b) for a, b in users])))
    assert report["summary"]["ease"]["vs_edlae"]["n_splits"] == 2 and "vs_edlae" not in report["summary"]["edlae"]
    md = (tmp_path / "tiny.md").read_text()
    assert f"| {label} |" in md and "| NDCG@100 − EDLAE [95% CI] (wins) |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    d = s["vs_edlae"]
    assert f"| {d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] ({d['wins']}/{d['n_splits']}) |" in row


def test_each_committed_table_is_the_rendering_of_its_json(tmp_path):
    """benchmarks/results: every paper_table Markdown table is what benchmarks/table_report.py
    renders from the JSON beside it (a hand edit or a layout change shows here), and --check
    names a table that is not."""
    table_report = load_script("benchmarks/table_report.py")
    reports = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    tables = [p for p in reports if json.loads(p.read_text()).get("benchmark") == "paper_table"]
    assert len(tables) >= 7
    assert table_report.main(["--check", *map(str, reports)]) == 0
    copy = tmp_path / "ml-100k.json"
    copy.write_text(tables[0].read_text())
    (tmp_path / "ml-100k.md").write_text(tables[0].with_suffix(".md").read_text().replace("0.", "1.", 1))
    assert table_report.main(["--check", str(copy)]) == 1
    assert table_report.main([str(copy)]) == 0  # rendered again
    assert (tmp_path / "ml-100k.md").read_text() == tables[0].with_suffix(".md").read_text()


def test_a_second_run_adds_its_rows_to_a_table_on_the_same_splits(paper_table, log_csv, tmp_path, capsys):
    """table_report --into: the rows only the second run made join the first run's table; the
    shared EASE row must match to the last digit, so the added row's paired difference is the
    second run's own; each run keeps its rows, time and command; other data is refused unwritten."""
    table_report = load_script("benchmarks/table_report.py")
    base_dir, new_dir, other_dir = (tmp_path / n for n in ("base", "new", "other"))
    for d in (base_dir, new_dir, other_dir):
        d.mkdir()
    assert paper_table.main(args_for(log_csv, base_dir, "--models", "ease,popularity", "--precision", "fp32")) == 0
    assert paper_table.main(args_for(log_csv, new_dir, "--models", "ease,multdae", "--precision", "fp32")) == 0
    assert paper_table.main(args_for(log_csv, other_dir, "--models", "ease,multdae", "--precision", "fp32",
                                     "--seeds", "1")) == 0
    base_json, new_json = base_dir / "tiny.json", new_dir / "tiny.json"
    new = json.loads(new_json.read_text())
    before = base_json.read_text(), (base_dir / "tiny.md").read_text()

    assert table_report.main([str(other_dir / "tiny.json"), "--into", str(base_json)]) == 2
    assert "differ in 'seeds_done'" in capsys.readouterr().err
    assert (base_json.read_text(), (base_dir / "tiny.md").read_text()) == before

    assert table_report.main([str(new_json), "--into", str(base_json)]) == 0
    merged = json.loads(base_json.read_text())
    assert list(merged["summary"]) == ["multdae", "ease", "popularity"]
    assert merged["summary"]["multdae"] == new["summary"]["multdae"]  # its paired difference included
    assert merged["summary"]["ease"] == json.loads(before[0])["summary"]["ease"]
    assert [r["rows"] for r in merged["runs"]] == [["ease", "popularity"], ["multdae"]]
    assert merged["runs"][1]["command"] == new["command"]
    md = (base_dir / "tiny.md").read_text()
    assert "Run 1 (rows EASE, Popularity):" in md and "Run 2 (rows Mult-DAE; the rows it shares with run 1" in md
    assert md == table_report.markdown(merged)
    # the picture is drawn again with the added row's curves (run 1's rows had none)
    from recvae.optional import available
    assert (base_dir / "tiny.png").is_file() == available("matplotlib")
    # nothing left to add; a shared row whose results differ is refused
    assert table_report.main([str(new_json), "--into", str(base_json)]) == 2
    assert "runs no row the base lacks" in capsys.readouterr().err
    new["per_seed"][0]["ease"]["test"]["ndcg@100"]["mean"] += 1e-12
    new["models"].append("edlae")
    with pytest.raises(table_report.MergeRefused, match="split seed 0: the row 'ease'"):
        table_report.merge(json.loads(before[0]), new)

    # a row run again after a change to its model alone takes the place of the base's
    again = json.loads(new_json.read_text())
    again["per_seed"][0]["multdae"]["test"]["ndcg@100"]["mean"] += 0.01
    again["command"] += " --again"
    again_json = tmp_path / "again.json"
    again_json.write_text(json.dumps(again))
    assert table_report.main([str(again_json), "--into", str(base_json), "--replace", "multdae"]) == 0
    replaced = json.loads(base_json.read_text())
    assert replaced["per_seed"][0]["multdae"] == again["per_seed"][0]["multdae"]
    assert replaced["summary"]["multdae"]["ndcg@100"] != merged["summary"]["multdae"]["ndcg@100"]
    assert replaced["summary"]["ease"] == merged["summary"]["ease"]
    assert [r["rows"] for r in replaced["runs"]] == [["ease", "popularity"], ["multdae"]]  # run 2 gave way
    assert replaced["runs"][1]["command"].endswith(" --again")
    capsys.readouterr()
    assert table_report.main([str(again_json), "--into", str(base_json), "--replace", "recvae"]) == 2
    assert "rows to replace that the new report did not run: ['recvae']" in capsys.readouterr().err
    assert json.loads(base_json.read_text()) == replaced
