"""The Mult-VAE paper's three data shapes on one machine: ML-20M, Netflix and MSD, synthetic.

Liang et al. (WWW 2018, Table 1) train on ML-20M (136,677 users x 20,108 items, 10.0M
interactions, 10,000 + 10,000 held-out users), Netflix (463,435 x 17,769, 56.9M; 40,000 +
40,000) and MSD (571,355 x 41,140, 33.6M; 50,000 + 50,000). For each shape, data of that shape
(:func:`paper_table.synthetic_ml20m`: log-normal history lengths, Zipf-like item popularity,
seed 0) goes through two processes of its own:

1. **generation**: builds the data and writes it as a prepared directory (``recvae prepare``'s
   memory-mapped format); its seconds and peak RSS are reported apart, as the generator's arrays
   are no part of training;
2. **measurement**, a fresh process whose peak RSS is the shape's figure, timing in turn
   * preparation: loading the prepared directory (its files are in the page cache, written just
     before) and the strong generalization split (N validation + N test users, seed 0);
   * one Mult-VAE epoch (the paper's network and defaults; precision "auto": bf16 where native)
     with validation NDCG@100 on the N validation users;
   * test evaluation (Recall@20/50, NDCG@100 of the N test users);
   * top-100 for every training user (``model.recommend(train, N=100)``: score, mask the
     history, top-K) and the forward passes alone (``model.score``) over the same users in the
     same batches of 1,000. The two alternate, ``--chunk-users`` users at a time, so a change
     of load on a shared machine reaches both alike.
   Each step's own peak RSS is read from ``VmHWM`` after resetting it (Linux ``clear_refs``).

The results hold, per step and shape, seconds and the cost per interaction, per user and per
user x item it handles, and how the cost per unit of work grows from ML-20M to the larger shapes
(its work: interactions for generation and preparation, users x items for the dense steps).
Targets checked and printed: each measuring process under 4 GB peak RSS; top-100 within 1.5x of
its forward passes; no step whose cost per unit of work grows by more than GROWTH_LIMIT.

Writes ``benchmarks/results/paper_shapes.{json,md}`` for a full run (every shape, scale 1); a
quick check (``--shapes``, ``--scale``, ``--items``) prints only, unless ``--out-dir`` is given.

**Models side by side** (``--models``, a comma list out of ``multvae``, ``ease``,
``recvae-linear``, ``multvae-linear``; default ``multvae``, the run above): each model of the list
is measured in a fresh process of its own per shape (its peak RSS is the model's figure), from
the same generated data and split, built by the model registry (``recvae.models.make_model``:
defaults, ``epochs=1``, seed 0, the CPU) and timed in the same steps where they apply:

* the fit: one epoch for Mult-VAE (one outer epoch, 3 encoder + 1 decoder passes, for RecVAE),
  the closed-form fit for EASE (float64, its default), the linear path's closed-form ``B``
  (EDLAE's, float64 then kept in float32) and then the VAE's epoch for the hybrids: the linear
  fit's seconds (``linear_seconds_``) and the epoch's are reported apart;
* validation NDCG@100 on the validation users: inside the fit for the VAEs (after the epoch),
  one ``evaluate`` after the fit for EASE;
* test evaluation (Recall@20/50, NDCG@100), the forward passes and top-100 for every training user
  (batches of 1,000), as above.

A model that refuses before fitting (:class:`~recvae.errors.ParameterError`: the hybrids beyond
``max_linear_gb``, 8 GB by default, as on MSD's 41,140 items, ~20 GB) is a row holding its one-line
message; a measuring process that fails or runs past its time is a row saying so (the run goes on
and exits with 1). ``--max-linear-gb`` is passed to the hybrids. For the linear models the row
also holds the size of the item-item matrix kept (EASE's ``B_``: n_items^2 x 8 bytes in float64;
the hybrids' ``B``: n_items^2 x 4 bytes) beside the measured peak. Writes
``benchmarks/results/paper_shapes_models.{json,md}`` at full scale (``--scale 1``, no ``--items``)
whatever the shapes; a quick check prints only, unless ``--out-dir`` is given. ``--merge REPORT...``
runs nothing: the rows of finished ``--models`` reports that ran replace the same rows of the
committed report, each row then naming its run (so one long row can be measured alone, later).
Examples::

    python benchmarks/paper_shapes.py                       # all three shapes: ~15 min on 2 cores
    python benchmarks/paper_shapes.py --shapes msd --scale 0.05
    python benchmarks/paper_shapes.py --shapes ml-20m,msd --models multvae,ease,recvae-linear,multvae-linear
    python benchmarks/paper_shapes.py --shapes ml-20m --scale 0.001 --items 2000 --models ease,recvae-linear
    python benchmarks/paper_shapes.py --shapes msd --models ease --out-dir /tmp/msd-ease
    python benchmarks/paper_shapes.py --merge /tmp/msd-ease/paper_shapes_models.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(REPO))

from paper_table import ML20M_SHAPE, environment, repo_relative, synthetic_ml20m  # noqa: E402

#: name -> (label, users, items, interactions, held-out users per set): the paper's Table 1
SHAPES = {
    "ml-20m": ("ML-20M", *ML20M_SHAPE, 10_000),
    "netflix": ("Netflix", 463_435, 17_769, 56_900_000, 40_000),
    "msd": ("MSD", 571_355, 41_140, 33_600_000, 50_000),
}
SEED = 0
K = 100
BATCH = 1000  # users per scoring batch: Recommender.batch_size_predict, the default of recommend
RSS_LIMIT_GB = 4.0
TOP_K_LIMIT = 1.5  # top-100 over all training users / their forward passes
GROWTH_LIMIT = 1.3  # a step's cost per unit of work at a larger shape / at ML-20M (timings here are noisy)
TIMEOUT_S = {"generate": 1800, "measure": 3600, "model": 10800}  # model: EASE on MSD, ~1 h on 2 cores
#: step -> (what it is, its work unit): "interactions" or "user x item"
STEPS = {
    "generation": ("generate the synthetic data and write the prepared directory (own process)", "interactions"),
    "preparation": ("load the prepared directory + strong generalization split", "interactions"),
    "training": ("one Mult-VAE epoch's updates (training users)", "user x item"),
    "validation": ("validation NDCG@100 after the epoch (validation users)", "user x item"),
    "evaluation": ("test evaluation, Recall@20/50 and NDCG@100 (test users)", "user x item"),
    "forward": ("forward passes alone (training users, batches of 1,000)", "user x item"),
    "top-100": ("top-100 for every training user (model.recommend)", "user x item"),
}


#: --models: registry name -> label
MODELS = {"multvae": "Mult-VAE", "ease": "EASE", "recvae-linear": "RecVAE + linear path",
          "multvae-linear": "Mult-VAE + linear path"}
DEFAULT_MODELS = ("multvae",)


def scaled(name: str, scale: float, items: int | None = None) -> dict:
    """The shape ``name`` with ``scale`` of its users, interactions and held-out users (floors:
    50 users, 5 interactions each, 10 held-out users per set) and ``items`` items when given."""
    label, users, items_, interactions, heldout = SHAPES[name]
    items = items_ if items is None else items
    n_users = max(round(users * scale), 50)
    return {"name": name, "label": label, "n_users": n_users, "n_items": items,
            "n_interactions": max(round(interactions * scale), 5 * n_users),
            "n_heldout_users": min(max(round(heldout * scale), 10), (n_users - 1) // 3)}


# -- memory of this process ----------------------------------------------------------------------
def peak_rss_gb() -> float:
    """This process's peak RSS (``ru_maxrss``, in KiB on Linux): since it started, or since the
    last :func:`reset_step_peak` (the reset lowers the kernel's high-water mark that it reads);
    :meth:`Steps.peak_gb` is the whole process's."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _status_gb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024**2 if m else None


def reset_step_peak() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS, so the next reading is one step's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Steps:
    """Seconds and peak RSS of each step of a measuring process."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def run(self, name: str, fn):
        exact = reset_step_peak()
        t = time.perf_counter()
        out = fn()
        self.add(name, time.perf_counter() - t, _status_gb("VmHWM") if exact else None)
        return out

    def peak_gb(self) -> float:
        """The process's peak RSS so far: the highest of its steps' peaks and of the reading now
        (each step's reset of VmHWM also lowers ``ru_maxrss``)."""
        return max([peak_rss_gb(), *(r["peak_rss_gb"] for r in self.rows.values() if r["peak_rss_gb"] is not None)])

    def add(self, name: str, seconds: float, peak_gb: float | None, **extra) -> None:
        row = self.rows.setdefault(name, {"seconds": 0.0, "peak_rss_gb": None})
        row["seconds"] += seconds
        if peak_gb is not None:
            row["peak_rss_gb"] = max(row["peak_rss_gb"] or 0.0, peak_gb)
        row.update(extra)
        print(f"  {name}: {row['seconds']:.1f} s" + (f", peak RSS {peak_gb:.2f} GB" if peak_gb else ""), flush=True)


# -- the two worker processes ---------------------------------------------------------------------
def generate(args) -> dict:
    from recvae.data.prepared import write_prepared

    shape = json.loads(args.shape_json)
    t0 = time.perf_counter()
    data = synthetic_ml20m(seed=SEED, shape=(shape["n_users"], shape["n_items"], shape["n_interactions"]))
    t1 = time.perf_counter()
    write_prepared(data, args.prepared, preprocessing={"synthetic": f"paper_table.synthetic_ml20m, seed {SEED}",
                                                       "shape": shape["name"]})
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "generate_seconds": t1 - t0, "write_seconds": t2 - t1,
            "n_users": int(data.n_users), "n_items": int(data.n_items), "nnz": int(data.nnz),
            "peak_rss_gb": peak_rss_gb()}


def score_training_users(model, train, steps: Steps, chunk_users: int) -> int:
    """Top-100 and forward passes over the training users, alternating chunk by chunk; their count."""
    n = train.shape[0]
    ids = np.full((n, K), -1, dtype=np.int64)  # the whole answer, as one recommend call returns it
    scores = np.full((n, K), -np.inf, dtype=np.float32)
    for lo in range(0, n, chunk_users):
        hi = min(lo + chunk_users, n)

        def forward():
            for b in range(lo, hi, BATCH):
                model.score(train[b:min(b + BATCH, hi)])

        def top():
            ids[lo:hi], scores[lo:hi] = model.recommend(train[lo:hi], N=K, batch_size=BATCH)

        steps.run("forward", forward)
        steps.run("top-100", top)
    assert (ids >= 0).all()
    return n


def prepared_split(prepared: str, shape: dict):
    """The prepared directory loaded and split as the paper does (N validation + N test users)."""
    from recvae.data.prepared import load_prepared
    from recvae.data.splits import strong_generalization_split

    return strong_generalization_split(load_prepared(prepared), n_heldout_users=shape["n_heldout_users"], seed=SEED)


def measure(args) -> dict:
    import torch

    from recvae.evaluation import evaluate
    from recvae.models import MultVAE

    shape = json.loads(args.shape_json)
    steps = Steps()
    rss_start = _status_gb("VmRSS")

    split = steps.run("preparation", lambda: prepared_split(args.prepared, shape))
    train = split.train.matrix
    model = MultVAE(epochs=1, random_state=SEED, device="cpu")
    steps.run("epoch", lambda: model.fit(split.train, validation=split.validation))
    epoch = steps.rows.pop("epoch")
    row = model.history_[0]
    steps.add("training", row["seconds"], epoch["peak_rss_gb"])
    steps.add("validation", row["val_seconds"], None, ndcg100=row["val_ndcg@100"])
    res = steps.run("evaluation", lambda: evaluate(model, split.test, ks=(20, 50, 100)))
    steps.rows["evaluation"]["ndcg100"] = res["ndcg@100"].mean

    n = score_training_users(model, train, steps, args.chunk_users)
    return {"steps": steps.rows, "n_train_users": int(n), "n_train_interactions": int(train.nnz),
            "n_items": int(train.shape[1]), "n_heldout_users": int(res.n_users),
            "n_test_fold_in": int(split.test.fold_in.nnz), "n_validation_fold_in": int(split.validation.fold_in.nnz),
            "n_interactions": int(sum(m.nnz for m in (train, split.validation.fold_in, split.validation.heldout,
                                                      split.test.fold_in, split.test.heldout))),
            "precision": model.precision_, "rss_at_start_gb": rss_start, "peak_rss_gb": steps.peak_gb(),
            "step_peaks_exact": reset_step_peak(), "torch_threads": torch.get_num_threads()}


def item_item_matrix(model) -> dict | None:
    """The item-item matrix a linear model keeps (EASE's ``B_``, a hybrid's ``module_.linear``):
    its dtype and GB, and n_items^2 x 4 bytes (float32) beside it; None for a model without one."""
    B = getattr(model, "B_", None)
    if B is not None:
        dtype, nbytes = B.dtype.name, B.nbytes
    else:
        B = getattr(getattr(model, "module_", None), "linear", None)
        if B is None or B.numel() == 0:
            return None
        dtype, nbytes = str(B.dtype).removeprefix("torch."), B.numel() * B.element_size()
    n = int(B.shape[0])
    return {"n_items": n, "dtype": dtype, "gb": nbytes / 1e9, "float32_gb": n * n * 4 / 1e9}


def measure_model(args) -> dict:
    """One model of ``--models`` (``--model-json``: its registry name and parameters) on the
    prepared data: the fit (its parts apart), validation, test evaluation, forward passes and
    top-100; a refusal before fitting (ParameterError) is returned as the row's message."""
    import torch

    from recvae.errors import ParameterError
    from recvae.evaluation import evaluate
    from recvae.models import make_model
    from recvae.models.registry import trains_by_epochs

    shape, spec = json.loads(args.shape_json), json.loads(args.model_json)
    steps = Steps()
    rss_start = _status_gb("VmRSS")

    split = steps.run("preparation", lambda: prepared_split(args.prepared, shape))
    train = split.train.matrix
    model = make_model(spec["name"], **spec["params"])
    by_epochs = trains_by_epochs(type(model))
    info = {"model": spec["name"], "n_train_users": int(train.shape[0]), "n_items": int(train.shape[1]),
            "n_train_interactions": int(train.nnz), "rss_at_start_gb": rss_start,
            "torch_threads": torch.get_num_threads(),
            "params": {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v))
                       for k, v in model.get_params().items()}}  # every hyperparameter, as run
    try:
        if by_epochs:
            steps.run("fit", lambda: model.fit(split.train, validation=split.validation))
        else:
            steps.run("fit", lambda: model.fit(split.train))
    except ParameterError as e:  # refused before fitting (a hybrid's max_linear_gb): the row is its message
        print(f"  refused: {e}", flush=True)
        return {**info, "status": "refused", "message": str(e), "steps": steps.rows, "peak_rss_gb": steps.peak_gb(),
                "step_peaks_exact": reset_step_peak()}
    fit = steps.rows["fit"]
    parts = {}
    if getattr(model, "linear_seconds_", None) is not None:
        parts["linear"] = model.linear_seconds_
    if by_epochs:
        row = model.history_[0]
        parts["training"], parts["validation"] = row["seconds"], row["val_seconds"] or 0.0
        parts["other"] = fit["seconds"] - sum(parts.values())
        fit["parts"] = parts
        steps.add("validation", parts["validation"], None, ndcg100=row["val_ndcg@100"], in_fit=True)
    else:
        fit["parts"] = parts
        val = steps.run("validation", lambda: evaluate(model, split.validation, ks=(K,)))
        steps.rows["validation"].update(ndcg100=val[f"ndcg@{K}"].mean, in_fit=False)
    res = steps.run("evaluation", lambda: evaluate(model, split.test, ks=(20, 50, 100)))
    steps.rows["evaluation"].update(ndcg100=res["ndcg@100"].mean, recall20=res["recall@20"].mean,
                                    recall50=res["recall@50"].mean)
    score_training_users(model, train, steps, args.chunk_users)
    return {**info, "status": "ok", "steps": steps.rows, "ndcg100": res["ndcg@100"].mean,
            "ndcg100_validation": steps.rows["validation"]["ndcg100"], "n_heldout_users": int(res.n_users),
            "item_item": item_item_matrix(model), "precision": getattr(model, "precision_", None),
            "peak_rss_gb": steps.peak_gb(), "step_peaks_exact": reset_step_peak()}


# -- driver ---------------------------------------------------------------------------------------
class WorkerFailed(SystemExit):
    """A worker process that exited with an error or ran past its time (its message says which)."""


def launch(kind: str, shape: dict, prepared: Path, out: Path, chunk_users: int, model_json: str | None = None) -> dict:
    """Run one worker process (its own session), killed with its group in every outcome."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--shape-json", json.dumps(shape),
           "--prepared", str(prepared), "--worker-out", str(out), "--chunk-users", str(chunk_users)]
    if model_json is not None:
        cmd += ["--model-json", model_json]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    rc = None
    try:
        rc = p.wait(timeout=TIMEOUT_S[kind])
    except subprocess.TimeoutExpired:
        pass
    finally:  # stopped in every outcome: done, timed out, or this process interrupted
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if rc is None:
        raise WorkerFailed(f"paper_shapes: {shape['name']}: the {kind} process did not finish within "
                           f"{TIMEOUT_S[kind]} s; stopped it")
    if rc != 0:
        raise WorkerFailed(f"paper_shapes: {shape['name']}: the {kind} process exited with {rc}"
                           + (" (killed: out of memory?)" if rc == -signal.SIGKILL else ""))
    return json.loads(out.read_text())


def run_shape(shape: dict, chunk_users: int) -> dict:
    print(f"{shape['label']}: {shape['n_users']:,} users x {shape['n_items']:,} items, "
          f"~{shape['n_interactions']:,} interactions, {shape['n_heldout_users']:,} + "
          f"{shape['n_heldout_users']:,} held-out users", flush=True)
    with tempfile.TemporaryDirectory(prefix="paper-shapes-") as tmp:
        prepared = Path(tmp) / "prepared"
        load = [round(v, 2) for v in os.getloadavg()]
        gen = launch("generate", shape, prepared, Path(tmp) / "generate.json", chunk_users)
        print(f"  generation: {gen['seconds']:.1f} s, peak RSS {gen['peak_rss_gb']:.2f} GB (own process)", flush=True)
        meas = launch("measure", shape, prepared, Path(tmp) / "measure.json", chunk_users)
    meas["steps"] = {"generation": {"seconds": gen["seconds"], "peak_rss_gb": gen["peak_rss_gb"]}, **meas["steps"]}
    return {**shape, "nnz": gen["nnz"], "generation": gen, "measure": meas, "load_average_before": load,
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def run_models_shape(shape: dict, models: dict[str, dict], chunk_users: int, skip: frozenset = frozenset()) -> dict:
    """One shape for ``--models``: the data generated once, then each model in a fresh measuring
    process; a failed process is a row saying so, and the other models still run. A model named
    with this shape in ``skip`` (``--skip SHAPE:MODEL``) is a row saying it was not run."""
    print(f"{shape['label']}: {shape['n_users']:,} users x {shape['n_items']:,} items, "
          f"~{shape['n_interactions']:,} interactions, {shape['n_heldout_users']:,} + "
          f"{shape['n_heldout_users']:,} held-out users", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="paper-shapes-") as tmp:
        prepared = Path(tmp) / "prepared"
        load = [round(v, 2) for v in os.getloadavg()]
        gen = launch("generate", shape, prepared, Path(tmp) / "generate.json", chunk_users)
        print(f"  generation: {gen['seconds']:.1f} s, peak RSS {gen['peak_rss_gb']:.2f} GB (own process)", flush=True)
        for name, params in models.items():
            print(f" {MODELS[name]} ({name}):", flush=True)
            if (shape["name"], name) in skip:
                rows[name] = {"model": name, "status": "not run",
                              "message": f"left out of this run (`--skip {shape['name']}:{name}`)"}
                print(f"  {rows[name]['message']}", flush=True)
                continue
            spec = json.dumps({"name": name, "params": params})
            try:
                rows[name] = launch("model", shape, prepared, Path(tmp) / f"{name}.json", chunk_users, spec)
            except WorkerFailed as e:  # a row saying so; an interrupt (SIGTERM, Ctrl-C) still ends the run
                print(f"  {e}", flush=True)
                rows[name] = {"model": name, "status": "failed", "message": str(e)}
    return {**shape, "nnz": gen["nnz"], "generation": gen, "models": rows, "load_average_before": load,
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def work(result: dict, step: str) -> dict:
    """What ``step`` handles at this shape: users, interactions and its work units."""
    m = result["measure"]
    if step in ("generation", "preparation"):
        users, interactions = result["n_users"], result["nnz"]
    elif step == "validation":
        users, interactions = m["n_heldout_users"], m["n_validation_fold_in"]
    elif step == "evaluation":
        users, interactions = m["n_heldout_users"], m["n_test_fold_in"]
    else:
        users, interactions = m["n_train_users"], m["n_train_interactions"]
    unit = STEPS[step][1]
    return {"users": users, "interactions": interactions,
            "units": interactions if unit == "interactions" else users * m["n_items"]}


def analyse(results: list[dict]) -> dict:
    """Per step and shape: cost per interaction, per user, per user x item, and its growth per
    unit of work against the first (smallest) shape; the three targets."""
    base = results[0]
    table, growth = [], {}
    for step in STEPS:
        for r in results:
            s = r["measure"]["steps"][step]
            w = work(r, step)
            per_unit = s["seconds"] / w["units"]
            b = base["measure"]["steps"][step]["seconds"] / work(base, step)["units"]
            table.append({"step": step, "shape": r["name"], "seconds": s["seconds"], "peak_rss_gb": s["peak_rss_gb"],
                          "us_per_interaction": 1e6 * s["seconds"] / w["interactions"],
                          "ms_per_1k_users": 1e6 * s["seconds"] / w["users"],
                          "ns_per_user_item": 1e9 * s["seconds"] / (w["users"] * r["measure"]["n_items"]),
                          "work_ratio": w["units"] / work(base, step)["units"],
                          "cost_ratio": s["seconds"] / base["measure"]["steps"][step]["seconds"],
                          "growth_per_unit": per_unit / b})
        growth[step] = max(row["growth_per_unit"] for row in table if row["step"] == step)
    targets = {
        "rss": {r["name"]: {"peak_rss_gb": r["measure"]["peak_rss_gb"],
                            "ok": r["measure"]["peak_rss_gb"] < RSS_LIMIT_GB} for r in results},
        "top_k": {r["name"]: {"ratio": r["measure"]["steps"]["top-100"]["seconds"]
                              / r["measure"]["steps"]["forward"]["seconds"]} for r in results},
        "growth": {step: {"max_growth_per_unit": g, "ok": g <= GROWTH_LIMIT} for step, g in growth.items()},
    }
    for v in targets["top_k"].values():
        v["ok"] = v["ratio"] <= TOP_K_LIMIT
    return {"table": table, "targets": targets}


def markdown(report: dict) -> str:
    results, a, env = report["shapes"], report["analysis"], report["environment"]
    by = {r["name"]: r for r in results}
    names = [r["name"] for r in results]
    lines = [
        "# The paper's data shapes on one machine (synthetic data, one Mult-VAE epoch)", "",
        "Synthetic data of each shape of Liang et al. (WWW 2018, Table 1) from `paper_table.synthetic_ml20m` "
        f"(seed {SEED}; log-normal history lengths, Zipf-like items), scale {report['scale']:g}. Generation runs "
        "in a process of its own; every other step in one fresh measuring process per shape, whose peak RSS is "
        "the shape's figure. Mult-VAE: the paper's network (I-600-200-600-I), batches of 500, precision "
        f"{results[0]['measure']['precision']}; scoring batches of {BATCH:,} users.", "",
        "| shape | users | items | interactions | held-out users | generation s (peak RSS GB) | preparation s | "
        "epoch s: training + validation | test evaluation s | forward passes s | top-100 s (x forward) | "
        "peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, t = r["measure"]["steps"], a["targets"]
        lines.append(
            f"| {r['label']} | {r['n_users']:,} | {r['n_items']:,} | {r['nnz']:,} | {r['n_heldout_users']:,} + "
            f"{r['n_heldout_users']:,} | {s['generation']['seconds']:.1f} ({s['generation']['peak_rss_gb']:.2f}) | "
            f"{s['preparation']['seconds']:.1f} | {s['training']['seconds']:.1f} + {s['validation']['seconds']:.1f} | "
            f"{s['evaluation']['seconds']:.1f} | {s['forward']['seconds']:.1f} | {s['top-100']['seconds']:.1f} "
            f"({t['top_k'][r['name']]['ratio']:.2f}) | {r['measure']['peak_rss_gb']:.2f} |")
    lines += [
        "", "## How each cost grows", "",
        "Per step and shape: seconds, the step's own peak RSS, its cost per interaction, per user and per "
        "user x item it handles (generation and preparation: all users and interactions; training, forward and "
        "top-100: the training users and their interactions; validation and evaluation: the held-out users "
        "of one set and their fold-in interactions), and the growth of its cost per unit of work "
        "against ML-20M: (seconds here / seconds on ML-20M) / (work here / work on ML-20M), where the work is "
        "interactions for generation and preparation and users x items for the others. 1.0: the cost grows as "
        "its work.", "",
        "| step | shape | s | step peak RSS GB | µs / interaction | ms / 1k users | ns / user·item | work x | "
        "cost x | growth per unit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in a["table"]:
        peak = f"{row['peak_rss_gb']:.2f}" if row["peak_rss_gb"] is not None else ""
        lines.append(f"| {row['step']} | {by[row['shape']]['label']} | {row['seconds']:.1f} | {peak} | "
                     f"{row['us_per_interaction']:.2f} | {row['ms_per_1k_users']:.1f} | {row['ns_per_user_item']:.3f} | "
                     f"{row['work_ratio']:.2f} | {row['cost_ratio']:.2f} | {row['growth_per_unit']:.2f} |")
    t = a["targets"]
    ok = lambda b: "met" if b else "**missed**"  # noqa: E731
    lines += [
        "", "## Targets", "",
        f"* Peak RSS of each measuring process under {RSS_LIMIT_GB:g} GB: "
        + "; ".join(f"{by[n]['label']} {t['rss'][n]['peak_rss_gb']:.2f} GB ({ok(t['rss'][n]['ok'])})" for n in names),
        f"* Top-100 for every training user within {TOP_K_LIMIT:g}x its forward passes: "
        + "; ".join(f"{by[n]['label']} {t['top_k'][n]['ratio']:.2f}x ({ok(t['top_k'][n]['ok'])})" for n in names),
        f"* No step's cost per unit of work growing by more than {GROWTH_LIMIT:g}x from ML-20M: "
        + "; ".join(f"{step} {v['max_growth_per_unit']:.2f} ({ok(v['ok'])})" for step, v in t["growth"].items()),
        "", "Step descriptions: " + "; ".join(f"{k}: {v[0]}" for k, v in STEPS.items()) + ".", "",
        "Validation NDCG@100 after the epoch / test NDCG@100: "
        + "; ".join(f"{by[n]['label']} {by[n]['measure']['steps']['validation']['ndcg100']:.4f} / "
                    f"{by[n]['measure']['steps']['evaluation']['ndcg100']:.4f}" for n in names)
        + " (synthetic data: items are drawn by popularity alone, so there is little to learn beyond it).", "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, AMX {'yes' if env['amx'] else 'no'}, AVX-512 BF16 "
        f"{'yes' if env['avx512_bf16'] else 'no'}; torch {env['torch']} ({results[0]['measure']['torch_threads']} "
        f"threads), numpy {env['numpy']}, scipy {env['scipy']}, recvae {env['recvae']}. Load average (1, 5, 15 min) "
        "before / after each shape: " + "; ".join(f"{by[n]['label']} {by[n]['load_average_before']} / "
                                                 f"{by[n]['load_average_after']}" for n in names)
        + f". Total {report['total_seconds'] / 60:.1f} min.", "",
        f"Command: `{report['command']}`", "",
    ]
    return "\n".join(lines)


def _cell(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown_models(report: dict) -> str:
    """The ``--models`` report: one table per shape, a row per model (refusals and failures with
    their message)."""
    runs = runs_of(report)
    lines = [
        "# The paper's data shapes on one machine: Mult-VAE, EASE and the hybrids (synthetic data)", "",
        "Synthetic data of each shape of Liang et al. (WWW 2018, Table 1) from `paper_table.synthetic_ml20m` "
        f"(seed {SEED}; log-normal history lengths, Zipf-like items), scale {report['scale']:g}"
        + (f", {report['items']:,} items" if report["items"] else "") + ". The data is generated once per shape; "
        "each model is then measured in a fresh process of its own, whose peak RSS is the model's figure. Models "
        "from the registry at their defaults (" + "; ".join(f"{MODELS[n]}: `{n}`" + (
            f" {', '.join(f'{k}={v}' for k, v in p.items())}" if p else "") for n, p in report["models"].items())
        + f"). Scoring batches of {BATCH:,} users.", "",
        "Fit: one epoch for the VAEs (one outer epoch for RecVAE: 3 encoder and 1 decoder passes), the closed-form "
        "fit for EASE (float64), the linear path's closed-form B and then the VAE's epoch for the hybrids; of "
        "which the linear path's fit and the epoch's updates, apart. Validation NDCG@100: the VAEs' is inside "
        "their fit, after the epoch; EASE's is one evaluation after its fit. Item-item matrix: the one the model "
        "keeps (its dtype), and n_items^2 x 4 bytes (float32) beside it.", "",
    ]
    for r in report["shapes"]:
        seen = sorted({m["n_items"] for m in r["models"].values() if "n_items" in m})
        lines += [
            f"## {r['label']}: {r['n_users']:,} users x {r['n_items']:,} items, {r['nnz']:,} interactions, "
            f"{r['n_heldout_users']:,} + {r['n_heldout_users']:,} held-out users", "",
            *([f"Items in the training split (the columns every model fits): {', '.join(f'{n:,}' for n in seen)}.", ""]
              if seen and seen != [r["n_items"]] else []),
            f"Generation (own process): {r['generation']['seconds']:.1f} s, peak RSS "
            f"{r['generation']['peak_rss_gb']:.2f} GB. Load average (1, 5, 15 min) before / after: "
            f"{r['load_average_before']} / {r['load_average_after']}.", "",
            "| model | fit s | of which linear path s | of which epoch's updates s | validation s | test evaluation s | "
            "forward passes s | top-100 s (x forward) | fit peak RSS GB | peak RSS GB | item-item matrix GB "
            "(float32 size) | NDCG@100 validation / test |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in r["models"].items():
            label = f"{MODELS[name]} (`{name}`)" + (f", run {m.get('run', 0) + 1}" if len(runs) > 1 else "")
            if m["status"] != "ok":
                msg = m["message"].replace("|", "\\|")
                lines.append(f"| {label} | **{m['status']}**: {msg} |" + " — |" * 10)
                continue
            s = m["steps"]
            fit, parts = s["fit"], s["fit"].get("parts", {})
            mat = m["item_item"]
            lines.append(
                f"| {label} | {fit['seconds']:.1f} | {_cell(parts.get('linear'))} | {_cell(parts.get('training'))} | "
                f"{s['validation']['seconds']:.1f}{'' if s['validation']['in_fit'] else ' (after the fit)'} | "
                f"{s['evaluation']['seconds']:.1f} | {s['forward']['seconds']:.1f} | {s['top-100']['seconds']:.1f} "
                f"({s['top-100']['seconds'] / s['forward']['seconds']:.2f}) | {_cell(fit['peak_rss_gb'], '.2f')} | "
                f"{m['peak_rss_gb']:.2f} | "
                + (f"{mat['gb']:.2f} {mat['dtype']} ({mat['float32_gb']:.2f})" if mat else "—")
                + f" | {m['ndcg100_validation']:.4f} / {m['ndcg100']:.4f} |")
        lines.append("")
    lines += ["Synthetic data: items are drawn by popularity alone, so there is little to learn beyond it; the NDCG "
              "figures check that each model ran, not which is better.", ""]
    if len(runs) > 1:
        lines += [f"The rows come from {len(runs)} runs (each row says which), merged with `--merge`:", ""]
    for i, run in enumerate(runs):
        env = run["environment"]
        threads = sorted({m["torch_threads"] for r in report["shapes"] for m in r["models"].values()
                          if "torch_threads" in m and m.get("run", 0) == i})
        lines += [
            (f"Run {i + 1}. " if len(runs) > 1 else "")
            + f"Machine: {env['cpu']}, {env['cpu_count']} cores, AMX {'yes' if env['amx'] else 'no'}, AVX-512 BF16 "
            f"{'yes' if env['avx512_bf16'] else 'no'}; torch {env['torch']} ({', '.join(map(str, threads)) or '?'} "
            f"threads), numpy {env['numpy']}, scipy {env['scipy']}, recvae {env['recvae']}. "
            f"Total {run['total_seconds'] / 60:.1f} min.", "",
            f"Command: `{run['command']}`", "",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list out of {','.join(SHAPES)} (default: all)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of each shape's users, interactions and held-out users (items unchanged); "
                        "e.g. 0.05 for a quick check")
    p.add_argument("--items", type=int,
                   help="every shape's item count instead of the paper's (a quick check of the item-item models, "
                        "whose fit grows as items^3); not a full run")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma list out of {','.join(MODELS)} (default: multvae, the run above); any other list "
                        "measures each model in its own process and writes paper_shapes_models.{json,md}")
    p.add_argument("--max-linear-gb", type=float,
                   help="max_linear_gb of the hybrids (recvae-linear, multvae-linear; default: the model's, 8): "
                        "beyond it they refuse, and their row is the refusal")
    p.add_argument("--skip", action="append", default=[], metavar="SHAPE:MODEL",
                   help="with --models: leave this model out at this shape (a row says so); repeatable")
    p.add_argument("--chunk-users", type=int, default=20_000,
                   help="training users per alternation of forward passes and top-100 (default 20,000)")
    p.add_argument("--out-dir", type=Path, help="results folder (default: benchmarks/results for a full run, "
                                                "none for a quick check)")
    p.add_argument("--merge", nargs="+", metavar="REPORT",
                   help="run nothing: put the rows of finished --models reports (their JSON) that ran in place of "
                        "the same rows of the --out-dir's (default benchmarks/results) paper_shapes_models report")
    p.add_argument("--worker", choices=("generate", "measure", "model"), help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    p.add_argument("--shape-json", help=argparse.SUPPRESS)
    p.add_argument("--prepared", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        import logging

        from recvae.distributed import watch_parent

        logging.getLogger("recvae.distributed").setLevel(logging.CRITICAL)  # its line speaks of torchrun
        watch_parent()  # the driver gone (even killed with SIGKILL): this process stops too
        result = {"generate": generate, "measure": measure, "model": measure_model}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    if args.merge:
        return merge_into(args.out_dir or RESULTS, args.merge)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown or not names:
        print(f"paper_shapes: error: --shapes: unknown {unknown}; expected a comma list out of {','.join(SHAPES)}",
              file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1 or args.chunk_users < BATCH or (args.items is not None and args.items < 2):
        print(f"paper_shapes: error: expected 0 < --scale <= 1, --chunk-users >= {BATCH} and --items >= 2",
              file=sys.stderr)
        return 2
    models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        print(f"paper_shapes: error: --models: unknown {unknown}; expected a comma list out of {','.join(MODELS)}",
              file=sys.stderr)
        return 2
    names = [n for n in SHAPES if n in names]  # smallest first: the growth is measured against it
    if models != list(DEFAULT_MODELS):
        return run_models(args, argv, names, models)
    if args.max_linear_gb is not None:
        print("paper_shapes: error: --max-linear-gb: no model of --models has a linear path", file=sys.stderr)
        return 2
    stop_workers_on_sigterm()
    full = args.scale == 1 and names == list(SHAPES) and args.items is None
    out = args.out_dir or (RESULTS if full else None)
    start = time.perf_counter()
    results = [run_shape(scaled(n, args.scale, args.items), args.chunk_users) for n in names]
    report = {
        "benchmark": "paper_shapes", "scale": args.scale, "seed": SEED, "k": K, "scoring_batch": BATCH,
        "chunk_users": args.chunk_users,
        "targets": {"peak_rss_gb_below": RSS_LIMIT_GB, "top_k_over_forward_at_most": TOP_K_LIMIT,
                    "growth_per_unit_at_most": GROWTH_LIMIT},
        "shapes": results, "analysis": analyse(results), "environment": environment(),
        "total_seconds": time.perf_counter() - start,
        "command": command(argv),
    }
    publish(report, markdown(report), out, "paper_shapes")
    return 0


def publish(report: dict, text: str, out: Path | None, name: str) -> None:
    """Print the markdown; with ``out``, write ``<out>/<name>.json`` and ``.md`` (atomically)."""
    print(text)
    if out is not None:
        from recvae.fileio import write_bytes, write_json

        write_json(Path(out) / f"{name}.json", report)
        write_bytes(Path(out) / f"{name}.md", text.encode())
        print(f"wrote {Path(out) / name}.json and .md")


def stop_workers_on_sigterm() -> None:
    """SIGTERM raises SystemExit here, so launch() stops the running worker before this process ends."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def command(argv: list[str] | None) -> str:
    """This run's command line, paths as seen from the repository."""
    return shlex.join(["python", "benchmarks/paper_shapes.py", *map(repo_relative, sys.argv[1:] if argv is None else argv)])


def runs_of(report: dict) -> list[dict]:
    """The runs a ``--models`` report was made from (command, environment, total seconds); a
    report of one run keeps them at its top level."""
    return report.get("runs") or [{k: report[k] for k in ("command", "environment", "total_seconds")}]


def merge_models_reports(base: dict, new: dict) -> dict:
    """``base`` with each row of ``new`` that ran (not left out with ``--skip``) in its place;
    a row keeps the index of its run in ``runs``. Both must measure the same data."""
    for key in ("scale", "items", "seed", "k", "scoring_batch", "chunk_users"):
        if base.get(key) != new.get(key):
            raise ValueError(f"--merge: the reports differ in {key} ({base.get(key)!r} and {new.get(key)!r}): "
                             "they did not measure the same data")
    merged = copy.deepcopy(base)
    runs = runs_of(base)
    merged["runs"] = runs + runs_of(new)
    merged["total_seconds"] = sum(r["total_seconds"] for r in merged["runs"])
    shapes = {s["name"]: s for s in merged["shapes"]}
    for shape in new["shapes"]:
        if shape["name"] not in shapes:
            shapes[shape["name"]] = {**shape, "models": {}}
        for name, row in shape["models"].items():
            if row["status"] != "not run":
                shapes[shape["name"]]["models"][name] = {**row, "run": row.get("run", 0) + len(runs)}
                merged["models"][name] = new["models"][name]
    merged["shapes"] = [shapes[n] for n in SHAPES if n in shapes]
    return merged


def merge_into(out: Path, reports: list[str]) -> int:
    """``--merge``: the rows of finished ``--models`` reports into ``<out>/paper_shapes_models``."""
    try:
        base = json.loads((out / "paper_shapes_models.json").read_text())
        for path in reports:
            base = merge_models_reports(base, json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        print(f"paper_shapes: error: {e}", file=sys.stderr)
        return 2
    publish(base, markdown_models(base), out, "paper_shapes_models")
    return 0


def run_models(args, argv: list[str] | None, names: list[str], models: list[str]) -> int:
    """``--models``: each model in its own measuring process per shape; paper_shapes_models.{json,md}."""
    from recvae.errors import ParameterError
    from recvae.models import make_model, model_class
    from recvae.models.registry import trains_by_epochs

    params = {}
    for name in models:  # checked here, before any data is generated
        cls = model_class(name)
        p = {"epochs": 1, "random_state": SEED, "device": "cpu"} if trains_by_epochs(cls) else {}
        if args.max_linear_gb is not None and "max_linear_gb" in cls._param_names():
            p["max_linear_gb"] = args.max_linear_gb
        try:
            make_model(name, **p)
        except ParameterError as e:
            print(f"paper_shapes: error: {name}: {e}", file=sys.stderr)
            return 2
        params[name] = p
    if args.max_linear_gb is not None and not any("max_linear_gb" in p for p in params.values()):
        print("paper_shapes: error: --max-linear-gb: no model of --models has a linear path", file=sys.stderr)
        return 2
    skip = set()
    for item in args.skip:
        shape, _, model = item.partition(":")
        if shape not in names or model not in params:
            print(f"paper_shapes: error: --skip {item}: expected SHAPE:MODEL with SHAPE out of --shapes "
                  f"({','.join(names)}) and MODEL out of --models ({','.join(params)})", file=sys.stderr)
            return 2
        skip.add((shape, model))
    out = args.out_dir or (RESULTS if args.scale == 1 and args.items is None else None)
    stop_workers_on_sigterm()
    start = time.perf_counter()
    results = [run_models_shape(scaled(n, args.scale, args.items), params, args.chunk_users, frozenset(skip))
               for n in names]
    report = {
        "benchmark": "paper_shapes_models", "scale": args.scale, "items": args.items, "seed": SEED, "k": K,
        "scoring_batch": BATCH, "chunk_users": args.chunk_users, "models": params, "shapes": results,
        "environment": environment(), "total_seconds": time.perf_counter() - start, "command": command(argv),
    }
    publish(report, markdown_models(report), out, "paper_shapes_models")
    failed = [f"{r['name']}: {n}" for r in results for n, m in r["models"].items() if m["status"] == "failed"]
    if failed:
        print(f"paper_shapes: failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
