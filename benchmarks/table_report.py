"""The report of ``benchmarks/paper_table.py``: its rows' labels, the per-model summary over split
seeds (with the paired differences from EASE and EDLAE), the Markdown table and the plot of the
validation curves. Reads a run's per-seed results; trains nothing.

Run alone, it renders the Markdown of finished reports again from their JSON (after a change of
the layout), or checks that each committed table is its JSON's rendering::

    python benchmarks/table_report.py benchmarks/results/ml-1m.json       # rewrites ml-1m.md
    python benchmarks/table_report.py --check benchmarks/results/*.json   # exit 1 where one differs
    python benchmarks/table_report.py ml-1m-more.json --into benchmarks/results/ml-1m-linear.json

The last adds the rows a second run made (on the same splits, its shared rows equal to the last
digit) to a committed table: one table, each run's rows, time, machine and command named. With
``--replace recvae`` the second run's RecVAE rows take the place of the table's (a rerun after a
change to RecVAE alone: the baselines it ran again must still agree to the last digit).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

from recvae.evaluation import paired_difference
from recvae.experiment import REPORT_METRICS
from recvae.fileio import atomic_path, write_bytes, write_json
from recvae.optional import available

LABELS = {
    "multvae": "Mult-VAE",
    "multvae:paper": "Mult-VAE, paper (I-600-200-600-I, cap 0.2 over 200,000 updates)",
    "multvae:anneal-1": "Mult-VAE, heuristic run 1 (anneal to 1.0)",
    "multvae:heuristic": "Mult-VAE, heuristic run 2 (cap = run 1's best beta, new seed)",
    "multvae:other-precision": "Mult-VAE, selected schedule in the other precision",
    "multdae": "Mult-DAE",
    "recvae": "RecVAE",
    "binary-multvae": "Mult-VAE, binary latent (200 bits)",
    "ease": "EASE",
    "edlae": "EDLAE",
    "multvae-linear": "Mult-VAE + linear path (EDLAE's B)",
    "recvae-linear": "RecVAE + linear path (EDLAE's B)",
    "popularity": "Popularity",
}
#: the hybrids (each run as its VAE's row is, plus the linear path)
HYBRIDS = ("multvae-linear", "recvae-linear")
#: the paired comparison's bootstrap
N_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def paired_with(per_seed: list[dict], key: str, reference: str = "ease") -> dict | None:
    """``key``'s NDCG@100 minus ``reference``'s (EASE, or EDLAE: the strongest linear model),
    paired by test user, over the seeds where both ran."""
    rows = [r for r in per_seed if key in r and reference in r and key != reference]
    if not rows or any("ndcg@100_per_user" not in r[k]["test"] for r in rows for k in (key, reference)):
        return None
    return paired_difference([r[key]["test"]["ndcg@100_per_user"] for r in rows],
                             [r[reference]["test"]["ndcg@100_per_user"] for r in rows],
                             n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)


def summarise(per_seed: list[dict]) -> dict:
    keys = [k for k in LABELS if any(k in r for r in per_seed)]
    out = {}
    for key in keys:
        rows = [r[key] for r in per_seed if key in r]
        s = {"label": LABELS[key], "n_seeds": len(rows)}
        for m in REPORT_METRICS:
            v = np.array([r["test"][m]["mean"] for r in rows])
            se = np.array([r["test"][m]["stderr"] for r in rows])
            s[m] = {"mean": float(v.mean()), "std_over_seeds": float(v.std(ddof=1)) if v.size > 1 else None,
                    "mean_stderr_within_seed": float(se.mean()), "per_seed": v.tolist()}
        s["train_seconds"] = float(np.mean([r["train_seconds"] for r in rows]))
        if "seconds_per_epoch" in rows[0]:
            s["seconds_per_epoch"] = float(np.mean([r["seconds_per_epoch"] for r in rows]))
            s["best_epoch"] = [r["best_epoch"] for r in rows]
            s["validation_ndcg@100"] = float(np.mean([r["validation_ndcg@100"] for r in rows]))
        if (key.startswith("multvae") or key == "binary-multvae") and key != "multvae:other-precision":
            s["beta_at_best_epoch"] = [r["beta_at_best_epoch"] for r in rows]
            s["max_beta"] = [r["max_beta"] for r in rows]
        if key == "multvae":
            s["selected"] = [r["selected"] for r in rows]
        if key == "multvae:other-precision":
            s["precision"] = rows[0]["params"]["precision"]
            s["mode"] = rows[0]["mode"]
        if s.get("mode") != "timing":
            s["vs_ease"] = paired_with(per_seed, key)
            if key != "edlae" and any("edlae" in r for r in per_seed):
                s["vs_edlae"] = paired_with(per_seed, key, "edlae")
        if key == "ease":
            s["l2"] = [r["params"]["l2"] for r in rows]
            s["validation_ndcg@100"] = float(np.mean([r["validation_ndcg@100"] for r in rows]))
        if key in HYBRIDS:
            s["chosen"] = [{k: r["params"][k] for k in ("linear_weight", "p", "l2")} for r in rows]
        if key == "edlae":
            s["chosen"] = [r["params"] for r in rows]
            s["validation_ndcg@100"] = float(np.mean([r["validation_ndcg@100"] for r in rows]))
        out[key] = s
    return out


def cell(s: dict, m: str) -> str:
    sd = s[m]["std_over_seeds"]
    spread = f" ± {sd:.4f}" if sd is not None else ""
    return f"{s[m]['mean']:.4f}{spread} [{s[m]['mean_stderr_within_seed']:.4f}]"


def paired_cell(p: dict | None) -> str:
    if p is None:
        return ""
    return f"{p['mean']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] ({p['wins']}/{p['n_splits']})"


def noise_sentence(summ: dict, reference: str = "ease", name: str = "EASE") -> str:
    """One sentence: which differences from ``reference`` are larger than noise (CI excludes 0)."""
    vs = f"vs_{reference}"
    real = [f"{s['label']} ({'above' if s[vs]['mean'] > 0 else 'below'})" for s in summ.values()
            if s.get(vs) and (s[vs]["ci_low"] > 0 or s[vs]["ci_high"] < 0)]
    if not real:
        return f"No model's NDCG@100 differs from {name}'s by more than noise (every 95% interval contains 0)."
    return (f"Larger than noise (95% interval excludes 0){'' if reference == 'ease' else ' against ' + name}: "
            + "; ".join(real) + f"; every other difference from {name} is within noise.")


def markdown(report: dict) -> str:
    d, env, summ = report["data"], report["environment"], report["summary"]
    lines = [
        f"# {report['name']}: the Mult-VAE paper's protocol (test users)",
        "",
        f"{d['n_users']:,} users, {d['n_items']:,} items, {d['n_interactions']:,} interactions after "
        f"preprocessing (ratings > 3.5, users with >= 5); {report.get('split', 'strong generalization split')}, "
        f"{report['n_heldout_users']} validation + {report['n_heldout_users']} test users per seed; "
        f"split seeds {report['seeds_done']} of {report['seeds']}. Choices made on validation NDCG@100 only.",
        "",
    ]
    if not report["complete"]:
        lines += [f"**Incomplete:** {report['stopped_reason']}. The table holds the runs that finished.", ""]
    lines += [
        "Mean over seeds ± standard deviation over seeds (ddof=1); in brackets the mean within-seed "
        "standard error over test users (std/sqrt(n), as the paper reports).",
        "",
    ]
    # a run without EASE (or EDLAE) has no paired differences from it: no column, no sentence
    with_ease = any(s.get("vs_ease") for s in summ.values())
    if with_ease:
        lines += [
            "NDCG@100 − EASE: the mean paired difference over all test users of all seeds, a 95% "
            f"paired bootstrap interval (users resampled within seeds, {N_RESAMPLES} resamples, seed "
            f"{BOOTSTRAP_SEED}) and the seeds where the model's mean beats EASE's.",
            "",
        ]
    with_edlae = any(s.get("vs_edlae") for s in summ.values())
    if with_edlae:
        lines += ["NDCG@100 − EDLAE: the same against EDLAE, the strongest linear model here.", ""]
    lines += [
        "| model | Recall@20 | Recall@50 | NDCG@100 | " + ("NDCG@100 − EASE [95% CI] (wins) | " if with_ease else "")
        + ("NDCG@100 − EDLAE [95% CI] (wins) | " if with_edlae else "") + "train s | s / epoch | best epoch | chosen |",
        "|---|---:|---:|---:|" + ("---:|" if with_ease else "") + ("---:|" if with_edlae else "") + "---:|---:|---:|---|",
    ]
    for key, s in summ.items():
        chosen = ""
        if key == "ease":
            chosen = "l2 " + ", ".join(f"{v:g}" for v in s["l2"])
        elif key == "edlae":
            chosen = "p / l2 " + ", ".join(f"{c['p']:g} / {c['l2']:g}" for c in s["chosen"])
        elif key in HYBRIDS:
            chosen = "w / p / l2 " + ", ".join(f"{c['linear_weight']:g} / {c['p']:g} / {c['l2']:g}" for c in s["chosen"])
        elif key == "multvae":
            chosen = ", ".join(k.split(":")[1] for k in s["selected"])
        elif (key.startswith("multvae") or key == "binary-multvae") and key != "multvae:other-precision":
            chosen = "beta@best " + ", ".join(f"{b:.3f}" for b in s["beta_at_best_epoch"])
        elif key == "multvae:other-precision":
            chosen = f"{s['precision']} ({s['mode']})"
        spe = f"{s['seconds_per_epoch']:.2f}" if "seconds_per_epoch" in s else ""
        be = ", ".join(map(str, s["best_epoch"])) if "best_epoch" in s else ""
        cells = [cell(s, m) for m in ("recall@20", "recall@50", "ndcg@100")]
        if s.get("mode") == "timing":  # 5 epochs for seconds per epoch: its metrics mean nothing
            cells = ["(timing only)"] * 3
        ease_cell = f" | {paired_cell(s.get('vs_ease'))}" if with_ease else ""
        edlae_cell = f" | {paired_cell(s.get('vs_edlae'))}" if with_edlae else ""
        lines.append(f"| {s['label']} | {' | '.join(cells)}{ease_cell}{edlae_cell} "
                     f"| {s['train_seconds']:.1f} | {spe} | {be} | {chosen} |")
    if with_ease:
        lines += ["", noise_sentence(summ)]
    if with_edlae:
        lines += ["", noise_sentence(summ, "edlae", "EDLAE")]
    if "multvae" in summ and "multvae:other-precision" in summ:
        o = summ["multvae:other-precision"]
        lines += ["", f"Seconds per Mult-VAE training epoch (selected schedule, mean over seeds): "
                      f"{report['precision']} {summ['multvae']['seconds_per_epoch']:.3f}, "
                      f"{o['precision']} {o['seconds_per_epoch']:.3f}."]
    if report.get("paper_table2_ml20m"):
        lines += ["", "Paper, Table 2 (ML-20M, 10,000 test users):", "",
                  "| model | Recall@20 | Recall@50 | NDCG@100 |", "|---|---:|---:|---:|"]
        for name, v in report["paper_table2_ml20m"].items():
            lines.append(f"| {name} (paper) | {v['recall@20']:.3f} | {v['recall@50']:.3f} | {v['ndcg@100']:.3f} |")
    if "multvae:paper" in summ:
        s = summ["multvae:paper"]
        lines += ["", f"Paper schedule: beta reached {', '.join(f'{b:.4f}' for b in s['max_beta'])} by the end "
                      f"(per seed); beta at the best epoch {', '.join(f'{b:.4f}' for b in s['beta_at_best_epoch'])}."]
    if "multvae:anneal-1" in summ:
        s = summ["multvae:anneal-1"]
        lines += [f"Heuristic run 1 (beta to 1.0 over {report['anneal_steps']} updates): best validation epoch "
                  f"at beta {', '.join(f'{b:.3f}' for b in s['beta_at_best_epoch'])}; run 2 uses that as its cap."]
        net = report.get("heuristic_network")
        if isinstance(net, dict):
            lines += [f"Both heuristic runs: hidden {tuple(net['hidden_dims'])}, latent {net['latent_dim']}, "
                      f"KL weighting {net['kl_weighting']} (the paper: (600,), 200, uniform)."]
    runs = report.get("runs")
    if not runs:
        return "\n".join(lines + ["", *run_lines(report, env), ""])
    for i, run in enumerate(runs, 1):
        rows = ", ".join(LABELS[k] for k in run["rows"])
        shared = "; the rows it shares with run 1 gave the same test results to the last digit" if i > 1 else ""
        lines += ["", f"Run {i} (rows {rows}{shared}):", *run_lines(run, run["environment"])]
    return "\n".join(lines + [""])


def run_lines(run: dict, env: dict) -> list[str]:
    """The footer of one run: its time, memory, load, machine and command."""
    return [
        f"Total {run['total_seconds'] / 60:.1f} min; peak RSS {run['peak_rss_gb']:.2f} GB; load average "
        f"{run['load_average_start']} at start, {run['load_average_end']} at end; precision {run['precision']}.",
        f"Environment: {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads); torch "
        f"{env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, recvae {env['recvae']}.",
        "",
        f"Command: `{run['command']}`",
    ]


#: what two reports must share to be one table: the data, its split and the training budget
SAME_RUN_SETTINGS = ("data", "protocol", "n_heldout_users", "seeds_done", "precision", "epochs", "patience",
                     "ease_grid")
#: the grids and networks of rows, where both reports record them (one run may lack the rows)
SAME_WHERE_BOTH = ("edlae_grid", "hybrid_weights", "heuristic_network", "anneal_steps")
_RUN_FIELDS = ("total_seconds", "peak_rss_gb", "load_average_start", "load_average_end", "precision",
               "environment", "command")


class MergeRefused(Exception):
    """Two reports that are not one table's runs (the message says what differs)."""


def merge(base: dict, new: dict, replace=()) -> dict:
    """``base`` with the rows that only ``new`` ran added, as one table with two runs.

    Refused unless both ran on the same data, split seeds and splits with the same budget
    (:data:`SAME_RUN_SETTINGS`), and every row both ran (the baselines the paired differences are
    taken against) has the same test results per seed to the last digit: then the added rows'
    differences from EASE and EDLAE are the ones a single run would give. The rows of each run
    are named in ``runs``; the top-level run fields stay the first run's.

    ``replace``: rows ``new`` ran again (after a change to their model alone) that take the
    place of ``base``'s; the other rows both ran must still agree to the last digit."""
    unknown = [k for k in replace if k not in new["models"]]
    if unknown:
        raise MergeRefused(f"rows to replace that the new report did not run: {unknown} (it ran {new['models']})")
    base = _without(base, replace)
    for key in SAME_RUN_SETTINGS + tuple(k for k in SAME_WHERE_BOTH if k in base and k in new):
        if base.get(key) != new.get(key):
            raise MergeRefused(f"the reports differ in {key!r}: {base.get(key)!r} against {new.get(key)!r}")
    added = [k for k in LABELS if k in new["models"] and k not in base["models"]]
    if not added:
        raise MergeRefused(f"the new report runs no row the base lacks (base {base['models']}, new {new['models']})")
    out = copy.deepcopy(base)
    for b, n in zip(out["per_seed"], new["per_seed"]):
        if b["split"] != n["split"]:
            raise MergeRefused(f"split seed {b['seed']}: the splits differ")
        for key in (set(b) & set(n)) - {"seed", "split", "seconds"}:
            if b[key]["test"] != n[key]["test"]:
                raise MergeRefused(f"split seed {b['seed']}: the row {key!r}, run by both, has other test results")
        for key in n:
            if key in added or key.split(":")[0] in added:
                b[key] = copy.deepcopy(n[key])
    runs = out.get("runs") or [{"rows": list(base["models"]), **{f: base[f] for f in _RUN_FIELDS}}]
    out["runs"] = runs + [{"rows": added, **{f: new[f] for f in _RUN_FIELDS}}]
    out["models"] = [k for k in LABELS if k in base["models"] or k in added]
    for key in set(new) - set(out):  # settings only the new run has (its rows' grids)
        out[key] = copy.deepcopy(new[key])
    out["complete"] = base["complete"] and new["complete"]
    out["stopped_reason"] = base["stopped_reason"] or new["stopped_reason"]
    out["summary"] = summarise(out["per_seed"])
    return out


def _without(report: dict, rows) -> dict:
    """``report`` without ``rows`` (and their variants, ``row:...``), in its seeds and its runs."""
    if not rows:
        return report
    out = copy.deepcopy(report)
    out["models"] = [k for k in out["models"] if k not in rows]
    for seed in out["per_seed"]:
        for key in [k for k in seed if k.split(":")[0] in rows]:
            del seed[key]
    if "runs" in out:  # a run left without rows goes (a single run's rows are merge's to record)
        out["runs"] = [dict(run, rows=[k for k in run["rows"] if k not in rows]) for run in out["runs"]]
        out["runs"] = [run for run in out["runs"] if run["rows"]]
    return out


def plot_curves(per_seed: list[dict], path: Path) -> bool:
    """Validation NDCG@100 per epoch of every row with a curve, one line per split seed, as a PNG
    at ``path``; False, drawing nothing, when no row has one (linear models only)."""
    keys = [k for k in LABELS if k != "multvae" and any("curve" in r.get(k, {}) for r in per_seed)]
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, key in enumerate(keys):
        for j, r in enumerate(per_seed):
            if key in r:
                curve = r[key]["curve"]
                ax.plot(range(1, len(curve) + 1), curve, color=f"C{c}", alpha=0.8, lw=1,
                        label=LABELS[key] if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@100")
    ax.set_title("validation NDCG@100 per epoch (one line per split seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render paper_table.py's Markdown tables from their JSON reports.")
    ap.add_argument("reports", nargs="+", type=Path, help="JSON reports of benchmarks/paper_table.py")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when a report's .md beside it is not its rendering")
    ap.add_argument("--into", type=Path, default=None, metavar="BASE",
                    help="merge: add the rows of REPORTS that BASE lacks to BASE (.json and .md, rewritten); "
                         "refused unless data, splits, budget and the shared rows' results are the same")
    ap.add_argument("--replace", default="", metavar="ROWS",
                    help="with --into: comma-separated rows (e.g. recvae) that REPORTS ran again after a change "
                         "to their model alone and that take the place of BASE's")
    args = ap.parse_args(argv)
    replace = [r for r in args.replace.split(",") if r]
    if replace and args.into is None:
        ap.error("--replace needs --into")
    if args.into is not None:
        base = json.loads(args.into.read_text())
        try:
            for path in args.reports:
                base = merge(base, json.loads(path.read_text()), replace)
        except MergeRefused as e:
            print(f"table_report: {path} cannot join {args.into}: {e}; nothing written", file=sys.stderr)
            return 2
        write_json(args.into, base)
        write_bytes(args.into.with_suffix(".md"), markdown(base).encode())
        print(f"wrote {args.into} and {args.into.with_suffix('.md')}")
        if not available("matplotlib"):
            print(f"matplotlib is not installed: {args.into.with_suffix('.png')} was not drawn again "
                  "(pip install 'recvae[plot]')")
        elif plot_curves(base["per_seed"], args.into.with_suffix(".png")):
            print(f"wrote {args.into.with_suffix('.png')}")
        return 0
    stale = []
    for path in args.reports:
        report = json.loads(path.read_text())
        if report.get("benchmark") != "paper_table":
            continue  # another benchmark's results (a shell glob of results/*.json)
        text, md = markdown(report), path.with_suffix(".md")
        if args.check:
            if not md.is_file() or md.read_text() != text:
                stale.append(str(md))
        else:
            write_bytes(md, text.encode())
            print(f"wrote {md}")
    for md in stale:
        print(f"{md}: not the rendering of its JSON report (run benchmarks/table_report.py on it)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
