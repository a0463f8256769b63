"""GPU check: ML-20M-shaped epochs of Mult-VAE, Mult-DAE and RecVAE on CUDA, EASE's fit, evaluation
and all-users top-100, written to ``benchmarks/results/gpu.json`` and ``gpu.md``.

Data: :func:`paper_table.synthetic_ml20m` (seed 0; 136,677 users x 20,108 items, ~9.8M
interactions, log-normal user lengths, Zipf-like item popularity) and the paper's strong
generalization split (10,000 validation and 10,000 test users). Steps, in this order (the
results files are rewritten after each, so a run stopped by a time limit keeps what it measured):

* 2 epochs each of Mult-VAE (default precision: bf16 where the GPU has it), Mult-VAE in fp32,
  Mult-DAE and RecVAE (one RecVAE epoch = 3 encoder passes + 1 decoder pass), with validation
  NDCG@100 after every epoch; the second epoch's seconds are reported (the first includes CUDA's
  warm-up), training alone and with its validation;
* evaluation of the 10,000 test users with the Mult-VAE model (Recall@20/50, NDCG@100);
* all-users top-100: ``recommend(N=100)`` for every user's history (136,677 users);
* EASE's fit (float64, on the CPU: numpy/LAPACK) and its evaluation on the test users;
* peak GPU memory per step and for the whole run.

Target (the speed issue): an ML-20M epoch of Mult-VAE under 0.5 s on one H100/H200.

    python benchmarks/gpu.py            # ML-20M shape; writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu.py --quick    # 20,000 users; prints only (unless --out is given)

Without CUDA it prints one line and exits 2. ``benchmarks/gpu.sh`` runs the CUDA tests, then this.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from paper_table import ML20M_SHAPE, synthetic_ml20m  # noqa: E402

from recvae.data.splits import strong_generalization_split  # noqa: E402
from recvae.evaluation import evaluate  # noqa: E402
from recvae.fileio import write_bytes, write_json  # noqa: E402
from recvae.models import EASE, MultDAE, MultVAE, RecVAE  # noqa: E402

QUICK_SHAPE = (20_000, ML20M_SHAPE[1], 1_470_000)  # ML-20M's items and user lengths, fewer users
TARGET_EPOCH_S = 0.5  # an ML-20M epoch of Mult-VAE on one H100/H200
EPOCHS = 2
TOP_K = 100
#: (key, label, class, parameters beyond the defaults)
TRAINING = (
    ("multvae", "Mult-VAE", MultVAE, {}),
    ("multvae-fp32", "Mult-VAE", MultVAE, {"precision": "fp32"}),
    ("multdae", "Mult-DAE", MultDAE, {}),
    ("recvae", "RecVAE", RecVAE, {}),
)


def no_cuda_line() -> str:
    build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no usable device"
    return f"gpu.py: no CUDA device (torch {torch.__version__}, {build}); nothing measured"


def gb(n_bytes: int) -> float:
    return n_bytes / 1e9


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "gpu_memory_gb": round(gb(props.total_memory), 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


class Report:
    """The results so far, written (json and md) after every step when ``out`` is set."""

    def __init__(self, out: Path | None, data: dict, start: float):
        self.out = out
        self.data = data
        self.start = start

    def step(self, key: str, fn, device: torch.device):
        """Run ``fn() -> dict`` as step ``key``: seconds, peak GPU memory, error; saved after."""
        self.data["status"], self.data["current_step"] = "running", key
        self.save()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - a failed step is recorded; the others still run
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        torch.cuda.synchronize(device)
        result["step_seconds"] = time.perf_counter() - t0
        result["peak_gpu_gb"] = gb(torch.cuda.max_memory_allocated(device))
        peak = self.data["peak_gpu"]
        peak["allocated_gb"] = max(peak["allocated_gb"], result["peak_gpu_gb"])
        peak["reserved_gb"] = max(peak["reserved_gb"], gb(torch.cuda.max_memory_reserved(device)))
        self.data["steps"][key] = result
        self.data["total_seconds"] = time.perf_counter() - self.start
        self.save()
        print(f"{key}: {summary_line(result)}", flush=True)
        return result

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.out.with_suffix(".json"), self.data)
        write_bytes(self.out.with_suffix(".md"), markdown(self.data).encode())


def summary_line(result: dict) -> str:
    if "error" in result:
        return f"failed ({result['error']})"
    if "epoch_seconds" in result:
        return (f"epochs {', '.join(f'{s:.2f}' for s in result['epoch_seconds'])} s, validation "
                f"{', '.join(f'{s:.2f}' for s in result['validation_seconds'])} s ({result['precision']}), "
                f"peak {result['peak_gpu_gb']:.2f} GB")
    return f"{result['seconds']:.2f} s, peak {result['peak_gpu_gb']:.2f} GB"


# -- steps -------------------------------------------------------------------------------------
def train_step(cls, params: dict, split, device: torch.device, holder: dict):
    def run() -> dict:
        model = cls(epochs=EPOCHS, random_state=0, device=str(device), **params)
        model.fit(split.train, validation=split.validation)
        hist = model.history_
        epoch = [h["seconds"] for h in hist]
        val = [h["val_seconds"] or 0.0 for h in hist]
        holder["model"] = model
        return {
            "precision": model.precision_,
            "params": {k: v for k, v in params.items()},
            "epoch_seconds": epoch,
            "validation_seconds": val,
            "second_epoch_seconds": epoch[-1],
            "second_epoch_with_validation_seconds": epoch[-1] + val[-1],
            "updates_per_epoch": hist[0]["step"],
            "validation_ndcg@100": [h["val_ndcg@100"] for h in hist],
            "losses": [h["loss"] for h in hist],
        }

    return run


def evaluation_step(model, users):
    def run() -> dict:
        res = evaluate(model, users, ks=(20, 50, 100))
        return {"seconds": res.seconds, "score_seconds": res.score_seconds, "n_users": res.n_users,
                "metrics": {k: v.mean for k, v in res.metrics.items()}}

    return run


def top_k_step(model, histories):
    def run() -> dict:
        t0 = time.perf_counter()
        ids, _ = model.recommend(histories, N=TOP_K)
        seconds = time.perf_counter() - t0
        assert ids.shape == (histories.shape[0], TOP_K) and (ids >= 0).all()
        return {"seconds": seconds, "n_users": int(histories.shape[0]), "k": TOP_K,
                "rows_per_second": histories.shape[0] * TOP_K / seconds}

    return run


def ease_fit_step(split, holder: dict):
    def run() -> dict:
        model = EASE().fit(split.train)
        holder["model"] = model
        return {"seconds": model.fit_seconds_, "n_items": model.n_items_, "dtype": "float64", "l2": model.l2}

    return run


# -- report ------------------------------------------------------------------------------------
def _f(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def target_sentence(data: dict) -> str:
    vae = data["steps"].get("multvae")
    if vae is None or "error" in vae:
        return f"**Target: an ML-20M epoch of Mult-VAE under {TARGET_EPOCH_S} s: not measured in this run.**"
    met = vae["second_epoch_seconds"] < TARGET_EPOCH_S
    return (f"**Target: an ML-20M epoch of Mult-VAE under {TARGET_EPOCH_S} s: {'met' if met else 'missed'}** "
            f"({vae['second_epoch_seconds']:.3f} s for the second epoch's {vae['updates_per_epoch']} updates in "
            f"{vae['precision']}; {vae['second_epoch_with_validation_seconds']:.3f} s with its validation).")


def markdown(data: dict) -> str:
    env, d = data["environment"], data["data"]
    steps = data["steps"]
    lines = [
        "# GPU check",
        "",
        f"{env['gpu']} ({env['gpu_memory_gb']} GB, compute capability {env['compute_capability']}), "
        f"torch {env['torch']}, CUDA {env['cuda']}" + (f", driver {env['driver']}" if env.get("driver") else "")
        + f"; {env['cpu_cores']} CPU cores (batches are built, top-k ranked and EASE fitted on the CPU). "
        f"Measured {data['date']}.",
        "",
        f"Data: {d['source']}: {d['n_users']:,} users x {d['n_items']:,} items, {d['nnz']:,} interactions; "
        f"strong generalization split (seed 0): {d['n_train_users']:,} training users, "
        f"{d['n_validation_users']:,} validation and {d['n_test_users']:,} test users"
        + (" (**--quick: not the ML-20M shape**)" if d.get("quick") else "") + ".",
        "",
    ]
    if data["status"] != "complete":
        during = f" during the step `{data['current_step']}`" if data.get("current_step") else ""
        lines += [f"**Incomplete: the run stopped{during} (a time limit?); the steps below are those that finished.**", ""]
    lines += [
        target_sentence(data),
        "",
        f"Training: {EPOCHS} epochs each, batches of 500 users, validation NDCG@100 on the validation users "
        "after every epoch; the second epoch is reported (the first includes warm-up). A RecVAE epoch is "
        "3 encoder passes and 1 decoder pass.",
        "",
        "| model | precision | epoch 1 s | epoch 2 s | validation s | epoch 2 + validation s | peak GPU GB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, _, _ in TRAINING:
        r = steps.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | {key} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {label} | {r['precision']} | {_f(r['epoch_seconds'][0])} | {_f(r['second_epoch_seconds'], 3)} | "
                     f"{_f(r['validation_seconds'][-1])} | {_f(r['second_epoch_with_validation_seconds'], 3)} | "
                     f"{_f(r['peak_gpu_gb'])} |")
    rows = []
    ev = steps.get("evaluation")
    if ev is not None:
        detail = ev.get("error") or (f"NDCG@100 {ev['metrics']['ndcg@100']:.4f}; scoring {ev['score_seconds']:.2f} s "
                                     "of it")
        rows.append((f"evaluation of {ev.get('n_users', d['n_test_users']):,} test users (Mult-VAE)", ev, detail))
    tk = steps.get("top100")
    if tk is not None:
        detail = tk.get("error") or f"{tk['rows_per_second']:,.0f} rows/s"
        rows.append((f"all-users top-{TOP_K}, {d['n_users']:,} users (Mult-VAE `recommend`)", tk, detail))
    ef = steps.get("ease_fit")
    if ef is not None:
        rows.append((f"EASE fit, {d['n_items']:,} items (float64, CPU)", ef, ef.get("error") or f"l2 {ef['l2']:g}"))
    ee = steps.get("ease_evaluation")
    if ee is not None:
        detail = ee.get("error") or f"NDCG@100 {ee['metrics']['ndcg@100']:.4f}"
        rows.append(("EASE evaluation of the test users", ee, detail))
    if rows:
        lines += ["", "| step | seconds | detail | peak GPU GB |", "|---|---:|---|---:|"]
        for label, r, detail in rows:
            lines.append(f"| {label} | {_f(r.get('seconds', r['step_seconds']))} | {detail} | {_f(r['peak_gpu_gb'])} |")
    peak = data["peak_gpu"]
    lines += [
        "",
        f"Peak GPU memory over the run: {peak['allocated_gb']:.2f} GB allocated by tensors, "
        f"{peak['reserved_gb']:.2f} GB reserved by the caching allocator. Data generation and split: "
        f"{d['seconds']:.1f} s. Total: {data.get('total_seconds', 0.0):.0f} s.",
        "",
        f"Produced by `{data['command']}`; `bash benchmarks/gpu.sh` runs the CUDA tests, then this.",
    ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 users instead of ML-20M's 136,677 (a smoke run)")
    ap.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    ap.add_argument("--no-ease", action="store_true", help="skip EASE's fit and evaluation")
    ap.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/gpu; "
                    "--quick writes nothing unless given)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_line(), file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"gpu.py: --device {args.device}: expected a CUDA device", file=sys.stderr)
        return 2
    if device.index is not None:
        torch.cuda.set_device(device)
    out = Path(args.out) if args.out else (None if args.quick else REPO / "benchmarks" / "results" / "gpu")
    torch.zeros(1, device=device)  # CUDA's context before any timing

    t0 = time.perf_counter()
    shape = QUICK_SHAPE if args.quick else ML20M_SHAPE
    data = synthetic_ml20m(seed=0, shape=shape)
    split = strong_generalization_split(data, seed=0)
    cols = np.searchsorted(np.asarray(data.item_ids), np.asarray(split.item_ids))
    everyone = data.matrix[:, cols].tocsr()  # every user's history over the training items
    data_seconds = time.perf_counter() - t0
    print(f"data: {data.n_users:,} users x {data.n_items:,} items, {data.matrix.nnz:,} interactions; "
          f"{split.train.n_users:,} training users ({data_seconds:.1f} s)", flush=True)

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(out, {
        "measured": True,
        "status": "running",
        "current_step": None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python benchmarks/gpu.py {argv_text}".strip(),
        "environment": environment(device),
        "data": {
            "source": "synthetic ML-20M-shaped data (benchmarks/paper_table.py, seed 0)",
            "quick": args.quick,
            "n_users": data.n_users, "n_items": int(split.train.n_items), "nnz": int(data.matrix.nnz),
            "n_train_users": split.train.n_users, "n_validation_users": split.validation.n_users,
            "n_test_users": split.test.n_users, "seconds": data_seconds,
        },
        "target": {"multvae_epoch_seconds": TARGET_EPOCH_S},
        "steps": {},
        "peak_gpu": {"allocated_gb": 0.0, "reserved_gb": 0.0},
    }, start=t0)

    vae = None
    for key, _, cls, params in TRAINING:
        holder: dict = {}
        report.step(key, train_step(cls, params, split, device, holder), device)
        if key == "multvae":
            vae = holder.get("model")  # evaluated and asked for top-100 below
        holder.clear()
        torch.cuda.empty_cache()
    if vae is not None:
        report.step("evaluation", evaluation_step(vae, split.test), device)
        report.step("top100", top_k_step(vae, everyone), device)
        del vae
        torch.cuda.empty_cache()
    if not args.no_ease:
        holder: dict = {}
        report.step("ease_fit", ease_fit_step(split, holder), device)
        if "model" in holder:
            report.step("ease_evaluation", evaluation_step(holder.pop("model"), split.test), device)

    steps = report.data["steps"]
    vae_step = steps.get("multvae", {})
    report.data["target"]["multvae_second_epoch_seconds"] = vae_step.get("second_epoch_seconds")
    report.data["target"]["met"] = (vae_step.get("second_epoch_seconds") is not None
                                    and vae_step["second_epoch_seconds"] < TARGET_EPOCH_S)
    report.data["status"], report.data["current_step"] = "complete", None
    report.data["total_seconds"] = time.perf_counter() - t0
    report.save()
    print(markdown(report.data))
    if out is not None:
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    failed = [k for k, r in steps.items() if "error" in r]
    if failed:
        print(f"gpu.py: failed steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
