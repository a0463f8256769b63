"""The Mult-VAE paper's table (Liang et al., WWW 2018, Table 2) on any MovieLens set or interaction file.

Protocol end to end: the paper's preprocessing (ratings > 3.5, users with >= 5), a strong
generalization split per split seed (disjoint training / validation / test users; held-out users
scored from 80% of their items, evaluated on the other 20%), every model of a seed on the same
split, every choice (EASE's l2, Mult-VAE's beta schedule, the epoch kept) made on validation
NDCG@100 through :mod:`recvae.tuning` (the code ``recvae tune`` runs), test users touched once
per fitted model.

Mult-VAE runs three times per seed and the run with the best validation NDCG@100 is the
"Mult-VAE" row (all three are reported):

* ``paper``: the notebook as published: I-600-200-600-I and beta = min(0.2, step / 200,000).
  On small data that schedule barely moves: ML-1M makes ~10 updates per epoch (4,834 training
  users / 500), 2,000 in 200 epochs, so beta ends near 0.01.
* ``anneal-1``: the paper's heuristic, run 1. beta grows linearly to 1.0 over the whole run
  (``total_anneal_steps`` = epochs x updates per epoch, so the schedule scales with the data
  instead of being fixed in updates); ``best_beta_`` is the beta at the best validation epoch.
* ``heuristic``: run 2, from scratch (another model seed) with ``anneal_cap = best_beta_`` of
  run 1 and the same slope, so beta reaches the cap where run 1 peaked and stays there.

Both heuristic runs use ``HEURISTIC_NETWORK`` (``--heuristic-network paper`` gives them the
paper's instead): a wider hidden layer, a 50-d latent and each user's KL weighted by its number
of interactions, chosen on ML-1M validation users (see the constant's comment).

RecVAE (``recvae``) runs with the reference defaults (``RECVAE_PARAMS``; 50 outer epochs unless
``--epochs``); the binary-latent Mult-VAE (``binary-multvae``) with 200 bits (``BINARY_PARAMS``),
beta annealed to 1.0 over the run as heuristic run 1. EDLAE (``edlae``, Steck NeurIPS 2020: EASE
with input dropout's L2 weight) is a row only when ``--models`` names it, its ``p`` and ``l2`` chosen
over its default grid as ``recvae tune`` chooses them. The hybrids (``multvae-linear`` and
``recvae-linear``: Mult-VAE or RecVAE whose logits add ``w * x B`` with EDLAE's ``B``) are rows
only when ``--models`` names them: the linear path is EDLAE's validation choice on the split, ``w``
is chosen over ``HYBRID_WEIGHTS`` (the grid ``linear_weight`` declares, 3 to 300: a run each; the rest are the model's defaults, RecVAE's
as its own row's). Every model is compared with EASE on the
same test users: the mean paired difference of NDCG@100 over all test users of all seeds, with a
95% interval from a paired bootstrap (users resampled within each seed; 2,000 resamples, seed 0;
:func:`recvae.evaluation.paired_difference`), and the number of seeds where it beats EASE.

Writes ``<out-dir>/<name>.json``, ``.md`` and then ``.png`` (validation NDCG@100 per epoch), atomically;
without matplotlib (the ``plot`` extra) it says so once at the start and skips only the picture.
Examples::

    RECVAE_DATA=../shared/data python benchmarks/paper_table.py --dataset ml-100k
    python benchmarks/paper_table.py --data ratings.csv --name ml-1m
    python benchmarks/paper_table.py --synthetic-ml20m --models popularity,multvae,multdae --epochs 1
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recvae import __version__ as recvae_version
from recvae import tuning
from recvae.cli import CLIError, add_data_options, data_spec_from_args
from recvae.cli.common import add_time_split_options
from recvae.models.device import resolve_device, resolve_precision
from recvae.data import Interactions
from recvae.data.interactions import sorted_unique
from recvae.data.splits import default_n_heldout_users
from recvae.data.time_splits import make_split
from recvae.evaluation import evaluate
from recvae.experiment import REPORT_METRICS
from recvae.models.registry import is_neural
from recvae.fileio import write_bytes, write_json
from recvae.optional import MissingDependencyError, available

from table_report import HYBRIDS, LABELS, markdown, plot_curves, summarise  # the report (benchmarks/)

logger = logging.getLogger("paper_table")

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def repo_relative(arg: str) -> str:
    """An absolute path argument as seen from the repository (``../shared/...``), so a recorded
    command runs on any machine; other arguments as they are."""
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg
ALL_MODELS = ("multvae", "multdae", "recvae", "binary-multvae", "ease", "popularity")
#: rows run only when --models names them (the default is ALL_MODELS)
OPTIONAL_MODELS = ("edlae", "multvae-linear", "recvae-linear")
#: the hybrids' w, one run each (their linear path: EDLAE's choice on the same split): the grid
#: their linear_weight row declares for tuning
HYBRID_WEIGHTS = tuning.parse_grid(None, "recvae-linear")["linear_weight"]
EASE_GRID = tuning.EASE_GRID
# The heuristic runs' network (chosen on ML-1M validation users; see recvae.tuning)
HEURISTIC_NETWORK = tuning.HEURISTIC_NETWORK
# RecVAE: the reference defaults (recvae.models.RecVAE), 50 outer epochs unless --epochs is given.
RECVAE_PARAMS: dict = {}
# The binary-latent Mult-VAE: 200 bits (the paper's latent size), the paper's I-600-...-I network,
# straight-through bits, beta annealed to 1.0 over the run as heuristic run 1 (best epoch kept).
BINARY_PARAMS = {"hidden_dims": (600,), "latent_dim": 200}
# Liang et al. 2018, Table 2 (ML-20M): Recall@20, Recall@50, NDCG@100
PAPER_ML20M = {
    "Mult-VAE": {"recall@20": 0.395, "recall@50": 0.537, "ndcg@100": 0.426},
    "Mult-DAE": {"recall@20": 0.387, "recall@50": 0.524, "ndcg@100": 0.419},
}
# ML-20M after the paper's preprocessing
ML20M_SHAPE = (136_677, 20_108, 10_000_000)


class TimeBudget:
    """Wall-clock budget checked between runs: a run that started always finishes."""

    def __init__(self, minutes: float | None):
        self.start = time.perf_counter()
        self.limit = None if minutes is None else 60.0 * minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit


# -- data --------------------------------------------------------------------------------------

def synthetic_ml20m(seed: int = 0, shape=ML20M_SHAPE) -> Interactions:
    """ML-20M-shaped implicit data built directly as CSR (never dense).

    Users' history lengths are log-normal (floor 5, like the paper's filter), scaled to the
    target interaction count; items are drawn from a Zipf-like popularity ``p_i ~ 1/(rank+10)^0.9``
    (long tail) in a random order; duplicates within a user are dropped.
    """
    n_users, n_items, n_target = shape
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=0.0, sigma=1.1, size=n_users)
    # duplicates drawn within a user are removed below: aim ~6% above the target
    lengths = np.maximum(5, np.round(lengths * (1.06 * n_target / lengths.sum()))).astype(np.int64)
    lengths = np.minimum(lengths, n_items // 2)
    popularity = 1.0 / (np.arange(n_items) + 10.0) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    items = rng.choice(n_items, size=int(lengths.sum()), p=popularity)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    codes = sorted_unique(users * n_items + items)
    for _ in range(20):  # duplicates can leave a user under 5 distinct items: draw more for those
        short = np.flatnonzero(np.bincount(codes // n_items, minlength=n_users) < 5)
        if short.size == 0:
            break
        extra = np.repeat(short, 5) * n_items + rng.choice(n_items, size=5 * short.size, p=popularity)
        codes = sorted_unique(np.concatenate([codes, extra]))
    rows, cols = np.divmod(codes, n_items)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    matrix = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float32), cols.astype(np.int32), indptr), shape=(n_users, n_items)
    )
    return Interactions(matrix=matrix, user_ids=np.arange(n_users), item_ids=np.arange(n_items))


def load_data(args) -> tuple[Interactions, dict]:
    if args.synthetic_ml20m:
        data = synthetic_ml20m(seed=0)
        return data, {"source": "synthetic ML-20M-shaped data (seed 0): log-normal user lengths, Zipf-like items"}
    spec = data_spec_from_args(args)
    spec.check_optional()
    data = spec.load(show_progress=False, timestamps=in_time(args))
    from dataclasses import asdict

    source = asdict(spec)
    if source.get("path"):  # as the recorded command gives it: from the repository, not this machine's root
        source["path"] = repo_relative(source["path"])
    return data, {"source": source}


def default_name(args) -> str:
    if args.name:
        return args.name
    if args.synthetic_ml20m:
        return "synthetic-ml20m"
    return args.dataset if args.dataset else Path(args.data).stem


# -- runs --------------------------------------------------------------------------------------

def metrics_of(res) -> dict:
    """Test metrics (mean, stderr) and the per-user NDCG@100 the paired comparison with EASE uses."""
    return ({m: {"mean": res[m].mean, "stderr": res[m].stderr} for m in REPORT_METRICS}
            | {"n_users": res.n_users, "ndcg@100_per_user": res.per_user["ndcg@100"].tolist()})


def trial_info(trial, test_users) -> dict:
    """What the results keep of a finished trial (``recvae.tuning.Trial``): its validation
    choice, timing and curve, and its fitted model's test metrics."""
    model = trial.estimator
    params = dict(trial.params)
    if not is_neural(trial.model):
        return {"train_seconds": trial.seconds, "params": params,
                "test": metrics_of(evaluate(model, test_users, ks=(20, 50, 100)))}
    hist = model.history_
    return {
        "train_seconds": trial.seconds,
        "epochs_run": len(hist),
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in hist])),
        "validation_seconds_per_epoch": float(np.mean([h["val_seconds"] or 0.0 for h in hist])),
        "best_epoch": trial.best_epoch,
        "validation_ndcg@100": trial.validation,
        "beta_at_best_epoch": trial.beta,
        "max_beta": float(max(h["beta"] for h in hist)),
        "stopped_early": model.stopped_early_,
        "curve": [h["val_ndcg@100"] for h in hist],
        "params": params,
        "test": metrics_of(evaluate(model, test_users, ks=(20, 50, 100))),
    }


def heuristic_network(args) -> dict:
    """The heuristic runs' network parameters: HEURISTIC_NETWORK, or none (the paper's defaults)."""
    return HEURISTIC_NETWORK if args.heuristic_network == "tuned" else {}


def run_seed(seed: int, data: Interactions, args, models, budget: TimeBudget, results: dict) -> bool:
    """Fit and evaluate every model on one split; fills ``results[key]`` as runs finish.
    Every choice goes through recvae.tuning, as `recvae tune` makes it. Returns False when the
    time budget ran out before every run of this seed was done."""
    split = make_split(data, seed=seed, n_heldout_users=args.n_heldout_users, cutoff=args.cutoff,
                       leave_last=args.leave_last)
    results["split"] = split.describe()
    common = dict(device=args.device, precision=args.precision, random_state=seed)
    if args.epochs is not None:
        common["epochs"] = args.epochs
    # every neural run gets --patience (default 50, the committed tables' protocol), never the library's default
    common["patience"] = args.patience

    def stop() -> bool:
        if budget.exhausted():
            logger.warning("--max-minutes reached after %.1f min: stopping before the next run", budget.elapsed() / 60)
            return True
        return False

    def trials(prefix: str) -> tuning.Trials:
        """A search whose every finished trial is evaluated on test and kept as ``prefix + name``."""
        def record(trial):
            results[prefix + trial.name] = trial_info(trial, split.test)
        return tuning.Trials(split.train, split.validation, on_trial=record, before_trial=stop)

    try:
        if "popularity" in models:
            trials("").run("popularity", "popularity", {})
        if "ease" in models:
            # the l2 grid shares one Gram matrix, so the trials keep no model: fit the chosen one
            search = tuning.Trials(split.train, split.validation, before_trial=stop)
            t0 = time.perf_counter()
            tuning.ease_trials(search, args.ease_grid)
            ease = tuning.best_estimator(search)
            best = search.best
            results["ease"] = {"train_seconds": time.perf_counter() - t0, "params": {"l2": best.params["l2"]},
                               "validation_grid": [{"l2": t.params["l2"], "ndcg@100": t.validation}
                                                   for t in search.trials],
                               "validation_ndcg@100": best.validation,
                               "test": metrics_of(evaluate(ease, split.test, ks=(20, 50, 100)))}
            del ease
        if "edlae" in models:
            # EDLAE (Steck, NeurIPS 2020) over its default grid (p x l2, one Gram matrix), as `recvae tune`
            t0 = time.perf_counter()
            search = tuning.search("edlae", split.train, split.validation, tuning.parse_grid(None, "edlae"),
                                   before_trial=stop)
            edlae = tuning.best_estimator(search)
            best = search.best
            results["edlae"] = {"train_seconds": time.perf_counter() - t0,
                                "params": {k: best.params[k] for k in ("l2", "p")},
                                "validation_grid": [{"l2": t.params["l2"], "p": t.params["p"], "ndcg@100": t.validation}
                                                    for t in search.trials],
                                "validation_ndcg@100": best.validation,
                                "test": metrics_of(evaluate(edlae, split.test, ks=(20, 50, 100)))}
            del edlae
        path = results.get("edlae", {}).get("params")
        for hybrid in (h for h in HYBRIDS if h in models):
            if path is None:  # EDLAE's choice on this split, as its row makes it
                search = tuning.search("edlae", split.train, split.validation, tuning.parse_grid(None, "edlae"),
                                       before_trial=stop)
                path = {k: search.best.params[k] for k in ("l2", "p")}
            base = {**common, **RECVAE_PARAMS} if hybrid == "recvae-linear" else common
            search = trials(hybrid + ":")
            for w in HYBRID_WEIGHTS:
                search.run(f"w={w:g}", hybrid, {**base, **path, "linear_weight": w})
            best = hybrid + ":" + search.best.name
            results[hybrid] = {**results[best], "selected": best}
        if "multvae" in models:
            search = trials("multvae:")
            tuning.multvae_trials(search, common, network=heuristic_network(args))
            # the Mult-VAE row: the run with the best validation NDCG@100 (never test)
            best = "multvae:" + search.best.name
            results["multvae"] = {**results[best], "selected": best}
            if args.compare_precision != "none":
                other = "fp32" if args.precision == "bf16" else "bf16"
                params = {**search.best.params, "precision": other}
                if args.compare_precision == "timing":
                    params["epochs"] = min(5, params.get("epochs", 200))
                    params["patience"] = None  # seconds per epoch: every epoch, whatever the library's default
                trials("multvae:").run("other-precision", "multvae", params)
                results["multvae:other-precision"]["mode"] = args.compare_precision
        if "multdae" in models:
            trials("").run("multdae", "multdae", common)
        if "recvae" in models:
            trials("").run("recvae", "recvae", {**common, **RECVAE_PARAMS})
        if "binary-multvae" in models:
            # beta annealed to 1.0 over the run, as heuristic run 1 (the best epoch kept)
            slope = tuning.full_run_updates("binary-multvae", common, split.train.n_users)
            trials("").run("binary-multvae", "binary-multvae",
                           {**common, **BINARY_PARAMS, "anneal_cap": 1.0, "total_anneal_steps": slope})
    except tuning.TuningStopped:
        return False
    return True


def environment() -> dict:
    import scipy
    import torch

    cpu, flags = platform.processor() or "unknown", set()
    try:  # the first processor's model name and flags
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu, flags = fields.get("model name", cpu), set(fields.get("flags", "").split())
    except OSError:
        pass
    return {"torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "recvae": recvae_version, "python": platform.python_version(), "cpu": cpu,
            "amx": bool(flags & {"amx_bf16", "amx_tile"}), "avx512_bf16": "avx512_bf16" in flags,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


# -- command line ------------------------------------------------------------------------------

def in_time(args) -> bool:
    """Whether the split is in time (``--cutoff`` or ``--leave-last``)."""
    return args.cutoff is not None or args.leave_last is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a MovieLens name (see `recvae datasets`)")
    src.add_argument("--data", metavar="FILE", help="an interaction file: CSV, TSV, GroupLens '::' (.dat) or Parquet")
    src.add_argument("--synthetic-ml20m", action="store_true",
                     help="ML-20M-shaped synthetic data (136,677 users x 20,108 items, ~10M interactions)")
    add_data_options(p)
    p.add_argument("--name", help="results file names (default: dataset name or file stem)")
    p.add_argument("--seeds", help="split seeds: a count N (seeds 0..N-1) or a list like 0,3,7 "
                                   "(default 5 below 2,000 users, else 3)")
    p.add_argument("--models", default=",".join(ALL_MODELS),
                   help=f"comma list out of {','.join(ALL_MODELS + OPTIONAL_MODELS)} (default: all but "
                        f"{','.join(OPTIONAL_MODELS)})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="matrix product precision of Mult-VAE/Mult-DAE training (default auto, as `recvae "
                        "train`: bf16 where the CPU or GPU has it natively, else fp32)")
    p.add_argument("--compare-precision", choices=("none", "timing", "full"), default="none",
                   help="rerun the selected Mult-VAE in the other precision: fully (a table row) or "
                        "5 epochs for seconds per epoch")
    p.add_argument("--heuristic-network", choices=("tuned", "paper"), default="tuned",
                   help="network of the heuristic's two Mult-VAE runs: HEURISTIC_NETWORK (default) or the paper's")
    p.add_argument("--epochs", type=int, help="neural models' epochs (paper: 200)")
    p.add_argument("--patience", type=int, default=50,
                   help="early stopping after this many epochs without validation gain (default 50)")
    p.add_argument("--ease-grid", default=",".join(f"{v:g}" for v in EASE_GRID), help="EASE l2 values")
    p.add_argument("--n-heldout-users", type=int,
                   help="validation and test users each (default: recvae.data.splits.default_n_heldout_users)")
    add_time_split_options(p)  # a split in time instead of the paper's random fold-in
    p.add_argument("--max-minutes", type=float, help="stop cleanly between runs after this much time")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p


def split_words(args) -> str:
    """The split, as the report's protocol line names it."""
    if args.cutoff is not None:
        return f"split in time at {args.cutoff} per seed (fold-in before it, targets at or after it)"
    if args.leave_last is not None:
        return f"split in time per seed (each held-out user's last {args.leave_last} interaction(s) are the targets)"
    return "strong generalization split per seed (80/20 fold-in)"


def parse_seeds(text: str | None, n_users: int) -> list[int]:
    if text is None:
        return list(range(5 if n_users < 2000 else 3))
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise CLIError(f"--seeds: expected a count or a comma list of integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise CLIError(f"--seeds: expected at least one non-negative seed, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("recvae").setLevel(logging.WARNING)
    try:
        return _main(args, argv)
    except (CLIError, ValueError, KeyError, OSError, MissingDependencyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        where = f" (--data {args.data})" if args.data and args.data not in msg else ""
        print(f"paper_table: error{where}: {msg}", file=sys.stderr)
        return 2


def _main(args, argv) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(ALL_MODELS + OPTIONAL_MODELS))
    if unknown or not models:
        raise CLIError(f"--models: unknown {unknown}; expected a comma list out of "
                       f"{','.join(ALL_MODELS + OPTIONAL_MODELS)}")
    try:
        args.ease_grid = tuple(float(v) for v in args.ease_grid.split(","))
    except ValueError:
        raise CLIError(f"--ease-grid: expected comma-separated numbers, got {args.ease_grid!r}") from None
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise CLIError(f"--max-minutes: expected a positive number, got {args.max_minutes}")
    if not args.out_dir.is_dir():
        raise CLIError(f"--out-dir {args.out_dir}: no such folder")
    # "auto" resolved once, so the other-precision rerun and the report name the precision used
    args.precision = resolve_precision(args.precision, resolve_device(args.device))
    budget = TimeBudget(args.max_minutes)
    load_start = os.getloadavg()
    plot = available("matplotlib")  # checked now: a long run must not die drawing its picture
    if not plot:
        logger.warning("matplotlib is not installed: the results will have no picture (pip install 'recvae[plot]')")

    data, source = load_data(args)
    if data.n_users < 3:
        raise CLIError(f"{data.n_users} user(s) left after preprocessing; need training, validation and test users")
    if data.n_items < 100:
        raise CLIError(f"{data.n_items} item(s) left after preprocessing; NDCG@100 needs at least 100")
    if args.n_heldout_users is None and not in_time(args):  # a split in time: its own rule
        args.n_heldout_users = default_n_heldout_users(data.n_users)
    seeds = parse_seeds(args.seeds, data.n_users)
    name = default_name(args)
    logger.info("%s: %d users, %d items, %d interactions; seeds %s; models %s", name, data.n_users,
                data.n_items, data.nnz, seeds, models)

    per_seed, stopped = [], None
    for seed in seeds:
        if budget.exhausted():
            stopped = f"--max-minutes {args.max_minutes:g} reached before seed {seed}"
            break
        results = {"seed": seed}
        t0 = time.perf_counter()
        finished = run_seed(seed, data, args, models, budget, results)
        results["seconds"] = time.perf_counter() - t0
        if any(k in results for k in LABELS):
            per_seed.append(results)
        msg = ", ".join(f"{k} {v['test']['ndcg@100']['mean']:.4f}" for k, v in results.items()
                        if k in LABELS)
        logger.info("seed %d (%.0f s): test NDCG@100 %s", seed, results["seconds"], msg)
        if not finished:
            stopped = f"--max-minutes {args.max_minutes:g} reached during seed {seed} (its remaining runs skipped)"
            break
    if not per_seed:
        raise CLIError(f"--max-minutes {args.max_minutes:g}: no run finished; nothing to report")

    report = {
        "benchmark": "paper_table",
        "name": name,
        "data": {**source, "n_users": int(data.n_users), "n_items": int(data.n_items),
                 "n_interactions": int(data.nnz)},
        "protocol": f"paper preprocessing; {split_words(args)}; model "
                    "selection on validation NDCG@100; test on held-out users",
        **({"split": split_words(args).replace(" per seed", "")} if in_time(args) else {}),
        "n_heldout_users": int(per_seed[0]["split"]["n_heldout_users"]),
        "seeds": seeds,
        "seeds_done": [r["seed"] for r in per_seed],
        "models": models,
        "precision": args.precision,
        "heuristic_network": heuristic_network(args) or "paper",
        "epochs": args.epochs or 200,
        "patience": args.patience,
        "anneal_steps": tuning.full_run_updates("multvae", {"epochs": args.epochs} if args.epochs else {},
                                                per_seed[0]["split"]["train"]["n_users"]),
        "ease_grid": list(args.ease_grid),
        **({"edlae_grid": {k: list(v) for k, v in tuning.parse_grid(None, "edlae").items()}}
           if "edlae" in models else {}),
        **({"hybrid_weights": list(HYBRID_WEIGHTS)} if set(HYBRIDS) & set(models) else {}),
        "complete": stopped is None,
        "stopped_reason": stopped,
        "summary": summarise(per_seed),
        "per_seed": per_seed,
        "paper_table2_ml20m": PAPER_ML20M if (args.synthetic_ml20m or args.dataset == "ml-20m"
                                              or name == "ml-20m") else None,
        "total_seconds": budget.elapsed(),
        "peak_rss_gb": peak_rss_gb(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "environment": environment(),
        "command": shlex.join(["python", "benchmarks/paper_table.py",
                               *map(repo_relative, sys.argv[1:] if argv is None else argv)]),
    }
    out = args.out_dir
    md = markdown(report)
    write_json(out / f"{name}.json", report)  # the numbers first: the picture is the optional part
    write_bytes(out / f"{name}.md", md.encode())
    print(md)
    if plot:
        plot_curves(per_seed, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
